// The trained-splats panel: the small SPZ by default (the .ply when training wrote none, or
// when the SPZ cannot be had), with a progress line while it downloads; a file above the
// autoload size waits for a click. While the task trains, the panel looks for a newer preview
// every PREVIEW_POLL_MS (HEAD on tasks/{id}/preview.spz) and swaps it in without moving the
// user's camera. Which file and when: model-source.js.

import { h, setText } from "./dom.js";
import * as fmt from "./format.js";
import * as src from "./model-source.js";
import { createViewerPanel, sparseOf } from "./panel-3d.js";
import { hasModel } from "./task-facts.js";

function isPhone() {
  try {
    return window.matchMedia("(pointer: coarse)").matches;
  } catch {
    return false;
  }
}

/** Ask the server about the newest preview: HEAD, or, where the server refuses HEAD (405),
 * a GET with If-None-Match. Resolves with {status, get (a header getter), bytes (GET only)}. */
async function probePreview(ctx, path, state, signal) {
  const headers = {};
  const token = ctx.api.getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  const url = ctx.api.url(path);
  if (state.head !== false) {
    const response = await fetch(url, { method: "HEAD", headers, cache: "no-store", signal });
    if (response.status !== 405) {
      state.head = true;
      return { status: response.status, get: (name) => response.headers.get(name), bytes: null };
    }
    state.head = false;
  }
  if (state.version) headers["If-None-Match"] = state.version;
  const response = await fetch(url, { headers, cache: "no-store", signal });
  const bytes = response.ok ? new Uint8Array(await response.arrayBuffer()) : null;
  return { status: response.status, get: (name) => response.headers.get(name), bytes };
}

/** The trained-splats panel of the detail view. */
export function createModelPanel(root, task, ctx) {
  const abort = new AbortController();
  // mode: null (not started), "preview" (looking for / showing training previews), "final".
  const state = { mode: null, timer: 0, busy: false, version: null, head: undefined };
  let confirmed = false;

  function stopPolling() {
    clearTimeout(state.timer);
    state.timer = 0;
  }

  function schedule(panel, delay) {
    stopPolling();
    if (!panel.closed) state.timer = setTimeout(() => poll(panel), delay);
  }

  /** Load the final model when the task got one while a preview was shown or looked for. */
  function refresh(panel) {
    if (panel.closed || state.mode !== "preview" || state.busy) return;
    if (hasModel(panel.task) && panel.shown) {
      stopPolling();
      panel.run();
    } else if (!panel.shown) {
      stopPolling();
    } else if (src.shouldPollPreview(panel.task, true) && !state.timer) {
      schedule(panel, 0);
    }
  }

  async function poll(panel) {
    state.timer = 0;
    if (panel.closed || state.busy || !src.shouldPollPreview(panel.task, panel.shown)) return;
    state.busy = true;
    try {
      await lookForPreview(panel);
    } catch (error) {
      if (error?.name === "AbortError" || panel.closed) return;
      if (!panel.view) panel.setState("idle", `No preview to show: ${error.detail || error.message}`);
    } finally {
      state.busy = false;
    }
    if (src.shouldPollPreview(panel.task, panel.shown)) schedule(panel, src.PREVIEW_POLL_MS);
    else refresh(panel);
  }

  async function lookForPreview(panel) {
    const path = src.previewPath(panel.task);
    const found = await probePreview(ctx, path, state, abort.signal);
    if (found.status === 404) {
      if (!panel.view) {
        panel.setState(
          "idle",
          "No preview yet: the first one appears after the trainer's first snapshot. This view checks every few seconds.",
        );
      }
      return;
    }
    if (found.status === 304) return;
    if (found.status === 401) ctx.api.hooks?.unauthorized?.("");
    if (found.status < 200 || found.status >= 300) {
      throw new Error(`the server answered ${found.status}`);
    }
    const version = src.previewVersion(found.get);
    if (!src.previewChanged(state.version, version) && panel.view) return;
    const label = src.previewLabel(found.get, panel.task);
    const progress = (loaded, total) => {
      const text = src.loadingText("the preview", loaded, total);
      if (panel.view) setText(panel.legend, text);
      else panel.setState("loading", text);
    };
    const bytes =
      found.bytes || (await ctx.api.getBytes(path, { signal: abort.signal, onProgress: progress }));
    if (panel.closed || state.mode !== "preview") return;
    const { loadSpark, SplatView } = await import("./viewer3d.js");
    const modules = await loadSpark();
    if (panel.closed || state.mode !== "preview") return;
    panel.view ??= new SplatView(panel.box, modules);
    const count = await panel.view.show(bytes, { type: "spz", keepView: true });
    if (panel.closed || state.mode !== "preview") return;
    state.version = version;
    panel.box.dataset.preview = version || "shown";
    setText(panel.legend, `${label} · ${fmt.count(count)} Gaussians`);
    panel.setState("ready", "");
  }

  async function loadFinal(panel) {
    state.mode = "final";
    stopPolling();
    let source = src.modelSource(panel.task, { phone: isPhone() });
    if (source.confirm && !confirmed) {
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
        `Load the 3D model (${fmt.bytes(source.size)})`,
      );
      panel.box.append(load);
      return;
    }
    if (!panel.view) panel.setState("loading", "Loading the 3D viewer…");
    const { loadSpark, SplatView } = await import("./viewer3d.js");
    const modules = await loadSpark();
    const fetchModel = (from) =>
      ctx.api.getBytes(from.path, {
        signal: abort.signal,
        onProgress: (loaded, total) =>
          panel.setState("loading", src.loadingText("the model", loaded, total || from.size)),
      });
    panel.setState("loading", src.loadingText("the model", 0, source.size));
    let bytes;
    try {
      bytes = await fetchModel(source);
    } catch (error) {
      if (source.type !== "spz" || error?.status !== 404) throw error;
      // The SPZ is listed but cannot be had (an older server): the .ply says the same.
      source = src.modelSource(
        { ...panel.task, metadata: { training: { ...panel.task.metadata.training, spz_path: null } } },
        { phone: false },
      );
      bytes = await fetchModel(source);
    }
    const sparse =
      source.type === "ply" ? await sparseOf(ctx, panel.task.task_id).catch(() => null) : null;
    if (panel.closed) return;
    panel.setState("loading", "Preparing the splats…");
    panel.view ??= new SplatView(panel.box, modules);
    const count = await panel.view.show(bytes, { type: source.type, sparse, keepView: true });
    if (panel.closed) return;
    const training = panel.task.metadata?.training || {};
    panel.box.dataset.file = source.type;
    delete panel.box.dataset.preview;
    setText(
      panel.legend,
      `${fmt.count(count || training.gaussian_count)} Gaussians · ${fmt.bytes(bytes.length)} .${source.type}`,
    );
    panel.setState("ready", "");
  }

  return createViewerPanel(
    root,
    task,
    "The trained Gaussian splats. Drag to turn, right-drag or arrow keys to move, scroll or pinch to zoom.",
    {
      available: src.modelPanelAvailable,
      close: () => {
        stopPolling();
        abort.abort();
      },
      async start(panel) {
        if (hasModel(panel.task)) return loadFinal(panel);
        state.mode = "preview";
        if (!panel.view) panel.setState("loading", "Looking for a preview of the training…");
        schedule(panel, 0);
      },
      visible: refresh,
      update: refresh,
    },
  );
}
