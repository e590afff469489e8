// Live updates: the /events stream (Server-Sent Events) feeds the store; while it is down the
// page polls GET /tasks, and opens the stream again with a growing delay. The connection
// indicator in the top bar says which of these is happening.

import { $, setText } from "./dom.js";
import {
  CONNECTION_TEXT,
  POLL_MS,
  createBackoff,
  nextConnection,
  shouldReopen,
} from "./live-policy.js";
import { idOfDeletedEvent, taskOfEvent } from "./store.js";

/** Load the newest page of tasks into the store. */
export async function refreshTasks(ctx) {
  const answer = await ctx.api.get("tasks", { params: { limit: ctx.store.state.pageSize } });
  ctx.store.mergeList(answer);
}

/**
 * Mount the connection indicator and return the live-update controls.
 * @param {Document} doc
 * @param {{api: object, store: object, refresh: () => Promise<void>,
 *   onHello: () => void}} ctx
 */
export function mountLive(doc, ctx) {
  const indicator = $("#connection", doc);
  const label = $("#connection-text", doc);
  const backoff = createBackoff();
  let status = "";
  let source = null;
  let polling = false;
  let pollTimer = 0;
  let retryTimer = 0;

  function setState(next) {
    if (status === next) return;
    status = next;
    indicator.dataset.state = next;
    setText(label, CONNECTION_TEXT[next]);
  }

  const on = (event) => setState(nextConnection(status, event));

  function connect() {
    clearTimeout(retryTimer);
    source?.close();
    const stream = new EventSource(ctx.api.url("events", {}, { withToken: true }));
    source = stream;
    stream.addEventListener("hello", () => {
      backoff.reset();
      on("hello");
      stopPolling();
      ctx.refresh().catch(() => {});
      ctx.onHello();
    });
    stream.addEventListener("task", (event) => {
      const task = taskOfEvent(event.data);
      if (task) ctx.store.upsert(task);
      else console.error("bad task event", event.data);
    });
    stream.addEventListener("deleted", (event) => {
      const taskId = idOfDeletedEvent(event.data);
      if (taskId) ctx.store.remove(taskId);
      else console.error("bad deleted event", event.data);
    });
    stream.addEventListener("error", () => {
      if (source !== stream) return;
      startPolling();
      // The browser gave up (an error answer, e.g. 401, or a proxy): try again ourselves.
      if (shouldReopen(stream.readyState)) retryTimer = setTimeout(connect, backoff.next());
    });
  }

  function startPolling() {
    on("stream-error");
    if (polling) return;
    polling = true;
    const poll = async () => {
      if (!polling) return;
      try {
        await ctx.refresh();
        if (polling) on("poll-ok");
      } catch (error) {
        if (polling && error.status === 0) on("poll-unreachable");
      }
      if (polling) pollTimer = setTimeout(poll, POLL_MS);
    };
    pollTimer = setTimeout(poll, POLL_MS);
  }

  function stopPolling() {
    polling = false;
    clearTimeout(pollTimer);
  }

  return {
    connect,
    /** Show `event`'s connection state: "unauthorized" or "poll-unreachable". */
    report: on,
    setState,
  };
}
