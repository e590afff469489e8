// The server's public API, as curl uses it: JSON over fetch, the upload over XMLHttpRequest
// (fetch cannot report upload progress), Server-Sent Events by URL. The API token, when the
// server wants one, is kept in localStorage and sent as `Authorization: Bearer` with every
// request; POST /login trades it for an HttpOnly session cookie that EventSource, images and
// download links send by themselves, so the token never appears in a URL (nor in a log).

const TOKEN_KEY = "gs-training-server:token";
let memoryToken = "";
let session = null; // the pending or done POST /login for the saved token

/** The folder the page was served from: every API path is resolved against it, so the page
 * also works behind a reverse proxy that serves the server under a sub-path. */
export const base = new URL(".", document.baseURI);

export class ApiError extends Error {
  /** `status` is the HTTP status, or 0 when the server could not be reached. */
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || memoryToken;
  } catch {
    return memoryToken; // storage disabled: keep it for this visit only
  }
}

export function setToken(token) {
  if (!token && getToken()) logout();
  session = null;
  memoryToken = token || "";
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled */
  }
}

/** POST /login with `token`: the server checks it and sets the session cookie. Rejects with
 * an ApiError (401 when the token is refused). */
export async function login(token) {
  let response;
  try {
    response = await fetch(url("login"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token }),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "The server cannot be reached. Is it running?");
  }
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
}

/** Check `token` with the server (POST /login, which sets the cookie), then keep it. */
export async function saveToken(token) {
  await login(token);
  setToken(token);
  session = Promise.resolve();
}

function logout() {
  // keepalive: the page may reload right after (the Forget button).
  fetch(url("logout"), { method: "POST", credentials: "same-origin", keepalive: true }).catch(
    () => {},
  );
}

/** The session cookie for the saved token, once per page: the first request waits for it. */
function ensureSession() {
  const token = getToken();
  if (!token) return Promise.resolve();
  if (!session) {
    session = login(token).catch(() => {
      session = null; // refused or unreachable: the request itself will say so
    });
  }
  return session;
}

/** Called with the refused request's detail whenever the server answers 401. */
export const hooks = { unauthorized: (_detail) => {} };

/** An absolute URL for an API path. `withToken` is kept for the callers that mark URLs
 * used by EventSource, <img> and download links: those carry the session cookie, never the
 * token (a token in a URL lands in access logs, history and Referer headers). */
export function url(path, params = {}, { withToken: _cookieAuth = false } = {}) {
  const target = new URL(String(path).replace(/^\/+/, ""), base);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") {
      target.searchParams.set(key, String(value));
    }
  }
  return target.toString();
}

/** The readable `detail` of an error answer (JSON or text). */
async function detailOf(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    /* not JSON */
  }
  return (
    text.trim().slice(0, 500) || `The server answered ${response.status} ${response.statusText}.`
  );
}

/** One request; resolves with the parsed JSON (or text), rejects with an ApiError. */
export async function request(method, path, { params, json, signal } = {}) {
  await ensureSession();
  const headers = { Accept: "application/json" };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(url(path, params), { method, headers, body, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "The server cannot be reached. Is it running?");
  }
  if (!response.ok) {
    const detail = await detailOf(response);
    if (response.status === 401) hooks.unauthorized(detail);
    throw new ApiError(response.status, detail);
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? response.json() : response.text();
}

export const get = (path, options) => request("GET", path, options);
export const post = (path, options) => request("POST", path, options);
export const del = (path, options) => request("DELETE", path, options);

/**
 * Upload `files` (one file, or several sent as one capture: the field `file` repeated) to
 * POST /upload with `params` in the query string (the server checks them before it reads the
 * body, so a bad value fails at once). `onProgress({loaded, total})` is called as bytes
 * leave; `onSent()` once the body is sent (the server then checks the content).
 * Returns {promise, abort}; the promise resolves with the UploadResponse.
 */
export function upload(files, params, { onProgress, onSent } = {}) {
  const list = Array.isArray(files) ? files : [files];
  const size = list.reduce((sum, f) => sum + (f.size || 0), 0);
  const xhr = new XMLHttpRequest();
  const promise = new Promise((resolve, reject) => {
    xhr.open("POST", url("upload", params));
    xhr.responseType = "text";
    const token = getToken();
    if (token) xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.upload.addEventListener("progress", (event) => {
      onProgress?.({
        loaded: event.loaded,
        total: event.lengthComputable ? event.total : size,
      });
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
      if (xhr.status === 401) hooks.unauthorized(detail);
      reject(new ApiError(xhr.status, detail));
    });
    xhr.addEventListener("error", () =>
      reject(
        new ApiError(
          0,
          "The upload was interrupted: the connection to the server closed. The server may " +
            `be down, or the ${list.length === 1 ? "file" : "files"} may be larger than it ` +
            "accepts.",
        ),
      ),
    );
    xhr.addEventListener("abort", () => reject(new ApiError(-1, "The upload was stopped.")));
    const form = new FormData();
    for (const file of list) form.append("file", file, file.name);
    xhr.send(form);
  });
  return { promise, abort: () => xhr.abort() };
}

/** The bytes of a (large) file, with `onProgress(loaded, total)` as they arrive. */
export async function getBytes(path, { onProgress, signal } = {}) {
  await ensureSession();
  const headers = {};
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(url(path), { headers, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "The server cannot be reached. Is it running?");
  }
  if (!response.ok) {
    const detail = await detailOf(response);
    if (response.status === 401) hooks.unauthorized(detail);
    throw new ApiError(response.status, detail);
  }
  const total = Number(response.headers.get("content-length")) || 0;
  if (!response.body) return new Uint8Array(await response.arrayBuffer());
  const reader = response.body.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.length;
    onProgress?.(loaded, total);
  }
  const bytes = new Uint8Array(loaded);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.length;
  }
  return bytes;
}
