// The pure task rules of static/task-facts.js: what the page says about a task and what it
// offers, from the server's task object alone.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import * as facts from "../../static/task-facts.js";
import { at, makeTask } from "./task-fixture.js";

const TRAINING_OFF = { training: { available: false, detail: "no CUDA device" } };
const TRAINING_ON = { training: { available: true } };

describe("actions come from the server's answer", () => {
  test("only the actions the server lists are shown", () => {
    const task = makeTask({ status: "training", active: true, allowed_actions: ["cancel"] });
    const view = facts.actionsView(task);
    assert.equal(view.cancel.shown, true);
    assert.equal(view.retry.shown, false);
    assert.equal(view.train.shown, false);
    assert.equal(view.delete.shown, false);
  });

  test("the status alone offers nothing: a failed task without allowed actions shows none", () => {
    const view = facts.actionsView(makeTask({ status: "failed", allowed_actions: [] }));
    for (const key of ["cancel", "retry", "train", "delete", "zip", "ply"]) {
      assert.equal(view[key].shown, false, key);
    }
  });

  test("a missing allowed_actions field allows nothing", () => {
    const task = makeTask({ status: "cancelled" });
    delete task.allowed_actions;
    assert.equal(facts.can(task, "retry"), false);
  });

  test("downloads follow `results`: dataset ZIP before the model, then ZIP and .ply", () => {
    const dataset = makeTask({ results: { dataset: true, model: false } });
    let view = facts.actionsView(dataset);
    assert.deepEqual(
      [view.zip.shown, view.zip.label, view.ply.shown],
      [true, "Download dataset (ZIP)", false],
    );
    assert.equal(view.zip.path, `download/${dataset.task_id}`);
    const model = makeTask({ results: { dataset: false, model: true } });
    view = facts.actionsView(model);
    assert.deepEqual(
      [view.zip.shown, view.zip.label, view.ply.shown],
      [true, "Download ZIP", true],
    );
    assert.equal(view.ply.path, `download/${model.task_id}/ply`);
  });

  test("cancelling a task that only waits in line is called removing it from the queue", () => {
    const waiting = makeTask({ queued_for: "preprocessing", allowed_actions: ["cancel"] });
    assert.equal(facts.actionsView(waiting).cancel.label, "Remove from queue");
    const running = makeTask({ status: "training", queued_for: null, allowed_actions: ["cancel"] });
    assert.equal(facts.actionsView(running).cancel.label, "Cancel");
  });

  test("Start training is disabled, with the reason, when the server cannot train", () => {
    const task = makeTask({ status: "preprocessing_completed", allowed_actions: ["train"] });
    const view = facts.actionsView(task, TRAINING_OFF);
    assert.equal(view.train.shown, true);
    assert.equal(view.train.disabled, true);
    assert.equal(view.train.title, "Training is not available: no CUDA device");
    assert.equal(facts.actionsView(task, TRAINING_ON).train.disabled, false);
  });

  test("active and the model come from the answer too", () => {
    assert.equal(facts.isActive(makeTask({ status: "training", active: false })), false);
    assert.equal(facts.isActive(makeTask({ status: "failed", active: true })), true);
    const done = makeTask({
      status: "training_completed",
      results: { dataset: true, model: false },
    });
    assert.equal(facts.hasModel(done), false);
  });
});

describe("the stage line of the board", () => {
  test("waiting tasks give their place in line", () => {
    const task = makeTask({ status: "pending", queue_position: 2, queued_for: "preprocessing" });
    assert.equal(facts.stageLine(task), "Waiting to be preprocessed · #2 in line");
    const gpu = makeTask({
      status: "preprocessing_completed",
      queued_for: "training",
      queue_position: 1,
    });
    assert.equal(facts.stageLine(gpu), "Waiting for the GPU · #1 in line");
  });

  test("on a Ray cluster: why a queued task waits, and the node a stage runs on", () => {
    const message = "waiting for a free GPU in the cluster (0 of 4 free)";
    const gpu = makeTask({
      status: "preprocessing_completed",
      queued_for: "training",
      queue_position: 1,
      message,
    });
    assert.equal(
      facts.stageLine(gpu),
      "Waiting for a free GPU in the cluster (0 of 4 free) · #1 in line",
    );
    const pending = makeTask({
      status: "pending",
      queued_for: "preprocessing",
      queue_position: 3,
      message: "waiting for the Ray cluster: unreachable",
    });
    assert.equal(facts.stageLine(pending), "Waiting for the Ray cluster: unreachable · #3 in line");
    const node = "gpu-2 (10.0.0.3, node ab12cd34)";
    const running = makeTask({
      status: "training",
      node,
      progress: { stage: "training", label: "Training", current: 10, total: 100, percent: 10 },
    });
    assert.equal(facts.stageLine(running), "Training 10/100 · on gpu-2");
    assert.match(facts.progressFacts(running), /Step 10 of 100 · on node gpu-2 \(10\.0\.0\.3/);
    assert.equal(facts.nodeHost(node), "gpu-2");
    assert.equal(facts.nodeHost("ab12cd34ef56"), "ab12cd34ef56");
    assert.equal(facts.nodeHost(null), "");
  });

  test("a running stage gives its label, step counts and the server's time left", () => {
    const task = makeTask({
      status: "training",
      progress: {
        stage: "training",
        label: "Training",
        current: 350,
        total: 700,
        percent: 50,
        eta_seconds: 125,
        updated_at: "2025-05-01T10:00:00Z",
      },
    });
    const now = at("2025-05-01T10:00:05Z"); // five seconds after the estimate was made
    assert.equal(
      facts.stageLine(task, { now, eta: facts.createEta() }),
      "Training 350/700 · 2 min left",
    );
  });

  test("a dataset at rest says whether it can be trained here", () => {
    const task = makeTask({
      status: "preprocessing_completed",
      metadata: { preprocessing: { frames_registered: 12 } },
    });
    assert.equal(
      facts.stageLine(task, { health: TRAINING_ON }),
      "12 cameras placed · ready to train",
    );
    assert.equal(
      facts.stageLine(task, { health: TRAINING_OFF }),
      "12 cameras placed · training not available here",
    );
  });

  test("failures show the first line of the error; results their size", () => {
    const failed = makeTask({ status: "failed", error_message: "Too few frames placed\nmore" });
    assert.equal(facts.stageLine(failed), "Too few frames placed");
    const done = makeTask({
      status: "training_completed",
      metadata: { training: { gaussian_count: 300, ply_size_bytes: 1536 } },
    });
    assert.equal(facts.stageLine(done), "300 Gaussians · 1.5 KiB");
    assert.equal(facts.stageLine({ ...done, expired: true }), "Files removed by the cleanup");
  });
});

describe("time left", () => {
  test("the server's estimate counts down from when it was made, never below zero", () => {
    const eta = facts.createEta();
    const task = makeTask({
      status: "preprocessing",
      progress: {
        stage: "preprocessing",
        percent: 10,
        eta_seconds: 60,
        updated_at: "2025-05-01T10:00:00Z",
      },
    });
    assert.equal(eta.secondsLeft(task, at("2025-05-01T10:00:20Z")), 40);
    assert.equal(eta.secondsLeft(task, at("2025-05-01T10:05:00Z")), 0);
  });

  test("without one it is estimated from how fast the percentage moves", () => {
    const eta = facts.createEta();
    const progress = (percent) =>
      makeTask({
        task_id: "t",
        status: "training",
        progress: { stage: "training", percent, eta_seconds: null },
      });
    const t0 = at("2025-05-01T10:00:00Z");
    assert.equal(eta.secondsLeft(progress(20), t0), null); // first sight: no speed yet
    assert.equal(eta.secondsLeft(progress(21), t0 + 10_000), null); // moved under 2 points
    // 20 -> 30 % in 10 s: 1 % per second, 70 % to go.
    assert.equal(eta.secondsLeft(progress(30), t0 + 10_000), 70);
  });

  test("a new stage, or a percentage that went back, starts the estimate over", () => {
    const eta = facts.createEta();
    const t0 = 1_000_000;
    const task = (stage, percent) =>
      makeTask({ task_id: "t", status: stage, progress: { stage, percent } });
    eta.secondsLeft(task("preprocessing", 50), t0);
    assert.equal(eta.secondsLeft(task("training", 60), t0 + 10_000), null);
    assert.equal(eta.secondsLeft(task("training", 70), t0 + 20_000), 30);
    assert.equal(eta.secondsLeft(task("training", 5), t0 + 30_000), null);
  });

  test("nothing is estimated for a task that is not running", () => {
    const eta = facts.createEta();
    const task = makeTask({ status: "pending", progress: { percent: 0, eta_seconds: 30 } });
    assert.equal(eta.secondsLeft(task, Date.now()), null);
  });
});

describe("bars, times, order and filters", () => {
  test("the board's bar is full for results, empty while waiting, else the stage's percent", () => {
    assert.equal(facts.barPercent(makeTask({ status: "training_completed" })), 100);
    assert.equal(facts.barPercent(makeTask({ status: "preprocessing_completed" })), 100);
    const queued = makeTask({ status: "preprocessing_completed", queued_for: "training" });
    assert.equal(facts.barPercent(queued), 0);
    assert.equal(facts.barTone(queued), "busy");
    const running = makeTask({ status: "training", progress: { percent: 42.5 } });
    assert.equal(facts.barPercent(running), 42.5);
    assert.equal(facts.rowPercent(running), "43 %");
    assert.equal(facts.rowPercent(makeTask({ status: "failed" })), "");
    assert.equal(facts.barTone(makeTask({ status: "failed" })), "danger");
  });

  test("the time line says how long it took, or how long it has been running", () => {
    const now = at("2025-05-01T10:30:00Z");
    const finished = makeTask({
      status: "training_completed",
      created_at: "2025-05-01T10:00:00Z",
      started_at: "2025-05-01T10:01:00Z",
      finished_at: "2025-05-01T10:03:30Z",
    });
    assert.equal(facts.timeLine(finished, now), "uploaded 30 minutes ago · took 2 min 30 s");
    const running = makeTask({
      status: "training",
      active: true,
      created_at: "2025-05-01T10:29:00Z",
      started_at: "2025-05-01T10:29:15Z",
    });
    assert.equal(facts.timeLine(running, now), "uploaded 1 minute ago · running 45 s");
  });

  test("the board is newest first, ties broken by id", () => {
    const old = makeTask({ task_id: "b", created_at: "2025-05-01T09:00:00Z" });
    const newer = makeTask({ task_id: "a", created_at: "2025-05-01T11:00:00Z" });
    const twinA = makeTask({ task_id: "c", created_at: "2025-05-01T10:00:00Z" });
    const twinB = makeTask({ task_id: "d", created_at: "2025-05-01T10:00:00Z" });
    const order = [old, twinA, newer, twinB].sort(facts.newestFirst).map((t) => t.task_id);
    assert.deepEqual(order, ["a", "d", "c", "b"]);
  });

  test("filters", () => {
    const waiting = makeTask({
      status: "preprocessing_completed",
      queued_for: "training",
      active: true,
    });
    const resting = makeTask({ status: "preprocessing_completed" });
    const failed = makeTask({ status: "failed" });
    assert.equal(facts.matchesFilter(waiting, "active"), true);
    assert.equal(facts.matchesFilter(resting, "active"), false);
    assert.equal(facts.matchesFilter(resting, "done"), true);
    assert.equal(facts.matchesFilter(failed, "problem"), true);
    assert.equal(facts.matchesFilter(failed, "done"), false);
    assert.equal(facts.matchesFilter(failed, "all"), true);
  });
});

describe("the step of the flow and the views", () => {
  test("each status puts the task at one step", () => {
    const steps = (fields) => facts.stepStates(makeTask(fields));
    assert.deepEqual(steps({ status: "pending" }), ["done", "waiting", "todo", "todo"]);
    assert.deepEqual(steps({ status: "preprocessing" }), ["done", "current", "todo", "todo"]);
    assert.deepEqual(steps({ status: "preprocessing_completed", queued_for: "training" }), [
      "done",
      "done",
      "waiting",
      "todo",
    ]);
    assert.deepEqual(steps({ status: "training" }), ["done", "done", "current", "todo"]);
    assert.deepEqual(steps({ status: "training_completed" }), ["done", "done", "done", "done"]);
  });

  test("a failure or a cancel is shown at the stage it stopped in", () => {
    const inTraining = { stage: "training" };
    const inPre = { stage: "preprocessing" };
    assert.deepEqual(facts.stepStates(makeTask({ status: "failed", progress: inTraining })), [
      "done",
      "done",
      "failed",
      "todo",
    ]);
    assert.deepEqual(facts.stepStates(makeTask({ status: "cancelled", progress: inPre })), [
      "done",
      "stopped",
      "todo",
      "todo",
    ]);
  });

  test("tabs: the log always, the dataset views once preprocessed, the model once trained", () => {
    const fresh = makeTask({ status: "preprocessing" });
    assert.deepEqual([...facts.availableTabs(fresh)], ["log"]);
    assert.equal(facts.defaultTab(fresh), "log");
    const dataset = makeTask({ status: "training", results: { dataset: true, model: false } });
    assert.deepEqual([...facts.availableTabs(dataset)].sort(), ["frames", "log", "sparse"]);
    assert.equal(facts.defaultTab(dataset), "sparse");
    const model = { ...dataset, results: { dataset: false, model: true } };
    assert.deepEqual([...facts.availableTabs(model)].sort(), ["frames", "log", "model", "sparse"]);
    assert.equal(facts.defaultTab(model), "model");
    // The status alone opens nothing: the cleanup removed the files, the server says none.
    const removed = {
      ...model,
      status: "training_completed",
      results: { dataset: false, model: false },
    };
    assert.deepEqual([...facts.availableTabs(removed)], ["log"]);
  });
});

describe("the progress block", () => {
  test("a running training gives steps, time left, speed, loss and PSNR", () => {
    const task = makeTask({
      status: "training",
      active: true,
      progress: {
        stage: "training",
        label: "Densifying",
        current: 120,
        total: 700,
        percent: 17.1,
        rate: 35.2,
        loss: 0.01234,
        psnr: 24.06,
        eta_seconds: 16,
        updated_at: "2025-05-01T10:00:00Z",
      },
    });
    const view = facts.progressView(task, {
      now: at("2025-05-01T10:00:00Z"),
      eta: facts.createEta(),
    });
    assert.equal(view.shown, true);
    assert.equal(view.waiting, false);
    assert.equal(view.label, "Training · Densifying");
    assert.equal(view.percentText, "17 %");
    assert.equal(
      view.facts,
      "Step 120 of 700 · 20 s left · 35 steps/s · loss 0.0123 · PSNR 24.1 dB",
    );
  });

  test("a waiting task says how many are ahead of it", () => {
    const next = makeTask({ status: "pending", active: true, queue_position: 1 });
    assert.equal(facts.progressView(next).facts, "Next in line");
    assert.equal(facts.progressView(next).waiting, true);
    const third = makeTask({
      status: "preprocessing_completed",
      active: true,
      queued_for: "training",
      queue_position: 3,
    });
    const view = facts.progressView(third);
    assert.equal(view.label, "Training");
    assert.equal(view.facts, "2 tasks ahead in line");
  });

  test("a task at rest has no progress block", () => {
    assert.equal(facts.progressView(makeTask({ status: "failed" })).shown, false);
  });
});

describe("announcements", () => {
  test("status changes worth a toast", () => {
    const before = makeTask({ status: "preprocessing" });
    const ready = { ...before, status: "preprocessing_completed" };
    assert.equal(
      facts.statusChangeNote(before, ready).text,
      "walk.mp4: frames and cameras are ready.",
    );
    const queued = { ...ready, queued_for: "training" };
    assert.equal(facts.statusChangeNote(before, queued), null);
    const failed = { ...before, status: "failed", error_message: "No camera poses\ntrace" };
    assert.deepEqual(facts.statusChangeNote(before, failed), {
      text: "walk.mp4 failed: No camera poses",
      tone: "danger",
      ms: 10000,
    });
  });

  test("progress is announced once per tenth", () => {
    const task = (percent) => makeTask({ status: "training", progress: { percent } });
    assert.equal(
      facts.progressAnnouncement(task(41)).key,
      facts.progressAnnouncement(task(49)).key,
    );
    assert.notEqual(
      facts.progressAnnouncement(task(49)).key,
      facts.progressAnnouncement(task(50)).key,
    );
    assert.equal(facts.progressAnnouncement(task(57)).text, "Training 50 percent");
    assert.equal(facts.progressAnnouncement(makeTask({ status: "failed" })), null);
  });
});

describe("training previews and the SPZ download", () => {
  test("a reported preview opens the 3D model tab while training, and it comes first", () => {
    const task = makeTask({
      status: "training",
      results: { dataset: true, model: false },
      metadata: { training_preview: { step: 1000, total: 7000 } },
    });
    assert.equal(facts.hasPreview(task), true);
    assert.equal(facts.availableTabs(task).has("model"), true);
    assert.equal(facts.defaultTab(task), "model");
    const ended = { ...task, status: "cancelled" };
    assert.equal(facts.availableTabs(ended).has("model"), false);
  });

  test("the .spz link shows only when training wrote one", () => {
    const model = makeTask({ results: { dataset: true, model: true } });
    assert.equal(facts.actionsView(model).spz.shown, false);
    const spz = { ...model, metadata: { training: { spz_path: "model.spz" } } };
    assert.deepEqual(facts.actionsView(spz).spz, { shown: true, path: `download/${model.task_id}/spz` });
  });
});
