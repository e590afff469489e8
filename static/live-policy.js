// The rules of the live connection, apart from the browser objects that follow them: when to
// try the event stream again, when to poll, and what the connection indicator says. No DOM.

export const POLL_MS = 4000;

/** What the connection indicator says in each state. */
export const CONNECTION_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting… (checking every few seconds)",
  offline: "Server unreachable; retrying",
  locked: "Token needed",
};

/** Doubling delays between attempts to open the event stream, from `first` up to `most` ms;
 * `reset()` once a stream said hello. */
export function createBackoff({ first = 1000, most = 15000 } = {}) {
  let delay = first;
  return {
    /** The delay before the next attempt (and doubles the one after). */
    next() {
      const now = delay;
      delay = Math.min(delay * 2, most);
      return now;
    },
    reset() {
      delay = first;
    },
  };
}

/**
 * The connection state after `event`:
 * "hello" (the stream is open), "stream-error" (it broke; polling starts), "poll-ok",
 * "poll-unreachable" (a poll found no server), "unauthorized" (a token is needed).
 */
export function nextConnection(current, event) {
  switch (event) {
    case "hello":
      return "live";
    case "stream-error":
      return current === "locked" ? "locked" : "reconnecting";
    case "poll-ok":
      return current === "offline" ? "reconnecting" : current;
    case "poll-unreachable":
      return "offline";
    case "unauthorized":
      return "locked";
    default:
      return current;
  }
}

/** Whether the page should open the event stream again itself after an error: only once the
 * browser gave up on it (EventSource.CLOSED is 2; it retries by itself otherwise). */
export function shouldReopen(readyState) {
  return readyState === 2;
}
