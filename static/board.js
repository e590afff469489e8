// The task board: every known task as a row, newest first, with its stage, progress bar and
// times; a filter and "Show older tasks". Each row links to #task={id}.

import { $, bar, h, setBar, setText, show } from "./dom.js";
import * as fmt from "./format.js";
import * as facts from "./task-facts.js";

/**
 * Mount the board on the page's #task-list and its controls.
 * @param {Document} doc
 * @param {{store: ReturnType<import("./store.js").createStore>, eta: object,
 *   refresh: () => Promise<void>, notify: {toast: Function}}} ctx
 * @returns {{tick: (now: number) => void, focusRow: (taskId: string) => boolean}}
 */
export function mountBoard(doc, ctx) {
  const { store, eta } = ctx;
  const list = $("#task-list", doc);
  const empty = $("#board-empty", doc);
  const rows = new Map(); // task_id -> {item, link, name, badge, stage, bar, pct, time}

  const lineOf = (task, now) => facts.stageLine(task, { now, eta, health: store.state.health });

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
    const name = facts.taskName(task);
    setText(row.name, name);
    row.name.title = name;
    setText(row.badge, label);
    row.badge.dataset.tone = tone;
    row.item.dataset.status = task.status;
    const line = lineOf(task, now);
    setText(row.stage, line);
    row.stage.title = line;
    setText(row.pct, facts.rowPercent(task));
    setBar(row.bar, facts.barPercent(task), facts.barTone(task));
    setText(row.time, facts.timeLine(task, now));
    markCurrent(row, store.state.selected === task.task_id);
    show(row.item, facts.matchesFilter(task, store.state.filter));
    return row;
  }

  function markCurrent(row, current) {
    if (current) row.link.setAttribute("aria-current", "true");
    else row.link.removeAttribute("aria-current");
  }

  /** Put the rows in newest-first order, showing those that match the filter. */
  function layout() {
    const { state } = store;
    const tasks = [...state.tasks.values()].sort(facts.newestFirst);
    let previous = null;
    let shown = 0;
    for (const task of tasks) {
      const row = paintRow(task);
      if (!row.item.hidden) shown += 1;
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
    setText($("#task-count", doc), state.total ? `(${fmt.count(state.total)})` : "");
    if (!state.tasks.size) setText(empty, "No tasks yet. Upload a video to start.");
    else if (!shown) setText(empty, "No task matches this filter.");
    show(empty, shown === 0);
    show($("#load-more", doc), state.total > state.tasks.size);
  }

  store.subscribe((change, state) => {
    switch (change.type) {
      case "task": {
        const { task, before } = change;
        if (!before || before.created_at !== task.created_at) layout();
        else paintRow(task);
        break;
      }
      case "selected": {
        const previous = change.previous && rows.get(change.previous);
        if (previous) markCurrent(previous, false);
        const current = state.selected && rows.get(state.selected);
        if (current) markCurrent(current, true);
        break;
      }
      case "removed":
      case "list":
      case "filter":
      case "health":
        layout();
        break;
    }
  });

  $("#task-filter", doc).addEventListener("change", (event) => {
    store.setFilter(event.target.value);
  });
  $("#load-more", doc).addEventListener("click", async () => {
    store.setPageSize(Math.min(1000, store.state.pageSize + 50));
    await ctx.refresh().catch((error) => ctx.notify.toast(error.detail, "danger"));
  });

  return {
    /** Repaint what changes with the clock: ages, durations and time left. */
    tick(now) {
      for (const task of store.state.tasks.values()) {
        const row = rows.get(task.task_id);
        if (!row || row.item.hidden) continue;
        setText(row.time, facts.timeLine(task, now));
        if (facts.isActive(task) || facts.runningStage(task)) setText(row.stage, lineOf(task, now));
      }
    },

    /** Scroll to the task's row and focus it; false when it has none. */
    focusRow(taskId) {
      const row = taskId && rows.get(taskId);
      if (!row) return false;
      row.link.scrollIntoView({ block: "center" });
      row.link.focus();
      return true;
    },
  };
}
