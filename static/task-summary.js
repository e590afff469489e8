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
 * How many images came from each source of a capture with several (or of photos), from the
 * summary's `sources`: "desk: 17 photos, 17 placed · orbit.mp4: 30 of 360 frames, 28 placed";
 * null for a single video (its numbers are the summary's own).
 */
export function sourcesLine(sources) {
  if (!Array.isArray(sources) || !sources.length) return null;
  if (sources.length === 1 && sources[0].kind !== "photos") return null;
  return sources
    .map((s) => {
      const kept = s.frames_kept ?? s.images;
      const taken =
        s.kind === "photos"
          ? kept === s.images
            ? `${fmt.count(s.images)} photos`
            : `${fmt.count(kept)} of ${fmt.count(s.images)} photos`
          : `${fmt.count(kept)} of ${fmt.count(s.images)} frames`;
      const placed = s.frames_registered != null ? `, ${fmt.count(s.frames_registered)} placed` : "";
      return `${s.label}: ${taken}${placed}`;
    })
    .join(" · ");
}

/**
 * The preprocessing summary of `metadata.preprocessing`: a sentence, a verdict and the stats
 * as [label, value, note] rows (with a "Sources" row for photos or several sources); null
 * before preprocessing has finished.
 */
export function preprocessingSummary(pre) {
  if (!pre) return null;
  const kept = pre.frames_kept;
  const registered = pre.frames_registered;
  const fraction = pre.registered_fraction ?? (kept ? registered / kept : null);
  const error = pre.mean_reprojection_error_px;
  const sources = sourcesLine(pre.sources);
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
      ...(sources ? [["Sources", sources, null]] : []),
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

/** "1920 × 1080 · 12 s · 29.97 fps · H264 · 883 KiB", or "–"; for a capture of several
 * sources "2 videos, 12 photos · 1280 × 720 · …" (the first source's size). */
export function videoLine(video = {}, size = null) {
  const counts =
    video.kind === "capture"
      ? [
          video.videos ? `${fmt.count(video.videos)} video${video.videos === 1 ? "" : "s"}` : null,
          video.photos ? `${fmt.count(video.photos)} photo${video.photos === 1 ? "" : "s"}` : null,
        ]
          .filter(Boolean)
          .join(", ")
      : null;
  return (
    [
      counts || null,
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

/** The server's default limit on the training images' longest side, when neither a factor
 * nor a limit was given (the server's trainer_max_image_size). */
export const DEFAULT_MAX_IMAGE_SIZE = 1600;

/** [width, height] of `metadata.training.image_size` ([w, h] or {width, height}), or null. */
function sizeOf(value) {
  if (Array.isArray(value) && value.length >= 2 && value[0] && value[1]) return [value[0], value[1]];
  if (value && value.width && value.height) return [value.width, value.height];
  return null;
}

/** The training resolution in words: the real size once training chose it, else the factor
 * asked for, else "auto (longest side ≤ N px)". Never "1/null". */
export function resolutionText(p, training = null) {
  const size = sizeOf(training?.image_size);
  const factor = training?.down_sample_factor ?? p.down_sample_factor;
  if (size) {
    const scale = factor > 1 ? ` (1/${factor} of the frames)` : factor === 1 ? " (full size)" : "";
    return `trained at ${size[0]} × ${size[1]} px${scale}`;
  }
  if (p.down_sample_factor == null) {
    const limit = p.max_image_size ?? training?.max_image_size ?? DEFAULT_MAX_IMAGE_SIZE;
    return `auto resolution (longest side ≤ ${fmt.count(limit)} px)`;
  }
  return p.down_sample_factor === 1 ? "full resolution" : `1/${p.down_sample_factor} resolution`;
}

/** "7,000 steps · 1/2 resolution · checkpoint kept · on request". */
export function trainingLine(p, training = null) {
  return (
    `${fmt.count(p.iterations)} steps · ${resolutionText(p, training)}` +
    (p.keep_checkpoint ? " · checkpoint kept" : "") +
    (p.auto_training ? "" : " · on request")
  );
}

/** Held-out PSNR levels of 3DGS on real phone captures, best first: [at least dB, word]. */
export const PSNR_LEVELS = [
  [30, "excellent"],
  [25, "good"],
  [20, "fair"],
  [-Infinity, "poor"],
];

/** "excellent", "good", "fair" or "poor" for a held-out PSNR in dB; "" without one. */
export function psnrVerdict(psnr) {
  if (psnr == null || !Number.isFinite(psnr)) return "";
  return PSNR_LEVELS.find(([least]) => psnr >= least)[1];
}

/** Whether the quality figures were measured on frames the model never trained on. */
export function heldOut(quality) {
  return quality.split === "held_out" || quality.split === "experiment";
}

/**
 * `metadata.training.quality` in words: {sentence, scale, rows} (rows as [label, value, note]),
 * or null when the trainer reported no figures. Held-out PSNR gets a verdict (see PSNR_LEVELS);
 * figures on the training views get none, since they overstate the quality.
 */
export function qualityView(quality) {
  if (!quality || (quality.psnr == null && quality.ssim == null)) return null;
  const { psnr, ssim, lpips } = quality;
  const frames =
    quality.eval_images != null
      ? `${fmt.count(quality.eval_images)} frame${quality.eval_images === 1 ? "" : "s"}`
      : "frames";
  const figure = psnr != null ? `${psnr.toFixed(1)} dB PSNR` : `SSIM ${ssim.toFixed(2)}`;
  const alongside = psnr != null && ssim != null ? ` (SSIM ${ssim.toFixed(2)})` : "";
  const verdict = heldOut(quality) ? psnrVerdict(psnr) : "";
  const sentence = heldOut(quality)
    ? `${figure} on ${frames} the model never saw${verdict ? ` — ${verdict}` : ""}${alongside}.`
    : `${figure}${alongside}, measured on the training frames (no frames were held out), so it overstates quality.`;
  const scale =
    "PSNR compares the model's renders with the real frames (higher is better): on real " +
    "captures below 20 dB is poor, 20–25 fair, 25–30 good, above 30 excellent. " +
    "SSIM is 1.00 for a perfect match" +
    (lpips != null ? "; LPIPS is 0 for a perfect match." : ".");
  const rows = [];
  if (psnr != null) rows.push(["PSNR", `${psnr.toFixed(1)} dB`, verdict || null]);
  if (ssim != null) rows.push(["SSIM", ssim.toFixed(3), null]);
  if (lpips != null) rows.push(["LPIPS", lpips.toFixed(3), "lower is better"]);
  return { sentence, scale, rows, verdict, heldOut: heldOut(quality) };
}

/** The "Task details" list as [term, description] pairs. */
export function factRows(task) {
  const p = task.params;
  return [
    ["Status", `${fmt.status(task)[0]} (${task.status})`],
    ["Message", task.message || "–"],
    ["Video", videoLine(task.metadata?.video || {}, task.video_size ?? null)],
    ["Frames", `${p.min_frames} to ${p.max_frames}`],
    ["Training", trainingLine(p, task.metadata?.training)],
    ["Uploaded", fmt.dateTime(task.created_at)],
    ["Started", fmt.dateTime(task.started_at)],
    ["Finished", fmt.dateTime(task.finished_at)],
    ["Attempts", String(task.attempts)],
    ["Task id", task.task_id],
  ];
}
