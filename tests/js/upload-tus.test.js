// The resumable upload's rules (static/upload-tus.js): the tus metadata sent, the key an
// unfinished upload is remembered by, and what a failed tus request tells the form.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  tusFailure,
  tusFingerprint,
  tusMetadata,
  tusUnsupported,
} from "../../static/upload-tus.js";

const FILE = { name: "walk.mp4", type: "video/mp4", size: 123456, lastModified: 1700000000000 };

function response(status, body) {
  return { getStatus: () => status, getBody: () => body };
}

describe("tus metadata", () => {
  test("carries the file's name and type and every parameter as a string", () => {
    const metadata = tusMetadata(FILE, { max_frames: 120, auto_training: "false", preset: "" });
    assert.deepEqual(metadata, {
      filename: "walk.mp4",
      filetype: "video/mp4",
      max_frames: "120",
      auto_training: "false",
    });
  });

  test("a file without a type is sent as bytes", () => {
    assert.equal(tusMetadata({ name: "x" }, {}).filetype, "application/octet-stream");
  });
});

describe("the key of an unfinished upload", () => {
  const endpoint = "http://host/uploads/";

  test("is the same for the same file, settings and server, in any order", () => {
    const a = tusFingerprint(FILE, { max_frames: 120, preset: "fast" }, endpoint);
    const b = tusFingerprint({ ...FILE }, { preset: "fast", max_frames: 120 }, endpoint);
    assert.equal(a, b);
  });

  test("differs when the settings, the file or the server differ", () => {
    const base = tusFingerprint(FILE, { max_frames: 120 }, endpoint);
    assert.notEqual(base, tusFingerprint(FILE, { max_frames: 121 }, endpoint));
    assert.notEqual(base, tusFingerprint({ ...FILE, size: 1 }, { max_frames: 120 }, endpoint));
    assert.notEqual(base, tusFingerprint(FILE, { max_frames: 120 }, "http://other/uploads/"));
  });
});

describe("a failed tus request", () => {
  test("gives the server's status and JSON detail", () => {
    const failure = tusFailure({
      originalResponse: response(415, '{"detail": "No video stream in the file."}'),
    });
    assert.deepEqual(failure, { status: 415, detail: "No video stream in the file." });
  });

  test("falls back to the body's text, then to the status", () => {
    const text = tusFailure({ originalResponse: response(502, " Bad gateway ") });
    assert.equal(text.detail, "Bad gateway");
    const empty = tusFailure({ originalResponse: response(500, "") });
    assert.equal(empty.detail, "The server answered 500.");
  });

  test("without an answer is status 0: the server could not be reached", () => {
    const failure = tusFailure({ message: "tus: failed to upload chunk", originalResponse: null });
    assert.equal(failure.status, 0);
    assert.match(failure.detail, /cannot be reached/);
  });

  test("404 and 405 mean the server has no resumable uploads; others do not", () => {
    assert.equal(tusUnsupported({ status: 404 }), true);
    assert.equal(tusUnsupported({ status: 405 }), true);
    assert.equal(tusUnsupported({ status: 413 }), false);
    assert.equal(tusUnsupported({ status: 0 }), false);
  });
});
