// Which file the splat view loads and when it looks for a training preview: the small SPZ by
// default (the .ply only when there is none), the size above which it asks first, the
// preview's polling rule and its label. Pure: no DOM, no fetch.

import * as fmt from "./format.js";
import { hasModel, hasPreview } from "./task-facts.js";

/** Seconds between two looks for a newer preview while a task trains (ms). */
export const PREVIEW_POLL_MS = 10_000;

/** Sizes above which the view asks before it downloads the model (bytes). */
export const AUTOLOAD_BYTES = { desktop: 300 * 1024 * 1024, phone: 60 * 1024 * 1024 };

/**
 * The file the 3D view should load for a finished task:
 * {type: "spz"|"ply", path, size (bytes or 0 when unknown), confirm (ask before loading)}.
 * The SPZ whenever training wrote one (about a tenth of the .ply), on phones as everywhere;
 * the .ply otherwise. The .ply stays downloadable from the actions either way.
 */
export function modelSource(task, { phone = false } = {}) {
  const training = task.metadata?.training || {};
  const id = task.task_id;
  const limit = phone ? AUTOLOAD_BYTES.phone : AUTOLOAD_BYTES.desktop;
  if (training.spz_path) {
    const size = training.spz_bytes || training.spz_size_bytes || 0;
    return { type: "spz", path: `download/${id}/spz`, size, confirm: size > limit };
  }
  const size = training.ply_size_bytes || 0;
  return { type: "ply", path: `download/${id}/ply`, size, confirm: size > limit };
}

/** The URL path of a task's newest training preview (an SPZ). */
export function previewPath(task) {
  return `tasks/${task.task_id}/preview.spz`;
}

/** Whether the model panel has something to offer: the model, or a preview while training. */
export function modelPanelAvailable(task) {
  return hasModel(task) || hasPreview(task);
}

/** Whether to look for a newer preview now: the panel is shown, the task trains and has no
 * final model yet. */
export function shouldPollPreview(task, shown) {
  return Boolean(shown && task && task.status === "training" && !hasModel(task));
}

/** What identifies one preview in a response's headers (`get(name)` as Headers.get): its
 * ETag, else its Last-Modified; null when it has neither. */
export function previewVersion(get) {
  return get("etag") || get("last-modified") || null;
}

/** Whether a preview with `next` version should replace the one shown (`shown`). */
export function previewChanged(shown, next) {
  return next !== null && next !== undefined && next !== shown;
}

function whole(value) {
  const number = Number(value);
  return value !== null && value !== undefined && value !== "" && Number.isFinite(number)
    ? Math.round(number)
    : null;
}

/**
 * "Preview at step 6,000 of 30,000": the step from the response's X-Preview-Step and
 * X-Preview-Total headers (`get` as Headers.get, or null), else from the task's
 * `metadata.training_preview`, else just "Preview".
 */
export function previewLabel(get, task) {
  let step = get ? whole(get("x-preview-step")) : null;
  let total = get ? whole(get("x-preview-total")) : null;
  if (step === null) {
    const meta = task?.metadata?.training_preview || {};
    step = whole(meta.step);
    total = whole(meta.total);
  }
  if (step === null) return "Preview";
  return `Preview at step ${fmt.count(step)}` + (total ? ` of ${fmt.count(total)}` : "");
}

/** "Loading the model: 1.2 MiB of 4.0 MiB (30 %)", for a download's progress. */
export function loadingText(what, loaded, total) {
  const percent = total ? ` (${Math.min(100, Math.round((100 * loaded) / total))} %)` : "";
  const of = total ? ` of ${fmt.bytes(total)}` : "";
  return `Loading ${what}: ${fmt.bytes(loaded)}${of}${percent}`;
}
