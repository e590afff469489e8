// The live connection's rules (static/live-policy.js): reconnect backoff, when to reopen the
// stream, and what the indicator says.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  CONNECTION_TEXT,
  createBackoff,
  nextConnection,
  shouldReopen,
} from "../../static/live-policy.js";

describe("backoff", () => {
  test("delays double from one second up to fifteen", () => {
    const backoff = createBackoff();
    const delays = Array.from({ length: 7 }, () => backoff.next());
    assert.deepEqual(delays, [1000, 2000, 4000, 8000, 15000, 15000, 15000]);
  });

  test("a stream that said hello starts the delays over", () => {
    const backoff = createBackoff({ first: 500, most: 3000 });
    backoff.next();
    backoff.next();
    backoff.reset();
    assert.equal(backoff.next(), 500);
  });
});

describe("connection states", () => {
  test("a broken stream means reconnecting, and hello means live again", () => {
    let state = nextConnection("live", "stream-error");
    assert.equal(state, "reconnecting");
    state = nextConnection(state, "poll-unreachable");
    assert.equal(state, "offline");
    state = nextConnection(state, "poll-ok");
    assert.equal(state, "reconnecting");
    assert.equal(nextConnection(state, "hello"), "live");
  });

  test("a poll that worked leaves a live or locked page as it is", () => {
    assert.equal(nextConnection("live", "poll-ok"), "live");
    assert.equal(nextConnection("locked", "poll-ok"), "locked");
  });

  test("a page waiting for its token stays locked when the stream breaks", () => {
    assert.equal(nextConnection("connecting", "unauthorized"), "locked");
    assert.equal(nextConnection("locked", "stream-error"), "locked");
    assert.equal(nextConnection("locked", "hello"), "live");
  });

  test("every state has its text", () => {
    for (const state of ["connecting", "live", "reconnecting", "offline", "locked"]) {
      assert.ok(CONNECTION_TEXT[state], state);
    }
  });

  test("the page reopens the stream only once the browser gave up on it", () => {
    assert.equal(shouldReopen(2), true); // EventSource.CLOSED
    assert.equal(shouldReopen(0), false); // CONNECTING: the browser retries by itself
    assert.equal(shouldReopen(1), false);
  });
});
