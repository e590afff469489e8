// The detail view's texts (static/task-summary.js) and the health banner's (static/health.js).

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { healthNotes } from "../../static/health.js";
import {
  factRows,
  failureView,
  notices,
  preprocessingSummary,
  psnrVerdict,
  qualityView,
  resolutionText,
  trainingLine,
  trainingStats,
  videoLine,
} from "../../static/task-summary.js";
import { makeTask } from "./task-fixture.js";

describe("the preprocessing verdict", () => {
  test("frames kept, placed and points, with the reprojection error", () => {
    const summary = preprocessingSummary({
      frames_kept: 12,
      frames_decoded: 360,
      frames_registered: 12,
      points3D: 147,
      mean_reprojection_error_px: 0.4213,
    });
    assert.equal(
      summary.sentence,
      "12 frames were kept out of 360 decoded, 12 of them placed in 3D, with 147 points (mean reprojection error 0.42 px).",
    );
    assert.equal(
      summary.verdict,
      "Camera tracking worked well: almost every frame got a position.",
    );
    assert.deepEqual(summary.stats[1], ["Cameras placed", "12 / 12", "100 %"]);
  });

  test("few cameras placed warns of gaps; no summary before preprocessing", () => {
    const summary = preprocessingSummary({ frames_kept: 20, frames_registered: 8, points3D: 5 });
    assert.equal(summary.verdict, "Only some frames got a position; the result may have gaps.");
    assert.deepEqual(summary.stats[3], ["Reprojection error", "–", null]);
    assert.equal(preprocessingSummary(undefined), null);
  });

  test("the training numbers", () => {
    const rows = trainingStats({
      gaussian_count: 300,
      iterations: 700,
      seconds: 75,
      ply_size_bytes: 2048,
    });
    assert.deepEqual(
      rows.map((r) => r[1]),
      ["300", "700", "1 min 15 s", "2.0 KiB"],
    );
    assert.equal(trainingStats(null), null);
  });
});

describe("task details", () => {
  test("video and training lines", () => {
    assert.equal(
      videoLine({ width: 1920, height: 1080, duration: 12, fps: 29.97, codec: "h264" }, 1536),
      "1920 × 1080 · 12 s · 29.97 fps · H264 · 1.5 KiB",
    );
    assert.equal(videoLine({}), "–");
    assert.equal(
      trainingLine({
        iterations: 700,
        down_sample_factor: 2,
        keep_checkpoint: true,
        auto_training: false,
      }),
      "700 steps · 1/2 resolution · checkpoint kept · on request",
    );
  });

  test("the list ends with the task id", () => {
    const task = makeTask({ status: "failed" });
    const rows = factRows(task);
    assert.deepEqual(rows[0], ["Status", "Failed (failed)"]);
    assert.deepEqual(rows.at(-1), ["Task id", task.task_id]);
  });
});

describe("failure and notices", () => {
  test("a failure's first line is the headline, the rest is kept as printed", () => {
    const task = makeTask({
      status: "failed",
      progress: { stage: "training" },
      error_message: "Trainer exited with 1\n  File x\nValueError: y\n",
    });
    assert.deepEqual(failureView(task), {
      title: "Training failed. ",
      headline: "Trainer exited with 1",
      more: "File x\nValueError: y",
    });
    assert.equal(failureView(makeTask({ status: "cancelled", error_message: "x" })), null);
  });

  test("a dataset at rest invites training only when the server allows it", () => {
    const resting = makeTask({ status: "preprocessing_completed", allowed_actions: ["train"] });
    assert.deepEqual(notices(resting, { training: { available: true } }), [
      "Frames and camera positions are ready. Start training when you like.",
    ]);
    assert.deepEqual(notices({ ...resting, allowed_actions: ["delete"] }), []);
    assert.match(
      notices(resting, { training: { available: false, detail: "no GPU" } })[0],
      /no GPU/,
    );
  });

  test("removed files and cancels are explained", () => {
    const task = makeTask({ status: "cancelled", expired: true });
    assert.equal(notices(task).length, 2);
  });
});

test("the health banner names what this server cannot do", () => {
  const healthy = {
    preprocessing: { available: true },
    training: { available: true },
    disk_free_bytes: 50 * 1024 ** 3,
  };
  assert.deepEqual(healthNotes(healthy), []);
  const notes = healthNotes({
    preprocessing: { available: false, detail: "pycolmap missing" },
    training: { available: false, detail: "no CUDA" },
    disk_free_bytes: 1024 ** 3,
  });
  assert.equal(notes.length, 3);
  assert.equal(notes[0], "Preprocessing cannot run on this server: pycolmap missing");
  assert.match(notes[2], /1\.0 GiB free/);
});

describe("the model's quality in words", () => {
  const held = {
    psnr: 27.43,
    ssim: 0.8712,
    lpips: 0.2,
    eval_images: 12,
    split: "held_out",
    step: 7000,
    source: "metrics_csv",
    note: "PSNR and SSIM on 12 held-out frames the model never saw",
  };

  test("held-out frames give a verdict, SSIM alongside", () => {
    const view = qualityView(held);
    assert.equal(view.sentence, "27.4 dB PSNR on 12 frames the model never saw — good (SSIM 0.87).");
    assert.deepEqual(view.rows, [
      ["PSNR", "27.4 dB", "good"],
      ["SSIM", "0.871", null],
      ["LPIPS", "0.200", "lower is better"],
    ]);
    assert.match(view.scale, /below 20 dB is poor, 20–25 fair, 25–30 good, above 30 excellent/);
    assert.equal(qualityView({ ...held, split: "experiment" }).heldOut, true);
  });

  test("the thresholds: poor below 20 dB, fair to 25, good to 30, excellent above", () => {
    assert.deepEqual(
      [12, 19.9, 20, 24.9, 25, 29.9, 30, 35].map(psnrVerdict),
      ["poor", "poor", "fair", "fair", "good", "good", "excellent", "excellent"],
    );
    assert.equal(psnrVerdict(null), "");
  });

  test("without held-out frames it says the figures overstate quality, with no verdict", () => {
    const view = qualityView({ ...held, split: "training_views", lpips: null, eval_images: 40 });
    assert.equal(
      view.sentence,
      "27.4 dB PSNR (SSIM 0.87), measured on the training frames (no frames were held out), so it overstates quality.",
    );
    assert.deepEqual(view.rows[0], ["PSNR", "27.4 dB", null]);
    assert.equal(view.rows.length, 2);
  });

  test("no figures, no quality", () => {
    assert.equal(qualityView(undefined), null);
    assert.equal(qualityView({ psnr: null, ssim: null, split: "held_out" }), null);
    assert.equal(qualityView({ ...held, eval_images: 1 }).sentence.includes("on 1 frame the"), true);
  });
});

describe("the training resolution", () => {
  const params = { iterations: 7000, down_sample_factor: null, keep_checkpoint: false, auto_training: true };

  test("chosen automatically: the limit asked for, else the server's 1,600 px", () => {
    assert.equal(resolutionText({ ...params, max_image_size: 1200 }), "auto resolution (longest side ≤ 1,200 px)");
    assert.equal(resolutionText(params), "auto resolution (longest side ≤ 1,600 px)");
    assert.equal(trainingLine(params), "7,000 steps · auto resolution (longest side ≤ 1,600 px)");
    assert.doesNotMatch(trainingLine(params), /null/);
  });

  test("the real training size once training recorded it", () => {
    const training = { image_size: [960, 540], down_sample_factor: 2 };
    assert.equal(resolutionText(params, training), "trained at 960 × 540 px (1/2 of the frames)");
    const same = { image_size: { width: 1920, height: 1080 }, down_sample_factor: 1 };
    assert.equal(resolutionText({ ...params, down_sample_factor: 1 }, same), "trained at 1920 × 1080 px (full size)");
    const task = makeTask({ params, metadata: { training } });
    assert.deepEqual(factRows(task)[4], ["Training", "7,000 steps · trained at 960 × 540 px (1/2 of the frames)"]);
  });
});
