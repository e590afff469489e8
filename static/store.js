// The page's state in one place: the tasks it knows, the board's filter and page size, the
// selected task and the server's health. Views subscribe to its changes; nothing else holds
// state shared between views. No DOM here.

import { toTime } from "./format.js";

/**
 * @typedef {import("./task-facts.js").Task} Task
 * @typedef {{before: Task|undefined, task: Task}} TaskChange
 * @typedef {(
 *   {type: "task", task: Task, before: Task|undefined} |
 *   {type: "removed", taskId: string} |
 *   {type: "list", changed: TaskChange[], removed: string[]} |
 *   {type: "selected", previous: string|null} |
 *   {type: "filter"} |
 *   {type: "health"}
 * )} Change
 */

/** Whether `task` is older news than `before` (a late event or poll answer). */
export function isStale(before, task) {
  if (!before) return false;
  const known = toTime(before.updated_at);
  const incoming = toTime(task.updated_at);
  return known != null && incoming != null && known > incoming;
}

/** The task of a `task` event's JSON payload (`{"task": {...}}`), or null if malformed. */
export function taskOfEvent(data) {
  let payload;
  try {
    payload = JSON.parse(data);
  } catch {
    return null;
  }
  const task = payload?.task;
  return task && typeof task.task_id === "string" ? task : null;
}

/** The task id of a `deleted` event's JSON payload (`{"task_id": "…"}`), or null. */
export function idOfDeletedEvent(data) {
  try {
    const id = JSON.parse(data)?.task_id;
    return typeof id === "string" ? id : null;
  } catch {
    return null;
  }
}

/**
 * Merge a page of `GET /tasks` (`{items, total}`, newest first) into the known tasks.
 * A known task missing from the answer although the answer covers its age (or holds every
 * task) was deleted meanwhile; known tasks older than the page stay. A newer copy already
 * known (from an event) wins over the answer's.
 * @param {Map<string, Task>} known
 * @param {{items: Task[], total: number}} answer
 */
export function mergeList(known, answer) {
  const items = answer.items;
  const tasks = new Map(known);
  const changed = [];
  const seen = new Set();
  for (const task of items) {
    seen.add(task.task_id);
    const before = known.get(task.task_id);
    if (isStale(before, task)) continue;
    tasks.set(task.task_id, task);
    changed.push({ before, task });
  }
  const complete = items.length >= answer.total;
  const oldest = items.length ? (toTime(items.at(-1).created_at) ?? Infinity) : Infinity;
  const removed = [];
  for (const [id, task] of known) {
    if (seen.has(id)) continue;
    if (complete || (toTime(task.created_at) ?? 0) >= oldest) {
      tasks.delete(id);
      removed.push(id);
    }
  }
  return { tasks, total: answer.total, changed, removed };
}

/** A new store. Listeners get each Change and the state after it. */
export function createStore({ pageSize = 50 } = {}) {
  const listeners = new Set();
  const state = {
    /** @type {Map<string, Task>} */
    tasks: new Map(),
    total: 0,
    pageSize,
    filter: "all",
    /** @type {string|null} */
    selected: null,
    health: null,
  };
  const emit = (change) => {
    for (const listener of [...listeners]) listener(change, state);
  };
  return {
    state,

    /** Call `listener(change, state)` on every change; returns the function that stops it. */
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },

    /** A task changed (event, action answer, single fetch): keep it unless it is stale.
     * A task new to the store adds one to the total unless `counted` (it was in the total
     * already: a task older than the loaded page). */
    upsert(task, { counted = false } = {}) {
      const before = state.tasks.get(task.task_id);
      if (isStale(before, task)) return false;
      if (!before && !counted) state.total += 1;
      state.tasks.set(task.task_id, task);
      emit({ type: "task", task, before });
      return true;
    },

    /** A task was deleted. */
    remove(taskId) {
      if (!state.tasks.delete(taskId)) return false;
      state.total = Math.max(0, state.total - 1);
      emit({ type: "removed", taskId });
      return true;
    },

    /** A fresh page of `GET /tasks`. */
    mergeList(answer) {
      const merged = mergeList(state.tasks, answer);
      state.tasks = merged.tasks;
      state.total = merged.total;
      emit({ type: "list", changed: merged.changed, removed: merged.removed });
    },

    select(taskId) {
      const previous = state.selected;
      if (previous === taskId) return;
      state.selected = taskId;
      emit({ type: "selected", previous });
    },

    setFilter(filter) {
      if (state.filter === filter) return;
      state.filter = filter;
      emit({ type: "filter" });
    },

    setPageSize(size) {
      state.pageSize = size;
    },

    setHealth(health) {
      state.health = health;
      emit({ type: "health" });
    },
  };
}
