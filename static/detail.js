// The detail view of the selected task: its name and status, the steps of the flow, the
// running stage's progress, why it failed, its actions, its results, and the tabs with the
// log, the frames and the two 3D views.

import { createActions } from "./detail-actions.js";
import { paintFacts, paintSummary } from "./detail-summary.js";
import { $, bar, h, setBar, setText, show } from "./dom.js";
import * as fmt from "./format.js";
import { createFramesPanel } from "./panel-frames.js";
import { createLogPanel } from "./panel-log.js";
import { createSparsePanel } from "./panel-3d.js";
import { createModelPanel } from "./panel-model.js";
import * as facts from "./task-facts.js";
import { failureView, notices } from "./task-summary.js";

const TAB_NAMES = { model: "3D model", sparse: "Cameras and points", frames: "Frames", log: "Log" };
const PANELS = {
  log: createLogPanel,
  frames: createFramesPanel,
  sparse: createSparsePanel,
  model: createModelPanel,
};

/**
 * Mount the detail view on #detail; it follows the store's task changes by itself.
 * @param {Document} doc
 * @param {object} ctx the page's context (store, api, eta, notify, focusRow, …)
 * @returns {{open: (task: object|null) => void, shownId: () => string|null,
 *   tick: (now: number) => void}}
 */
export function mountDetail(doc, ctx) {
  const { store, eta } = ctx;
  const article = $("#task-detail", doc);
  let view = null; // {id, refs, panels, tab, pickedTab, announced}

  function build(id) {
    const refs = { tabs: {}, panels: {} };
    refs.title = h("h2", { id: "detail-title", tabindex: "-1" });
    refs.badge = h("span", { class: "badge big" });
    refs.sub = h("p", { class: "detail-sub" });
    refs.steps = h("ol", { class: "stepper", "aria-label": "Steps" });
    refs.stepItems = facts.STEPS.map((label) =>
      h(
        "li",
        { class: "step" },
        h("span", { class: "step-dot", "aria-hidden": "true" }),
        h("span", { class: "step-label" }, label),
      ),
    );
    refs.steps.append(...refs.stepItems);
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
    refs.actions = createActions(doc, ctx, () => view?.id ?? null);
    refs.summary = h("div", { class: "summary" });
    refs.facts = h("dl", { class: "facts" });

    const tabList = h("div", { class: "tabs", role: "tablist", "aria-label": "Task views" });
    for (const [key, label] of Object.entries(TAB_NAMES)) {
      refs.tabs[key] = h(
        "button",
        {
          type: "button",
          role: "tab",
          class: "tab",
          id: `tab-${key}`,
          "aria-controls": `panel-${key}`,
          "aria-selected": "false",
          tabindex: "-1",
          onclick: () => pickTab(key),
        },
        label,
      );
      tabList.append(refs.tabs[key]);
      refs.panels[key] = h("div", {
        class: "panel",
        role: "tabpanel",
        id: `panel-${key}`,
        "aria-labelledby": `tab-${key}`,
        hidden: true,
      });
    }
    tabList.addEventListener("keydown", (event) => {
      const shown = Object.keys(refs.tabs).filter((key) => !refs.tabs[key].hidden);
      const index = shown.indexOf(view?.tab);
      const next = {
        ArrowRight: shown[(index + 1) % shown.length],
        ArrowLeft: shown[(index - 1 + shown.length) % shown.length],
        Home: shown[0],
        End: shown.at(-1),
      }[event.key];
      if (next) {
        event.preventDefault();
        pickTab(next, true, true);
      }
    });
    const back = (event) => {
      event.preventDefault();
      if (ctx.focusRow(id)) return;
      const title = $("#tasks-title", doc);
      title.scrollIntoView({ block: "center" });
      title.focus();
    };
    refs.root = h(
      "div",
      { class: "detail-inner" },
      h("a", { class: "back-link", href: "#tasks-title", onclick: back }, "↑ All tasks"),
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
      refs.actions.element,
      refs.actions.errorBox,
      refs.summary,
      tabList,
      ...Object.values(refs.panels),
      h("details", { class: "more-facts" }, h("summary", {}, "Task details"), refs.facts),
    );
    return refs;
  }

  function close() {
    if (!view) return;
    for (const panel of Object.values(view.panels)) panel.close();
    view = null;
  }

  /** Show `task` (or the how-it-works text when null). */
  function open(task) {
    close();
    show($("#detail-empty", doc), !task);
    show(article, Boolean(task));
    if (!task) {
      article.replaceChildren();
      return;
    }
    for (const id of ctx.sparse.keys()) if (id !== task.task_id) ctx.sparse.delete(id);
    const refs = build(task.task_id);
    article.replaceChildren(refs.root);
    const panels = {};
    for (const [key, create] of Object.entries(PANELS)) {
      panels[key] = create(refs.panels[key], task, ctx);
    }
    view = { id: task.task_id, refs, panels, tab: null, pickedTab: false, announced: null };
    update(task);
    pickTab(facts.defaultTab(task), false);
  }

  function update(task) {
    if (!view || task.task_id !== view.id) return;
    paint(view.refs, task);
    for (const panel of Object.values(view.panels)) panel.update(task);
    const tabs = facts.availableTabs(task);
    for (const [name, button] of Object.entries(view.refs.tabs)) show(button, tabs.has(name));
    const best = facts.defaultTab(task);
    if (!tabs.has(view.tab) || (!view.pickedTab && best !== view.tab)) pickTab(best, false);
  }

  function pickTab(name, byUser = true, focus = false) {
    if (!view) return;
    if (byUser) view.pickedTab = true;
    view.tab = name;
    for (const [key, button] of Object.entries(view.refs.tabs)) {
      const selected = key === name;
      button.setAttribute("aria-selected", String(selected));
      button.tabIndex = selected ? 0 : -1;
      show(view.refs.panels[key], selected);
      if (selected && focus) button.focus();
    }
    for (const [key, panel] of Object.entries(view.panels)) panel.visible(key === name);
  }

  function paint(refs, task) {
    const now = Date.now();
    const [label, tone] = fmt.status(task);
    setText(refs.title, facts.taskName(task));
    setText(refs.badge, label);
    refs.badge.dataset.tone = tone;
    facts.stepStates(task).forEach((value, index) => {
      const item = refs.stepItems[index];
      item.dataset.state = value;
      item.setAttribute("aria-label", `${item.textContent}: ${facts.STEP_NAMES[value]}`);
      if (value === "current" || value === "waiting") item.setAttribute("aria-current", "step");
      else item.removeAttribute("aria-current");
    });

    const progress = facts.progressView(task, { now, eta });
    show(refs.progress, progress.shown);
    if (progress.shown) {
      setText(refs.progressLabel, progress.label);
      setText(refs.progressPct, progress.percentText);
      setBar(refs.progressBar, progress.percent, "busy");
      refs.progressBar.dataset.phase = progress.waiting ? "waiting" : "";
      refs.progressBar.dataset.status = task.status; // whose progress the bar shows
      setText(refs.progressFacts, progress.facts);
      announceProgress(task);
    }

    const failure = failureView(task);
    show(refs.error, Boolean(failure));
    if (failure) {
      // The first line says what happened; what follows (e.g. a trainer's last output) is
      // shown as it was printed.
      const more = failure.more
        ? h("pre", { class: "alert-detail", tabindex: "0" }, failure.more)
        : null;
      refs.error.replaceChildren(
        h("strong", {}, failure.title),
        failure.headline,
        more,
        h("span", { class: "hint" }, " The log below has the details; Retry runs the stage again."),
      );
      if (more) requestAnimationFrame(() => (more.scrollTop = more.scrollHeight));
    }
    const notes = notices(task, store.state.health);
    setText(refs.notice, notes.join(" "));
    show(refs.notice, notes.length > 0);

    refs.actions.paint(task);
    paintSummary(refs.summary, task);
    paintFacts(refs.facts, task);
    paintTimes(refs, task, now);
  }

  function announceProgress(task) {
    const next = facts.progressAnnouncement(task);
    if (!next || view.announced === next.key) return;
    const first = view.announced === null;
    view.announced = next.key;
    if (!first) ctx.notify.announce(next.text);
  }

  function paintTimes(refs, task, now) {
    setText(refs.sub, facts.timeLine(task, now));
    refs.sub.title = `Uploaded ${fmt.dateTime(task.created_at)}`;
    if (facts.isActive(task) || facts.runningStage(task)) {
      setText(refs.progressFacts, facts.progressFacts(task, now, eta));
    }
  }

  store.subscribe((change, state) => {
    if (!view) return;
    if (change.type === "task") update(change.task);
    else if (change.type === "list" || change.type === "health") {
      const task = state.tasks.get(view.id);
      if (task) update(task);
    }
  });

  return {
    open,
    shownId: () => view?.id ?? null,
    tick(now) {
      const task = view && store.state.tasks.get(view.id);
      if (task) paintTimes(view.refs, task, now);
    },
  };
}
