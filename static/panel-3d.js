// The 3D panels' frame around viewer3d.js, and the sparse point cloud with the camera path
// (the trained splats are panel-model.js). Both load their libraries only when first shown,
// and say why when they cannot show anything.

import { h, setText, show } from "./dom.js";
import * as fmt from "./format.js";
import { canPreview } from "./task-facts.js";

/** The /sparse payload of a task, fetched once per task while it is kept in `cache`. */
export function sparseOf(ctx, taskId) {
  if (!ctx.sparse.has(taskId)) {
    const request = ctx.api.get(`tasks/${taskId}/sparse`);
    request.catch(() => ctx.sparse.delete(taskId));
    ctx.sparse.set(taskId, request);
  }
  return ctx.sparse.get(taskId);
}

/**
 * A panel with a 3D view: `available(task)` says whether it has something to show,
 * `start(panel)` loads and shows it (and may reject: the panel then says why);
 * `visible(panel)` and `update(panel)`, when given, hear of every change of `panel.shown` and
 * `panel.task` after the panel did its own part.
 */
export function createViewerPanel(root, initial, label, hooks) {
  const { available, start, close: onClose } = hooks;
  const panel = {
    task: initial,
    view: null,
    closed: false,
    started: false,
    shown: false,
    box: h("div", { class: "viewer", "data-state": "idle" }),
    message: h("p", { class: "viewer-message", role: "status" }),
    legend: h("p", { class: "viewer-legend" }),
  };
  panel.box.append(panel.message);
  const reset = h(
    "button",
    {
      type: "button",
      class: "button small",
      disabled: true,
      onclick: () => panel.view?.resetView(),
    },
    "Reset view",
  );
  const full = h(
    "button",
    {
      type: "button",
      class: "button small ghost",
      disabled: true,
      onclick: () => {
        if (document.fullscreenElement) document.exitFullscreen();
        else panel.box.requestFullscreen?.().catch(() => {});
      },
    },
    "Full screen",
  );
  root.append(
    panel.box,
    h("div", { class: "panel-bar" }, panel.legend, h("span", { class: "spacer" }), reset, full),
    h("p", { class: "panel-note" }, label),
  );

  panel.setState = (value, message) => {
    panel.box.dataset.state = value;
    full.disabled = value !== "ready";
    reset.disabled = value !== "ready";
    setText(panel.message, message || "");
    show(panel.message, Boolean(message));
  };
  panel.fail = (error) => {
    if (panel.closed || error?.name === "AbortError") return;
    panel.view?.dispose();
    panel.view = null;
    panel.started = false; // showing the tab again tries again
    panel.setState("error", error?.detail || error?.message || String(error));
  };
  panel.run = () => start(panel).catch(panel.fail);

  return {
    visible(shown) {
      panel.shown = shown;
      if (shown && !panel.started && available(panel.task)) {
        panel.started = true;
        panel.run();
      }
      if (shown) panel.view?.fit();
      hooks.visible?.(panel);
    },
    update(task) {
      panel.task = task;
      hooks.update?.(panel);
    },
    close() {
      panel.closed = true;
      onClose?.();
      panel.view?.dispose();
      panel.view = null;
    },
  };
}

/** The cameras-and-points panel. */
export function createSparsePanel(root, task, ctx) {
  return createViewerPanel(
    root,
    task,
    "Orange: where the camera was for each kept frame; blue: its path. Drag to turn, right-drag or arrow keys to move, scroll or pinch to zoom.",
    {
      available: canPreview,
      async start(panel) {
        panel.setState("loading", "Loading the point cloud…");
        const { loadThree, SparseView } = await import("./viewer3d.js");
        const [modules, sparse] = await Promise.all([
          loadThree(),
          sparseOf(ctx, panel.task.task_id),
        ]);
        if (panel.closed) return;
        panel.view = new SparseView(panel.box, modules);
        panel.view.show(sparse);
        const shown =
          sparse.points.count < sparse.points.total
            ? ` (showing ${fmt.count(sparse.points.count)})`
            : "";
        setText(
          panel.legend,
          `${fmt.count(sparse.points.total)} points${shown} · ${fmt.count(sparse.cameras.length)} cameras`,
        );
        panel.setState("ready", "");
      },
    },
  );
}
