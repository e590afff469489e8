// The log panel: the task's log tail, then its new lines live (GET /logs/{id}/stream), with
// Pause/Follow; the stream ends with the task and starts again when it runs again.

import { h, setText, show } from "./dom.js";
import * as fmt from "./format.js";
import { isActive } from "./task-facts.js";

const LOG_LINES = 500;
const LOG_KEEP = 4000;
const RECONNECT_MS = 3000;
const TIMESTAMP = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) (.*)$/;

/** The CSS class of a log line's kind ("" for plain output). */
export function lineClass(text) {
  if (text.startsWith("[server]")) return "log-server";
  if (/\b(error|traceback|exception|failed)\b/i.test(text)) return "log-error";
  if (text.startsWith("@progress")) return "log-dim";
  return "";
}

/**
 * @param {HTMLElement} root the tab panel
 * @param {object} initial the task
 * @param {{api: object}} ctx
 */
export function createLogPanel(root, initial, ctx) {
  const { api } = ctx;
  let task = initial;
  let following = true;
  let pending = [];
  let source = null;
  let shown = false;
  let ended = null;
  let retryTimer = 0;

  const followButton = h(
    "button",
    { type: "button", class: "button small", "aria-pressed": "true", onclick: () => toggle() },
    "Pause",
  );
  const state = h("span", { class: "log-state", role: "status" });
  const raw = h(
    "a",
    {
      class: "button small ghost",
      href: api.url(`logs/${task.task_id}`, {}, { withToken: true }),
      target: "_blank",
      rel: "noopener",
    },
    "Open the whole log",
  );
  const view = h("div", {
    class: "log",
    tabindex: "0",
    role: "log",
    "aria-live": "off",
    "aria-label": "Task log",
  });
  root.append(
    h("div", { class: "panel-bar" }, followButton, state, h("span", { class: "spacer" }), raw),
    view,
  );

  function connect() {
    disconnect();
    ended = null;
    pending = [];
    show(followButton, true);
    view.replaceChildren();
    setText(state, "Connecting…");
    const stream = new EventSource(
      api.url(`logs/${task.task_id}/stream`, { lines: LOG_LINES }, { withToken: true }),
    );
    source = stream;
    stream.addEventListener("open", () => setText(state, following ? "Following live" : "Paused"));
    stream.addEventListener("log", (event) => add(event.data));
    stream.addEventListener("end", (event) => {
      stream.close();
      source = null;
      ended = event.data;
      if (!following) toggle();
      show(followButton, false);
      setText(state, `The log ended: the task is ${event.data.replaceAll("_", " ")}.`);
    });
    stream.addEventListener("error", () => {
      if (source !== stream) return;
      // The server went away: read the tail again when it is back (no duplicates).
      stream.close();
      source = null;
      setText(state, "Connection lost; reconnecting…");
      retryTimer = setTimeout(() => shown && connect(), RECONNECT_MS);
    });
  }

  function disconnect() {
    clearTimeout(retryTimer);
    source?.close();
    source = null;
  }

  function add(line) {
    if (!following) {
      pending.push(line);
      if (pending.length > LOG_KEEP) pending.shift();
      setText(followButton, `Follow (${fmt.count(pending.length)} new)`);
      return;
    }
    append([line]);
  }

  function append(lines) {
    const fragment = document.createDocumentFragment();
    for (const line of lines) {
      const match = TIMESTAMP.exec(line);
      const text = match ? match[2] : line;
      const row = h("div", { class: "log-line" });
      if (match) row.append(h("span", { class: "log-time" }, fmt.clock(match[1])));
      row.append(text);
      const kind = lineClass(text);
      if (kind) row.classList.add(kind);
      fragment.append(row);
    }
    view.append(fragment);
    while (view.childElementCount > LOG_KEEP) view.firstElementChild.remove();
    if (following) view.scrollTop = view.scrollHeight;
  }

  function toggle() {
    following = !following;
    followButton.setAttribute("aria-pressed", String(following));
    setText(followButton, following ? "Pause" : "Follow");
    if (following && pending.length) {
      const lines = pending;
      pending = [];
      append(lines);
    }
    if (!ended) setText(state, following ? "Following live" : "Paused: new lines wait");
  }

  return {
    visible(now) {
      shown = now;
      if (shown && !source) connect();
      if (!shown) disconnect();
    },
    update(next) {
      const wasActive = isActive(task);
      task = next;
      // A task that runs again (retry, train) writes to its log again: follow it.
      if (shown && ended && isActive(task) && !wasActive) connect();
    },
    close: disconnect,
  };
}
