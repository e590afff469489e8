// What the upload form holds when it is more than one video: the kind of each chosen file,
// the words for the selection ("12 photos", "2 videos", "desk.zip"), whether it can go as a
// resumable upload (one video only: tus sends one file), and the one POST /upload that sends
// several files at once. The pure parts take no DOM; `sendFiles` drives XMLHttpRequest.

import * as fmt from "./format.js";

/** What the file input accepts: videos, photos (JPEG, PNG, HEIC) and ZIPs of photos. */
export const ACCEPT = [
  "video/*",
  ".mp4,.mov,.m4v,.mkv,.webm,.avi",
  "image/jpeg,image/png,image/heic,image/heif,.jpg,.jpeg,.png,.heic,.heif",
  "application/zip,.zip",
].join(",");

const PHOTO = /\.(jpe?g|png|hei[cf])$/i;
const ZIP = /\.zip$/i;

/**
 * "zip", "photo" or "video" (anything else: the server checks every file by its content and
 * names the one it cannot use).
 * @param {{name: string, type?: string}} file
 */
export function fileKind(file) {
  const type = file.type || "";
  if (ZIP.test(file.name) || type === "application/zip" || type === "application/x-zip-compressed") {
    return "zip";
  }
  if (PHOTO.test(file.name) || /^image\//.test(type)) return "photo";
  return "video";
}

function plural(count, one, many = `${one}s`) {
  return `${fmt.count(count)} ${count === 1 ? one : many}`;
}

/**
 * The drop zone's title and hint for the chosen files.
 * @param {{name: string, size: number, type?: string}[]} files
 * @returns {{title: string, hint: string}}
 */
export function describeSelection(files) {
  if (!files.length) {
    return {
      title: "Choose a video, photos or a ZIP",
      hint: "or drop them here · walk around the subject while filming",
    };
  }
  const size = files.reduce((sum, f) => sum + (f.size || 0), 0);
  const hint = `${fmt.bytes(size)} · choose others or drop them here`;
  if (files.length === 1) return { title: files[0].name, hint };
  const counts = { video: 0, photo: 0, zip: 0 };
  for (const file of files) counts[fileKind(file)] += 1;
  const parts = [];
  if (counts.video) parts.push(plural(counts.video, "video"));
  if (counts.photo) parts.push(plural(counts.photo, "photo"));
  if (counts.zip) parts.push(plural(counts.zip, "ZIP"));
  return { title: `${parts.join(", ")} of one scene`, hint };
}

/** Whether the selection can go as one resumable (tus) upload: a single video. */
export function resumable(files) {
  return files.length === 1 && fileKind(files[0]) === "video";
}

/** The headline of a refused upload of photos or several files, by HTTP status. */
export function selectionErrorTitle(status, files) {
  if (resumable(files)) return null; // the video's own titles apply
  const titles = {
    400: "The files cannot be used together.",
    413: "The photos or files are too large.",
    415: "A file cannot be used.",
    422: "These photos cannot make one scene.",
  };
  return titles[status] || null;
}

/**
 * Send every file in one POST /upload (the field `file` repeated), `params` in the query.
 * `onProgress({loaded, total})` as bytes leave, `onSent()` once all are sent. Returns
 * {promise, abort}; the promise resolves with the UploadResponse or rejects with an ApiError.
 */
export function sendFiles(api, files, params, { onProgress, onSent } = {}) {
  const xhr = new XMLHttpRequest();
  const total = files.reduce((sum, f) => sum + (f.size || 0), 0);
  const promise = new Promise((resolve, reject) => {
    xhr.open("POST", api.url("upload", params));
    xhr.responseType = "text";
    const token = api.getToken();
    if (token) xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.upload.addEventListener("progress", (event) => {
      onProgress?.({ loaded: event.loaded, total: event.lengthComputable ? event.total : total });
    });
    xhr.upload.addEventListener("load", () => onSent?.());
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        /* not JSON */
      }
      if (xhr.status >= 200 && xhr.status < 300 && body) {
        resolve(body);
        return;
      }
      const detail =
        (body && typeof body.detail === "string" && body.detail) ||
        xhr.responseText.trim().slice(0, 500) ||
        `The server answered ${xhr.status}.`;
      if (xhr.status === 401) api.hooks.unauthorized(detail);
      reject(new api.ApiError(xhr.status, detail));
    });
    xhr.addEventListener("error", () =>
      reject(
        new api.ApiError(
          0,
          "The upload was interrupted: the connection to the server closed. Send the files " +
            "again.",
        ),
      ),
    );
    xhr.addEventListener("abort", () => reject(new api.ApiError(-1, "The upload was stopped.")));
    const form = new FormData();
    for (const file of files) form.append("file", file, file.name);
    xhr.send(form);
  });
  return { promise, abort: () => xhr.abort() };
}
