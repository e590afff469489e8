// The web page: upload a video, follow every task live, look at a task's log, frames, camera
// path and trained splats, and act on it. This module only wires the views together around
// one store; each view is mounted from its own module and talks only to the public API.

import * as api from "./api.js";
import { mountBoard } from "./board.js";
import { mountCluster } from "./cluster.js";
import { mountDetail } from "./detail.js";
import { $, createNotifier, scrollIntoViewIfStacked } from "./dom.js";
import { loadHealth, mountHealth } from "./health.js";
import { mountLive, refreshTasks } from "./live.js";
import { mountFrameDialog } from "./panel-frames.js";
import { createStore } from "./store.js";
import { canPreview, createEta, statusChangeNote, taskName } from "./task-facts.js";
import * as fmt from "./format.js";
import { mountToken } from "./token.js";
import { mountUpload } from "./upload.js";

const HEALTH_MS = 30000;
const CLUSTER_HEALTH_MS = 5000; // with a Ray cluster, its free GPUs change by the minute
const TASK_HASH = /^#task=([0-9a-f-]{36})$/i;

function start(doc) {
  const store = createStore();
  const ctx = {
    api,
    store,
    eta: createEta(),
    notify: createNotifier($("#announcer", doc), $("#toasts", doc)),
    sparse: new Map(), // task_id -> Promise of the /sparse payload
    refresh: () => refreshTasks(ctx),
    loadHealth: () => loadHealth(ctx),
    focusRow: (taskId) => board.focusRow(taskId),
    onHello: () => ctx.loadHealth().catch(() => {}),
    onLocked: () => live.setState("locked"),
    onSaved: () => {
      live.connect();
      ctx.refresh().catch(() => {});
    },
    onUploaded: (taskId) => {
      location.hash = `task=${taskId}`;
    },
  };
  mountHealth(doc, ctx);
  mountCluster(doc, ctx);
  const board = mountBoard(doc, ctx);
  const live = mountLive(doc, ctx);
  const token = mountToken(doc, ctx);
  ctx.frameDialog = mountFrameDialog(doc, ctx);
  const detail = mountDetail(doc, ctx);
  mountUpload(doc, ctx);

  const clearHash = () => history.replaceState(null, "", location.pathname + location.search);

  /** Fetch a selected task the board does not hold (older than its page, or just made). */
  async function loadSelected(taskId) {
    try {
      store.upsert(await api.get(`tasks/${taskId}`), { counted: true });
      if (store.state.selected === taskId && detail.shownId() !== taskId) {
        detail.open(store.state.tasks.get(taskId));
      }
    } catch (error) {
      if (error.status === 404 || error.status === 422) {
        ctx.notify.toast("That task does not exist (any more).", "warn");
        if (store.state.selected === taskId) {
          store.select(null);
          clearHash();
        }
      }
    }
  }

  function statusChanged(before, task) {
    if (!canPreview(task)) ctx.sparse.delete(task.task_id); // rerun: a new model
    ctx.notify.announce(`${taskName(task)}: ${fmt.status(task)[0]}`);
    const note = statusChangeNote(before, task);
    if (note) ctx.notify.toast(note.text, note.tone, note.ms);
  }

  store.subscribe((change, state) => {
    switch (change.type) {
      case "task":
        if (change.before && change.before.status !== change.task.status) {
          statusChanged(change.before, change.task);
        }
        break;
      case "list":
        for (const { before, task } of change.changed) {
          if (before && before.status !== task.status) statusChanged(before, task);
        }
        if (state.selected && !state.tasks.has(state.selected)) loadSelected(state.selected);
        break;
      case "removed":
        if (state.selected === change.taskId) {
          store.select(null);
          clearHash();
        }
        break;
      case "selected": {
        const id = state.selected;
        const task = id ? state.tasks.get(id) : null;
        detail.open(task || null);
        if (id && !task) loadSelected(id);
        break;
      }
    }
  });

  function route() {
    const match = TASK_HASH.exec(location.hash);
    const id = match ? match[1].toLowerCase() : null;
    const changed = id !== store.state.selected;
    store.select(id);
    if (!changed && id && detail.shownId() !== id && store.state.tasks.has(id)) {
      detail.open(store.state.tasks.get(id));
    }
    if (id && changed) scrollIntoViewIfStacked($("#detail", doc));
  }

  async function begin() {
    window.addEventListener("hashchange", route);
    live.setState("connecting");
    try {
      await ctx.loadHealth();
    } catch (error) {
      if (error.status === 401) await token.waitForToken();
      else if (error.status === 0) live.report("poll-unreachable");
    }
    try {
      await ctx.refresh();
    } catch (error) {
      if (error.status === 0) live.report("poll-unreachable");
    }
    route();
    live.connect();
    setInterval(() => {
      const now = Date.now();
      board.tick(now);
      detail.tick(now);
    }, 1000);
    let healthAt = Date.now();
    setInterval(() => {
      if (!store.state.health?.cluster && Date.now() - healthAt < HEALTH_MS) return;
      healthAt = Date.now();
      ctx.loadHealth().catch(() => {});
    }, CLUSTER_HEALTH_MS);
    doc.documentElement.dataset.ready = "true";
  }

  begin();
}

start(document);
