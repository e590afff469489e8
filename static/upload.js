// The upload form: choose or drop a video (or several videos, photos or a ZIP of photos of one
// scene), set the frames and training options, send it with a progress bar (bytes, speed,
// time left) that can be stopped; the new task then opens. A single video goes as a
// resumable tus upload (tus-js-client, from node_modules) when the server serves it, so a
// dropped connection or a reload resumes where it stopped; otherwise, and for photos, a ZIP
// or several files, as one POST /upload.

import { $, h, setBar, setText, show } from "./dom.js";
import * as fmt from "./format.js";
import { createUploadMeter, uploadErrorTitle, uploadFields } from "./upload-fields.js";
import {
  ACCEPT,
  describeSelection,
  resumable as isResumable,
  selectionErrorTitle,
} from "./upload-files.js";
import { startTusUpload, TUS_SCRIPT, tusUnsupported } from "./upload-tus.js";

let tusLibrary; // the promise of tus-js-client, or of null when it is not installed

/** tus-js-client (its bundle sets window.tus), loaded once; null when it cannot be used. */
function loadTus(api) {
  if (tusLibrary === undefined) {
    tusLibrary = import(api.url(TUS_SCRIPT)).then(
      () => (window.tus?.isSupported ? window.tus : null),
      () => null,
    );
  }
  return tusLibrary;
}

/**
 * Send `file`: resumable (tus, /uploads/) when the server and the page have it, else one
 * POST /upload. Returns {promise, abort}; the promise resolves with the upload's answer
 * ({task_id, training_available, training_unavailable_reason}) or rejects with an ApiError.
 */
function sendFile(api, file, params, callbacks) {
  let current = null;
  let stopped = false;
  const stoppedError = () => new api.ApiError(-1, "The upload was stopped.");
  const resumable = async (tus) => {
    const token = api.getToken();
    current = startTusUpload(tus, file, params, {
      endpoint: api.url("uploads/"),
      headers: token ? { Authorization: `Bearer ${token}` } : {},
      ...callbacks,
    });
    const taskId = await current.promise;
    const health = await api.get("health").catch(() => null);
    const training = health?.training || { available: true };
    return {
      task_id: taskId,
      training_available: training.available,
      training_unavailable_reason: training.detail,
    };
  };
  const promise = (async () => {
    const tus = await loadTus(api);
    if (stopped) throw stoppedError();
    if (tus) {
      try {
        return await resumable(tus);
      } catch (failure) {
        if (!tusUnsupported(failure)) {
          if (failure.status === 401) api.hooks.unauthorized(failure.detail);
          throw new api.ApiError(failure.status, failure.detail);
        }
        if (stopped) throw stoppedError();
      }
    }
    current = api.upload(file, params, callbacks);
    return current.promise;
  })();
  return {
    promise,
    abort: () => {
      stopped = true;
      current?.abort();
    },
  };
}

const FIELD_IDS = {
  minFrames: "min-frames",
  maxFrames: "max-frames",
  iterations: "iterations",
};

/**
 * @param {Document} doc
 * @param {{api: object, notify: {announce: Function, toast: Function},
 *   onUploaded: (taskId: string) => void}} ctx
 */
export function mountUpload(doc, ctx) {
  const form = $("#upload-form", doc);
  const input = $("#file-input", doc);
  const zone = $("#dropzone", doc);
  const button = $("#upload-button", doc);
  const errorBox = $("#upload-error", doc);
  const barElement = $("#upload-bar", doc);
  const numbers = $("#upload-numbers", doc);
  let files = [];
  let request = null;
  input.multiple = true;
  input.accept = ACCEPT;

  function choose(chosen) {
    files = Array.from(chosen || []);
    zone.classList.toggle("has-file", files.length > 0);
    if (files.length === 1 && isResumable(files)) {
      setText($("#file-title", doc), files[0].name);
      setText($("#file-hint", doc), `${fmt.bytes(files[0].size)} · choose another or drop it here`);
    } else {
      const { title, hint } = describeSelection(files);
      setText($("#file-title", doc), title);
      setText($("#file-hint", doc), hint);
    }
    show(errorBox, false);
    button.disabled = !files.length || Boolean(request);
  }

  function formValues() {
    return {
      minFrames: $("#min-frames", doc).value,
      maxFrames: $("#max-frames", doc).value,
      preset: $("#preset", doc).value,
      iterations: $("#iterations", doc).value,
      autoTraining: $("#auto-training", doc).checked,
      downSample: $("#down-sample", doc).value,
      keepCheckpoint: $("#keep-checkpoint", doc).checked,
    };
  }

  function showError(title, detail) {
    errorBox.replaceChildren(h("strong", {}, title), " ", detail);
    show(errorBox, true);
  }

  function setUploading(active) {
    for (const element of form.querySelectorAll("input, select, fieldset")) {
      element.disabled = active;
    }
    button.disabled = active || !files.length;
    show($("#upload-cancel", doc), active);
    show($("#upload-progress", doc), active);
    zone.classList.toggle("disabled", active);
  }

  async function submit(event) {
    event.preventDefault();
    if (!files.length || request) return;
    const { params, problems } = uploadFields(formValues());
    if (problems.length) {
      showError("Check the settings.", problems.map((p) => p.text).join(" "));
      $(`#${FIELD_IDS[problems[0].field]}`, doc).focus();
      return;
    }
    show(errorBox, false);
    const chosen = files;
    const sending = {
      name: chosen.length === 1 ? chosen[0].name : describeSelection(chosen).title,
      size: chosen.reduce((sum, f) => sum + f.size, 0),
    };
    const meter = createUploadMeter();
    barElement.dataset.phase = "sending";
    setBar(barElement, 0, "busy");
    setText(numbers, `0 B of ${fmt.bytes(sending.size)}`);
    let lastQuarter = 0;
    const send = isResumable(chosen)
      ? (api, p, callbacks) => sendFile(api, chosen[0], p, callbacks)
      : (api, p, callbacks) => api.upload(chosen, p, callbacks);
    request = send(ctx.api, params, {
      onProgress: ({ loaded, total }) => {
        // Count the file's bytes, not the form's boundaries around them.
        const fraction = total ? Math.min(1, loaded / total) : 0;
        const percent = 100 * fraction;
        setBar(barElement, percent);
        const sent = Math.round(fraction * sending.size);
        setText(numbers, meter.line(sent, sending.size, performance.now()));
        const quarter = Math.floor(percent / 25);
        if (quarter > lastQuarter) {
          lastQuarter = quarter;
          ctx.notify.announce(`Upload ${quarter * 25} percent`);
        }
      },
      onSent: () => {
        setBar(barElement, 100);
        barElement.dataset.phase = "checking";
        const what = isResumable(chosen) ? "the video" : "the files";
        setText(numbers, `${fmt.bytes(sending.size)} sent · the server is checking ${what}…`);
      },
    });
    setUploading(true);
    try {
      const answer = await request.promise;
      ctx.notify.announce(`${sending.name} uploaded`);
      ctx.notify.toast(`${sending.name} uploaded: preprocessing starts.`, "ok");
      if (params.auto_training === "true" && !answer.training_available) {
        ctx.notify.toast(
          `Training is not available on this server (${answer.training_unavailable_reason}); ` +
            "the task will stop after preprocessing.",
          "warn",
          10000,
        );
      }
      request = null;
      setUploading(false);
      input.value = "";
      choose(null);
      ctx.onUploaded(answer.task_id);
    } catch (error) {
      request = null;
      setUploading(false);
      if (error.status === -1) ctx.notify.toast("Upload stopped.", "info");
      else {
        const title = selectionErrorTitle(error.status, chosen) || uploadErrorTitle(error.status);
        showError(title, error.detail);
      }
    } finally {
      delete barElement.dataset.phase;
    }
  }

  input.addEventListener("change", () => choose(input.files));
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      if (!request) zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "dragend"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (request) return;
    const dropped = event.dataTransfer?.files;
    if (dropped?.length) choose(dropped);
  });
  // A file dropped anywhere else must not make the browser leave the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  $("#preset", doc).addEventListener("change", (event) => {
    show($("#iterations-field", doc), event.target.value === "custom");
  });
  form.addEventListener("submit", submit);
  choose([]); // the drop zone says what it takes: a video, photos or a ZIP of photos
  $("#upload-cancel", doc).addEventListener("click", () => request?.abort());
}
