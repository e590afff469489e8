// Formatting for people: sizes, speeds, durations, relative times and status names.

const numberFormat = new Intl.NumberFormat(undefined);
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

/** 1536 -> "1.5 KiB" */
export function bytes(size) {
  if (size == null || !Number.isFinite(size)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = size;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  if (unit === 0) return `${Math.round(value)} B`;
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/** bytes per second -> "3.2 MiB/s" */
export function speed(bytesPerSecond) {
  if (!bytesPerSecond || !Number.isFinite(bytesPerSecond)) return "–";
  return `${bytes(bytesPerSecond)}/s`;
}

/** 3725 -> "1 h 2 min"; 75 -> "1 min 15 s"; 4 -> "4 s" */
export function duration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "–";
  let s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  if (h) return m ? `${h} h ${m} min` : `${h} h`;
  return s ? `${m} min ${s} s` : `${m} min`;
}

/** Seconds left, as "about 3 min left" (rounded up to keep the number from jumping). */
export function timeLeft(seconds) {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return "";
  if (seconds < 1) return "almost done";
  if (seconds < 10) return `${Math.ceil(seconds)} s left`;
  if (seconds < 60) return `${Math.ceil(seconds / 5) * 5} s left`;
  if (seconds < 3600) return `${Math.ceil(seconds / 60)} min left`;
  return `${duration(Math.ceil(seconds / 600) * 600)} left`;
}

/** A Date (or ISO text) relative to now: "just now", "3 min ago", "yesterday". */
export function ago(value, now = Date.now()) {
  const time = toTime(value);
  if (time == null) return "–";
  const seconds = (now - time) / 1000;
  if (seconds < 10) return "just now";
  if (seconds < 60) return relative.format(-Math.floor(seconds / 10) * 10, "second");
  if (seconds < 3600) return relative.format(-Math.floor(seconds / 60), "minute");
  if (seconds < 86400) return relative.format(-Math.floor(seconds / 3600), "hour");
  return relative.format(-Math.floor(seconds / 86400), "day");
}

/** A full local date and time, for tooltips and the details list. */
export function dateTime(value) {
  const time = toTime(value);
  if (time == null) return "–";
  return new Date(time).toLocaleString(undefined, {
    dateStyle: "medium",
    timeStyle: "medium",
  });
}

/** Local wall-clock time of an ISO timestamp, for log lines: "14:03:27". */
export function clock(value) {
  const time = toTime(value);
  if (time == null) return "";
  return new Date(time).toLocaleTimeString(undefined, { hour12: false });
}

export function toTime(value) {
  if (value == null) return null;
  const time = value instanceof Date ? value.getTime() : Date.parse(value);
  return Number.isFinite(time) ? time : null;
}

export function count(value) {
  return value == null ? "–" : numberFormat.format(value);
}

export function percent(value, digits = 0) {
  if (value == null || !Number.isFinite(value)) return "–";
  return `${value.toFixed(digits)} %`;
}

// Status names as people say them, and the tone of their badge.
const STATUS = {
  pending: ["Waiting", "neutral"],
  preprocessing: ["Preprocessing", "busy"],
  preprocessing_completed: ["Dataset ready", "ready"],
  training: ["Training", "busy"],
  training_completed: ["Done", "ok"],
  failed: ["Failed", "danger"],
  cancelled: ["Cancelled", "warn"],
};

/** [label, tone] of a task's status (a task waiting for the GPU says so). */
export function status(task) {
  if (task.status === "preprocessing_completed" && task.queued_for === "training") {
    return ["Waiting for training", "neutral"];
  }
  return STATUS[task.status] || [task.status, "neutral"];
}

export const STAGE_NAMES = { preprocessing: "Preprocessing", training: "Training" };
