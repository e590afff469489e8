// The web page: upload a video, follow every task live, look at a task's log, frames, camera
// path and trained splats, and act on it. It talks only to the public API (see api.js).

import * as api from "./api.js";
import * as fmt from "./format.js";

const $ = (selector, root = document) => root.querySelector(selector);
const ACTIVE = new Set(["pending", "preprocessing", "training"]);
const NO_DATASET = new Set(["pending", "preprocessing"]);
const POLL_MS = 4000;
const HEALTH_MS = 30000;
const LOG_LINES = 500;
const LOG_KEEP = 4000;
const PLY_AUTOLOAD_BYTES = 300 * 1024 * 1024;
const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
const singleColumn = window.matchMedia("(max-width: 959px)");

const state = {
  tasks: new Map(), // task_id -> TaskPublic
  total: 0,
  pageSize: 50,
  filter: "all",
  selected: null,
  health: null,
  authRequired: null, // unknown until /health answers
  estimates: new Map(), // task_id -> {stage, t0, p0}: client-side ETA when the server has none
  sparse: new Map(), // task_id -> Promise of the /sparse payload
};

// -- small DOM helpers ----------------------------------------------------------------------

/** Build an element: h("a", {class: "x", href: "#", onclick: f}, "text", child). */
function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === "class") element.className = value;
    else if (key === "text") element.textContent = value;
    else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  element.append(...children.flat().filter((c) => c != null && c !== false));
  return element;
}

function setText(element, text) {
  const value = text == null ? "" : String(text);
  if (element.textContent !== value) element.textContent = value;
}

function show(element, visible) {
  if (element.hidden === visible) element.hidden = !visible;
}

function setBar(bar, percent, tone) {
  const value = Math.max(0, Math.min(100, Number.isFinite(percent) ? percent : 0));
  const fill = bar.firstElementChild;
  const width = `${value.toFixed(1)}%`;
  if (fill.style.width !== width) fill.style.width = width;
  if (tone !== undefined && bar.dataset.tone !== tone) bar.dataset.tone = tone;
  if (bar.getAttribute("role") === "progressbar") {
    bar.setAttribute("aria-valuenow", String(Math.round(value)));
  }
}

function bar(label) {
  const props = label
    ? {
        class: "bar",
        role: "progressbar",
        "aria-label": label,
        "aria-valuemin": "0",
        "aria-valuemax": "100",
        "aria-valuenow": "0",
      }
    : { class: "bar", "aria-hidden": "true" };
  return h("span", props, h("span", { class: "bar-fill" }));
}

let announceTimer = 0;
/** Tell screen readers something (politely, once). */
function announce(text) {
  const region = $("#announcer");
  clearTimeout(announceTimer);
  region.textContent = "";
  announceTimer = setTimeout(() => {
    region.textContent = text;
  }, 60);
}

function toast(text, tone = "info", ms = 6000) {
  const item = h("div", { class: `toast ${tone}` }, text);
  $("#toasts").append(item);
  setTimeout(() => item.remove(), ms);
}

function scrollIntoViewIfStacked(element) {
  if (!singleColumn.matches) return;
  element.scrollIntoView({ behavior: reducedMotion.matches ? "auto" : "smooth", block: "start" });
}

// -- task facts -----------------------------------------------------------------------------

function taskName(task) {
  return task.original_filename || `Task ${task.task_id.slice(0, 8)}`;
}

function isActive(task) {
  return ACTIVE.has(task.status) || Boolean(task.queued_for);
}

const DATASET_MADE = new Set(["preprocessing_completed", "training", "training_completed"]);

/** Whether the task has a dataset to look at (frames, cameras and points). */
function hasDataset(task) {
  if (task.expired || NO_DATASET.has(task.status)) return false;
  return DATASET_MADE.has(task.status) || Boolean(task.metadata?.preprocessing);
}

function hasModel(task) {
  return !task.expired && task.status === "training_completed" && Boolean(task.metadata?.training);
}

/** What the task's state allows: the page shows exactly these actions. */
function allowed(task) {
  const resting = task.status === "preprocessing_completed" && !task.queued_for;
  return {
    cancel: task.status === "preprocessing" || task.status === "training" || !!task.queued_for,
    retry: (task.status === "failed" || task.status === "cancelled") && !task.expired,
    train: resting && !task.expired,
    zip:
      !task.expired &&
      (task.status === "training_completed" || task.status === "preprocessing_completed"),
    ply: hasModel(task),
    delete: true,
  };
}

/** Seconds left in the running stage: the server's estimate, or one made here from how fast
 * the stage's percentage has moved since the page first saw it. */
function secondsLeft(task, now = Date.now()) {
  const progress = task.progress;
  if (!progress || !ACTIVE.has(task.status) || task.status === "pending") return null;
  if (progress.eta_seconds != null) {
    const since = (now - (fmt.toTime(progress.updated_at) ?? now)) / 1000;
    return Math.max(0, progress.eta_seconds - Math.max(0, since));
  }
  const percent = progress.percent;
  if (percent == null) return null;
  let estimate = state.estimates.get(task.task_id);
  if (!estimate || estimate.stage !== progress.stage || percent < estimate.p0) {
    estimate = { stage: progress.stage, t0: now, p0: percent };
    state.estimates.set(task.task_id, estimate);
  }
  const elapsed = (now - estimate.t0) / 1000;
  const done = percent - estimate.p0;
  if (elapsed < 3 || done < 2) return null;
  return (elapsed / done) * (100 - percent);
}

/** One line about where the task is: the stage, step counts, queue place or outcome. */
function stageLine(task, now) {
  const p = task.progress;
  const queue = task.queue_position ? ` · #${task.queue_position} in line` : "";
  switch (task.status) {
    case "pending":
      return `Waiting to be preprocessed${queue}`;
    case "preprocessing":
    case "training": {
      const parts = [p?.label || fmt.STAGE_NAMES[task.status]];
      if (p?.current != null && p?.total) {
        parts[0] += ` ${fmt.count(p.current)}/${fmt.count(p.total)}`;
      }
      const left = fmt.timeLeft(secondsLeft(task, now));
      if (left) parts.push(left);
      return parts.join(" · ");
    }
    case "preprocessing_completed": {
      if (task.queued_for) return `Waiting for the GPU${queue}`;
      const pre = task.metadata?.preprocessing;
      const ready = pre ? `${fmt.count(pre.frames_registered)} cameras placed · ` : "";
      const unavailable = state.health && !state.health.training.available;
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

function barPercent(task) {
  if (task.status === "training_completed") return 100;
  if (task.status === "preprocessing_completed") return task.queued_for ? 0 : 100;
  if (task.status === "pending") return 0;
  return task.progress?.percent ?? 0;
}

function barTone(task) {
  const tones = {
    failed: "danger",
    cancelled: "warn",
    training_completed: "ok",
    preprocessing_completed: task.queued_for ? "busy" : "ready",
  };
  return tones[task.status] || "busy";
}

function timeLine(task, now) {
  const parts = [`uploaded ${fmt.ago(task.created_at, now)}`];
  const start = fmt.toTime(task.started_at);
  const end = fmt.toTime(task.finished_at);
  if (start && end && !isActive(task)) parts.push(`took ${fmt.duration((end - start) / 1000)}`);
  else if (start && ACTIVE.has(task.status) && task.status !== "pending") {
    parts.push(`running ${fmt.duration((now - start) / 1000)}`);
  }
  return parts.join(" · ");
}

// -- the task board -------------------------------------------------------------------------

const rows = new Map(); // task_id -> {item, link, name, badge, stage, bar, pct, time}

function matchesFilter(task) {
  switch (state.filter) {
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

function newestFirst(a, b) {
  return (
    (fmt.toTime(b.created_at) ?? 0) - (fmt.toTime(a.created_at) ?? 0) ||
    (a.task_id < b.task_id ? 1 : -1)
  );
}

function makeRow(task) {
  const row = {
    name: h("span", { class: "task-name" }),
    badge: h("span", { class: "badge" }),
    stage: h("span", { class: "task-stage" }),
    pct: h("span", { class: "task-pct" }),
    bar: bar(null),
    time: h("span", { class: "task-time" }),
  };
  row.link = h(
    "a",
    { class: "task-link", href: `#task=${task.task_id}` },
    h("span", { class: "task-top" }, row.name, row.badge),
    h("span", { class: "task-mid" }, row.stage, row.pct),
    row.bar,
    row.time,
  );
  row.item = h("li", { class: "task-row", "data-id": task.task_id }, row.link);
  rows.set(task.task_id, row);
  return row;
}

function paintRow(task, now = Date.now()) {
  const row = rows.get(task.task_id) || makeRow(task);
  const [label, tone] = fmt.status(task);
  setText(row.name, taskName(task));
  row.name.title = taskName(task);
  setText(row.badge, label);
  row.badge.dataset.tone = tone;
  row.item.dataset.status = task.status;
  const line = stageLine(task, now);
  setText(row.stage, line);
  row.stage.title = line;
  const running = task.status === "preprocessing" || task.status === "training";
  setText(row.pct, running ? fmt.percent(task.progress?.percent ?? 0) : "");
  setBar(row.bar, barPercent(task), barTone(task));
  setText(row.time, timeLine(task, now));
  if (state.selected === task.task_id) row.link.setAttribute("aria-current", "true");
  else row.link.removeAttribute("aria-current");
  return row;
}

/** Put the rows in newest-first order, showing those that match the filter. */
function layoutBoard() {
  const list = $("#task-list");
  const tasks = [...state.tasks.values()].sort(newestFirst);
  let previous = null;
  let shown = 0;
  for (const task of tasks) {
    const row = paintRow(task);
    const visible = matchesFilter(task);
    show(row.item, visible);
    if (visible) shown += 1;
    const expected = previous ? previous.nextSibling : list.firstChild;
    if (expected !== row.item) list.insertBefore(row.item, expected);
    previous = row.item;
  }
  for (const [id, row] of rows) {
    if (!state.tasks.has(id)) {
      row.item.remove();
      rows.delete(id);
    }
  }
  setText($("#task-count"), state.total ? `(${fmt.count(state.total)})` : "");
  const empty = $("#board-empty");
  if (!state.tasks.size) setText(empty, "No tasks yet. Upload a video to start.");
  else if (!shown) setText(empty, "No task matches this filter.");
  show(empty, shown === 0);
  show($("#load-more"), state.total > state.tasks.size);
}

/** A task changed (event, poll or action answer): store it and repaint what shows it. */
function upsert(task) {
  const before = state.tasks.get(task.task_id);
  if (before && fmt.toTime(before.updated_at) > fmt.toTime(task.updated_at)) return; // stale
  if (!before) state.total += 1;
  state.tasks.set(task.task_id, task);
  if (before && before.status !== task.status) statusChanged(before, task);
  if (!before || before.created_at !== task.created_at) layoutBoard();
  else {
    const row = paintRow(task);
    show(row.item, matchesFilter(task));
  }
  if (state.selected === task.task_id) detail.update(task);
}

function removeTask(taskId) {
  if (!state.tasks.delete(taskId)) return;
  state.total = Math.max(0, state.total - 1);
  layoutBoard();
  if (state.selected === taskId) {
    select(null);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function statusChanged(before, task) {
  if (NO_DATASET.has(task.status)) state.sparse.delete(task.task_id); // rerun: a new model
  const [label] = fmt.status(task);
  announce(`${taskName(task)}: ${label}`);
  if (task.status === "training_completed") {
    toast(`${taskName(task)} is ready: look at it in 3D or download it.`, "ok");
  } else if (task.status === "failed") {
    toast(`${taskName(task)} failed: ${stageLine(task)}`, "danger", 10000);
  } else if (
    task.status === "preprocessing_completed" &&
    !task.queued_for &&
    before.status === "preprocessing"
  ) {
    toast(`${taskName(task)}: frames and cameras are ready.`, "ok");
  }
}

/** Reload the newest tasks (after a reconnect, or while polling) and reconcile. */
async function refreshTasks() {
  const answer = await api.get("tasks", { params: { limit: state.pageSize } });
  const seen = new Set();
  for (const task of answer.tasks) {
    seen.add(task.task_id);
    const before = state.tasks.get(task.task_id);
    state.tasks.set(task.task_id, task);
    if (before && before.status !== task.status) statusChanged(before, task);
  }
  // Missing from the answer although it covers the task's age (or the answer holds every
  // task): deleted meanwhile.
  const complete = answer.tasks.length >= answer.total;
  const oldest = answer.tasks.length ? fmt.toTime(answer.tasks.at(-1).created_at) : Infinity;
  for (const [id, task] of state.tasks) {
    if (!seen.has(id) && (complete || fmt.toTime(task.created_at) >= oldest)) {
      state.tasks.delete(id);
    }
  }
  state.total = answer.total;
  layoutBoard();
  if (state.selected) {
    const task = state.tasks.get(state.selected);
    if (task) detail.update(task);
    else await loadSelected(state.selected);
  }
}

// -- live updates: Server-Sent Events with polling as the fallback ---------------------------

const live = {
  source: null,
  polling: false,
  pollTimer: 0,
  retryTimer: 0,
  retryDelay: 1000,
  status: "",
};

function setConnection(status) {
  if (live.status === status) return;
  live.status = status;
  const element = $("#connection");
  element.dataset.state = status;
  const text = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting… (checking every few seconds)",
    offline: "Server unreachable; retrying",
    locked: "Token needed",
  }[status];
  setText($("#connection-text"), text);
}

function connectEvents() {
  clearTimeout(live.retryTimer);
  live.source?.close();
  const source = new EventSource(api.url("events", {}, { withToken: true }));
  live.source = source;
  source.addEventListener("hello", () => {
    live.retryDelay = 1000;
    setConnection("live");
    stopPolling();
    refreshTasks().catch(() => {});
    loadHealth().catch(() => {});
  });
  source.addEventListener("task", (event) => {
    try {
      upsert(JSON.parse(event.data).task);
    } catch (error) {
      console.error("bad task event", error);
    }
  });
  source.addEventListener("deleted", (event) => {
    try {
      removeTask(JSON.parse(event.data).task_id);
    } catch (error) {
      console.error("bad deleted event", error);
    }
  });
  source.addEventListener("error", () => {
    if (live.source !== source) return;
    startPolling();
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up (an error answer, e.g. 401, or a proxy): try again ourselves.
      live.retryTimer = setTimeout(connectEvents, live.retryDelay);
      live.retryDelay = Math.min(live.retryDelay * 2, 15000);
    }
  });
}

function startPolling() {
  if (live.status !== "locked") setConnection("reconnecting");
  if (live.polling) return;
  live.polling = true;
  const poll = async () => {
    if (!live.polling) return;
    try {
      await refreshTasks();
      if (live.polling && live.status === "offline") setConnection("reconnecting");
    } catch (error) {
      if (live.polling && error.status === 0) setConnection("offline");
    }
    if (live.polling) live.pollTimer = setTimeout(poll, POLL_MS);
  };
  live.pollTimer = setTimeout(poll, POLL_MS);
}

function stopPolling() {
  live.polling = false;
  clearTimeout(live.pollTimer);
}

// -- server health and the token ----------------------------------------------------------

async function loadHealth() {
  const health = await api.get("health");
  state.health = health;
  state.authRequired = health.auth_required;
  show($("#token-button"), health.auth_required || Boolean(api.getToken()));
  const banner = $("#health-banner");
  const notes = [];
  if (!health.preprocessing.available) {
    notes.push(`Preprocessing cannot run on this server: ${health.preprocessing.detail}`);
  }
  if (!health.training.available) {
    notes.push(
      `Training is not available on this server (${health.training.detail}). Videos are ` +
        "still turned into frames and camera positions you can look at and download.",
    );
  }
  if (health.disk_free_bytes < 2 * 1024 ** 3) {
    notes.push(`The server's disk is almost full: ${fmt.bytes(health.disk_free_bytes)} free.`);
  }
  setText(banner, notes.join(" "));
  banner.dataset.tone = health.preprocessing.available ? "info" : "warn";
  show(banner, notes.length > 0);
  return health;
}

let tokenWaiters = [];

/** Ask for the API token (once, however many requests were refused). */
function askToken(reason) {
  const dialog = $("#token-dialog");
  setConnection("locked");
  const hadToken = Boolean(api.getToken());
  const error = $("#token-error");
  setText(error, hadToken ? `The saved token was refused: ${reason}` : "");
  show(error, hadToken);
  show($("#token-forget"), hadToken);
  if (!dialog.open) {
    $("#token-input").value = "";
    dialog.showModal();
  }
  return new Promise((resolve) => tokenWaiters.push(resolve));
}

async function saveToken(event) {
  event.preventDefault();
  const input = $("#token-input");
  const value = input.value.trim();
  const error = $("#token-error");
  if (!value) {
    setText(error, "Enter the token.");
    show(error, true);
    input.focus();
    return;
  }
  api.setToken(value);
  try {
    await loadHealth();
  } catch (failure) {
    if (failure.status === 401) {
      api.setToken("");
      setText(error, "This token was refused. Check it and try again.");
      show(error, true);
      input.select();
      return;
    }
  }
  $("#token-dialog").close();
  show($("#token-button"), true);
  toast("Token saved in this browser.", "ok");
  const waiters = tokenWaiters;
  tokenWaiters = [];
  for (const resolve of waiters) resolve();
  connectEvents();
  refreshTasks().catch(() => {});
}

// -- upload ------------------------------------------------------------------------------------

const upload = { file: null, request: null, samples: [] };

function chooseFile(file) {
  upload.file = file || null;
  const title = $("#file-title");
  const hint = $("#file-hint");
  $("#dropzone").classList.toggle("has-file", Boolean(file));
  if (file) {
    setText(title, file.name);
    setText(hint, `${fmt.bytes(file.size)} · choose another or drop it here`);
  } else {
    setText(title, "Choose a video");
    setText(hint, "or drop it here · walk around the subject while filming");
  }
  show($("#upload-error"), false);
  $("#upload-button").disabled = !file || Boolean(upload.request);
}

function uploadParams() {
  const params = {};
  const problems = [];
  const number = (id, name, min, max) => {
    const input = $(`#${id}`);
    const text = input.value.trim();
    if (!text) return null;
    const value = Number(text);
    if (!Number.isInteger(value) || value < min || value > max) {
      problems.push([input, `${name} must be a whole number from ${min} to ${max}.`]);
      return null;
    }
    return value;
  };
  const minFrames = number("min-frames", "The least number of frames", 3, 2000);
  const maxFrames = number("max-frames", "The largest number of frames", 3, 2000);
  if (minFrames != null && maxFrames != null && minFrames > maxFrames) {
    problems.push([$("#min-frames"), "“At least” must not be more than “At most”."]);
  }
  if (minFrames != null) params.min_frames = minFrames;
  if (maxFrames != null) params.max_frames = maxFrames;
  const preset = $("#preset").value;
  if (preset === "custom") {
    const iterations = number("iterations", "The number of steps", 100, 200000);
    if (iterations == null && !problems.length) {
      problems.push([$("#iterations"), "Enter the number of training steps (100 to 200,000)."]);
    }
    if (iterations != null) params.iterations = iterations;
  } else if (preset) {
    params.preset = preset;
  }
  params.auto_training = $("#auto-training").checked ? "true" : "false";
  const factor = $("#down-sample").value;
  if (factor !== "1") params.down_sample_factor = factor;
  if ($("#keep-checkpoint").checked) params.keep_checkpoint = "true";
  return { params, problems };
}

function showUploadError(title, detail) {
  const box = $("#upload-error");
  box.replaceChildren(h("strong", {}, title), " ", detail);
  show(box, true);
}

const UPLOAD_ERRORS = {
  401: "The token was refused.",
  413: "The video is too large.",
  415: "This file cannot be used.",
  422: "Check the settings.",
  507: "The server's disk is full.",
};

function uploadNumbers(loaded, total) {
  const now = performance.now();
  upload.samples.push([now, loaded]);
  while (upload.samples.length > 2 && now - upload.samples[0][0] > 3000) upload.samples.shift();
  const [t0, b0] = upload.samples[0];
  const rate = now - t0 > 250 ? ((loaded - b0) * 1000) / (now - t0) : 0;
  const left = rate > 0 ? fmt.timeLeft((total - loaded) / rate) : "";
  const share = total ? Math.floor((100 * loaded) / total) : 0;
  const parts = [`${fmt.bytes(loaded)} of ${fmt.bytes(total)} (${share} %)`];
  if (rate > 0) parts.push(fmt.speed(rate));
  if (left) parts.push(left);
  return parts.join(" · ");
}

function setUploading(active) {
  for (const element of $("#upload-form").querySelectorAll("input, select, fieldset")) {
    element.disabled = active;
  }
  $("#upload-button").disabled = active || !upload.file;
  show($("#upload-cancel"), active);
  show($("#upload-progress"), active);
  $("#dropzone").classList.toggle("disabled", active);
}

async function submitUpload(event) {
  event.preventDefault();
  if (!upload.file || upload.request) return;
  const { params, problems } = uploadParams();
  if (problems.length) {
    showUploadError("Check the settings.", problems.map((p) => p[1]).join(" "));
    problems[0][0].focus();
    return;
  }
  show($("#upload-error"), false);
  const file = upload.file;
  const barElement = $("#upload-bar");
  const numbers = $("#upload-numbers");
  barElement.dataset.phase = "sending";
  setBar(barElement, 0, "busy");
  setText(numbers, `0 B of ${fmt.bytes(file.size)}`);
  upload.samples = [];
  let lastQuarter = 0;
  upload.request = api.upload(file, params, {
    onProgress: ({ loaded, total }) => {
      // Count the file's bytes, not the form's boundaries around them.
      const fraction = total ? Math.min(1, loaded / total) : 0;
      const percent = 100 * fraction;
      setBar(barElement, percent);
      setText(numbers, uploadNumbers(Math.round(fraction * file.size), file.size));
      const quarter = Math.floor(percent / 25);
      if (quarter > lastQuarter) {
        lastQuarter = quarter;
        announce(`Upload ${quarter * 25} percent`);
      }
    },
    onSent: () => {
      setBar(barElement, 100);
      barElement.dataset.phase = "checking";
      setText(numbers, `${fmt.bytes(file.size)} sent · the server is checking the video…`);
    },
  });
  setUploading(true);
  try {
    const answer = await upload.request.promise;
    announce(`${file.name} uploaded`);
    toast(`${file.name} uploaded: preprocessing starts.`, "ok");
    if (params.auto_training === "true" && !answer.training_available) {
      toast(
        `Training is not available on this server (${answer.training_unavailable_reason}); ` +
          "the task will stop after preprocessing.",
        "warn",
        10000,
      );
    }
    upload.request = null;
    setUploading(false);
    $("#file-input").value = "";
    chooseFile(null);
    location.hash = `task=${answer.task_id}`;
  } catch (error) {
    upload.request = null;
    setUploading(false);
    if (error.status === -1) {
      toast("Upload stopped.", "info");
    } else {
      showUploadError(UPLOAD_ERRORS[error.status] || "The upload failed.", error.detail);
    }
  } finally {
    delete barElement.dataset.phase;
  }
}

function wireUpload() {
  const input = $("#file-input");
  const zone = $("#dropzone");
  input.addEventListener("change", () => chooseFile(input.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      if (!upload.request) zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "dragend"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (upload.request) return;
    const file = event.dataTransfer?.files?.[0];
    if (file) chooseFile(file);
  });
  // A file dropped anywhere else must not make the browser leave the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  $("#preset").addEventListener("change", (event) => {
    show($("#iterations-field"), event.target.value === "custom");
  });
  $("#upload-form").addEventListener("submit", submitUpload);
  $("#upload-cancel").addEventListener("click", () => upload.request?.abort());
}

// -- task detail -------------------------------------------------------------------------------

const detail = {
  id: null,
  refs: null,
  tab: null,
  pickedTab: false,
  panels: {},

  /** Show task `task` (or nothing). */
  open(task) {
    this.close();
    const article = $("#task-detail");
    show($("#detail-empty"), !task);
    show(article, Boolean(task));
    if (!task) {
      article.replaceChildren();
      return;
    }
    this.id = task.task_id;
    this.pickedTab = false;
    for (const id of state.sparse.keys()) if (id !== task.task_id) state.sparse.delete(id);
    this.refs = buildDetail();
    article.replaceChildren(this.refs.root);
    this.panels = {
      log: new LogPanel(this.refs.panels.log, task),
      frames: new FramesPanel(this.refs.panels.frames, task),
      sparse: new SparsePanel(this.refs.panels.sparse, task),
      model: new ModelPanel(this.refs.panels.model, task),
    };
    this.update(task);
    this.pickTab(defaultTab(task), false);
  },

  close() {
    for (const panel of Object.values(this.panels)) panel.close();
    this.panels = {};
    this.id = null;
    this.tab = null;
  },

  update(task) {
    if (!this.refs || task.task_id !== this.id) return;
    paintDetail(this.refs, task);
    for (const panel of Object.values(this.panels)) panel.update(task);
    const tabs = availableTabs(task);
    for (const [name, button] of Object.entries(this.refs.tabs)) show(button, tabs.has(name));
    if (!tabs.has(this.tab)) this.pickTab(defaultTab(task), false);
    else if (!this.pickedTab && defaultTab(task) !== this.tab)
      this.pickTab(defaultTab(task), false);
  },

  pickTab(name, byUser = true, focus = false) {
    if (!this.refs) return;
    if (byUser) this.pickedTab = true;
    this.tab = name;
    for (const [key, button] of Object.entries(this.refs.tabs)) {
      const selected = key === name;
      button.setAttribute("aria-selected", String(selected));
      button.tabIndex = selected ? 0 : -1;
      show(this.refs.panels[key], selected);
      if (selected && focus) button.focus();
    }
    for (const [key, panel] of Object.entries(this.panels)) panel.visible(key === name);
  },

  tick(now) {
    const task = this.id && state.tasks.get(this.id);
    if (task) paintDetailTimes(this.refs, task, now);
  },
};

function availableTabs(task) {
  const tabs = new Set(["log"]);
  if (hasDataset(task)) {
    tabs.add("frames");
    tabs.add("sparse");
  }
  if (hasModel(task)) tabs.add("model");
  return tabs;
}

function defaultTab(task) {
  if (hasModel(task)) return "model";
  if (hasDataset(task)) return "sparse";
  return "log";
}

function buildDetail() {
  const refs = { actions: {}, tabs: {}, panels: {} };
  refs.title = h("h2", { id: "detail-title", tabindex: "-1" });
  refs.badge = h("span", { class: "badge big" });
  refs.sub = h("p", { class: "detail-sub" });
  refs.steps = h("ol", { class: "stepper", "aria-label": "Steps" });
  refs.stepItems = ["Upload", "Pre\u00adprocessing", "Training", "Result"].map((label) => {
    const item = h(
      "li",
      { class: "step" },
      h("span", { class: "step-dot", "aria-hidden": "true" }),
      h("span", { class: "step-label" }, label),
    );
    refs.steps.append(item);
    return item;
  });
  refs.progressLabel = h("span", { class: "progress-label" });
  refs.progressPct = h("span", { class: "progress-pct" });
  refs.progressBar = bar("Progress of the running stage");
  refs.progressFacts = h("p", { class: "progress-facts" });
  refs.progress = h(
    "div",
    { class: "progress-block" },
    h("div", { class: "progress-head" }, refs.progressLabel, refs.progressPct),
    refs.progressBar,
    refs.progressFacts,
  );
  refs.error = h("div", { class: "alert error", role: "alert" });
  refs.notice = h("div", { class: "alert info" });
  refs.actionError = h("div", { class: "alert error", role: "alert", hidden: true });

  const link = (key, text, cls) => {
    refs.actions[key] = h("a", { class: `button ${cls}`, href: "#", download: "" }, text);
    return refs.actions[key];
  };
  const button = (key, text, cls, onclick) => {
    refs.actions[key] = h("button", { type: "button", class: `button ${cls}`, onclick }, text);
    return refs.actions[key];
  };
  refs.trainPreset = h(
    "select",
    { class: "small-select", "aria-label": "Training quality" },
    h("option", { value: "" }, "As uploaded"),
    h("option", { value: "fast" }, "Fast · 7,000 steps"),
    h("option", { value: "full" }, "Full · 30,000 steps"),
  );
  refs.trainGroup = h(
    "span",
    { class: "train-group" },
    button("train", "Start training", "primary", () => act("train")),
    refs.trainPreset,
  );
  refs.actionBar = h(
    "div",
    { class: "actions", role: "group", "aria-label": "Task actions" },
    link("ply", "Download .ply", "primary"),
    link("zip", "Download ZIP", ""),
    refs.trainGroup,
    button("retry", "Retry", "", () => act("retry")),
    button("cancel", "Cancel", "", () => act("cancel")),
    button("delete", "Delete", "danger-outline", () => act("delete")),
  );
  refs.summary = h("div", { class: "summary" });
  refs.facts = h("dl", { class: "facts" });

  const tabList = h("div", { class: "tabs", role: "tablist", "aria-label": "Task views" });
  const names = { model: "3D model", sparse: "Cameras and points", frames: "Frames", log: "Log" };
  for (const [key, label] of Object.entries(names)) {
    const tab = h(
      "button",
      {
        type: "button",
        role: "tab",
        class: "tab",
        id: `tab-${key}`,
        "aria-controls": `panel-${key}`,
        "aria-selected": "false",
        tabindex: "-1",
        onclick: () => detail.pickTab(key),
      },
      label,
    );
    refs.tabs[key] = tab;
    tabList.append(tab);
    refs.panels[key] = h("div", {
      class: "panel",
      role: "tabpanel",
      id: `panel-${key}`,
      "aria-labelledby": `tab-${key}`,
      hidden: true,
    });
  }
  tabList.addEventListener("keydown", (event) => {
    const visible = Object.entries(refs.tabs)
      .filter(([, b]) => !b.hidden)
      .map(([k]) => k);
    const index = visible.indexOf(detail.tab);
    let next = null;
    if (event.key === "ArrowRight") next = visible[(index + 1) % visible.length];
    else if (event.key === "ArrowLeft")
      next = visible[(index - 1 + visible.length) % visible.length];
    else if (event.key === "Home") next = visible[0];
    else if (event.key === "End") next = visible.at(-1);
    if (next) {
      event.preventDefault();
      detail.pickTab(next, true, true);
    }
  });

  refs.root = h(
    "div",
    { class: "detail-inner" },
    h("a", { class: "back-link", href: "#tasks-title", onclick: backToList }, "↑ All tasks"),
    h(
      "header",
      { class: "detail-head" },
      h("div", { class: "detail-titles" }, refs.title, refs.sub),
      refs.badge,
    ),
    refs.steps,
    refs.progress,
    refs.error,
    refs.notice,
    refs.actionBar,
    refs.actionError,
    refs.summary,
    tabList,
    ...Object.values(refs.panels),
    h("details", { class: "more-facts" }, h("summary", {}, "Task details"), refs.facts),
  );
  return refs;
}

function backToList(event) {
  event.preventDefault();
  const row = state.selected && rows.get(state.selected);
  const target = row ? row.link : $("#tasks-title");
  target.scrollIntoView({ block: "center" });
  target.focus();
}

function stepStates(task) {
  // Upload, Preprocessing, Training, Result: done | current | failed | todo | skipped
  const s = task.status;
  const failedIn = task.progress?.stage === "training" ? 2 : 1;
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
      states[failedIn] = s === "failed" ? "failed" : "stopped";
      if (failedIn === 1) states[2] = "todo";
      return states;
    }
    default:
      return ["done", "todo", "todo", "todo"];
  }
}

function paintDetail(refs, task) {
  const now = Date.now();
  const [label, tone] = fmt.status(task);
  setText(refs.title, taskName(task));
  setText(refs.badge, label);
  refs.badge.dataset.tone = tone;
  const stepNames = {
    done: "done",
    current: "in progress",
    waiting: "waiting",
    failed: "failed",
    stopped: "cancelled",
    todo: "not started",
  };
  stepStates(task).forEach((value, index) => {
    const item = refs.stepItems[index];
    item.dataset.state = value;
    item.setAttribute("aria-label", `${item.textContent}: ${stepNames[value]}`);
    if (value === "current" || value === "waiting") item.setAttribute("aria-current", "step");
    else item.removeAttribute("aria-current");
  });

  // Progress of the running (or waiting) stage.
  const running = task.status === "preprocessing" || task.status === "training";
  const waiting = task.status === "pending" || Boolean(task.queued_for);
  show(refs.progress, running || waiting);
  if (running || waiting) {
    const p = task.progress;
    const stage = running
      ? fmt.STAGE_NAMES[task.status]
      : task.queued_for === "training"
        ? "Training"
        : "Preprocessing";
    setText(
      refs.progressLabel,
      running && p?.label && p.label !== stage ? `${stage} · ${p.label}` : stage,
    );
    setText(refs.progressPct, running ? fmt.percent(p?.percent ?? 0) : "");
    setBar(refs.progressBar, running ? (p?.percent ?? 0) : 0, "busy");
    refs.progressBar.dataset.phase = waiting ? "waiting" : "";
    paintProgressFacts(refs, task, now);
    maybeAnnounceProgress(task);
  }

  // Why it ended badly, and what else the user should know.
  const errorText = task.status === "failed" ? task.error_message || task.message : null;
  show(refs.error, Boolean(errorText));
  if (errorText) {
    // The first line says what happened; what follows (e.g. a trainer's last output) is
    // shown as it was printed.
    const [headline, ...rest] = errorText.trim().split("\n");
    const more = rest.join("\n").trim();
    refs.error.replaceChildren(
      h(
        "strong",
        {},
        task.progress?.stage === "training" ? "Training failed. " : "Preprocessing failed. ",
      ),
      headline,
      more ? h("pre", { class: "alert-detail", tabindex: "0" }, more) : null,
      h("span", { class: "hint" }, " The log below has the details; Retry runs the stage again."),
    );
    const detailBox = refs.error.querySelector(".alert-detail");
    if (detailBox) requestAnimationFrame(() => (detailBox.scrollTop = detailBox.scrollHeight));
  }
  const notices = [];
  if (task.expired)
    notices.push("The cleanup removed this task's files: upload the video again to redo it.");
  if (
    task.status === "preprocessing_completed" &&
    !task.queued_for &&
    state.health &&
    !state.health.training.available
  ) {
    notices.push(
      `Training is not available on this server: ${state.health.training.detail}. Download the dataset to train elsewhere.`,
    );
  } else if (task.status === "preprocessing_completed" && !task.queued_for && !task.expired) {
    notices.push("Frames and camera positions are ready. Start training when you like.");
  }
  if (task.status === "cancelled")
    notices.push("Cancelled. Retry runs it again from the stage that did not finish.");
  setText(refs.notice, notices.join(" "));
  show(refs.notice, notices.length > 0);

  // Actions the state allows.
  const can = allowed(task);
  for (const [key, element] of Object.entries(refs.actions)) show(element, Boolean(can[key]));
  show(refs.trainGroup, can.train);
  refs.actions.train.disabled = Boolean(state.health && !state.health.training.available);
  refs.actions.train.title = refs.actions.train.disabled
    ? `Training is not available: ${state.health.training.detail}`
    : "";
  setText(refs.actions.cancel, task.queued_for && !running ? "Remove from queue" : "Cancel");
  if (can.zip) {
    refs.actions.zip.href = api.url(`download/${task.task_id}`, {}, { withToken: true });
    setText(
      refs.actions.zip,
      task.status === "training_completed" ? "Download ZIP" : "Download dataset (ZIP)",
    );
  }
  if (can.ply)
    refs.actions.ply.href = api.url(`download/${task.task_id}/ply`, {}, { withToken: true });
  refs.trainPreset.options[0].textContent = `As uploaded · ${fmt.count(task.params.iterations)} steps`;

  paintSummary(refs.summary, task);
  paintFacts(refs.facts, task);
  paintDetailTimes(refs, task, now);
}

function paintProgressFacts(refs, task, now) {
  const p = task.progress;
  const parts = [];
  const running = task.status === "preprocessing" || task.status === "training";
  if (!running) {
    const ahead = task.queue_position ? task.queue_position - 1 : 0;
    parts.push(
      ahead > 0 ? `${ahead} ${ahead === 1 ? "task" : "tasks"} ahead in line` : "Next in line",
    );
  } else if (p) {
    if (p.current != null && p.total) {
      const count = `${fmt.count(p.current)} of ${fmt.count(p.total)}`;
      parts.push(task.status === "training" ? `Step ${count}` : count);
    }
    const left = fmt.timeLeft(secondsLeft(task, now));
    if (left) parts.push(left);
    if (p.rate) {
      const unit = task.status === "training" ? " steps" : "";
      parts.push(`${p.rate.toFixed(p.rate < 10 ? 1 : 0)}${unit}/s`);
    }
    if (p.loss != null) parts.push(`loss ${p.loss.toFixed(4)}`);
    if (p.psnr != null) parts.push(`PSNR ${p.psnr.toFixed(1)} dB`);
  }
  setText(refs.progressFacts, parts.join(" · ") || "Starting…");
}

const announced = new Map(); // task_id -> last announced tenth of progress
function maybeAnnounceProgress(task) {
  const percent = task.progress?.percent;
  if (percent == null || !(task.status === "preprocessing" || task.status === "training")) return;
  const key = `${task.status}:${Math.floor(percent / 10)}`;
  if (announced.get(task.task_id) === key) return;
  const first = !announced.has(task.task_id);
  announced.set(task.task_id, key);
  if (!first) announce(`${fmt.STAGE_NAMES[task.status]} ${Math.floor(percent / 10) * 10} percent`);
}

function paintDetailTimes(refs, task, now) {
  if (!refs) return;
  setText(refs.sub, timeLine(task, now));
  refs.sub.title = `Uploaded ${fmt.dateTime(task.created_at)}`;
  if (
    task.status === "preprocessing" ||
    task.status === "training" ||
    task.queued_for ||
    task.status === "pending"
  ) {
    paintProgressFacts(refs, task, now);
  }
}

function stat(label, value, note) {
  return h(
    "div",
    { class: "stat" },
    h("dt", {}, label),
    h(
      "dd",
      {},
      h("span", { class: "stat-value" }, value),
      note ? h("span", { class: "stat-note" }, note) : null,
    ),
  );
}

function paintSummary(container, task) {
  const pre = task.metadata?.preprocessing;
  const train = task.metadata?.training;
  const key = JSON.stringify([pre, train, task.status]);
  if (container.dataset.key === key) return;
  container.dataset.key = key;
  const parts = [];
  if (pre) {
    const kept = pre.frames_kept;
    const registered = pre.frames_registered;
    const fraction = pre.registered_fraction ?? (kept ? registered / kept : null);
    let verdict;
    if (fraction == null) verdict = "";
    else if (fraction >= 0.9)
      verdict = "Camera tracking worked well: almost every frame got a position.";
    else if (fraction >= 0.6)
      verdict = "Camera tracking worked for most frames; the rest were left out.";
    else verdict = "Only some frames got a position; the result may have gaps.";
    const sentence =
      `${fmt.count(kept)} frames were kept` +
      (pre.frames_decoded ? ` out of ${fmt.count(pre.frames_decoded)} decoded` : "") +
      `, ${fmt.count(registered)} of them placed in 3D, with ${fmt.count(pre.points3D)} points` +
      (pre.mean_reprojection_error_px != null
        ? ` (mean reprojection error ${pre.mean_reprojection_error_px.toFixed(2)} px).`
        : ".");
    parts.push(
      h("h3", {}, "Preprocessing"),
      h("p", { class: "summary-text" }, sentence, " ", verdict),
      h(
        "dl",
        { class: "stats" },
        stat("Frames kept", fmt.count(kept)),
        stat(
          "Cameras placed",
          `${fmt.count(registered)} / ${fmt.count(kept)}`,
          fraction != null ? fmt.percent(fraction * 100) : null,
        ),
        stat("3D points", fmt.count(pre.points3D)),
        stat(
          "Reprojection error",
          pre.mean_reprojection_error_px != null
            ? `${pre.mean_reprojection_error_px.toFixed(2)} px`
            : "–",
        ),
      ),
    );
  }
  if (train) {
    parts.push(
      h("h3", {}, "Training"),
      h(
        "dl",
        { class: "stats" },
        stat("Gaussians", fmt.count(train.gaussian_count)),
        stat("Steps", fmt.count(train.iterations)),
        stat("Training time", fmt.duration(train.seconds)),
        stat("Model size", fmt.bytes(train.ply_size_bytes)),
      ),
    );
  }
  container.replaceChildren(...parts);
  show(container, parts.length > 0);
}

function paintFacts(container, task) {
  const video = task.metadata?.video || {};
  const p = task.params;
  const rows = [
    ["Status", `${fmt.status(task)[0]} (${task.status})`],
    ["Message", task.message || "–"],
    [
      "Video",
      [
        video.width && video.height ? `${video.width} × ${video.height}` : null,
        video.duration != null ? fmt.duration(video.duration) : null,
        video.fps ? `${Number(video.fps).toFixed(video.fps % 1 ? 2 : 0)} fps` : null,
        video.codec ? video.codec.toUpperCase() : null,
        task.video_size != null ? fmt.bytes(task.video_size) : null,
      ]
        .filter(Boolean)
        .join(" · ") || "–",
    ],
    ["Frames", `${p.min_frames} to ${p.max_frames}`],
    [
      "Training",
      `${fmt.count(p.iterations)} steps · ${p.down_sample_factor === 1 ? "full resolution" : `1/${p.down_sample_factor} resolution`}${p.keep_checkpoint ? " · checkpoint kept" : ""}${p.auto_training ? "" : " · on request"}`,
    ],
    ["Uploaded", fmt.dateTime(task.created_at)],
    ["Started", fmt.dateTime(task.started_at)],
    ["Finished", fmt.dateTime(task.finished_at)],
    ["Attempts", String(task.attempts)],
    ["Task id", task.task_id],
  ];
  const key = JSON.stringify(rows);
  if (container.dataset.key === key) return;
  container.dataset.key = key;
  container.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

async function act(action) {
  const task = state.tasks.get(detail.id);
  if (!task) return;
  const refs = detail.refs;
  const button = refs.actions[action];
  show(refs.actionError, false);
  if (action === "delete") {
    const running = isActive(task) ? " It is still running and will be stopped." : "";
    setText(
      $("#confirm-text"),
      `“${taskName(task)}” and its video, frames, model and log will be removed.${running} This cannot be undone.`,
    );
    const dialog = $("#confirm-dialog");
    dialog.returnValue = "";
    dialog.showModal();
    const choice = await new Promise((resolve) =>
      dialog.addEventListener("close", () => resolve(dialog.returnValue), { once: true }),
    );
    if (choice !== "confirm") {
      button.focus();
      return;
    }
  }
  const busyText = {
    cancel: "Cancelling…",
    retry: "Retrying…",
    train: "Starting…",
    delete: "Deleting…",
  }[action];
  const label = button.textContent;
  button.disabled = true;
  setText(button, busyText);
  try {
    if (action === "delete") {
      await api.del(`tasks/${task.task_id}`);
      toast(`${taskName(task)} deleted.`, "info");
      removeTask(task.task_id);
      return;
    }
    const body =
      action === "train" && refs.trainPreset.value ? { preset: refs.trainPreset.value } : undefined;
    const answer = await api.post(`tasks/${task.task_id}/${action}`, { json: body });
    const done = {
      cancel: `${taskName(task)}: cancelled.`,
      retry: `${taskName(task)}: queued to run again.`,
      train: `${taskName(task)}: queued for training.`,
    }[action];
    toast(done || answer.message, "info");
    const fresh = await api.get(`tasks/${task.task_id}`);
    upsert(fresh);
  } catch (error) {
    if (error.status === 404) {
      removeTask(task.task_id);
      toast("That task no longer exists.", "warn");
      return;
    }
    refs.actionError.replaceChildren(
      h("strong", {}, "That did not work. "),
      error.detail || String(error),
    );
    show(refs.actionError, true);
  } finally {
    if (button.isConnected) {
      button.disabled = false;
      if (button.textContent === busyText) setText(button, label);
      const current = state.tasks.get(task.task_id);
      if (current) detail.update(current);
    }
  }
}

// -- log panel -------------------------------------------------------------------------------

const TIMESTAMP = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) (.*)$/;

class LogPanel {
  constructor(root, task) {
    this.task = task;
    this.following = true;
    this.pending = [];
    this.source = null;
    this.shown = false;
    this.ended = null;
    this.followButton = h(
      "button",
      {
        type: "button",
        class: "button small",
        "aria-pressed": "true",
        onclick: () => this.toggle(),
      },
      "Pause",
    );
    this.state = h("span", { class: "log-state", role: "status" });
    this.raw = h(
      "a",
      {
        class: "button small ghost",
        href: api.url(`logs/${task.task_id}`, {}, { withToken: true }),
        target: "_blank",
        rel: "noopener",
      },
      "Open the whole log",
    );
    this.view = h("div", {
      class: "log",
      tabindex: "0",
      role: "log",
      "aria-live": "off",
      "aria-label": "Task log",
    });
    root.append(
      h(
        "div",
        { class: "panel-bar" },
        this.followButton,
        this.state,
        h("span", { class: "spacer" }),
        this.raw,
      ),
      this.view,
    );
  }

  visible(shown) {
    this.shown = shown;
    if (shown && !this.source) this.connect();
    if (!shown) this.disconnect();
  }

  update(task) {
    const wasActive = isActive(this.task);
    this.task = task;
    // A task that runs again (retry, train) writes to its log again: follow it.
    if (this.shown && this.ended && isActive(task) && !wasActive) this.connect();
  }

  connect() {
    this.disconnect();
    this.ended = null;
    this.pending = [];
    show(this.followButton, true);
    this.view.replaceChildren();
    setText(this.state, "Connecting…");
    const source = new EventSource(
      api.url(`logs/${this.task.task_id}/stream`, { lines: LOG_LINES }, { withToken: true }),
    );
    this.source = source;
    source.addEventListener("open", () =>
      setText(this.state, this.following ? "Following live" : "Paused"),
    );
    source.addEventListener("log", (event) => this.add(event.data));
    source.addEventListener("end", (event) => {
      source.close();
      this.source = null;
      this.ended = event.data;
      if (!this.following) this.toggle();
      show(this.followButton, false);
      setText(this.state, `The log ended: the task is ${event.data.replaceAll("_", " ")}.`);
    });
    source.addEventListener("error", () => {
      if (this.source !== source) return;
      // The server went away: read the tail again when it is back (no duplicates).
      source.close();
      this.source = null;
      setText(this.state, "Connection lost; reconnecting…");
      this.retry = setTimeout(() => this.shown && this.connect(), 3000);
    });
  }

  disconnect() {
    clearTimeout(this.retry);
    this.source?.close();
    this.source = null;
  }

  add(line) {
    if (!this.following) {
      this.pending.push(line);
      if (this.pending.length > LOG_KEEP) this.pending.shift();
      setText(this.followButton, `Follow (${fmt.count(this.pending.length)} new)`);
      return;
    }
    this.append([line]);
  }

  append(lines) {
    const fragment = document.createDocumentFragment();
    for (const line of lines) {
      const match = TIMESTAMP.exec(line);
      const text = match ? match[2] : line;
      const row = h("div", { class: "log-line" });
      if (match) row.append(h("span", { class: "log-time" }, fmt.clock(match[1])));
      row.append(text);
      if (text.startsWith("[server]")) row.classList.add("log-server");
      else if (/\b(error|traceback|exception|failed)\b/i.test(text)) row.classList.add("log-error");
      else if (text.startsWith("@progress")) row.classList.add("log-dim");
      fragment.append(row);
    }
    this.view.append(fragment);
    while (this.view.childElementCount > LOG_KEEP) this.view.firstElementChild.remove();
    if (this.following) this.view.scrollTop = this.view.scrollHeight;
  }

  flush() {
    if (this.pending.length && this.following) {
      const lines = this.pending;
      this.pending = [];
      this.append(lines);
    }
  }

  toggle() {
    this.following = !this.following;
    this.followButton.setAttribute("aria-pressed", String(this.following));
    setText(this.followButton, this.following ? "Pause" : "Follow");
    if (this.following) this.flush();
    if (!this.ended)
      setText(this.state, this.following ? "Following live" : "Paused: new lines wait");
  }

  close() {
    this.disconnect();
  }
}

// -- frames panel ---------------------------------------------------------------------------

class FramesPanel {
  constructor(root, task) {
    this.root = root;
    this.task = task;
    this.loaded = false;
    this.frames = [];
    this.status = h("p", { class: "panel-note", role: "status" });
    this.grid = h("ul", { class: "frames", "aria-label": "Kept frames" });
    root.append(this.status, this.grid);
  }

  update(task) {
    this.task = task;
  }

  async visible(shown) {
    if (!shown || this.loaded || !hasDataset(this.task)) return;
    this.loaded = true;
    setText(this.status, "Loading the frames…");
    try {
      const answer = await api.get(`tasks/${this.task.task_id}/frames`);
      this.frames = answer.frames;
      const video = this.task.metadata?.video;
      const ratio = video?.width && video?.height ? `${video.width} / ${video.height}` : "4 / 3";
      this.grid.style.setProperty("--ratio", ratio);
      this.grid.replaceChildren(
        ...answer.frames.map((frame, index) =>
          h(
            "li",
            {},
            h(
              "button",
              {
                type: "button",
                class: "thumb",
                "aria-label": `Frame ${index + 1} of ${answer.count}: ${frame.name}`,
                onclick: () => openFrame(this.frames, index),
              },
              h("img", {
                src: api.url(frame.thumbnail_url, {}, { withToken: true }),
                alt: "",
                loading: "lazy",
                decoding: "async",
              }),
              h("span", { class: "thumb-label", "aria-hidden": "true" }, String(index + 1)),
            ),
          ),
        ),
      );
      setText(
        this.status,
        `${fmt.count(answer.count)} frames were kept for the 3D reconstruction. Select one to see it larger.`,
      );
    } catch (error) {
      this.loaded = false;
      setText(this.status, `The frames cannot be shown: ${error.detail || error}`);
    }
  }

  close() {}
}

const frameViewer = { frames: [], index: 0 };

function openFrame(frames, index) {
  frameViewer.frames = frames;
  showFrame(index);
  const dialog = $("#frame-dialog");
  if (!dialog.open) dialog.showModal();
}

function showFrame(index) {
  const { frames } = frameViewer;
  if (!frames.length) return;
  frameViewer.index = (index + frames.length) % frames.length;
  const frame = frames[frameViewer.index];
  setText($("#frame-title"), `Frame ${frameViewer.index + 1} of ${frames.length} · ${frame.name}`);
  const image = $("#frame-image");
  image.src = api.url(frame.url, {}, { withToken: true });
  image.alt = `Frame ${frameViewer.index + 1}: ${frame.name}`;
}

// -- 3D panels --------------------------------------------------------------------------------

function sparseOf(taskId) {
  if (!state.sparse.has(taskId)) {
    const request = api.get(`tasks/${taskId}/sparse`);
    request.catch(() => state.sparse.delete(taskId));
    state.sparse.set(taskId, request);
  }
  return state.sparse.get(taskId);
}

class ViewerPanel {
  constructor(root, task, label) {
    this.task = task;
    this.view = null;
    this.started = false;
    this.closed = false;
    this.box = h("div", { class: "viewer", "data-state": "idle" });
    this.message = h("p", { class: "viewer-message", role: "status" });
    this.box.append(this.message);
    this.legend = h("p", { class: "viewer-legend" });
    this.reset = h(
      "button",
      {
        type: "button",
        class: "button small",
        disabled: true,
        onclick: () => this.view?.resetView(),
      },
      "Reset view",
    );
    this.full = h(
      "button",
      {
        type: "button",
        class: "button small ghost",
        disabled: true,
        onclick: () => this.fullscreen(),
      },
      "Full screen",
    );
    root.append(
      this.box,
      h(
        "div",
        { class: "panel-bar" },
        this.legend,
        h("span", { class: "spacer" }),
        this.reset,
        this.full,
      ),
      h("p", { class: "panel-note" }, label),
    );
  }

  setState(value, message) {
    this.box.dataset.state = value;
    this.full.disabled = value !== "ready";
    setText(this.message, message || "");
    show(this.message, Boolean(message));
  }

  fullscreen() {
    if (document.fullscreenElement) document.exitFullscreen();
    else this.box.requestFullscreen?.().catch(() => {});
  }

  update(task) {
    this.task = task;
  }

  visible(shown) {
    if (shown && !this.started && this.available()) {
      this.started = true;
      this.start().catch((error) => this.fail(error));
    }
    if (shown) this.view?.fit();
  }

  fail(error) {
    if (this.closed) return;
    this.view?.dispose();
    this.view = null;
    this.reset.disabled = true;
    this.started = false; // showing the tab again tries again
    this.setState("error", error?.detail || error?.message || String(error));
  }

  close() {
    this.closed = true;
    this.view?.dispose();
    this.view = null;
  }
}

class SparsePanel extends ViewerPanel {
  constructor(root, task) {
    super(
      root,
      task,
      "Orange: where the camera was for each kept frame; blue: its path. Drag to turn, right-drag or arrow keys to move, scroll or pinch to zoom.",
    );
  }

  available() {
    return hasDataset(this.task);
  }

  async start() {
    this.setState("loading", "Loading the point cloud…");
    const { loadThree, SparseView } = await import("./viewer3d.js");
    const [modules, sparse] = await Promise.all([loadThree(), sparseOf(this.task.task_id)]);
    if (this.closed) return;
    this.view = new SparseView(this.box, modules);
    this.view.show(sparse);
    this.reset.disabled = false;
    const shown =
      sparse.points.count < sparse.points.total
        ? ` (showing ${fmt.count(sparse.points.count)})`
        : "";
    setText(
      this.legend,
      `${fmt.count(sparse.points.total)} points${shown} · ${fmt.count(sparse.cameras.length)} cameras`,
    );
    this.setState("ready", "");
  }
}

class ModelPanel extends ViewerPanel {
  constructor(root, task) {
    super(
      root,
      task,
      "The trained Gaussian splats. Drag to turn, right-drag or arrow keys to move, scroll or pinch to zoom.",
    );
    this.abort = new AbortController();
  }

  available() {
    return hasModel(this.task);
  }

  async start() {
    const size = this.task.metadata.training.ply_size_bytes || 0;
    if (size > PLY_AUTOLOAD_BYTES && !this.confirmed) {
      this.setState("idle", "");
      const load = h(
        "button",
        {
          type: "button",
          class: "button primary",
          onclick: () => {
            this.confirmed = true;
            load.remove();
            this.start().catch((error) => this.fail(error));
          },
        },
        `Load the 3D model (${fmt.bytes(size)})`,
      );
      this.box.append(load);
      return;
    }
    this.setState("loading", "Loading the 3D viewer…");
    const { loadSpark, SplatView } = await import("./viewer3d.js");
    const modules = await loadSpark();
    const sparse = await sparseOf(this.task.task_id).catch(() => null);
    this.setState("loading", `Loading the model: 0 B of ${fmt.bytes(size)}`);
    const bytes = await api.getBytes(`download/${this.task.task_id}/ply`, {
      signal: this.abort.signal,
      onProgress: (loaded, total) => {
        const percent = total ? ` (${Math.round((100 * loaded) / total)} %)` : "";
        this.setState(
          "loading",
          `Loading the model: ${fmt.bytes(loaded)} of ${fmt.bytes(total || size)}${percent}`,
        );
      },
    });
    if (this.closed) return;
    this.setState("loading", "Preparing the splats…");
    this.view = new SplatView(this.box, modules);
    const count = await this.view.show(bytes, sparse);
    if (this.closed) return;
    this.reset.disabled = false;
    setText(
      this.legend,
      `${fmt.count(count || this.task.metadata.training.gaussian_count)} Gaussians · ${fmt.bytes(size)}`,
    );
    this.setState("ready", "");
  }

  close() {
    this.abort.abort();
    super.close();
  }
}

// -- selection and routing ---------------------------------------------------------------

function select(taskId) {
  const previous = state.selected;
  state.selected = taskId;
  if (previous && rows.has(previous)) rows.get(previous).link.removeAttribute("aria-current");
  if (taskId && rows.has(taskId)) rows.get(taskId).link.setAttribute("aria-current", "true");
  if (previous === taskId && detail.id === taskId) return;
  const task = taskId ? state.tasks.get(taskId) : null;
  detail.open(task || null);
  if (taskId && !task) loadSelected(taskId);
}

async function loadSelected(taskId) {
  try {
    const task = await api.get(`tasks/${taskId}`);
    state.tasks.set(task.task_id, task);
    layoutBoard();
    if (state.selected === taskId) detail.open(task);
  } catch (error) {
    if (error.status === 404 || error.status === 422) {
      toast("That task does not exist (any more).", "warn");
      if (state.selected === taskId) {
        state.selected = null;
        detail.open(null);
        history.replaceState(null, "", location.pathname + location.search);
      }
    }
  }
}

function route() {
  const match = /^#task=([0-9a-f-]{36})$/i.exec(location.hash);
  const id = match ? match[1].toLowerCase() : null;
  const changed = id !== state.selected;
  select(id);
  if (id && changed) scrollIntoViewIfStacked($("#detail"));
}

// -- start ---------------------------------------------------------------------------------

function tick() {
  const now = Date.now();
  for (const task of state.tasks.values()) {
    const row = rows.get(task.task_id);
    if (!row || row.item.hidden) continue;
    setText(row.time, timeLine(task, now));
    if (
      task.status === "preprocessing" ||
      task.status === "training" ||
      task.status === "pending"
    ) {
      const line = stageLine(task, now);
      setText(row.stage, line);
    }
  }
  detail.tick(now);
}

function wire() {
  api.hooks.unauthorized = (reason) => {
    askToken(reason);
  };
  wireUpload();
  $("#task-filter").addEventListener("change", (event) => {
    state.filter = event.target.value;
    layoutBoard();
  });
  $("#load-more").addEventListener("click", async () => {
    state.pageSize = Math.min(1000, state.pageSize + 50);
    await refreshTasks().catch((error) => toast(error.detail, "danger"));
  });
  $("#token-form").addEventListener("submit", saveToken);
  $("#token-button").addEventListener("click", () => {
    const dialog = $("#token-dialog");
    setText($("#token-reason"), "The token is kept in this browser and sent with every request.");
    show($("#token-forget"), Boolean(api.getToken()));
    show($("#token-error"), false);
    $("#token-input").value = "";
    dialog.showModal();
  });
  $("#token-forget").addEventListener("click", () => {
    api.setToken("");
    $("#token-dialog").close();
    toast("The saved token was removed from this browser.", "info");
    location.reload();
  });
  $("#token-dialog").addEventListener("cancel", (event) => {
    if (!api.getToken() && state.authRequired !== false) event.preventDefault(); // nothing works without it
  });
  $("#frame-prev").addEventListener("click", () => showFrame(frameViewer.index - 1));
  $("#frame-next").addEventListener("click", () => showFrame(frameViewer.index + 1));
  $("#frame-dialog").addEventListener("keydown", (event) => {
    if (event.key === "ArrowLeft") showFrame(frameViewer.index - 1);
    if (event.key === "ArrowRight") showFrame(frameViewer.index + 1);
  });
  window.addEventListener("hashchange", route);
}

async function start() {
  wire();
  setConnection("connecting");
  try {
    await loadHealth();
  } catch (error) {
    if (error.status === 401) await new Promise((resolve) => tokenWaiters.push(resolve));
    else if (error.status === 0) setConnection("offline");
  }
  try {
    await refreshTasks();
  } catch (error) {
    if (error.status === 0) setConnection("offline");
  }
  route();
  connectEvents();
  setInterval(tick, 1000);
  setInterval(() => loadHealth().catch(() => {}), HEALTH_MS);
  document.documentElement.dataset.ready = "true";
}

start();
