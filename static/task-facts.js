// Pure facts about a task, for people: names, one-line stage texts, progress and time left,
// the step of the flow it is at, which views and actions it offers. No DOM here: every
// function takes the server's task object (GET /status/{id}) and returns plain values.
// What a task allows (its actions, its downloads, whether it is active) is read from the
// server's answer (`allowed_actions`, `results`, `active`), never worked out from `status`.

import * as fmt from "./format.js";

/**
 * @typedef {object} Progress
 * @property {string} [stage]
 * @property {string|null} [label]
 * @property {number|null} [current]
 * @property {number|null} [total]
 * @property {number|null} [percent]
 * @property {number|null} [rate]
 * @property {number|null} [eta_seconds]
 * @property {number|null} [loss]
 * @property {number|null} [psnr]
 * @property {string|null} [updated_at]
 *
 * @typedef {object} Task
 * @property {string} task_id
 * @property {string} status
 * @property {string} [message]
 * @property {string|null} [error_message]
 * @property {string} created_at
 * @property {string} [updated_at]
 * @property {string|null} [started_at]
 * @property {string|null} [finished_at]
 * @property {Progress|null} [progress]
 * @property {number|null} [queue_position]
 * @property {string|null} [queued_for]
 * @property {boolean} [expired]
 * @property {boolean} [active] the task runs or waits in a queue
 * @property {string[]} [allowed_actions] control POSTs the server accepts now
 * @property {{dataset: boolean, model: boolean}} [results] what can be downloaded now
 * @property {string|null} [original_filename]
 * @property {object} [metadata]
 * @property {object} [params]
 *
 * @typedef {{training: {available: boolean, detail?: string}}} Health
 */

/** @param {Task} task */
export function taskName(task) {
  return task.original_filename || `Task ${task.task_id.slice(0, 8)}`;
}

/** Whether the task runs or waits in a queue (its log may still grow), as the server says. */
export function isActive(task) {
  return Boolean(task.active);
}

/** The stage whose process runs now ("preprocessing" or "training"), or null. */
export function runningStage(task) {
  return task.status === "preprocessing" || task.status === "training" ? task.status : null;
}

/** Whether the server accepts control POST `action` ("cancel", "retry", "train", "delete"). */
export function can(task, action) {
  return Array.isArray(task.allowed_actions) && task.allowed_actions.includes(action);
}

/** Whether a trained model can be downloaded (and so shown in 3D) now. */
export function hasModel(task) {
  return Boolean(task.results?.model);
}

/** Whether a preview of the splats being trained can be shown now: the task trains and the
 * server says it wrote a snapshot (`results.preview` or `metadata.training_preview`). */
export function hasPreview(task) {
  return (
    task.status === "training" &&
    Boolean(task.results?.preview || task.metadata?.training_preview)
  );
}

/** Whether the task has a dataset to look at (frames, cameras and points): the server has
 * its dataset or its model. */
export function canPreview(task) {
  return Boolean(task.results?.dataset || task.results?.model);
}

/** The buttons and links of the detail view: which show, with what text and target. */
export function actionsView(task, health = null) {
  const trainingOff = Boolean(health && !health.training.available);
  const model = hasModel(task);
  const zip = model || Boolean(task.results?.dataset);
  return {
    cancel: {
      shown: can(task, "cancel"),
      label: task.queued_for && !runningStage(task) ? "Remove from queue" : "Cancel",
    },
    retry: { shown: can(task, "retry") },
    train: {
      shown: can(task, "train"),
      disabled: trainingOff,
      title: trainingOff ? `Training is not available: ${health.training.detail}` : "",
    },
    delete: { shown: can(task, "delete") },
    zip: {
      shown: zip,
      label: model ? "Download ZIP" : "Download dataset (ZIP)",
      path: `download/${task.task_id}`,
    },
    ply: { shown: model, path: `download/${task.task_id}/ply` },
    spz: {
      shown: model && Boolean(task.metadata?.training?.spz_path),
      path: `download/${task.task_id}/spz`,
    },
  };
}

/**
 * Seconds left in a running stage: the server's estimate (counted down since it was made),
 * or one made here from how fast the percentage moved since this tracker first saw it.
 * The tracker remembers one starting point per task and stage.
 */
export function createEta() {
  const starts = new Map(); // task_id -> {stage, t0, p0}
  return {
    /** @param {Task} task @param {number} now milliseconds */
    secondsLeft(task, now = Date.now()) {
      const progress = task.progress;
      if (!progress || !runningStage(task)) return null;
      if (progress.eta_seconds != null) {
        const since = (now - (fmt.toTime(progress.updated_at) ?? now)) / 1000;
        return Math.max(0, progress.eta_seconds - Math.max(0, since));
      }
      const percent = progress.percent;
      if (percent == null) return null;
      let start = starts.get(task.task_id);
      if (!start || start.stage !== progress.stage || percent < start.p0) {
        start = { stage: progress.stage, t0: now, p0: percent };
        starts.set(task.task_id, start);
      }
      const elapsed = (now - start.t0) / 1000;
      const done = percent - start.p0;
      if (elapsed < 3 || done < 2) return null;
      return (elapsed / done) * (100 - percent);
    },
    forget(taskId) {
      starts.delete(taskId);
    },
  };
}

const NO_ETA = { secondsLeft: () => null };

/** The short host name of the node a stage runs on ("gpu-2 (10.0.0.5, node ab12cd34)"). */
export function nodeHost(node) {
  if (!node) return "";
  const cut = node.indexOf(" (");
  return cut > 0 ? node.slice(0, cut) : node;
}

/** Why a queued task waits, when the server said (a Ray cluster without a free GPU). */
function waitingReason(task) {
  const message = task.message || "";
  return task.queued_for && message.startsWith("waiting ")
    ? message[0].toUpperCase() + message.slice(1)
    : null;
}

/** One line about where the task is: the stage, step counts, queue place or outcome. */
export function stageLine(task, { now = Date.now(), eta = NO_ETA, health = null } = {}) {
  const p = task.progress;
  const queue = task.queue_position ? ` · #${task.queue_position} in line` : "";
  switch (task.status) {
    case "pending":
      return `${waitingReason(task) || "Waiting to be preprocessed"}${queue}`;
    case "preprocessing":
    case "training": {
      const parts = [p?.label || fmt.STAGE_NAMES[task.status]];
      if (p?.current != null && p?.total) {
        parts[0] += ` ${fmt.count(p.current)}/${fmt.count(p.total)}`;
      }
      const left = fmt.timeLeft(eta.secondsLeft(task, now));
      if (left) parts.push(left);
      if (task.node) parts.push(`on ${nodeHost(task.node)}`);
      return parts.join(" · ");
    }
    case "preprocessing_completed": {
      if (task.queued_for) return `${waitingReason(task) || "Waiting for the GPU"}${queue}`;
      const pre = task.metadata?.preprocessing;
      const ready = pre ? `${fmt.count(pre.frames_registered)} cameras placed · ` : "";
      const unavailable = health && !health.training.available;
      return `${ready}${unavailable ? "training not available here" : "ready to train"}`;
    }
    case "training_completed": {
      const t = task.metadata?.training;
      if (task.expired) return "Files removed by the cleanup";
      return t
        ? `${fmt.count(t.gaussian_count)} Gaussians · ${fmt.bytes(t.ply_size_bytes)}`
        : "Done";
    }
    case "failed":
      return (task.error_message || task.message || "Failed").split("\n")[0];
    case "cancelled":
      return task.message || "Cancelled";
    default:
      return task.message || "";
  }
}

/** How full the task's bar on the board is (0 to 100). */
export function barPercent(task) {
  if (task.status === "training_completed") return 100;
  if (task.status === "preprocessing_completed") return task.queued_for ? 0 : 100;
  if (task.status === "pending") return 0;
  return task.progress?.percent ?? 0;
}

/** The colour of the task's bar: busy, ready, ok, warn or danger. */
export function barTone(task) {
  const tones = {
    failed: "danger",
    cancelled: "warn",
    training_completed: "ok",
    preprocessing_completed: task.queued_for ? "busy" : "ready",
  };
  return tones[task.status] || "busy";
}

/** The percentage shown beside a running task's stage line ("" when none runs). */
export function rowPercent(task) {
  return runningStage(task) ? fmt.percent(task.progress?.percent ?? 0) : "";
}

/** "uploaded 3 min ago · took 2 min" or "… · running 40 s". */
export function timeLine(task, now = Date.now()) {
  const parts = [`uploaded ${fmt.ago(task.created_at, now)}`];
  const start = fmt.toTime(task.started_at);
  const end = fmt.toTime(task.finished_at);
  if (start && end && !isActive(task)) parts.push(`took ${fmt.duration((end - start) / 1000)}`);
  else if (start && runningStage(task)) {
    parts.push(`running ${fmt.duration((now - start) / 1000)}`);
  }
  return parts.join(" · ");
}

/** Whether the task belongs in the board's filter ("all", "active", "done", "problem"). */
export function matchesFilter(task, filter) {
  switch (filter) {
    case "active":
      return isActive(task);
    case "done":
      return task.status === "training_completed" || task.status === "preprocessing_completed";
    case "problem":
      return task.status === "failed" || task.status === "cancelled";
    default:
      return true;
  }
}

/** Sort order of the board: newest upload first, ties broken by id. */
export function newestFirst(a, b) {
  return (
    (fmt.toTime(b.created_at) ?? 0) - (fmt.toTime(a.created_at) ?? 0) ||
    (a.task_id < b.task_id ? 1 : -1)
  );
}

export const STEPS = ["Upload", "Pre\u00adprocessing", "Training", "Result"];

/** What screen readers hear for each step state. */
export const STEP_NAMES = {
  done: "done",
  current: "in progress",
  waiting: "waiting",
  failed: "failed",
  stopped: "cancelled",
  todo: "not started",
};

/** The state of each step of the flow (Upload, Preprocessing, Training, Result). */
export function stepStates(task) {
  const s = task.status;
  const endedIn = task.progress?.stage === "training" ? 2 : 1;
  switch (s) {
    case "pending":
      return ["done", "waiting", "todo", "todo"];
    case "preprocessing":
      return ["done", "current", "todo", "todo"];
    case "preprocessing_completed":
      return ["done", "done", task.queued_for ? "waiting" : "todo", "todo"];
    case "training":
      return ["done", "done", "current", "todo"];
    case "training_completed":
      return ["done", "done", "done", "done"];
    case "failed":
    case "cancelled": {
      const states = ["done", "done", "todo", "todo"];
      states[endedIn] = s === "failed" ? "failed" : "stopped";
      return states;
    }
    default:
      return ["done", "todo", "todo", "todo"];
  }
}

/** The detail view's tabs the task offers now. */
export function availableTabs(task) {
  const tabs = new Set(["log"]);
  if (canPreview(task)) {
    tabs.add("frames");
    tabs.add("sparse");
  }
  if (hasModel(task) || hasPreview(task)) tabs.add("model");
  return tabs;
}

/** The tab worth opening first: the model (or its training preview), else the cameras, else
 * the log. */
export function defaultTab(task) {
  if (hasModel(task) || hasPreview(task)) return "model";
  if (canPreview(task)) return "sparse";
  return "log";
}

/** The progress block of the detail view: shown while the task runs or waits. */
export function progressView(task, { now = Date.now(), eta = NO_ETA } = {}) {
  const running = runningStage(task);
  const shown = Boolean(running) || isActive(task);
  const p = task.progress;
  const stage = running
    ? fmt.STAGE_NAMES[running]
    : task.queued_for === "training"
      ? "Training"
      : "Preprocessing";
  return {
    shown,
    waiting: shown && !running,
    label: running && p?.label && p.label !== stage ? `${stage} · ${p.label}` : stage,
    percentText: running ? fmt.percent(p?.percent ?? 0) : "",
    percent: running ? (p?.percent ?? 0) : 0,
    facts: progressFacts(task, now, eta),
  };
}

/** "Step 1,200 of 7,000 · 2 min left · 35 steps/s · loss 0.0123 · PSNR 24.1 dB". */
export function progressFacts(task, now = Date.now(), eta = NO_ETA) {
  const p = task.progress;
  const parts = [];
  const running = runningStage(task);
  if (!running) {
    const ahead = task.queue_position ? task.queue_position - 1 : 0;
    parts.push(
      ahead > 0 ? `${ahead} ${ahead === 1 ? "task" : "tasks"} ahead in line` : "Next in line",
    );
  } else if (p) {
    if (p.current != null && p.total) {
      const count = `${fmt.count(p.current)} of ${fmt.count(p.total)}`;
      parts.push(running === "training" ? `Step ${count}` : count);
    }
    const left = fmt.timeLeft(eta.secondsLeft(task, now));
    if (left) parts.push(left);
    if (p.rate) {
      const unit = running === "training" ? " steps" : "";
      parts.push(`${p.rate.toFixed(p.rate < 10 ? 1 : 0)}${unit}/s`);
    }
    if (p.loss != null) parts.push(`loss ${p.loss.toFixed(4)}`);
    if (p.psnr != null) parts.push(`PSNR ${p.psnr.toFixed(1)} dB`);
  }
  if (running && task.node) parts.push(`on node ${task.node}`);
  return parts.join(" · ") || "Starting…";
}

/** The toast for a status change, or null: {text, tone, ms}. */
export function statusChangeNote(before, task) {
  const name = taskName(task);
  if (task.status === "training_completed") {
    return { text: `${name} is ready: look at it in 3D or download it.`, tone: "ok", ms: 6000 };
  }
  if (task.status === "failed") {
    return { text: `${name} failed: ${stageLine(task)}`, tone: "danger", ms: 10000 };
  }
  if (
    task.status === "preprocessing_completed" &&
    !task.queued_for &&
    before.status === "preprocessing"
  ) {
    return { text: `${name}: frames and cameras are ready.`, tone: "ok", ms: 6000 };
  }
  return null;
}

/** The progress announcement for screen readers ("Training 40 percent"): a key that changes
 * every tenth, and the text. */
export function progressAnnouncement(task) {
  const percent = task.progress?.percent;
  const running = runningStage(task);
  if (percent == null || !running) return null;
  const tenth = Math.floor(percent / 10);
  return {
    key: `${running}:${tenth}`,
    text: `${fmt.STAGE_NAMES[running]} ${tenth * 10} percent`,
  };
}
