"""The upright frame of a Structure-from-Motion scene, from its registered cameras.

COLMAP picks an arbitrary world frame, so trained scenes come out tilted. This module finds
the scene's up direction, centre and size from the cameras (and, when given, the sparse
points), and returns the similarity that maps COLMAP world coordinates into an upright frame:

* +Y is up, the scene's centre is at the origin, and the first camera looks along -Z (its
  horizontal heading), with +X to its right: a right-handed, y-up frame as three.js and Spark
  use (the SPZ spec's RUB), so a viewer's default camera sees the scene as the first frame did;
* optionally scaled so that the cameras' median distance from the centre is `target_radius`.

Cameras are given as COLMAP stores them: world-to-camera rotations R (N, 3, 3) and
translations t (N, 3), x = R·X + t. Their centres are C = -Rᵀt; OpenCV cameras look along +z
with +x right and +y down, so in world coordinates a camera's right is row 0 of R, its up is
-(row 1) and its viewing direction row 2.

How up is found (each step falls back when its geometry says nothing):

1. the mean of the cameras' up vectors: a prior, biased when the phone is pitched (looking
   down at an object tilts every up vector towards it);
2. the direction most perpendicular to all the cameras' right vectors: people hold a phone
   level (little roll) but pitch it freely, so right vectors are horizontal and this is
   unbiased by pitch; it needs the heading to change (an arc or an orbit). When the heading
   barely changes (a straight walk), up is taken as the mean up made perpendicular to the
   common right direction;
3. when the camera centres spread like an orbit (wide in two directions, flat in the third)
   and the plane's normal agrees with step 2 within 15°, the two are averaged, each weighted
   by the inverse of its variance (residual variance over count × spread, as for any fitted
   normal).

Pure numpy; nothing here imports the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SPREAD = 4.0  # rights' second eigenvalue over the first: the up direction is determined
MIN_HEADING_VARIANCE = 0.02  # … and the headings vary enough (about ±15° or more)
MAX_PRIOR_ANGLE = 60.0  # degrees between the rights' estimate and the mean up to trust it
ORBIT_SPREAD = 0.15  # centres' middle over largest variance: they spread in two directions
ORBIT_FLATNESS = 0.05  # centres' smallest over middle variance: they lie in a plane
MAX_PLANE_ANGLE = 15.0  # degrees between the plane's normal and the rights' estimate
MIN_INTERSECTION = 0.05  # optical axes' least-squares system: smallest eigenvalue per camera
FRONT_SHARE = 0.7  # share of cameras the axes' meeting point must lie in front of


@dataclass(frozen=True)
class UprightFrame:
    """The upright frame of a scene.

    matrix: 4×4 similarity from COLMAP world coordinates to the upright frame (+Y up, centre
    at the origin, first camera looking along -Z). up, centre: in COLMAP world coordinates.
    radius: the cameras' median distance from the centre, in COLMAP units. scale: the factor
    the matrix applies. method: which estimates gave the up direction (for logs and metadata).
    """

    matrix: np.ndarray
    up: np.ndarray
    centre: np.ndarray
    radius: float
    scale: float
    method: str


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if norm < 1e-12:
        raise ValueError("cannot normalise a zero vector")
    return v / norm


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(np.dot(_unit(a), _unit(b)), -1.0, 1.0))))


def rotations_from_quaternions(qvec: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) of COLMAP quaternions (N, 4) in w, x, y, z order."""
    q = np.asarray(qvec, dtype=np.float64).reshape(-1, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def _check(rotations: np.ndarray, translations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rotations, dtype=np.float64)
    t = np.asarray(translations, dtype=np.float64)
    if r.ndim != 3 or r.shape[1:] != (3, 3) or t.shape != (len(r), 3) or len(r) == 0:
        raise ValueError("need rotations (N, 3, 3) and translations (N, 3) for N ≥ 1 cameras")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(t))):
        raise ValueError("camera poses must be finite")
    return r, t


def camera_centres(rotations: np.ndarray, translations: np.ndarray) -> np.ndarray:
    """Camera centres C = -Rᵀt (N, 3) in world coordinates."""
    r, t = _check(rotations, translations)
    return -np.einsum("nji,nj->ni", r, t)


def estimate_up(rotations: np.ndarray, translations: np.ndarray) -> tuple[np.ndarray, str]:
    """The scene's up direction (a unit vector in world coordinates) and how it was found."""
    r, t = _check(rotations, translations)
    rights, ups = r[:, 0, :], -r[:, 1, :]
    mean_up = np.sum(ups, axis=0)
    if np.linalg.norm(mean_up) < 1e-6 * len(r):
        raise ValueError("the cameras' up vectors cancel out: no up direction")
    mean_up = _unit(mean_up)
    if len(r) < 3:
        return mean_up, "mean camera up"

    values, vectors = np.linalg.eigh(rights.T @ rights / len(r))  # ascending
    # Angular variance of a fitted normal: residual variance over (count × weakest spread).
    variance = max(values[0], 1e-12) / (len(r) * max(values[1], 1e-12))
    if values[1] >= MIN_SPREAD * values[0] and values[1] >= MIN_HEADING_VARIANCE:
        up, method = vectors[:, 0], "camera rights"
    else:  # one heading: up lies in the plane perpendicular to the common right direction
        common = vectors[:, 2]
        up, method = mean_up - np.dot(mean_up, common) * common, "mean up ⟂ camera rights"
    up = _unit(up)
    if np.dot(up, mean_up) < 0:
        up = -up
    if _angle_deg(up, mean_up) > MAX_PRIOR_ANGLE:
        return mean_up, "mean camera up"

    centres = camera_centres(r, t)
    if len(r) >= 4:
        spread, axes = np.linalg.eigh(np.cov((centres - centres.mean(axis=0)).T))
        orbit = spread[1] >= ORBIT_SPREAD * spread[2] and spread[0] <= ORBIT_FLATNESS * spread[1]
        normal = axes[:, 0] if np.dot(axes[:, 0], up) >= 0 else -axes[:, 0]
        if orbit and _angle_deg(normal, up) <= MAX_PLANE_ANGLE and method == "camera rights":
            # Both estimates are unbiased: weight each by the inverse of its variance.
            plane_variance = max(spread[0], 1e-12) / (len(r) * max(spread[1], 1e-12))
            weights = 1 / variance, 1 / plane_variance
            return _unit(weights[0] * up + weights[1] * normal), f"{method} + orbit plane"
    return up, method


def estimate_centre(
    rotations: np.ndarray, translations: np.ndarray, points: np.ndarray | None = None
) -> np.ndarray:
    """The scene's centre in world coordinates: the coordinate-wise median of the sparse
    points when given; else where the cameras' optical axes meet (least squares) when they
    converge in front of the cameras; else the mean of the camera centres."""
    r, t = _check(rotations, translations)
    if points is not None:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        p = p[np.all(np.isfinite(p), axis=1)]
        if len(p):
            return np.median(p, axis=0)
    centres = camera_centres(r, t)
    forwards = r[:, 2, :]
    projectors = np.eye(3)[None] - np.einsum("ni,nj->nij", forwards, forwards)
    a = projectors.sum(axis=0)
    if len(r) >= 2 and np.linalg.eigvalsh(a)[0] >= MIN_INTERSECTION * len(r):
        meet = np.linalg.solve(a, np.einsum("nij,nj->i", projectors, centres))
        in_front = np.einsum("ni,ni->n", meet[None] - centres, forwards) > 0
        if in_front.mean() >= FRONT_SHARE:
            return meet
    return centres.mean(axis=0)


def upright_frame(
    rotations: np.ndarray,
    translations: np.ndarray,
    points: np.ndarray | None = None,
    *,
    target_radius: float | None = 1.0,
) -> UprightFrame:
    """The similarity from COLMAP world coordinates to the upright frame (see the module's
    docstring): +Y up, centre at the origin, the first camera looking along -Z, and the
    cameras' median distance from the centre scaled to `target_radius` (None: unscaled)."""
    r, t = _check(rotations, translations)
    up, method = estimate_up(r, t)
    centre = estimate_centre(r, t, points)
    centres = camera_centres(r, t)
    radius = float(np.median(np.linalg.norm(centres - centre, axis=1)))
    scale = 1.0
    if target_radius is not None:
        if target_radius <= 0:
            raise ValueError("target_radius must be positive")
        scale = target_radius / radius if radius > 1e-9 else 1.0

    # -Z along the first camera's horizontal heading (or, looking straight down, its up).
    first = r[0]
    heading = first[2] - np.dot(first[2], up) * up
    if np.linalg.norm(heading) < 1e-3:
        heading = -first[1] - np.dot(-first[1], up) * up
    if np.linalg.norm(heading) < 1e-3:  # degenerate: any horizontal direction
        heading = np.cross(up, [1.0, 0.0, 0.0] if abs(up[0]) < 0.9 else [0.0, 0.0, 1.0])
    back = -_unit(heading)
    right = np.cross(up, back)
    rotation = np.stack([right, up, back])  # rows: the new axes in world coordinates
    matrix = np.eye(4)
    matrix[:3, :3] = scale * rotation
    matrix[:3, 3] = -scale * rotation @ centre
    return UprightFrame(matrix, up, centre, radius, scale, method)
