"""An early verdict from a skeleton of the video: a few of the kept frames, spread over its
motion, reconstructed before the rest.

The parallax pre-check (pipeline.parallax) refuses a camera that stands still or only turns in
about a second, but it judges two views at a time, and two views of a moving, deforming
subject (a bird walking up to the lens) look like parallax. Only a reconstruction shows that
the views do not form one still scene. This stage reconstructs a skeleton first: at most one
frame per SKELETON_STEP image widths of motion (at least MIN_FRAMES), their features at full
resolution (the rest of the run reuses them), matched with their skeleton neighbours and
mapped. A capture whose skeleton cannot place even a quarter of its frames in one model is
refused there, in a few seconds; any other goes on to the full reconstruction, which alone
decides whether it passes.

Skeleton neighbours are at most SKELETON_STEP widths apart (three quarters of the picture in
common), and each is matched with the next three: a still, textured scene filmed by a moving
camera places them (the synthetic orbit: 13 of 13 neighbour pairs verified, and all 14 frames
placed when the mapping was let run to the end; it now stops at a quarter, all the verdict
needs). The cockatoo sample: 1 of 16 verified, nothing placed. Frames with little texture
are never refused here (run_pipeline.gate_skeleton): they may match only at full density.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import sfm

# Image motion (in image widths, as frame selection measures it) between skeleton neighbours.
SKELETON_STEP = 0.25
MIN_FRAMES = 12
# The skeleton runs only when it is at most this share of the kept frames: on a short capture
# the full reconstruction is the verdict, nearly as soon.
MAX_SHARE = 1 / 3
OVERLAP = 3  # each skeleton frame is matched with this many next ones (and those 2^k apart)
# Refused when the skeleton's largest model places fewer than this share of its frames.
REFUSE_BELOW = 0.25


def positions(
    motion: Sequence[float], step: float = SKELETON_STEP, minimum: int = MIN_FRAMES
) -> list[int]:
    """Positions in the kept frames (their cumulative motion, ascending) of the skeleton: the
    first and the last frame, and between them the farthest frame at most `step` from the
    previous pick (both frames beside a larger single step); a shorter step where that gives
    fewer than `minimum`."""
    n = len(motion)
    if n == 0:
        return []
    picks = _greedy(motion, step)
    total = float(motion[-1] - motion[0])
    if len(picks) < minimum and n > len(picks) and total > 0:
        picks = _greedy(motion, total / (minimum - 1))
    return picks


def _greedy(motion: Sequence[float], step: float) -> list[int]:
    picks = [0]
    for k in range(1, len(motion)):
        if motion[k] - motion[picks[-1]] > step and k - 1 > picks[-1]:
            picks.append(k - 1)
    if picks[-1] != len(motion) - 1:
        picks.append(len(motion) - 1)
    return picks


def applies(n_kept: int, picks: Sequence[int]) -> bool:
    """Whether a skeleton of `picks` is worth running on `n_kept` frames."""
    return len(picks) >= MIN_FRAMES and len(picks) <= MAX_SHARE * n_kept


@dataclass
class SkeletonCheck:
    """What the skeleton's reconstruction found."""

    names: list[str]
    pairs: set[tuple[int, int]]  # matched pairs, as positions in the kept frames
    registered: int
    models: int
    points3D: int
    pair_stats: sfm.PairStats
    camera_id: int
    stage_seconds: dict[str, float]  # features, matching, mapping

    @property
    def seconds(self) -> float:
        """Its whole wall time."""
        return sum(self.stage_seconds.values())

    @property
    def hopeless(self) -> bool:
        """Too few of its frames in one model for the full reconstruction to pass."""
        return self.registered < REFUSE_BELOW * len(self.names)

    def record(self) -> dict[str, Any]:
        """What the summary's `skeleton` says."""
        return {
            "frames": len(self.names),
            "registered": self.registered,
            "models": self.models,
            "points3D": self.points3D,
            "neighbours": self.pair_stats.neighbours,
            "neighbours_verified": self.pair_stats.neighbours_verified,
            "seconds": round(self.seconds, 2),
        }

    def describe(self) -> str:
        """One line for the log with the numbers behind the verdict."""
        p = self.pair_stats
        return (
            f"skeleton of {len(self.names)} frames: {self.registered} placed in its largest of "
            f"{self.models} model(s), {self.points3D} points; {p.neighbours_verified} of "
            f"{p.neighbours} neighbouring pairs verified, {p.verified_pairs} pairs in all, "
            f"median {p.median_features} features; {self.seconds:.1f} s ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
            + ")"
        )


def run_skeleton(
    db: Path,
    frames_dir: Path,
    work_dir: Path,
    names: list[str],
    picks: list[int],
    size: tuple[int, int],
    opts: sfm.SfmOptions,
    progress: sfm.ProgressFn,
) -> SkeletonCheck:
    """Features of the skeleton's frames (into `db`, with the camera the rest will share),
    matching between skeleton neighbours, and mapping into work_dir/skeleton."""
    clock = time.perf_counter
    times = {"started": clock()}
    chosen = [names[k] for k in picks]
    camera_id = sfm.extract_features(db, frames_dir, chosen, size, opts, progress)
    times["features"] = clock()
    local = sfm.sequential_pairs(len(picks), OVERLAP)
    pairs = {(picks[i], picks[j]) for i, j in local}
    sfm.match_features(db, names, pairs, work_dir, opts, lambda current, total: None)
    times["matching"] = clock()
    needed = math.ceil(REFUSE_BELOW * len(chosen))
    models: list[Any] = sfm.run_mapping(
        db,
        frames_dir,
        work_dir / "skeleton",
        len(chosen),
        needed,
        opts,
        lambda current, total: None,
        enough=needed,  # the verdict needs no more: a good capture stops there
    )
    times["mapping"] = clock()
    best = models[0] if models else None
    return SkeletonCheck(
        names=chosen,
        pairs=pairs,
        registered=best.num_reg_images() if best is not None else 0,
        models=len(models),
        points3D=best.num_points3D() if best is not None else 0,
        pair_stats=sfm.pair_stats(db, chosen),
        camera_id=camera_id,
        stage_seconds={
            "features": times["features"] - times["started"],
            "matching": times["matching"] - times["features"],
            "mapping": times["mapping"] - times["matching"],
        },
    )
