// The page's two 3D views, loaded only when shown: the sparse point cloud with the camera
// positions (three.js) and the trained Gaussian splats (Spark, a three.js splat renderer).
// Both come from node_modules through the server's /vendor mounts; when `npm ci` was not run,
// they say so and the rest of the page works as before.

import * as api from "./api.js";
import { drawnSparse } from "./scene-frame.js";

export class ViewerUnavailable extends Error {}

const NOT_INSTALLED =
  "The 3D viewer is not installed: run npm ci in the server's folder, then restart the server.";

async function present(path) {
  try {
    const response = await fetch(new URL(path, api.base), { method: "HEAD", cache: "no-store" });
    return response.ok;
  } catch {
    return false;
  }
}

function webgl2Available() {
  try {
    return Boolean(document.createElement("canvas").getContext("webgl2"));
  } catch {
    return false;
  }
}

let threeModules = null;
let sparkModule = null;

/** three.js and its orbit controls, or a ViewerUnavailable saying why not. */
export function loadThree() {
  threeModules ??= (async () => {
    if (!(await present("vendor/three/build/three.module.js"))) {
      throw new ViewerUnavailable(NOT_INSTALLED);
    }
    if (!webgl2Available()) {
      throw new ViewerUnavailable(
        "This browser cannot show 3D here: WebGL 2 is turned off or not supported.",
      );
    }
    const THREE = await import("three");
    const { OrbitControls } = await import("three/addons/controls/OrbitControls.js");
    return { THREE, OrbitControls };
  })();
  threeModules.catch(() => {
    threeModules = null; // try again next time (e.g. after npm ci and a restart)
  });
  return threeModules;
}

/** Spark (the splat renderer), or a ViewerUnavailable saying why not. */
export function loadSpark() {
  sparkModule ??= (async () => {
    const three = await loadThree();
    if (!(await present("vendor/spark/spark.module.js"))) {
      throw new ViewerUnavailable(NOT_INSTALLED);
    }
    return { ...three, spark: await import("@sparkjsdev/spark") };
  })();
  sparkModule.catch(() => {
    sparkModule = null;
  });
  return sparkModule;
}

/** A canvas with a perspective camera and orbit controls that draws only when something
 * changed (camera moves, data arrives, the size changes), so an open page costs nothing. */
class Stage {
  constructor(host, { THREE, OrbitControls }, label) {
    this.THREE = THREE;
    this.host = host;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "viewer-canvas";
    this.canvas.tabIndex = 0;
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", label);
    host.prepend(this.canvas);
    this.renderer = new THREE.WebGLRenderer({ canvas: this.canvas, antialias: false });
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    this.scene = new THREE.Scene();
    this.scene.background = new THREE.Color(0x14171c);
    this.camera = new THREE.PerspectiveCamera(50, 1, 0.01, 1000);
    this.OrbitControls = OrbitControls;
    this.controls = null; // made in look(), once the scene's up direction is known
    this.frames = 0;
    this.raf = 0;
    this.home = null;
    this.resize = new ResizeObserver(() => this.fit());
    this.resize.observe(host);
    this.fit();
  }

  fit() {
    const width = Math.max(1, this.host.clientWidth);
    const height = Math.max(1, this.host.clientHeight);
    this.renderer.setSize(width, height, false);
    this.camera.aspect = width / height;
    this.camera.updateProjectionMatrix();
    this.invalidate();
  }

  /** Draw the next `frames` animation frames (and as long as the controls still glide). */
  invalidate(frames = 2) {
    this.frames = Math.max(this.frames, frames);
    if (!this.raf && this.renderer) this.raf = requestAnimationFrame(() => this.tick());
  }

  tick() {
    this.raf = 0;
    if (!this.renderer) return;
    const moving = this.controls ? this.controls.update() : false;
    this.renderer.render(this.scene, this.camera);
    this.frames -= 1;
    this.host.dataset.rendered = String((Number(this.host.dataset.rendered) || 0) + 1);
    const waiting = this.afterRender?.() === false; // e.g. the splats are not sorted yet
    if (moving || this.frames > 0 || waiting) this.invalidate(0);
  }

  /** Look at `target` from `position` with `up`; remembered for resetView(). */
  look(position, target, up, size) {
    this.home = { position: position.clone(), target: target.clone() };
    this.camera.near = Math.max(size * 0.001, 1e-4);
    this.camera.far = size * 200;
    this.camera.updateProjectionMatrix();
    // OrbitControls turns around camera.up as it is when they are made.
    this.controls?.dispose();
    this.camera.up.copy(up);
    this.controls = new this.OrbitControls(this.camera, this.canvas);
    this.controls.enableDamping = true;
    this.controls.dampingFactor = 0.12;
    this.controls.minDistance = size * 0.01;
    this.controls.maxDistance = size * 50;
    this.controls.listenToKeyEvents(this.canvas);
    this.controls.addEventListener("change", () => this.invalidate());
    this.resetView();
  }

  resetView() {
    if (!this.home || !this.controls) return;
    this.camera.position.copy(this.home.position);
    this.controls.target.copy(this.home.target);
    this.camera.lookAt(this.home.target);
    this.controls.update();
    this.invalidate();
  }

  dispose() {
    cancelAnimationFrame(this.raf);
    this.resize.disconnect();
    this.controls?.dispose();
    this.scene.traverse((object) => {
      object.geometry?.dispose?.();
      object.material?.dispose?.();
    });
    this.renderer.dispose();
    this.renderer.forceContextLoss();
    this.renderer = null;
    this.canvas.remove();
  }
}

function vec(THREE, values) {
  return new THREE.Vector3(values[0], values[1], values[2]);
}

/** The sparse model's suggested view: centre, size and up, in three.js vectors. */
function sceneFrame(THREE, sparse) {
  const center = vec(THREE, sparse.center);
  const up = vec(THREE, sparse.up).normalize();
  let size = sparse.radius || 1;
  for (const camera of sparse.cameras) {
    size = Math.max(size, vec(THREE, camera.center).distanceTo(center));
  }
  return { center, up, size };
}

/** A view from outside the camera path, raised above it, that shows the cameras and points. */
function overviewPosition(THREE, sparse, frame) {
  const { center, up, size } = frame;
  let away = new THREE.Vector3();
  for (const camera of sparse.cameras) away.add(vec(THREE, camera.center).sub(center));
  if (away.lengthSq() < 1e-12 && sparse.cameras.length) {
    away = vec(THREE, sparse.cameras[0].direction).negate();
  }
  if (away.lengthSq() < 1e-12) away.set(0, 0, 1);
  away.normalize();
  away.addScaledVector(up, -away.dot(up)); // horizontal part
  if (away.lengthSq() < 1e-12) away.set(1, 0, 0);
  away.normalize().multiplyScalar(Math.cos(0.6)).addScaledVector(up, Math.sin(0.6));
  return center.clone().addScaledVector(away.normalize(), size * 2.4);
}

/** The point cloud and the cameras (frusta and the path between them). */
export class SparseView extends Stage {
  constructor(host, three) {
    super(host, three, "Sparse point cloud and camera positions; drag to turn, scroll to zoom");
  }

  /** Draw the /sparse payload: in the scene's upright frame when it has `scene` (+Y up, the
   * first camera looking along -Z), else in COLMAP's frame with the cameras' mean up. The
   * host says which (`data-frame`) and where the drawn camera centres are
   * (`data-camera-path`, JSON [[x, y, z], ...] in the view's world frame, +Y up when upright). */
  show(payload) {
    const { THREE } = this;
    const sparse = drawnSparse(payload);
    this.host.dataset.frame = sparse.frame;
    this.host.dataset.cameraPath = JSON.stringify(
      sparse.cameras.map((camera) => camera.center.map((v) => Number(v.toFixed(5)))),
    );
    const points = new THREE.BufferGeometry();
    points.setAttribute(
      "position",
      new THREE.BufferAttribute(new Float32Array(sparse.points.positions), 3),
    );
    points.setAttribute(
      "color",
      new THREE.BufferAttribute(new Uint8Array(sparse.points.colors), 3, true),
    );
    const dpr = this.renderer.getPixelRatio();
    this.scene.add(
      new THREE.Points(
        points,
        new THREE.PointsMaterial({ size: 3 * dpr, sizeAttenuation: false, vertexColors: true }),
      ),
    );

    const frame = sceneFrame(THREE, sparse);
    const scale = frame.size * 0.08;
    const lines = [];
    const path = [];
    for (const camera of sparse.cameras) {
      const apex = vec(THREE, camera.center);
      const forward = vec(THREE, camera.direction).normalize();
      const up = vec(THREE, camera.up).normalize();
      const right = new THREE.Vector3().crossVectors(forward, up).normalize();
      const w = camera.width && camera.fx ? camera.width / 2 / camera.fx : 0.6;
      const h = camera.height && camera.fy ? camera.height / 2 / camera.fy : 0.45;
      const mid = apex.clone().addScaledVector(forward, scale);
      const corner = (sx, sy) =>
        mid
          .clone()
          .addScaledVector(right, sx * w * scale)
          .addScaledVector(up, sy * h * scale);
      const c = [corner(-1, 1), corner(1, 1), corner(1, -1), corner(-1, -1)];
      for (const p of c) lines.push(apex, p);
      for (let i = 0; i < 4; i += 1) lines.push(c[i], c[(i + 1) % 4]);
      const top = mid.clone().addScaledVector(up, h * scale * 1.5);
      lines.push(c[0], top, top, c[1]); // a roof: which way is up
      path.push(apex);
    }
    const frusta = new THREE.BufferGeometry().setFromPoints(lines);
    this.scene.add(
      new THREE.LineSegments(frusta, new THREE.LineBasicMaterial({ color: 0xffb020 })),
    );
    if (path.length > 1) {
      const trail = new THREE.BufferGeometry().setFromPoints(path);
      this.scene.add(
        new THREE.Line(
          trail,
          new THREE.LineBasicMaterial({ color: 0x7aa2ff, transparent: true, opacity: 0.7 }),
        ),
      );
    }
    this.look(overviewPosition(THREE, sparse, frame), frame.center, frame.up, frame.size);
  }
}

/** The splats' centre and size from their bounding box. */
function boxFrame(THREE, mesh) {
  const box = mesh.getBoundingBox(true);
  const center = box.getCenter(new THREE.Vector3());
  const size = Math.max(box.getSize(new THREE.Vector3()).length() / 2, 1e-3);
  return { center, size };
}

/** The start view of a .ply (COLMAP's frame): a little behind the first camera, with the
 * cameras' up; without cameras, from -z with y down. */
function colmapView(THREE, mesh, sparse) {
  if (sparse && sparse.cameras.length) {
    const frame = sceneFrame(THREE, sparse);
    const first = sparse.cameras[0];
    const position = vec(THREE, first.center).addScaledVector(
      vec(THREE, first.direction).normalize(),
      -frame.size * 0.15,
    );
    return { position, frame };
  }
  const { center, size } = boxFrame(THREE, mesh);
  const frame = { center, size, up: new THREE.Vector3(0, -1, 0) }; // COLMAP: y points down
  return { position: center.clone().add(new THREE.Vector3(0, -0.5, -2).multiplyScalar(size)), frame };
}

/** The start view of an upright SPZ (+Y up, the first camera looking along -Z): from +Z,
 * a little raised, towards the splats' centre. */
function uprightView(THREE, mesh) {
  const { center, size } = boxFrame(THREE, mesh);
  const frame = { center, size, up: new THREE.Vector3(0, 1, 0) };
  return { position: center.clone().add(new THREE.Vector3(0, 0.5, 2).multiplyScalar(size)), frame };
}

/** The trained Gaussian splats, drawn by Spark. */
export class SplatView extends Stage {
  constructor(host, modules) {
    super(host, modules, "The trained 3D Gaussian splat scene; drag to turn, scroll to zoom");
    this.spark = modules.spark;
    this.sparkRenderer = new this.spark.SparkRenderer({
      renderer: this.renderer,
      onDirty: () => this.invalidate(),
    });
    this.scene.add(this.sparkRenderer);
    this.mesh = null;
    this.type = null; // "ply" or "spz": the frame the camera was set up for
    this.drawnMark = null; // the performance mark to set once the new splats are drawn
    this.afterRender = () => this.markDrawn();
  }

  /** After a frame: once Spark draws splats of the new mesh (a sort that started after the
   * mesh was added has finished, and it left splats to draw), set the "splats-drawn"
   * performance mark (and data-drawn on the host); false while waiting. */
  markDrawn() {
    const pending = this.drawnMark;
    if (!pending) return true;
    const sparkRenderer = this.sparkRenderer;
    const sorted = sparkRenderer.lastSortTime >= pending.since && !sparkRenderer.sorting;
    if (!(sorted && sparkRenderer.activeSplats > 0)) {
      if (performance.now() - pending.since < 30_000) return false;
      this.drawnMark = null; // nothing drawn after 30 s: stop waiting
      return true;
    }
    this.drawnMark = null;
    performance.mark("splats-drawn", { detail: pending.detail });
    this.host.dataset.drawn = String((Number(this.host.dataset.drawn) || 0) + 1);
    return true;
  }

  /**
   * Show splat file bytes: `type` "ply" (COLMAP's frame, y down: the camera takes its up and
   * start from `sparse`, the capture's cameras) or "spz" (stored upright, +Y up in SPZ's own
   * RUB frame; Spark reads its values as they are, so nothing is turned and the sparse
   * cameras, which are in COLMAP's frame, are not used). No rotation is ever set on the mesh.
   * `keepView`: a newer version of the same scene (a training preview, then the final model)
   * replaces the shown one without moving the user's camera. Returns the splat count.
   */
  async show(bytes, { type = "ply", sparse = null, keepView = false } = {}) {
    const { THREE, spark } = this;
    const spz = type === "spz";
    performance.mark("splats-bytes", { detail: { type, bytes: bytes.length } });
    const mesh = new spark.SplatMesh({
      fileBytes: bytes,
      fileType: spz ? spark.SplatFileType.SPZ : spark.SplatFileType.PLY,
      fileName: spz ? "model.spz" : "point_cloud.ply",
    });
    await mesh.initialized;
    if (!this.renderer) {
      mesh.dispose?.(); // closed while loading
      return 0;
    }
    const count = mesh.packedSplats?.numSplats ?? 0;
    performance.mark("splats-decoded", { detail: { type, count } });
    this.drawnMark = { since: performance.now(), detail: { type, count, bytes: bytes.length } };
    const old = this.mesh;
    const sameFrame = old && this.type === type;
    this.mesh = mesh;
    this.type = type;
    this.scene.add(mesh);
    if (old) {
      this.scene.remove(old);
      old.dispose?.();
    }
    if (!(keepView && sameFrame && this.controls)) {
      const { position, frame } = spz ? uprightView(THREE, mesh) : colmapView(THREE, mesh, sparse);
      this.look(position, frame.center, frame.up, frame.size);
    }
    this.invalidate(4);
    return count;
  }

  dispose() {
    this.mesh?.dispose?.();
    this.sparkRenderer?.dispose?.();
    super.dispose();
  }
}
