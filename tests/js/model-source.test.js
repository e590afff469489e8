// Which splat file the 3D view loads, and the training preview's polling rule and label
// (static/model-source.js).

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  AUTOLOAD_BYTES,
  loadingText,
  modelPanelAvailable,
  modelSource,
  previewChanged,
  previewLabel,
  previewPath,
  previewVersion,
  shouldPollPreview,
} from "../../static/model-source.js";
import { makeTask } from "./task-fixture.js";

const MIB = 1024 * 1024;

function trained(training) {
  return makeTask({
    status: "training_completed",
    results: { dataset: true, model: true },
    metadata: { training: { ply_size_bytes: 120 * MIB, gaussian_count: 500000, ...training } },
  });
}

describe("the file the splat view loads", () => {
  test("the SPZ when training wrote one, on desktops and phones alike", () => {
    const task = trained({ spz_path: "model.spz", spz_bytes: 9 * MIB });
    for (const phone of [false, true]) {
      assert.deepEqual(modelSource(task, { phone }), {
        type: "spz",
        path: `download/${task.task_id}/spz`,
        size: 9 * MIB,
        confirm: false,
      });
    }
  });

  test("the .ply when there is no SPZ; a phone asks before a large one", () => {
    const task = trained({});
    const desktop = modelSource(task);
    assert.equal(desktop.type, "ply");
    assert.equal(desktop.path, `download/${task.task_id}/ply`);
    assert.equal(desktop.size, 120 * MIB);
    assert.equal(desktop.confirm, false);
    assert.equal(modelSource(task, { phone: true }).confirm, true);
    const huge = trained({ ply_size_bytes: AUTOLOAD_BYTES.desktop + 1 });
    assert.equal(modelSource(huge).confirm, true);
  });

  test("an SPZ of unknown size loads without asking", () => {
    const source = modelSource(trained({ spz_path: "model.spz" }), { phone: true });
    assert.deepEqual([source.type, source.size, source.confirm], ["spz", 0, false]);
  });

  test("download progress in bytes and percent", () => {
    assert.equal(loadingText("the model", 512 * 1024, 2 * MIB), "Loading the model: 512 KiB of 2.0 MiB (25 %)");
    assert.equal(loadingText("the preview", 2048, 0), "Loading the preview: 2.0 KiB");
  });
});

describe("training previews", () => {
  const training = (fields = {}) =>
    makeTask({ status: "training", active: true, results: { dataset: true, model: false }, ...fields });

  test("polled only while the panel is shown and the task trains without a final model", () => {
    assert.equal(shouldPollPreview(training(), true), true);
    assert.equal(shouldPollPreview(training(), false), false);
    assert.equal(shouldPollPreview(trained({}), true), false);
    assert.equal(shouldPollPreview(makeTask({ status: "failed" }), true), false);
    assert.equal(shouldPollPreview(null, true), false);
    assert.equal(previewPath(training()).endsWith("/preview.spz"), true);
  });

  test("the model panel opens for a preview the server reports, and for the model", () => {
    assert.equal(modelPanelAvailable(training()), false);
    assert.equal(modelPanelAvailable(training({ metadata: { training_preview: { step: 1 } } })), true);
    assert.equal(modelPanelAvailable(trained({})), true);
    const ended = makeTask({ status: "failed", metadata: { training_preview: { step: 1 } } });
    assert.equal(modelPanelAvailable(ended), false);
  });

  test("a preview is new when its ETag (else Last-Modified) differs from the shown one", () => {
    const headers = new Headers({ ETag: '"abc"', "Last-Modified": "Tue, 01 Dec 2026 07:00:00 GMT" });
    const get = (name) => headers.get(name);
    assert.equal(previewVersion(get), '"abc"');
    const dated = new Headers({ "Last-Modified": "Tue, 01 Dec 2026 07:00:00 GMT" });
    assert.equal(previewVersion((n) => dated.get(n)), "Tue, 01 Dec 2026 07:00:00 GMT");
    assert.equal(previewVersion(() => null), null);
    assert.equal(previewChanged(null, '"abc"'), true);
    assert.equal(previewChanged('"abc"', '"abc"'), false);
    assert.equal(previewChanged('"abc"', '"abd"'), true);
    assert.equal(previewChanged('"abc"', null), false);
  });

  test("the label: the headers' step first, then the task's, else just 'Preview'", () => {
    const task = training({ metadata: { training_preview: { step: 2000, total: 7000 } } });
    const headers = new Headers({ "X-Preview-Step": "6000", "X-Preview-Total": "30000" });
    assert.equal(previewLabel((n) => headers.get(n), task), "Preview at step 6,000 of 30,000");
    assert.equal(previewLabel(() => null, task), "Preview at step 2,000 of 7,000");
    assert.equal(previewLabel(null, training()), "Preview");
    const stepOnly = new Headers({ "X-Preview-Step": "500" });
    assert.equal(previewLabel((n) => stepOnly.get(n), training()), "Preview at step 500");
  });
});
