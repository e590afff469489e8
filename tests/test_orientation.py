"""The upright frame (pipeline/orientation.py) of synthetic camera rigs with a known up
direction, each placed in a deliberately rotated COLMAP world: full orbits, handheld arcs with
noise, cameras tilted at random by up to ±15°, a straight walk."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import orientation as ori
from training_server_spz import split_similarity

UP = np.array([0.0, 0.0, 1.0])  # the rigs are built z-up, then moved into a random world


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation by `angle` radians about unit `axis` (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def look_at(centre: np.ndarray, target: np.ndarray, up: np.ndarray = UP) -> np.ndarray:
    """World-to-camera rotation of an OpenCV camera at `centre` looking at `target`, level
    (no roll): rows are the camera's right, down and forward in world coordinates."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    down = -(up - np.dot(up, forward) * forward)
    down /= np.linalg.norm(down)
    right = np.cross(down, forward)
    return np.stack([right, down, forward])


def tilt(r: np.ndarray, roll: float, pitch: float, yaw: float = 0.0) -> np.ndarray:
    """The camera turned about its own axes (radians): roll about z, pitch about x, yaw
    about y."""
    turn = axis_rotation(np.array([0.0, 0.0, 1.0]), roll)
    turn = axis_rotation(np.array([1.0, 0.0, 0.0]), pitch) @ turn
    turn = axis_rotation(np.array([0.0, 1.0, 0.0]), yaw) @ turn
    return turn @ r  # camera-frame rotation applied after world-to-camera


def to_colmap(
    rotations: list[np.ndarray], centres: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rig in a random world: x_world = s·Q·x_rig + o. Returns COLMAP-style R, t, and
    the world's true up and the similarity (4×4) from rig to world."""
    q, s, o = random_rotation(rng), rng.uniform(0.2, 5), rng.normal(scale=10, size=3)
    r_world = np.stack([r @ q.T for r in rotations])  # world-to-camera in the new world
    c_world = s * centres @ q.T + o
    t_world = -np.einsum("nij,nj->ni", r_world, c_world)
    rig_to_world = np.eye(4)
    rig_to_world[:3, :3], rig_to_world[:3, 3] = s * q, o
    return r_world, t_world, q @ UP, rig_to_world


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def orbit(
    rng: np.random.Generator,
    count: int,
    arc_deg: float = 360.0,
    radius: float = 3.0,
    height: float = 1.2,
    position_noise: float = 0.0,
    tilt_deg: float = 0.0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Cameras on a (part of a) circle around the origin at `height`, looking at the origin
    (so pitched down), with optional position noise and random roll/pitch/yaw."""
    angles = np.radians(np.linspace(0, arc_deg, count, endpoint=arc_deg < 360))
    centres = np.stack([radius * np.cos(angles), radius * np.sin(angles), np.full(count, height)])
    centres = centres.T + rng.normal(scale=position_noise, size=(count, 3))
    rotations = [look_at(c, np.zeros(3)) for c in centres]
    if tilt_deg:
        t = math.radians(tilt_deg)
        rotations = [tilt(r, *rng.uniform(-t, t, 3)) for r in rotations]
    return rotations, centres


def check_frame(frame: ori.UprightFrame, true_up: np.ndarray, bound_deg: float) -> None:
    """The frame's up is within `bound_deg` of the truth, and its matrix is a similarity that
    sends the true up to +Y (within the same bound)."""
    assert angle_deg(frame.up, true_up) <= bound_deg, frame.method
    scale, rotation, _ = split_similarity(frame.matrix)
    assert scale == pytest.approx(frame.scale)
    assert angle_deg(rotation @ true_up, np.array([0.0, 1.0, 0.0])) <= bound_deg


@pytest.mark.parametrize("seed", range(5))
def test_full_orbit_in_a_rotated_world(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rotations, centres = orbit(rng, 60)
    r, t, true_up, rig_to_world = to_colmap(rotations, centres, rng)
    frame = ori.upright_frame(r, t)
    check_frame(frame, true_up, 0.5)
    assert "orbit plane" in frame.method
    # The cameras look at the origin of the rig: that is the centre, mapped to 0.
    np.testing.assert_allclose(frame.centre, rig_to_world[:3, 3], atol=1e-6 * 50)
    moved = (frame.matrix @ np.c_[ori.camera_centres(r, t), np.ones(len(r))].T).T[:, :3]
    assert np.median(np.linalg.norm(moved, axis=1)) == pytest.approx(1.0)
    # All the cameras sit 1.2 above the centre in a 3.0 orbit: the same in the new frame.
    np.testing.assert_allclose(moved[:, 1], 1.2 / math.hypot(3.0, 1.2), atol=1e-6)
    # The first camera looks along -Z (horizontally), with +X to its right.
    forward = frame.matrix[:3, :3] @ r[0][2]
    right = frame.matrix[:3, :3] @ r[0][0]
    assert angle_deg(forward * [1, 0, 1], [0, 0, -1]) < 1e-6
    assert angle_deg(right, [1, 0, 0]) < 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_handheld_arc_with_noise(seed: int) -> None:
    """A 100° arc walked around an object, the phone pitched down ~20° at it, with 4 %
    position noise, wobbling height and ±3° of shake: the mean camera up alone is off by
    about the pitch; the frame must be within 3°."""
    rng = np.random.default_rng(100 + seed)
    rotations, centres = orbit(rng, 80, arc_deg=100, height=1.1, position_noise=0.12)
    rotations = [tilt(rot, *rng.uniform(-math.radians(3), math.radians(3), 3)) for rot in rotations]
    r, t, true_up, _ = to_colmap(rotations, centres, rng)
    mean_up = -r[:, 1, :].sum(axis=0)
    assert angle_deg(mean_up, true_up) > 10  # the naive estimate is visibly wrong here
    check_frame(ori.upright_frame(r, t), true_up, 3.0)


@pytest.mark.parametrize("seed", range(5))
def test_cameras_tilted_randomly_by_15_degrees(seed: int) -> None:
    """An orbit of 60 frames, each turned at random by up to ±15° in roll, pitch and yaw
    (worst of 200 such rigs: 0.94°)."""
    rng = np.random.default_rng(200 + seed)
    rotations, centres = orbit(rng, 60, radius=2.0, height=0.8, tilt_deg=15, position_noise=0.05)
    r, t, true_up, _ = to_colmap(rotations, centres, rng)
    frame = ori.upright_frame(r, t)
    assert frame.method == "camera rights + orbit plane"
    check_frame(frame, true_up, 2.0)


@pytest.mark.parametrize("seed", range(3))
def test_partial_arc_with_tilted_cameras(seed: int) -> None:
    """A 140° arc of 150 frames, each tilted at random by up to ±15° about all three axes.
    Without a closed orbit only the camera rights say where up is, and ±15° of roll leaves
    a statistical error (median 1.3°, 95th percentile 2.6° over 200 such rigs): bound 4°."""
    rng = np.random.default_rng(300 + seed)
    rotations, centres = orbit(rng, 150, arc_deg=140, tilt_deg=15, position_noise=0.08)
    r, t, true_up, _ = to_colmap(rotations, centres, rng)
    frame = ori.upright_frame(r, t)
    assert frame.method == "camera rights"  # half an orbit or less: the plane is not used
    check_frame(frame, true_up, 4.0)


def test_straight_walk_keeps_the_heading() -> None:
    """Walking forward down a corridor: every camera has the same heading (the rights say
    nothing about up along the walk), pitch wobbles ±10°, roll ±3°."""
    rng = np.random.default_rng(7)
    rotations, centres = [], []
    for i in range(50):
        centre = np.array([0.1 * i, rng.normal(scale=0.05), 1.6 + rng.normal(scale=0.03)])
        base = look_at(centre, centre + np.array([1.0, 0.0, 0.0]))
        pitch, roll = rng.uniform(-0.17, 0.17), rng.uniform(-0.05, 0.05)
        rotations.append(tilt(base, roll, pitch))
        centres.append(centre)
    r, t, true_up, _ = to_colmap(rotations, np.array(centres), rng)
    frame = ori.upright_frame(r, t, target_radius=None)
    check_frame(frame, true_up, 3.0)
    assert frame.method == "mean up ⟂ camera rights"
    assert frame.scale == 1.0


def test_sparse_points_give_the_centre() -> None:
    """With sparse points, the centre is their median: far-away outliers do not drag it."""
    rng = np.random.default_rng(8)
    rotations, centres = orbit(rng, 40, arc_deg=90)
    r, t, _, rig_to_world = to_colmap(rotations, centres, rng)
    object_points = rng.normal(scale=0.3, size=(2000, 3)) + np.array([0.5, -0.2, 0.1])
    outliers = rng.normal(scale=200, size=(100, 3))
    points_rig = np.concatenate([object_points, outliers])
    points = (rig_to_world @ np.c_[points_rig, np.ones(len(points_rig))].T).T[:, :3]
    frame = ori.upright_frame(r, t, points)
    truth = rig_to_world[:3, :3] @ [0.5, -0.2, 0.1] + rig_to_world[:3, 3]
    scale = np.cbrt(np.linalg.det(rig_to_world[:3, :3]))
    assert np.linalg.norm(frame.centre - truth) < 0.05 * scale
    np.testing.assert_allclose(frame.matrix @ [*truth, 1.0], [0, 0, 0, 1], atol=0.05)


def test_quaternions_match_colmap_convention() -> None:
    rng = np.random.default_rng(9)
    rotation = random_rotation(rng)
    w = math.sqrt(1 + np.trace(rotation)) / 2
    q = [w, *(np.array([rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0],
                        rotation[1, 0] - rotation[0, 1]]) / (4 * w))]  # fmt: skip
    np.testing.assert_allclose(
        ori.rotations_from_quaternions(np.array([q]))[0], rotation, atol=1e-9
    )


def test_rejects_unusable_input() -> None:
    with pytest.raises(ValueError):
        ori.upright_frame(np.zeros((0, 3, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError):
        ori.upright_frame(np.eye(3)[None], np.zeros((2, 3)))
    with pytest.raises(ValueError):
        ori.upright_frame(np.full((1, 3, 3), np.nan), np.zeros((1, 3)))
    single = ori.upright_frame(look_at(np.array([0.0, -2, 0]), np.zeros(3))[None], np.zeros((1, 3)))
    assert angle_deg(single.up, UP) < 1e-6
