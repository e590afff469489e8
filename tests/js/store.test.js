// The page's store (static/store.js): merging event payloads and list answers, stale copies,
// deletions, and what its subscribers hear.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  createStore,
  idOfDeletedEvent,
  isStale,
  mergeList,
  taskOfEvent,
} from "../../static/store.js";
import { makeTask } from "./task-fixture.js";

const listOf = (items, total = items.length) => ({
  tasks: items.map((t) => t.task_id),
  items,
  total,
  limit: 50,
  offset: 0,
});

describe("event payloads", () => {
  test("a task event carries the task; anything else is rejected", () => {
    const task = makeTask({ status: "training" });
    assert.deepEqual(taskOfEvent(JSON.stringify({ task })), task);
    assert.equal(taskOfEvent("not json"), null);
    assert.equal(taskOfEvent(JSON.stringify({ task: { status: "x" } })), null);
    assert.equal(taskOfEvent("null"), null);
  });

  test("a deleted event carries the id", () => {
    assert.equal(idOfDeletedEvent('{"task_id": "abc"}'), "abc");
    assert.equal(idOfDeletedEvent('{"task_id": 3}'), null);
    assert.equal(idOfDeletedEvent("{"), null);
  });
});

describe("upsert", () => {
  test("a new task is stored, counted and announced to subscribers", () => {
    const store = createStore();
    const heard = [];
    store.subscribe((change, state) => heard.push([change.type, state.total]));
    const task = makeTask();
    assert.equal(store.upsert(task), true);
    assert.equal(store.state.tasks.get(task.task_id), task);
    assert.deepEqual(heard, [["task", 1]]);
  });

  test("an older copy than the one known is ignored", () => {
    const store = createStore();
    const newer = makeTask({ status: "training", updated_at: "2025-05-01T10:00:05Z" });
    const older = { ...newer, status: "preprocessing", updated_at: "2025-05-01T10:00:01Z" };
    store.upsert(newer);
    assert.equal(isStale(newer, older), true);
    assert.equal(store.upsert(older), false);
    assert.equal(store.state.tasks.get(newer.task_id).status, "training");
  });

  test("a change reports the copy it replaced", () => {
    const store = createStore();
    const first = makeTask({ status: "preprocessing" });
    store.upsert(first);
    let change = null;
    store.subscribe((c) => (change = c));
    const second = {
      ...first,
      status: "preprocessing_completed",
      updated_at: "2025-05-01T10:01:00Z",
    };
    store.upsert(second);
    assert.equal(change.before.status, "preprocessing");
    assert.equal(change.task.status, "preprocessing_completed");
    assert.equal(store.state.total, 1);
  });

  test("a fetched task already in the total does not count twice", () => {
    const store = createStore();
    store.mergeList(listOf([makeTask()], 5));
    store.upsert(makeTask({ created_at: "2025-04-01T00:00:00Z" }), { counted: true });
    assert.equal(store.state.total, 5);
    assert.equal(store.state.tasks.size, 2);
  });

  test("an unsubscribed listener hears nothing more", () => {
    const store = createStore();
    let calls = 0;
    const stop = store.subscribe(() => (calls += 1));
    store.upsert(makeTask());
    stop();
    store.upsert(makeTask());
    assert.equal(calls, 1);
  });
});

describe("list answers", () => {
  test("the page is read from `items`", () => {
    const a = makeTask();
    const b = makeTask();
    const merged = mergeList(new Map(), listOf([a, b]));
    assert.deepEqual([...merged.tasks.keys()], [a.task_id, b.task_id]);
    assert.equal(merged.total, 2);
  });

  test("a known task missing from a complete answer was deleted", () => {
    const kept = makeTask();
    const gone = makeTask();
    const known = new Map([
      [kept.task_id, kept],
      [gone.task_id, gone],
    ]);
    const merged = mergeList(known, listOf([kept]));
    assert.deepEqual(merged.removed, [gone.task_id]);
    assert.equal(merged.tasks.has(gone.task_id), false);
  });

  test("a task older than a partial page is kept; one as new as the page is not", () => {
    const page = [
      makeTask({ created_at: "2025-05-01T12:00:00Z" }),
      makeTask({ created_at: "2025-05-01T11:00:00Z" }),
    ];
    const older = makeTask({ created_at: "2025-05-01T09:00:00Z" });
    const deleted = makeTask({ created_at: "2025-05-01T11:30:00Z" });
    const known = new Map([
      [older.task_id, older],
      [deleted.task_id, deleted],
    ]);
    const merged = mergeList(known, listOf(page, 10));
    assert.equal(merged.tasks.has(older.task_id), true);
    assert.deepEqual(merged.removed, [deleted.task_id]);
    assert.equal(merged.total, 10);
  });

  test("a newer copy from an event wins over the answer's", () => {
    const live = makeTask({ status: "training", updated_at: "2025-05-01T10:05:00Z" });
    const polled = {
      ...live,
      status: "preprocessing_completed",
      updated_at: "2025-05-01T10:04:00Z",
    };
    const merged = mergeList(new Map([[live.task_id, live]]), listOf([polled]));
    assert.equal(merged.tasks.get(live.task_id).status, "training");
    assert.deepEqual(merged.changed, []);
  });

  test("the store reports the status changes a list brought", () => {
    const store = createStore();
    const before = makeTask({ status: "training" });
    store.upsert(before);
    let change = null;
    store.subscribe((c) => (change = c));
    const after = { ...before, status: "training_completed", updated_at: "2025-05-01T11:00:00Z" };
    store.mergeList(listOf([after]));
    assert.equal(change.type, "list");
    assert.equal(change.changed[0].before.status, "training");
    assert.equal(change.changed[0].task.status, "training_completed");
  });
});

describe("removal, selection and filter", () => {
  test("removing a task lowers the total; an unknown id changes nothing", () => {
    const store = createStore();
    const task = makeTask();
    store.upsert(task);
    const heard = [];
    store.subscribe((c) => heard.push(c.type));
    assert.equal(store.remove("nope"), false);
    assert.equal(store.remove(task.task_id), true);
    assert.equal(store.state.total, 0);
    assert.deepEqual(heard, ["removed"]);
  });

  test("selecting tells the previous selection; the same selection twice is one change", () => {
    const store = createStore();
    const heard = [];
    store.subscribe((c, s) => heard.push([c.previous, s.selected]));
    store.select("a");
    store.select("a");
    store.select("b");
    assert.deepEqual(heard, [
      [null, "a"],
      ["a", "b"],
    ]);
  });

  test("filter and health changes are announced", () => {
    const store = createStore();
    const heard = [];
    store.subscribe((c) => heard.push(c.type));
    store.setFilter("active");
    store.setFilter("active");
    store.setHealth({ training: { available: true } });
    assert.deepEqual(heard, ["filter", "health"]);
    assert.equal(store.state.filter, "active");
  });
});
