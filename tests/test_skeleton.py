"""The early skeleton verdict (pipeline/skeleton.py): which frames form the skeleton, when it
runs, and that its refusal quotes what it measured. The runs on real videos are in
tests/test_run_pipeline.py (the cockatoo sample refused from its skeleton) and
tests/test_gate.py (rendered orbits with a fast step or dropped frames pass with it)."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run_pipeline as rp
from pipeline import skeleton
from pipeline.sfm import PairStats


def steps_of(motion: np.ndarray, picks: list[int]) -> np.ndarray:
    return np.diff(motion[picks])


def stats_of(neighbours: int, verified: int, pairs: int, features: int) -> PairStats:
    """Matching numbers of a skeleton: its neighbour pairs, how many verified, all verified
    pairs, median features per frame."""
    return PairStats(
        neighbours=neighbours,
        neighbours_verified=verified,
        verified_pairs=pairs,
        rotation_only_fraction=0.0,
        median_features=features,
    )


def check_of(names: list[str], registered: int, stats: PairStats) -> skeleton.SkeletonCheck:
    """A skeleton's outcome: `registered` of `names` placed in one model."""
    return skeleton.SkeletonCheck(
        names=names,
        pairs=set(),
        registered=registered,
        models=1 if registered else 0,
        points3D=0,
        pair_stats=stats,
        camera_id=1,
        stage_seconds={},
    )


def test_skeleton_frames_are_at_most_a_step_apart_where_the_motion_allows():
    motion = np.linspace(0, 4.0, 90)  # 4 image widths over 90 kept frames
    picks = skeleton.positions(motion)
    assert picks[0] == 0 and picks[-1] == 89
    assert picks == sorted(set(picks))
    assert steps_of(motion, picks).max() <= skeleton.SKELETON_STEP + 1e-9
    # The farthest frame within the step each time: not more frames than needed.
    for a, b in itertools.pairwise(picks[:-1]):
        assert motion[b + 1] - motion[a] > skeleton.SKELETON_STEP
    assert skeleton.applies(90, picks)


def test_both_frames_beside_a_large_single_step_are_in_the_skeleton():
    steps = np.full(59, 0.04)
    steps[30] = 0.6  # the camera moved 15 times the usual step between frames 30 and 31
    motion = np.concatenate([[0.0], np.cumsum(steps)])
    picks = skeleton.positions(motion)
    assert 30 in picks and 31 in picks
    big = steps_of(motion, picks) > skeleton.SKELETON_STEP
    assert big.sum() == 1  # only the step that no frame divides


def test_little_motion_still_gives_the_minimum_spread_evenly():
    motion = np.linspace(0, 0.5, 60)
    picks = skeleton.positions(motion)
    assert len(picks) >= skeleton.MIN_FRAMES
    gaps = np.diff(picks)
    assert gaps.max() - gaps.min() <= 1


def test_no_skeleton_where_it_would_not_be_much_smaller_than_the_capture():
    # The office sample's 17 frames: the full reconstruction is the verdict.
    assert not skeleton.applies(17, skeleton.positions(np.linspace(0, 1.0, 17)))
    assert not skeleton.applies(30, list(range(12)))
    assert skeleton.applies(36, list(range(12)))
    assert not skeleton.applies(100, list(range(11)))


@pytest.mark.parametrize(
    ("registered", "frames", "hopeless"), [(0, 17, True), (4, 17, True), (5, 17, False)]
)
def test_hopeless_below_a_quarter_of_the_skeleton(registered, frames, hopeless):
    stats = stats_of(frames - 1, 1, 1, 400)
    check = check_of([f"f{k}" for k in range(frames)], registered, stats)
    assert check.hopeless is hopeless


def test_the_skeleton_refusal_quotes_what_it_measured():
    few_pairs = stats_of(16, 1, 1, 357)
    message = rp.explain_failure(0, 17, 0, few_pairs, skeleton=True)
    found = re.search(r"Only (\d+) of (\d+) frames spread over the video", message)
    assert found and found.groups() == ("0", "17")
    assert "(1 of 16 such pairs matched)" in message
    assert "the subject moves" in message and "Walk slowly" in message
    # Skeleton pairs that match but place no model: the other reason, with its numbers.
    matched = stats_of(16, 14, 30, 900)
    message = rp.explain_failure(3, 17, 2, matched, skeleton=True)
    assert message.startswith("Only 3 of 17 frames spread over the video")
    assert "they fall into 2 separate pieces" in message
    assert "such pairs matched" not in message


def _gate_with(monkeypatch, tmp_path, median_features: int) -> str:
    """gate_skeleton on a 60-frame video whose skeleton places nothing, its frames showing
    `median_features` features; returns the log."""
    import io

    from pipeline import capture

    names = [f"frame_{k:06d}.jpg" for k in range(60)]
    group = capture.Group(
        label="v.mp4",
        kind="video",
        file="v.mp4",
        names=names,
        size=(640, 360),
        images=60,
        motion_of={name: 0.05 * k for k, name in enumerate(names)},
    )
    stats = stats_of(11, 1, 1, median_features)

    def fake_run(db, frames_dir, work_dir, names_, picks, size, opts, progress):
        return check_of([names_[k] for k in picks], 0, stats)

    monkeypatch.setattr(skeleton, "run_skeleton", fake_run)
    args = rp.build_parser().parse_args(["--video_path", "v.mp4", "--output_dir", str(tmp_path)])
    log = io.StringIO()
    rep = rp.Reporter(io.StringIO(), log)
    check = rp.gate_skeleton(
        args,
        rep,
        rp.StageClock(),
        capture.Capture([group]),
        tmp_path / "db",
        tmp_path,
        tmp_path,
        None,
    )
    assert check is not None and check.hopeless
    return log.getvalue()


def test_a_hopeless_skeleton_of_textured_frames_refuses(monkeypatch, tmp_path):
    with pytest.raises(rp.GateError) as refused:
        _gate_with(monkeypatch, tmp_path, median_features=900)
    assert refused.value.code == "too_few_registered"
    assert "frames spread over the video" in refused.value.message


def test_a_hopeless_skeleton_of_plain_frames_leaves_the_verdict_to_the_full_run(
    monkeypatch, tmp_path
):
    # Little texture may match only at the full density: no early refusal.
    log = _gate_with(monkeypatch, tmp_path, median_features=rp.LOW_TEXTURE_FEATURES - 1)
    assert "the full reconstruction decides" in log
