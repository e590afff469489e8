// Photos and several videos on the page: the kind of each chosen file, the words for the
// selection, which uploads can resume (static/upload-files.js), and how the preprocessing
// summary says what came from each source (static/task-summary.js).

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { preprocessingSummary, sourcesLine, videoLine } from "../../static/task-summary.js";
import {
  ACCEPT,
  describeSelection,
  fileKind,
  resumable,
  selectionErrorTitle,
} from "../../static/upload-files.js";

const video = { name: "orbit.mp4", size: 2048, type: "video/mp4" };
const photo = (k) => ({ name: `IMG_${k}.HEIC`, size: 1024, type: "" });
const zip = { name: "desk.zip", size: 4096, type: "application/zip" };

describe("the files chosen for an upload", () => {
  test("each file's kind, from its name or type (the server checks the content)", () => {
    assert.equal(fileKind(video), "video");
    assert.equal(fileKind(photo(1)), "photo");
    assert.equal(fileKind({ name: "a.JPG" }), "photo");
    assert.equal(fileKind({ name: "scan", type: "image/png" }), "photo");
    assert.equal(fileKind(zip), "zip");
    assert.equal(fileKind({ name: "clip.mov", type: "video/quicktime" }), "video");
    assert.match(ACCEPT, /\.zip/);
    assert.match(ACCEPT, /\.heic/);
    assert.match(ACCEPT, /video\/\*/);
  });

  test("the drop zone's words for one file, several, and none", () => {
    assert.deepEqual(describeSelection([zip]), {
      title: "desk.zip",
      hint: "4.0 KiB · choose others or drop them here",
    });
    assert.equal(describeSelection([video, { ...video, name: "high.mp4" }]).title, "2 videos of one scene");
    assert.equal(
      describeSelection([photo(1), photo(2), photo(3), video]).title,
      "1 video, 3 photos of one scene",
    );
    assert.equal(describeSelection([]).title, "Choose a video, photos or a ZIP");
  });

  test("only a single video resumes (tus sends one file); the rest is one POST /upload", () => {
    assert.equal(resumable([video]), true);
    assert.equal(resumable([zip]), false);
    assert.equal(resumable([photo(1)]), false);
    assert.equal(resumable([video, video]), false);
  });

  test("a refused set of files gets its own headline; a single video keeps its own", () => {
    assert.equal(selectionErrorTitle(415, [zip]), "A file cannot be used.");
    assert.equal(selectionErrorTitle(422, [photo(1), photo(2)]), "These photos cannot make one scene.");
    assert.equal(selectionErrorTitle(413, [video]), null);
  });
});

describe("what came from each source", () => {
  const sources = [
    { label: "orbit_1.mp4", kind: "video", images: 36, frames_kept: 30, frames_registered: 30 },
    { label: "desk", kind: "photos", images: 17, frames_kept: 17, frames_registered: 15 },
  ];

  test("a line per source, photos and frames told apart", () => {
    assert.equal(
      sourcesLine(sources),
      "orbit_1.mp4: 30 of 36 frames, 30 placed · desk: 17 photos, 15 placed",
    );
    assert.equal(
      sourcesLine([{ label: "big", kind: "photos", images: 250, frames_kept: 100 }]),
      "big: 100 of 250 photos",
    );
    // A single video says it in the summary's own numbers: no extra row.
    assert.equal(sourcesLine([sources[0]]), null);
    assert.equal(sourcesLine(undefined), null);
  });

  test("the summary gets a Sources row only when there is something to add", () => {
    const base = { frames_kept: 47, frames_registered: 45, points3D: 900 };
    const summary = preprocessingSummary({ ...base, sources });
    assert.deepEqual(summary.stats.at(-1), [
      "Sources",
      "orbit_1.mp4: 30 of 36 frames, 30 placed · desk: 17 photos, 15 placed",
      null,
    ]);
    assert.equal(preprocessingSummary({ ...base, sources: [sources[0]] }).stats.length, 4);
  });

  test("the task's input line for a capture of several sources", () => {
    assert.equal(
      videoLine({ kind: "capture", videos: 2, photos: 12, width: 640, height: 480, duration: 9 }, 2048),
      "2 videos, 12 photos · 640 × 480 · 9 s · 2.0 KiB",
    );
  });
});
