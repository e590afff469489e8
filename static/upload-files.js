// What the upload form holds when it is more than one video: the kind of each chosen file,
// the words for the selection ("12 photos", "2 videos", "desk.zip"), whether it can go as a
// resumable upload (one video only: tus sends one file); api.upload sends several files at
// once. No DOM here.

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
