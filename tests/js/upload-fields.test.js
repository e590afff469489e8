// The upload's rules (static/upload-fields.js): the query fields sent, the problems caught
// before sending, and the progress line.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { createUploadMeter, uploadErrorTitle, uploadFields } from "../../static/upload-fields.js";

const EMPTY = {
  minFrames: "",
  maxFrames: "",
  preset: "",
  iterations: "7000",
  autoTraining: true,
  downSample: "1",
  keepCheckpoint: false,
};

describe("upload fields", () => {
  test("an untouched form sends only auto_training: the server's defaults apply", () => {
    assert.deepEqual(uploadFields(EMPTY), { params: { auto_training: "true" }, problems: [] });
  });

  test("every option the form sets reaches the query", () => {
    const { params, problems } = uploadFields({
      ...EMPTY,
      minFrames: " 10 ",
      maxFrames: "30",
      preset: "fast",
      autoTraining: false,
      downSample: "4",
      keepCheckpoint: true,
    });
    assert.deepEqual(problems, []);
    assert.deepEqual(params, {
      min_frames: 10,
      max_frames: 30,
      preset: "fast",
      auto_training: "false",
      down_sample_factor: "4",
      keep_checkpoint: "true",
    });
  });

  test("a custom number of steps is sent as iterations, not as a preset", () => {
    const { params } = uploadFields({ ...EMPTY, preset: "custom", iterations: "12000" });
    assert.equal(params.iterations, 12000);
    assert.equal("preset" in params, false);
  });

  test("out-of-range and non-integer values are problems, naming the field to fix", () => {
    const { problems } = uploadFields({ ...EMPTY, minFrames: "2", maxFrames: "10.5" });
    assert.deepEqual(
      problems.map((p) => p.field),
      ["minFrames", "maxFrames"],
    );
    assert.equal(
      problems[0].text,
      "The least number of frames must be a whole number from 3 to 2000.",
    );
  });

  test("at least more than at most is caught", () => {
    const { params, problems } = uploadFields({ ...EMPTY, minFrames: "50", maxFrames: "10" });
    assert.deepEqual(problems, [
      { field: "minFrames", text: "“At least” must not be more than “At most”." },
    ]);
    assert.equal(params.min_frames, 50); // the values are read; the problem stops the upload
  });

  test("custom steps left empty must be filled in", () => {
    const { problems } = uploadFields({ ...EMPTY, preset: "custom", iterations: "" });
    assert.deepEqual(problems, [
      { field: "iterations", text: "Enter the number of training steps (100 to 200,000)." },
    ]);
    const tooFew = uploadFields({ ...EMPTY, preset: "custom", iterations: "50" }).problems;
    assert.equal(tooFew[0].field, "iterations");
  });
});

describe("the upload meter", () => {
  test("the first sample gives bytes and share only", () => {
    const meter = createUploadMeter();
    assert.equal(meter.line(0, 904192, 1000), "0 B of 883 KiB (0 %)");
  });

  test("speed and time left come from the samples of the last seconds", () => {
    const meter = createUploadMeter();
    const total = 10 * 1024 * 1024;
    meter.line(0, total, 0);
    // 1 MiB in one second: 9 MiB to go at 1 MiB/s.
    assert.equal(
      meter.line(1024 * 1024, total, 1000),
      "1.0 MiB of 10 MiB (10 %) · 1.0 MiB/s · 9 s left",
    );
  });

  test("old samples leave the window, so the speed follows a change", () => {
    const meter = createUploadMeter(3000);
    const total = 100 * 1024 * 1024;
    const mib = 1024 * 1024;
    meter.line(0, total, 0);
    assert.match(meter.line(10 * mib, total, 1000), /· 10 MiB\/s ·/); // fast at first
    meter.line(11 * mib, total, 5000);
    // Samples older than 3 s are gone: the speed is that of the last second, 1 MiB/s.
    assert.match(meter.line(12 * mib, total, 6000), /· 1\.0 MiB\/s · 2 min left$/);
  });
});

test("refused uploads get a headline by status", () => {
  assert.equal(uploadErrorTitle(413), "The video is too large.");
  assert.equal(uploadErrorTitle(415), "This file cannot be used.");
  assert.equal(uploadErrorTitle(500), "The upload failed.");
});
