// The two 3D panels around viewer3d.js: the sparse point cloud with the camera path, and
// the trained splats (a large .ply waits for a click). Both load their libraries only when
// first shown, and say why when they cannot show anything.

import { h, setText, show } from "./dom.js";
import * as fmt from "./format.js";
import { canPreview, hasModel } from "./task-facts.js";

const PLY_AUTOLOAD_BYTES = 300 * 1024 * 1024;

/** The /sparse payload of a task, fetched once per task while it is kept in `cache`. */
function sparseOf(ctx, taskId) {
  if (!ctx.sparse.has(taskId)) {
    const request = ctx.api.get(`tasks/${taskId}/sparse`);
    request.catch(() => ctx.sparse.delete(taskId));
    ctx.sparse.set(taskId, request);
  }
  return ctx.sparse.get(taskId);
}

/**
 * A panel with a 3D view: `available(task)` says whether it has something to show,
 * `start(panel)` loads and shows it (and may reject: the panel then says why).
 */
function createViewerPanel(root, initial, label, { available, start, close: onClose }) {
  const panel = {
    task: initial,
    view: null,
    closed: false,
    started: false,
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
    if (panel.closed) return;
    panel.view?.dispose();
    panel.view = null;
    panel.started = false; // showing the tab again tries again
    panel.setState("error", error?.detail || error?.message || String(error));
  };
  panel.run = () => start(panel).catch(panel.fail);

  return {
    visible(shown) {
      if (shown && !panel.started && available(panel.task)) {
        panel.started = true;
        panel.run();
      }
      if (shown) panel.view?.fit();
    },
    update(task) {
      panel.task = task;
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

/** The trained-splats panel. */
export function createModelPanel(root, task, ctx) {
  const abort = new AbortController();
  let confirmed = false;
  return createViewerPanel(
    root,
    task,
    "The trained Gaussian splats. Drag to turn, right-drag or arrow keys to move, scroll or pinch to zoom.",
    {
      available: hasModel,
      close: () => abort.abort(),
      async start(panel) {
        const training = panel.task.metadata?.training || {};
        const size = training.ply_size_bytes || 0;
        if (size > PLY_AUTOLOAD_BYTES && !confirmed) {
          panel.setState("idle", "");
          const load = h(
            "button",
            {
              type: "button",
              class: "button primary",
              onclick: () => {
                confirmed = true;
                load.remove();
                panel.run();
              },
            },
            `Load the 3D model (${fmt.bytes(size)})`,
          );
          panel.box.append(load);
          return;
        }
        panel.setState("loading", "Loading the 3D viewer…");
        const { loadSpark, SplatView } = await import("./viewer3d.js");
        const modules = await loadSpark();
        const sparse = await sparseOf(ctx, panel.task.task_id).catch(() => null);
        panel.setState("loading", `Loading the model: 0 B of ${fmt.bytes(size)}`);
        const bytes = await ctx.api.getBytes(`download/${panel.task.task_id}/ply`, {
          signal: abort.signal,
          onProgress: (loaded, total) => {
            const percent = total ? ` (${Math.round((100 * loaded) / total)} %)` : "";
            panel.setState(
              "loading",
              `Loading the model: ${fmt.bytes(loaded)} of ${fmt.bytes(total || size)}${percent}`,
            );
          },
        });
        if (panel.closed) return;
        panel.setState("loading", "Preparing the splats…");
        panel.view = new SplatView(panel.box, modules);
        const count = await panel.view.show(bytes, sparse);
        if (panel.closed) return;
        setText(
          panel.legend,
          `${fmt.count(count || training.gaussian_count)} Gaussians · ${fmt.bytes(size)}`,
        );
        panel.setState("ready", "");
      },
    },
  );
}
