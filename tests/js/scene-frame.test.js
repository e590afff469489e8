// The sparse model moved into the scene's upright frame (static/scene-frame.js).

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  drawnSparse,
  matrixScale,
  pathLevel,
  sceneMatrix,
  transformDirection,
  transformPoint,
} from "../../static/scene-frame.js";

// The stand-in pipeline's layout: cameras on a circle of radius 4 in COLMAP's x-z plane,
// looking at the origin, -y up; and the server's matrix for it (scale 1/4, y and z flipped).
const MATRIX = [
  [0.25, 0, 0, 0],
  [0, -0.25, 0, 0],
  [0, 0, -0.25, 0],
  [0, 0, 0, 1],
];

function circle(tilt = 0) {
  // Cameras around the origin, optionally on a circle tilted by `tilt` radians about x.
  const cameras = [];
  for (let i = 0; i < 8; i += 1) {
    const a = (2 * Math.PI * i) / 8;
    const x = 4 * Math.sin(a);
    const z0 = -4 * Math.cos(a);
    const centre = [x, -z0 * Math.sin(tilt), z0 * Math.cos(tilt)];
    cameras.push({ name: `f${i}`, center: centre, direction: centre.map((c) => -c / 4), up: [0, -1, 0] });
  }
  return cameras;
}

function payload(scene, cameras = circle()) {
  return {
    points: { total: 2, count: 2, positions: [0, 0, 0, 1, -2, 3], colors: [0, 0, 0, 1, 1, 1] },
    cameras,
    center: [0, 0, 0],
    radius: 0.8,
    up: [0, -1, 0],
    scene,
  };
}

describe("the scene's matrix", () => {
  test("is used only when it is a finite, invertible 4x4", () => {
    assert.equal(sceneMatrix(null), null);
    assert.equal(sceneMatrix({}), null);
    assert.equal(sceneMatrix({ matrix: [[1, 0, 0], [0, 1, 0], [0, 0, 1]] }), null);
    assert.equal(sceneMatrix({ matrix: [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, NaN, 0], [0, 0, 0, 1]] }), null);
    assert.equal(sceneMatrix({ matrix: [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]] }), null);
    assert.deepEqual(sceneMatrix({ matrix: MATRIX }), MATRIX);
  });

  test("moves points with scale and shift, directions as unit vectors", () => {
    const m = [
      [0, 0, 2, 1],
      [2, 0, 0, -1],
      [0, 2, 0, 0],
      [0, 0, 0, 1],
    ];
    assert.deepEqual(transformPoint(m, [1, 2, 3]), [7, 1, 4]);
    assert.deepEqual(transformDirection(m, [0, 0, 5]), [1, 0, 0]);
    assert.equal(matrixScale(m), 2);
  });
});

describe("the sparse model as drawn", () => {
  test("without a scene stays in COLMAP's frame, as sent", () => {
    const sparse = payload(null);
    const drawn = drawnSparse(sparse);
    assert.equal(drawn.frame, "colmap");
    assert.deepEqual(drawn.cameras, sparse.cameras);
    assert.deepEqual(drawn.up, [0, -1, 0]);
  });

  test("with a scene is upright: +Y up, cameras' up +Y, radius scaled", () => {
    const drawn = drawnSparse(payload({ matrix: MATRIX, scale: 0.25 }));
    assert.equal(drawn.frame, "upright");
    assert.deepEqual(drawn.up, [0, 1, 0]);
    assert.equal(drawn.radius, 0.2);
    assert.deepEqual([...drawn.points.positions], [0, 0, 0, 0.25, 0.5, -0.75]);
    for (const camera of drawn.cameras) {
      assert.ok(Math.abs(camera.up[1] - 1) < 1e-9, `camera up ${camera.up}`);
      assert.ok(Math.abs(Math.hypot(...camera.center) - 1) < 1e-9);
    }
    const level = pathLevel(drawn.cameras.map((c) => c.center));
    assert.ok(level.rise < 1e-9 && Math.abs(level.extent - 2) < 1e-9, JSON.stringify(level));
  });

  test("a tilted capture comes out level once the scene's matrix turns it back", () => {
    const tilt = 0.5;
    const cameras = circle(tilt).map((c) => ({ ...c, up: [0, -Math.cos(tilt), -Math.sin(tilt)] }));
    const raw = pathLevel(cameras.map((c) => c.center));
    assert.ok(raw.rise > 0.4 * raw.extent, "the raw path is tilted");
    // COLMAP → upright: undo the tilt about x, then flip y and z.
    const c = Math.cos(tilt);
    const s = Math.sin(tilt);
    const matrix = [
      [1, 0, 0, 0],
      [0, -c, -s, 0],
      [0, s, -c, 0],
      [0, 0, 0, 1],
    ];
    const drawn = drawnSparse(payload({ matrix }, cameras));
    const level = pathLevel(drawn.cameras.map((cam) => cam.center));
    assert.ok(level.rise < 1e-6 * level.extent, JSON.stringify(level));
    for (const cam of drawn.cameras) assert.ok(cam.up[1] > 0.999, `camera up ${cam.up}`);
  });
});

describe("how level a path is", () => {
  test("rise is the y spread, extent the widest x-z distance", () => {
    assert.deepEqual(pathLevel([]), { rise: 0, extent: 0 });
    assert.deepEqual(pathLevel([[0, 1, 0], [3, 2, 4], [0, 1.5, 1]]), { rise: 1, extent: 5 });
  });
});
