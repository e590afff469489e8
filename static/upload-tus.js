// Resumable uploads with tus-js-client (served from node_modules at vendor/tus-js-client/):
// the upload's tus metadata from its parameters, the key under which the browser remembers
// an unfinished upload (so a reload or a dropped connection resumes it), and what a failed
// tus request means for the form. The pure parts take no DOM; `startTusUpload` drives the
// library it is given.

/** Where the page loads tus-js-client from (its UMD bundle sets `window.tus`). */
export const TUS_SCRIPT = "vendor/tus-js-client/tus.min.js";

/** Waits before each retry after a dropped connection (ms); then the error is shown. */
export const RETRY_DELAYS = [0, 1000, 3000, 5000, 10000, 20000];

/**
 * The tus Upload-Metadata for `file` with the upload's `params` (all values as strings):
 * `filename`, `filetype` and the parameters of POST /upload.
 * @param {{name: string, type?: string}} file
 * @param {Record<string, string|number>} params
 * @returns {Record<string, string>}
 */
export function tusMetadata(file, params) {
  const metadata = { filename: file.name, filetype: file.type || "application/octet-stream" };
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") metadata[key] = String(value);
  }
  return metadata;
}

/**
 * The key an unfinished upload is remembered by: the same file sent with the same settings
 * to the same server resumes; other settings start a new upload.
 * @param {{name: string, size: number, lastModified?: number}} file
 * @param {Record<string, string|number>} params
 * @param {string} endpoint
 */
export function tusFingerprint(file, params, endpoint) {
  const settings = Object.keys(params)
    .sort()
    .map((key) => `${key}=${params[key]}`)
    .join("&");
  return ["gs-tus", endpoint, file.name, file.size, file.lastModified ?? 0, settings].join("|");
}

/**
 * What a tus-js-client error means: `status` (the server's HTTP status, 0 when it could not
 * be reached) and a readable `detail` (the server's JSON `detail` when it sent one).
 * @param {{originalResponse?: {getStatus(): number, getBody(): string} | null,
 *   message?: string}} error
 * @returns {{status: number, detail: string}}
 */
export function tusFailure(error) {
  const response = error?.originalResponse;
  const status = response ? Number(response.getStatus()) || 0 : 0;
  if (!status) {
    return {
      status: 0,
      detail:
        "The upload was interrupted and could not be resumed: the server cannot be reached. " +
        "Send it again to continue where it stopped.",
    };
  }
  const text = String(response.getBody() || "");
  try {
    const body = JSON.parse(text);
    if (body && typeof body.detail === "string") return { status, detail: body.detail };
  } catch {
    /* not JSON */
  }
  return { status, detail: text.trim().slice(0, 500) || `The server answered ${status}.` };
}

/** Whether a failure means this server has no resumable uploads (use POST /upload). */
export function tusUnsupported(failure) {
  return failure.status === 404 || failure.status === 405;
}

/**
 * Send `file` with the tus library `tus` to `endpoint` (the server's /uploads/), resuming an
 * unfinished upload of the same file and settings. `onProgress({loaded, total})` as bytes
 * leave, `onSent()` once all are sent (the server then checks the video). Returns
 * {promise, abort}: the promise resolves with the new task's id, or rejects with
 * {status, detail} (status -1 when stopped: the unfinished upload is then removed).
 */
export function startTusUpload(tus, file, params, options) {
  const { endpoint, headers, onProgress, onSent } = options;
  let upload = null;
  let stopped = false;
  let rejectStopped = () => {};
  const promise = new Promise((resolve, reject) => {
    rejectStopped = reject;
    upload = new tus.Upload(file, {
      endpoint,
      headers,
      metadata: tusMetadata(file, params),
      retryDelays: RETRY_DELAYS,
      removeFingerprintOnSuccess: true,
      fingerprint: (f) => Promise.resolve(tusFingerprint(f, params, endpoint)),
      onProgress: (loaded, total) => {
        onProgress?.({ loaded, total });
        if (total && loaded >= total) onSent?.();
      },
      onSuccess: (payload) => {
        const taskId = payload?.lastResponse?.getHeader("Upload-Task-Id");
        if (taskId) resolve(taskId);
        else reject({ status: 0, detail: "The server did not say which task it made." });
      },
      onError: (error) => {
        if (!stopped) reject(tusFailure(error));
      },
    });
    upload
      .findPreviousUploads()
      .then((previous) => {
        if (stopped) return;
        if (previous.length) upload.resumeFromPreviousUpload(previous[0]);
        upload.start();
      })
      .catch(() => upload.start());
  });
  return {
    promise,
    abort: () => {
      stopped = true;
      upload?.abort(true).catch(() => {});
      rejectStopped({ status: -1, detail: "The upload was stopped." });
    },
  };
}
