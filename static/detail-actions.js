// The detail view's action bar: downloads, start training (with a quality choice), retry,
// cancel and delete. What shows comes from the server's task (`allowed_actions`, `results`);
// a press posts the action, confirms a delete first and reports a refusal under the bar.

import { $, h, setText, show } from "./dom.js";
import * as fmt from "./format.js";
import * as facts from "./task-facts.js";

const BUSY_TEXT = {
  cancel: "Cancelling…",
  retry: "Retrying…",
  train: "Starting…",
  delete: "Deleting…",
};

/**
 * The action bar and its error box for one task's detail view.
 * @param {Document} doc
 * @param {{api: object, store: object, notify: {toast: Function}}} ctx
 * @param {() => string|null} currentId the id of the task the view shows
 */
export function createActions(doc, ctx, currentId) {
  const { api, store, notify } = ctx;
  const actions = {};
  const link = (key, text, cls) => {
    actions[key] = h("a", { class: `button ${cls}`, href: "#", download: "" }, text);
    return actions[key];
  };
  const button = (key, text, cls) => {
    actions[key] = h(
      "button",
      { type: "button", class: `button ${cls}`, onclick: () => act(key) },
      text,
    );
    return actions[key];
  };
  const trainPreset = h(
    "select",
    { class: "small-select", "aria-label": "Training quality" },
    h("option", { value: "" }, "As uploaded"),
    h("option", { value: "fast" }, "Fast · 7,000 steps"),
    h("option", { value: "full" }, "Full · 30,000 steps"),
  );
  const trainGroup = h(
    "span",
    { class: "train-group" },
    button("train", "Start training", "primary"),
    trainPreset,
  );
  const element = h(
    "div",
    { class: "actions", role: "group", "aria-label": "Task actions" },
    link("ply", "Download .ply", "primary"),
    link("spz", "Download .spz", ""),
    link("zip", "Download ZIP", ""),
    trainGroup,
    button("retry", "Retry", ""),
    button("cancel", "Cancel", ""),
    button("delete", "Delete", "danger-outline"),
  );
  const errorBox = h("div", { class: "alert error", role: "alert", hidden: true });
  const busy = new Set();

  function paint(task) {
    const view = facts.actionsView(task, store.state.health);
    for (const [key, item] of Object.entries(actions)) {
      show(item, view[key].shown || busy.has(key));
    }
    show(trainGroup, view.train.shown || busy.has("train"));
    if (!busy.has("train")) actions.train.disabled = view.train.disabled;
    actions.train.title = view.train.title;
    if (!busy.has("cancel")) setText(actions.cancel, view.cancel.label);
    if (view.zip.shown) {
      actions.zip.href = api.url(view.zip.path, {}, { withToken: true });
      setText(actions.zip, view.zip.label);
    }
    if (view.ply.shown) actions.ply.href = api.url(view.ply.path, {}, { withToken: true });
    if (view.spz.shown) actions.spz.href = api.url(view.spz.path, {}, { withToken: true });
    const steps = fmt.count(task.params.iterations);
    trainPreset.options[0].textContent = `As uploaded · ${steps} steps`;
  }

  async function confirmDelete(task) {
    const running = facts.isActive(task) ? " It is still running and will be stopped." : "";
    setText(
      $("#confirm-text", doc),
      `“${facts.taskName(task)}” and its video, frames, model and log will be removed.${running} This cannot be undone.`,
    );
    const dialog = $("#confirm-dialog", doc);
    dialog.returnValue = "";
    dialog.showModal();
    const choice = await new Promise((resolve) =>
      dialog.addEventListener("close", () => resolve(dialog.returnValue), { once: true }),
    );
    return choice === "confirm";
  }

  async function act(action) {
    const task = store.state.tasks.get(currentId());
    if (!task) return;
    const pressed = actions[action];
    show(errorBox, false);
    if (action === "delete" && !(await confirmDelete(task))) {
      pressed.focus();
      return;
    }
    const name = facts.taskName(task);
    const label = pressed.textContent;
    busy.add(action);
    pressed.disabled = true;
    setText(pressed, BUSY_TEXT[action]);
    try {
      if (action === "delete") {
        await api.del(`tasks/${task.task_id}`);
        notify.toast(`${name} deleted.`, "info");
        store.remove(task.task_id);
        return;
      }
      const body = action === "train" && trainPreset.value ? { preset: trainPreset.value } : null;
      const answer = await api.post(`tasks/${task.task_id}/${action}`, { json: body ?? undefined });
      const done = {
        cancel: `${name}: cancelled.`,
        retry: `${name}: queued to run again.`,
        train: `${name}: queued for training.`,
      }[action];
      notify.toast(done || answer.message, "info");
      store.upsert(await api.get(`tasks/${task.task_id}`));
    } catch (error) {
      if (error.status === 404) {
        store.remove(task.task_id);
        notify.toast("That task no longer exists.", "warn");
        return;
      }
      errorBox.replaceChildren(
        h("strong", {}, "That did not work. "),
        error.detail || String(error),
      );
      show(errorBox, true);
    } finally {
      busy.delete(action);
      if (pressed.isConnected) {
        pressed.disabled = false;
        if (pressed.textContent === BUSY_TEXT[action]) setText(pressed, label);
        const current = store.state.tasks.get(task.task_id);
        if (current) paint(current);
      }
    }
  }

  return { element, errorBox, paint };
}
