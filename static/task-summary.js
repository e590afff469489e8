// Pure texts of the detail view: why a task failed, what else to know, the preprocessing
// verdict, the training numbers and the "Task details" list. No DOM here.

import * as fmt from "./format.js";
import { can, isActive } from "./task-facts.js";

/** The failure box: {title, headline, more} for a failed task, else null. */
export function failureView(task) {
  const text = task.status === "failed" ? task.error_message || task.message : null;
  if (!text) return null;
  const [headline, ...rest] = text.trim().split("\n");
  return {
    title: task.progress?.stage === "training" ? "Training failed. " : "Preprocessing failed. ",
    headline,
    more: rest.join("\n").trim(),
  };
}

/** What else the user should know about the task, as sentences. */
export function notices(task, health = null) {
  const found = [];
  if (task.expired) {
    found.push("The cleanup removed this task's files: upload the video again to redo it.");
  }
  const resting = task.status === "preprocessing_completed" && !isActive(task);
  if (resting && health && !health.training.available) {
    found.push(
      `Training is not available on this server: ${health.training.detail}. Download the dataset to train elsewhere.`,
    );
  } else if (resting && can(task, "train")) {
    found.push("Frames and camera positions are ready. Start training when you like.");
  }
  if (task.status === "cancelled") {
    found.push("Cancelled. Retry runs it again from the stage that did not finish.");
  }
  return found;
}

/** How well camera tracking worked, from the share of kept frames that got a position. */
export function trackingVerdict(fraction) {
  if (fraction == null) return "";
  if (fraction >= 0.9) return "Camera tracking worked well: almost every frame got a position.";
  if (fraction >= 0.6) return "Camera tracking worked for most frames; the rest were left out.";
  return "Only some frames got a position; the result may have gaps.";
}

/**
 * The preprocessing summary of `metadata.preprocessing`: a sentence, a verdict and the stats
 * as [label, value, note] rows; null before preprocessing has finished.
 */
export function preprocessingSummary(pre) {
  if (!pre) return null;
  const kept = pre.frames_kept;
  const registered = pre.frames_registered;
  const fraction = pre.registered_fraction ?? (kept ? registered / kept : null);
  const error = pre.mean_reprojection_error_px;
  const sentence =
    `${fmt.count(kept)} frames were kept` +
    (pre.frames_decoded ? ` out of ${fmt.count(pre.frames_decoded)} decoded` : "") +
    `, ${fmt.count(registered)} of them placed in 3D, with ${fmt.count(pre.points3D)} points` +
    (error != null ? ` (mean reprojection error ${error.toFixed(2)} px).` : ".");
  return {
    sentence,
    verdict: trackingVerdict(fraction),
    stats: [
      ["Frames kept", fmt.count(kept), null],
      [
        "Cameras placed",
        `${fmt.count(registered)} / ${fmt.count(kept)}`,
        fraction != null ? fmt.percent(fraction * 100) : null,
      ],
      ["3D points", fmt.count(pre.points3D), null],
      ["Reprojection error", error != null ? `${error.toFixed(2)} px` : "–", null],
    ],
  };
}

/** The training stats of `metadata.training` as [label, value, note] rows, or null. */
export function trainingStats(train) {
  if (!train) return null;
  return [
    ["Gaussians", fmt.count(train.gaussian_count), null],
    ["Steps", fmt.count(train.iterations), null],
    ["Training time", fmt.duration(train.seconds), null],
    ["Model size", fmt.bytes(train.ply_size_bytes), null],
  ];
}

/** "1920 × 1080 · 12 s · 29.97 fps · H264 · 883 KiB", or "–". */
export function videoLine(video = {}, size = null) {
  return (
    [
      video.width && video.height ? `${video.width} × ${video.height}` : null,
      video.duration != null ? fmt.duration(video.duration) : null,
      video.fps ? `${Number(video.fps).toFixed(video.fps % 1 ? 2 : 0)} fps` : null,
      video.codec ? video.codec.toUpperCase() : null,
      size != null ? fmt.bytes(size) : null,
    ]
      .filter(Boolean)
      .join(" · ") || "–"
  );
}

/** "7,000 steps · 1/2 resolution · checkpoint kept · on request". */
export function trainingLine(p) {
  const scale =
    p.down_sample_factor === 1 ? "full resolution" : `1/${p.down_sample_factor} resolution`;
  return (
    `${fmt.count(p.iterations)} steps · ${scale}` +
    (p.keep_checkpoint ? " · checkpoint kept" : "") +
    (p.auto_training ? "" : " · on request")
  );
}

/** The "Task details" list as [term, description] pairs. */
export function factRows(task) {
  const p = task.params;
  return [
    ["Status", `${fmt.status(task)[0]} (${task.status})`],
    ["Message", task.message || "–"],
    ["Video", videoLine(task.metadata?.video || {}, task.video_size ?? null)],
    ["Frames", `${p.min_frames} to ${p.max_frames}`],
    ["Training", trainingLine(p)],
    ["Uploaded", fmt.dateTime(task.created_at)],
    ["Started", fmt.dateTime(task.started_at)],
    ["Finished", fmt.dateTime(task.finished_at)],
    ["Attempts", String(task.attempts)],
    ["Task id", task.task_id],
  ];
}
