"""Tests of the quality gate of run_pipeline.py: the parallax pre-check (a verdict in seconds
for cameras that stand still or only turn) and the camera-path check (a fast move is not a
misplaced block), on rendered videos with known cameras and the sample videos."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
OFFICE = TESTS / "data" / "tum_office_orbit.mp4"
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from test_run_pipeline import Run, assert_user_error, run_pipeline  # noqa: E402

import synthetic_video as sv  # noqa: E402
from pipeline import frames as pipeline_frames  # noqa: E402
from pipeline import parallax  # noqa: E402


def kept_frames(video: Path, out_dir: Path) -> list[Path]:
    """The frames run_pipeline.py would keep (default selection), in video order."""
    _, scan = pipeline_frames.scan_video(video, out_dir, 300, lambda c, t: None)
    selection = pipeline_frames.select_frames(scan, 20, 100)
    names = pipeline_frames.keep_frames(out_dir, scan, selection, lambda c, t: None)
    return [out_dir / name for name in names]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gate_media")


@pytest.fixture(scope="module")
def pan_video(media: Path) -> sv.SyntheticVideo:
    """24 frames, 480×270: a camera standing still and turning through 70°."""
    return sv.render_video(media / "pan.mp4", sv.pan_poses(24, 70), width=480, height=270, fps=6)


# ---------------------------------------------------------------------------------------------
# The parallax pre-check


def test_gric_prefers_the_simpler_model_only_when_it_fits():
    rng = np.random.default_rng(0)
    small = rng.normal(0, 0.5, 300) ** 2  # residuals at the noise level
    # Both models fit: the homography (lower dimension) wins by about ln(4) per point.
    assert parallax.gric(small, 0.7, d=2, k=8) < parallax.gric(small, 0.7, d=3, k=7) - 300
    # The homography misses most points (parallax): the fundamental matrix wins.
    large = small.copy()
    large[:200] += 25.0
    assert parallax.gric(small, 0.7, d=3, k=7) < parallax.gric(large, 0.7, d=2, k=8)


def test_rotation_only_pan_is_judged_rotation(tmp_path, pan_video):
    check = parallax.check_parallax(kept_frames(pan_video.path, tmp_path))
    assert check.verdict == "rotation", check.describe()
    assert all(s.h_median_px < 1.0 for s in check.measured)


def test_orbit_and_office_show_parallax(tmp_path, media):
    orbit = sv.render_video(
        media / "orbit.mp4", sv.orbit_poses(36, turns=0.75), width=640, height=360, fps=6
    )
    for video in (orbit.path, OFFICE):
        check = parallax.check_parallax(kept_frames(video, tmp_path / video.stem))
        print(check.describe())
        assert check.verdict == "parallax", check.describe()
        assert all(s.verdict == "parallax" for s in check.measured)
        assert check.seconds < 5


@pytest.mark.slow
def test_rotation_only_pan_is_refused_in_seconds(tmp_path, pan_video):
    run = run_pipeline(pan_video.path, tmp_path / "out")
    error = assert_user_error(run, 4, "rotation_only")
    assert "only turns on the spot" in error["message"]
    # The message quotes what was measured.
    measured = re.search(r"in (\d+) of (\d+) stretches of the (\d+) frames", error["message"])
    assert measured and measured.group(3) == "24"
    assert int(measured.group(1)) * 2 >= int(measured.group(2))
    # Refused before any feature extraction.
    assert "features" not in {p["stage"] for p in run.progress}
    assert run.seconds < 15


# ---------------------------------------------------------------------------------------------
# The camera-path check: a fast move or dropped frames are not a misplaced block

PATH_FRAMES = 30


def fast_step_fractions(n: int, at: int, factor: float) -> np.ndarray:
    """Orbit fractions of n frames with even steps, except step `at`, `factor` times longer."""
    steps = np.ones(n - 1)
    steps[at] = factor
    cumulative = np.concatenate([[0.0], np.cumsum(steps)])
    return cumulative / cumulative[-1]


def dropped_fractions(n: int, at: int, dropped: int) -> np.ndarray:
    """Orbit fractions of n frames left from n + dropped even ones, `dropped` missing after
    frame `at` (a video that lost frames)."""
    kept = [*range(at + 1), *range(at + 1 + dropped, n + dropped)]
    return np.array(kept) / (n + dropped - 1)


@pytest.fixture(scope="module")
def path_videos(media: Path) -> dict[str, sv.SyntheticVideo]:
    """30 frames, 480×270, over 0.25 of an orbit: one whose camera moves 12 times faster for
    one step, one with 11 frames dropped in the middle."""
    paths = {
        "fast": fast_step_fractions(PATH_FRAMES, 14, 12.0),
        "dropped": dropped_fractions(PATH_FRAMES, 14, 11),
    }
    return {
        name: sv.render_video(
            media / f"{name}.mp4",
            sv.orbit_poses_at(fractions, turns=0.25),
            width=480,
            height=270,
            fps=6,
        )
        for name, fractions in paths.items()
    }


@pytest.fixture(scope="module")
def path_runs(path_videos, tmp_path_factory) -> dict[str, tuple[sv.SyntheticVideo, Run]]:
    out = tmp_path_factory.mktemp("path_runs")
    count = ("--min_frames", str(PATH_FRAMES), "--max_frames", str(PATH_FRAMES))
    return {
        name: (video, run_pipeline(video.path, out / name, *count))
        for name, video in path_videos.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fast", "dropped"])
def test_a_fast_step_or_dropped_frames_keep_every_frame(path_runs, name):
    video, run = path_runs[name]
    assert run.rc == 0, run.stderr
    s = run.summary
    print({k: s[k] for k in ("path_jump_ratio", "jump_link_points", "weakest_link_ratio")})
    # The step is as large as the old check refused (above 10 times the usual step) ...
    assert s["path_jump_ratio"] > 10
    # ... and is measured, not mistaken: every frame placed where it was, no retry needed.
    assert s["frames_kept"] == PATH_FRAMES and s["frames_registered"] == PATH_FRAMES
    assert not s["retried_with_exhaustive"]
    assert s["jump_link_points"] >= 50
    import pycolmap

    model = pycolmap.Reconstruction(run.out_dir / "images_undistorted" / "sparse" / "0")
    est = {
        int(re.search(r"(\d+)", im.name).group(1)): im.projection_center()
        for im in model.images.values()
    }
    err = sv.centre_errors(est, video)
    print(f"camera centre error: mean {100 * err.mean():.3f} %, max {100 * err.max():.3f} %")
    assert err.max() < 0.02


def displaced(model_dir: Path, block: range, shift: float):
    """The model in `model_dir` with the cameras of `block` (frame positions in name order)
    moved by `shift` times the extent of the camera path, their points left where they are:
    a block placed far from where it was, whose own numbers still look fine."""
    import pycolmap

    model = pycolmap.Reconstruction(model_dir)
    names = sorted(im.name for im in model.images.values())
    centres = np.array([im.projection_center() for im in model.images.values()])
    offset = np.array([0.0, 0.0, shift * np.ptp(centres, axis=0).max()])
    for image in model.images.values():
        if names.index(image.name) in block:
            frame = model.frames[image.frame_id]
            pose = frame.rig_from_world
            moved = pose.translation - pose.rotation.matrix() @ offset
            frame.rig_from_world = pycolmap.Rigid3d(pose.rotation, moved)
    return model, names


@pytest.mark.slow
def test_a_displaced_block_of_cameras_is_caught(path_runs):
    import run_pipeline as rp
    from pipeline import sfm

    _, run = path_runs["fast"]
    model_dir = run.out_dir / "colmap" / "sparse" / "best"
    model, names = displaced(model_dir, range(0), 0.0)
    healthy = sfm.check_path(model, names)
    assert healthy.jump_ratio > 10  # the fast step
    assert not healthy.misplaced(10.0) and not healthy.suspicious(10.0)
    model, names = displaced(model_dir, range(20, 26), 0.6)
    broken = sfm.check_path(model, names)
    print(broken, broken.weakest_jump(10.0))
    assert broken.misplaced(10.0) and broken.suspicious(10.0)
    # The refusal quotes what was measured at the broken step.
    ratio, link, share = broken.weakest_jump(10.0)
    message = rp.inconsistent_path_message(broken, 10.0)
    numbers = r"\((\d+) times the usual step\) and only (\d+) 3D points .*\((\d+) %"
    quoted = re.search(numbers, message)
    assert quoted, message
    assert int(quoted.group(1)) == round(ratio) and int(quoted.group(2)) == link
    assert int(quoted.group(3)) == round(100 * share) and share < 0.1
