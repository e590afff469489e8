// The frames panel: the kept frames as thumbnails (GET /tasks/{id}/frames), and the dialog
// that shows one large, stepping with the arrow keys.

import { $, h, setText } from "./dom.js";
import * as fmt from "./format.js";
import { canPreview } from "./task-facts.js";

/**
 * Mount the page's frame dialog (#frame-dialog).
 * @param {Document} doc
 * @param {{api: object}} ctx
 * @returns {{open: (frames: object[], index: number) => void}}
 */
export function mountFrameDialog(doc, ctx) {
  const dialog = $("#frame-dialog", doc);
  const image = $("#frame-image", doc);
  let frames = [];
  let index = 0;

  function showFrame(next) {
    if (!frames.length) return;
    index = (next + frames.length) % frames.length;
    const frame = frames[index];
    setText($("#frame-title", doc), `Frame ${index + 1} of ${frames.length} · ${frame.name}`);
    image.src = ctx.api.url(frame.url, {}, { withToken: true });
    image.alt = `Frame ${index + 1}: ${frame.name}`;
  }

  $("#frame-prev", doc).addEventListener("click", () => showFrame(index - 1));
  $("#frame-next", doc).addEventListener("click", () => showFrame(index + 1));
  dialog.addEventListener("keydown", (event) => {
    if (event.key === "ArrowLeft") showFrame(index - 1);
    if (event.key === "ArrowRight") showFrame(index + 1);
  });

  return {
    open(list, at) {
      frames = list;
      showFrame(at);
      if (!dialog.open) dialog.showModal();
    },
  };
}

/**
 * @param {HTMLElement} root the tab panel
 * @param {object} initial the task
 * @param {{api: object, frameDialog: {open: Function}}} ctx
 */
export function createFramesPanel(root, initial, ctx) {
  let task = initial;
  let loaded = false;
  const status = h("p", { class: "panel-note", role: "status" });
  const grid = h("ul", { class: "frames", "aria-label": "Kept frames" });
  root.append(status, grid);

  function thumb(frame, index, frames, count) {
    return h(
      "li",
      {},
      h(
        "button",
        {
          type: "button",
          class: "thumb",
          "aria-label": `Frame ${index + 1} of ${count}: ${frame.name}`,
          onclick: () => ctx.frameDialog.open(frames, index),
        },
        h("img", {
          src: ctx.api.url(frame.thumbnail_url, {}, { withToken: true }),
          alt: "",
          loading: "lazy",
          decoding: "async",
        }),
        h("span", { class: "thumb-label", "aria-hidden": "true" }, String(index + 1)),
      ),
    );
  }

  async function load() {
    loaded = true;
    setText(status, "Loading the frames…");
    try {
      const answer = await ctx.api.get(`tasks/${task.task_id}/frames`);
      const video = task.metadata?.video;
      const ratio = video?.width && video?.height ? `${video.width} / ${video.height}` : "4 / 3";
      grid.style.setProperty("--ratio", ratio);
      const { frames, count } = answer;
      grid.replaceChildren(...frames.map((frame, i) => thumb(frame, i, frames, count)));
      setText(
        status,
        `${fmt.count(answer.count)} frames were kept for the 3D reconstruction. Select one to see it larger.`,
      );
    } catch (error) {
      loaded = false;
      setText(status, `The frames cannot be shown: ${error.detail || error}`);
    }
  }

  return {
    visible(shown) {
      if (shown && !loaded && canPreview(task)) load();
    },
    update(next) {
      task = next;
    },
    close() {},
  };
}
