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

from test_run_pipeline import assert_user_error, run_pipeline  # noqa: E402

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
