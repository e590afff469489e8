// The sparse model in the scene's upright frame: the server's `/tasks/{id}/sparse` carries
// `scene.matrix` (4×4, row-major: COLMAP world → +Y up, centred, the first camera looking
// along -Z, scaled); this module moves the points, the cameras and the suggested view into
// that frame, so the 3D view opens level. Pure: no DOM, no three.js.

/** The scene's 4×4 matrix (row-major rows) when `scene` has a usable one, else null. */
export function sceneMatrix(scene) {
  const m = scene?.matrix;
  if (!Array.isArray(m) || m.length !== 4) return null;
  for (const row of m) {
    if (!Array.isArray(row) || row.length !== 4) return null;
    if (!row.every((v) => typeof v === "number" && Number.isFinite(v))) return null;
  }
  const det =
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) -
    m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0]) +
    m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
  return Math.abs(det) > 1e-18 ? m : null;
}

/** `m` applied to the point `p` ([x, y, z]). */
export function transformPoint(m, p) {
  const [x, y, z] = p;
  return [0, 1, 2].map((i) => m[i][0] * x + m[i][1] * y + m[i][2] * z + m[i][3]);
}

/** `m`'s rotation applied to the direction `v`, as a unit vector (scale and shift dropped). */
export function transformDirection(m, v) {
  const [x, y, z] = v;
  const out = [0, 1, 2].map((i) => m[i][0] * x + m[i][1] * y + m[i][2] * z);
  const length = Math.hypot(...out);
  return length > 1e-12 ? out.map((c) => c / length) : out;
}

/** The uniform scale of `m` (the length of its first row's rotation part). */
export function matrixScale(m) {
  return Math.hypot(m[0][0], m[0][1], m[0][2]) || 1;
}

/** Flat [x, y, z, ...] positions moved by `m`, as a Float32Array. */
export function transformPositions(m, positions) {
  const out = new Float32Array(positions.length);
  for (let i = 0; i + 2 < positions.length; i += 3) {
    const x = positions[i];
    const y = positions[i + 1];
    const z = positions[i + 2];
    out[i] = m[0][0] * x + m[0][1] * y + m[0][2] * z + m[0][3];
    out[i + 1] = m[1][0] * x + m[1][1] * y + m[1][2] * z + m[1][3];
    out[i + 2] = m[2][0] * x + m[2][1] * y + m[2][2] * z + m[2][3];
  }
  return out;
}

/**
 * The /sparse payload as the 3D view should draw it, with `frame`: "upright" (moved by
 * `scene.matrix`; `up` is +Y) or "colmap" (no usable scene: as the server sent it, with its
 * cameras' mean up). Points, camera centres, directions and ups, `center` and `radius` move
 * together; nothing else changes.
 */
export function drawnSparse(sparse) {
  const m = sceneMatrix(sparse.scene);
  if (!m) return { ...sparse, frame: "colmap" };
  const scale = matrixScale(m);
  return {
    ...sparse,
    frame: "upright",
    points: { ...sparse.points, positions: transformPositions(m, sparse.points.positions) },
    cameras: sparse.cameras.map((camera) => ({
      ...camera,
      center: transformPoint(m, camera.center),
      direction: transformDirection(m, camera.direction),
      up: transformDirection(m, camera.up),
    })),
    center: transformPoint(m, sparse.center || [0, 0, 0]),
    up: [0, 1, 0],
    radius: (sparse.radius || 1) * scale,
  };
}

/** How level a camera path is in a +Y-up frame: `rise` (the spread of the centres' y) and
 * `extent` (the largest horizontal distance between two of them, x-z plane). */
export function pathLevel(centres) {
  if (!centres.length) return { rise: 0, extent: 0 };
  const ys = centres.map((c) => c[1]);
  let extent = 0;
  for (let i = 0; i < centres.length; i += 1) {
    for (let j = i + 1; j < centres.length; j += 1) {
      const d = Math.hypot(centres[i][0] - centres[j][0], centres[i][2] - centres[j][2]);
      extent = Math.max(extent, d);
    }
  }
  return { rise: Math.max(...ys) - Math.min(...ys), extent };
}
