#!/usr/bin/env python
"""Turn a video into a COLMAP dataset for Gaussian Splatting training.

Stages: decode the video, select sharp and well-spread frames, extract SIFT features, match
them, reconstruct the camera path with pycolmap, check the result, undistort to PINHOLE.
Writes {output_dir}/images_undistorted/{images,sparse/0} and
{output_dir}/preprocess_summary.json; intermediate data goes to {output_dir}/frames and
{output_dir}/colmap.

Talks to the server through stdout (docs/stage-protocol.md): `@progress {json}` lines while it
runs and one `@error {json}` line when it fails on purpose. Exit codes: 0 success, 1
unexpected error, 2 bad command line, 3 unusable video, 4 quality gate refused the result.
Everything else (our log, COLMAP's log) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pipeline.protocol import (  # the contract with the server
    DATASET_DIR,
    SUMMARY_NAME,
    error_line,
    progress_line,
    write_line,
)

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_QUALITY_GATE = 4  # a bad input exits with pipeline.frames.EXIT_BAD_INPUT (3)
WORK_DIRS = ("frames", "colmap", DATASET_DIR)
SUMMARY_VERSION = 1
# Decoding keeps the sharpest frame of each stretch of the video as a candidate, this many per
# frame wanted: selection then needs no second decoding pass.
CANDIDATES_PER_FRAME = 3


class Reporter:
    """Writes the machine-readable protocol lines and the human log."""

    def __init__(self, protocol: TextIO, log: TextIO, min_interval: float = 0.25) -> None:
        self.protocol = protocol
        self.log_stream = log
        self.min_interval = min_interval
        self._last: dict[str, tuple[float, int, int | None]] = {}

    def progress(self, stage: str, current: int, total: int | None) -> None:
        """Report `current` of `total` for a stage: at most a few times a second, but always
        the first report and the one that reaches the total."""
        now = time.monotonic()
        last = self._last.get(stage)
        if last is not None:
            if stage == "mapping":  # a new mapping attempt restarts its count; stay monotone
                current = max(current, last[1])
            final = total is not None and current >= total
            if (current, total) == last[1:] or (now - last[0] < self.min_interval and not final):
                return
        self._last[stage] = (now, current, total)
        write_line(self.protocol, progress_line(stage, current, total))

    def restart(self, *stages: str) -> None:
        """Forget what was reported for stages that run again (the safer retry)."""
        for stage in stages:
            self._last.pop(stage, None)

    def error(self, code: str, message: str) -> None:
        """The one message a user should read; printed just before exiting non-zero."""
        write_line(self.protocol, error_line(code, message))
        self.log(f"error: {message}")

    def log(self, message: str) -> None:
        """A line for the task log."""
        self.log_stream.write(f"[run_pipeline] {message}\n")
        self.log_stream.flush()


class GateError(Exception):
    """The reconstruction was refused by the quality gate."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line; the server passes the first four options."""
    p = argparse.ArgumentParser(
        description="Turn a video into a COLMAP dataset (undistorted PINHOLE images and a "
        "sparse model) for Gaussian Splatting training, using pip packages only.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--video_path",
        type=Path,
        action="append",
        required=True,
        help="the input video file; repeat it for several videos of one scene, or name a "
        "folder of sources (its videos, its subfolders of photos, the photos directly in it: "
        "each a source with its own camera), as the server lays out uploads of several files "
        "or a ZIP of photos",
    )
    p.add_argument(
        "--output_dir",
        type=Path,
        required=True,
        help=f"task folder; results go to {DATASET_DIR}/ and {SUMMARY_NAME}, "
        "intermediate data to frames/ and colmap/ (all overwritten)",
    )
    p.add_argument(
        "--max_frames", type=int, default=100, help="most frames to keep for reconstruction"
    )
    p.add_argument(
        "--min_frames",
        type=int,
        default=20,
        help="fewest frames to keep (a video with fewer usable frames keeps them all)",
    )
    p.add_argument(
        "--frame_spacing",
        type=float,
        default=None,
        help="keep one frame per this much camera motion, in image widths, within the frame "
        "limits (default: 0.04, pipeline.frames.FRAME_SPACING; smaller keeps more frames and "
        "takes longer; 0.02 was the default before 2026-12)",
    )
    p.add_argument(
        "--skip_undistortion",
        action="store_true",
        help="copy the frames and model as they are instead of undistorting them "
        "(the trainer reads only PINHOLE / SIMPLE_PINHOLE: use with --camera_model "
        "PINHOLE or SIMPLE_PINHOLE)",
    )
    g = p.add_argument_group("camera tracking")
    g.add_argument(
        "--matcher",
        choices=("sequential", "exhaustive"),
        default="sequential",
        help="sequential: each frame with its neighbours in time plus loop-closure "
        "candidates (fast, for video); exhaustive: every pair (slow, most robust)",
    )
    g.add_argument(
        "--mapper",
        choices=("incremental", "global"),
        default="incremental",
        help="incremental: COLMAP's classic mapper; global: GLOMAP-style global "
        "mapper (similar speed on video, less robust in our measurements)",
    )
    g.add_argument(
        "--max_image_size",
        type=int,
        default=1280,
        help="frames are scaled down to this longest side for feature extraction",
    )
    g.add_argument("--max_features", type=int, default=4096, help="SIFT features per frame")
    g.add_argument(
        "--first_octave",
        type=int,
        choices=(-1, 0),
        default=None,
        help="SIFT first octave: -1 upsamples frames (more features, 4x slower); "
        "default: -1 for frames up to 0.5 megapixels, else 0",
    )
    g.add_argument(
        "--camera_model",
        default="SIMPLE_RADIAL",
        choices=("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"),
        help="lens model estimated for the video's (single, shared) camera",
    )
    g.add_argument(
        "--overlap",
        type=int,
        default=5,
        help="sequential matching: each frame is matched with the next OVERLAP frames and "
        "with those 8, 16, 32, ... frames later",
    )
    g.add_argument(
        "--loop_closure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sequential matching: also match frames that look alike far apart in "
        "time (offline, no vocabulary tree)",
    )
    g.add_argument("--num_threads", type=int, default=-1, help="CPU threads (-1: all cores)")
    g.add_argument("--seed", type=int, default=0, help="random seed, for repeatable runs")
    q = p.add_argument_group("quality gate")
    q.add_argument(
        "--min_registered", type=int, default=10, help="fail when fewer frames get a camera pose"
    )
    q.add_argument(
        "--min_registered_fraction",
        type=float,
        default=0.5,
        help="fail when a smaller fraction of the kept frames gets a camera pose",
    )
    q.add_argument(
        "--min_points", type=int, default=500, help="fail when the model has fewer 3D points"
    )
    q.add_argument(
        "--early_verdict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reconstruct a skeleton of a video (a frame per quarter image width of motion) "
        "first and refuse it there when it places under a quarter of its frames",
    )
    q.add_argument(
        "--max_path_jump",
        type=float,
        default=10.0,
        help="a step of the camera path this many times longer than the steps around it, "
        "or a cut between neighbouring frames that fewer than 10%% of the usual 3D points "
        "cross, means a misplaced block of frames: retry with exhaustive matching, then fail "
        "if it still jumps (0 disables these checks)",
    )
    p.add_argument("--verbose", action="store_true", help="show COLMAP's detailed log")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject inconsistent options the way argparse does (exit code 2)."""
    if args.min_frames < 2:
        parser.error("--min_frames must be at least 2")
    if args.frame_spacing is not None and not 0.001 <= args.frame_spacing <= 1:
        parser.error("--frame_spacing must be between 0.001 and 1 (image widths)")
    if args.max_frames < args.min_frames:
        parser.error("--max_frames must be at least --min_frames")
    if not 0 <= args.min_registered_fraction <= 1:
        parser.error("--min_registered_fraction must be between 0 and 1")
    if args.min_registered < 2:
        parser.error("--min_registered must be at least 2")


def clean_outputs(output_dir: Path, video: Path | list[Path]) -> None:
    """Remove what an earlier attempt left (never the uploaded video(s) or anything else)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    inputs = [p.resolve() for p in ([video] if isinstance(video, Path) else video) if p.exists()]
    for name in (SUMMARY_NAME, *WORK_DIRS):
        path = output_dir / name
        if path.exists() and inputs:
            target = path.resolve()
            if any(target == upload or target in upload.parents for upload in inputs):
                continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def explain_failure(
    registered: int, kept: int, n_models: int, pairs: Any, *, skeleton: bool = False
) -> str:
    """A user-facing sentence on why few frames could be placed, from the matching evidence
    (of the whole capture, or of the early skeleton: frames a quarter image width apart)."""
    what = "frames spread over the video" if skeleton else "frames"
    head = f"Only {registered} of {kept} {what} could be placed in one 3D model"
    advice = "Walk slowly around a still, textured subject while filming, keeping it in view."
    if pairs.neighbours and pairs.neighbours_verified < 0.5 * pairs.neighbours:
        if skeleton:
            return (
                f"{head}: frames a quarter of the picture apart share too few recognisable "
                f"features ({pairs.neighbours_verified} of {pairs.neighbours} such pairs "
                "matched): the subject moves or changes shape, or the camera moves fast, or "
                f"the surfaces are plain, shiny or dark. {advice}"
            )
        return (
            f"{head}: neighbouring frames share too few recognisable features "
            f"({pairs.neighbours_verified} of {pairs.neighbours} neighbouring pairs matched; "
            f"fast motion, blur, or plain, shiny or dark surfaces). {advice}"
        )
    if pairs.rotation_only_fraction > 0.5:
        return (
            f"{head}: the camera hardly moves (it stays in place or only turns on the spot), "
            f"so depth cannot be measured. {advice}"
        )
    pieces = f" (they fall into {n_models} separate pieces)" if n_models > 1 else ""
    return (
        f"{head}: the camera hardly moves around the subject, or the subject itself moves, so "
        f"the frames do not show one still scene from different viewpoints{pieces}. {advice}"
    )


def quality_gate(
    args: argparse.Namespace, stats: dict[str, Any], kept: int, n_models: int, pairs: Any
) -> None:
    """Refuse reconstructions too poor to train on, with a message saying what to do."""
    registered = stats["frames_registered"]
    if registered < args.min_registered or registered < args.min_registered_fraction * kept:
        raise GateError("too_few_registered", explain_failure(registered, kept, n_models, pairs))
    if stats["points3D"] < args.min_points:
        raise GateError("too_few_points", explain_few_points(args, stats, kept, pairs))


# Fewer SIFT features per frame than this (median) is a frame with little texture: measured
# 1,500-2,100 on the rendered scenes and the office sample, several thousand on phone video.
LOW_TEXTURE_FEATURES = 300


def explain_few_points(
    args: argparse.Namespace, stats: dict[str, Any], kept: int, pairs: Any
) -> str:
    """Why a model with a camera path has too few points, from what was measured: the share
    of matched pairs a rotation alone explains, and the features found per frame."""
    head = (
        f"The camera path was found ({stats['frames_registered']} of {kept} frames) but only "
        f"{stats['points3D']} 3D points (at least {args.min_points} are needed)"
    )
    if pairs.median_features < LOW_TEXTURE_FEATURES:
        return (
            f"{head}: the frames show too little texture (a median of {pairs.median_features} "
            "features per frame). Film a textured subject in good light."
        )
    if pairs.rotation_only_fraction > 0.5:
        return (
            f"{head}: the camera hardly moves, it turns on the spot ("
            f"{100 * pairs.rotation_only_fraction:.0f} % of the {pairs.verified_pairs} matched "
            "frame pairs are explained by a rotation alone), so points cannot be placed in "
            "depth. Walk slowly around the subject while filming, keeping it in view."
        )
    return (
        f"{head}, although the frames are textured (a median of {pairs.median_features} "
        "features per frame): the views differ too little in angle to place points in depth. "
        "Walk slowly around the subject while filming, keeping it in view."
    )


def inconsistent_path_message(path: Any, max_jump: float) -> str:
    """Why a camera path with a weakly connected jump is refused, with the numbers measured."""
    jump = path.weakest_jump(max_jump)
    if jump is None:  # not measured step by step: the largest step
        jump = (path.jump_ratio, path.jump_link or 0, path.jump_link_ratio or 0.0)
    ratio, link, share = jump
    return (
        f"The camera path found is inconsistent: it jumps between neighbouring frames "
        f"({ratio:.0f} times the usual step) and only {link} 3D points join the two sides "
        f"({100 * share:.0f} % of the usual), so part of the scene would be misplaced. Film "
        "again more slowly and steadily, keeping the subject in view."
    )


def coverage_warning(names: list[str], placed: set[str], time_of: dict[str, float]) -> str:
    """A warning naming the stretches of the video whose frames are not in the model."""
    parts: list[list[int]] = []
    for k, name in enumerate(names):
        if name in placed:
            continue
        if parts and parts[-1][1] == k - 1:
            parts[-1][1] = k
        else:
            parts.append([k, k])
    spans = ", ".join(
        f"{time_of[names[a]]:.1f}-{time_of[names[b]]:.1f} s ({b - a + 1} frames)" for a, b in parts
    )
    return (
        f"only {len(placed)} of {len(names)} frames registered; the model leaves out {spans} "
        "of the video"
    )


def parallax_check(frames_dir: Path, names: list[str]) -> Any:
    """The parallax pre-check (pipeline.parallax) on the kept frames, in video order."""
    from pipeline import parallax

    return parallax.check_parallax([frames_dir / name for name in names])


def parallax_gate(check: Any, kept: int) -> None:
    """Refuse, before the reconstruction, a video whose camera stands still or only turns:
    every measured stretch of the video says so (the message quotes the measurements)."""
    measured = check.measured
    if check.verdict not in ("static", "rotation"):
        return
    stretches = f"{len(measured)} of {len(check.segments)} stretches of the {kept} frames"
    advice = "Walk slowly around a still, textured subject while filming, keeping it in view."
    if check.verdict == "static":
        moved = max(s.median_motion_px for s in measured)
        raise GateError(
            "static_camera",
            f"The camera hardly moves: it stays in place (in {stretches} the picture moved by "
            f"at most {moved:.1f} pixels), so depth cannot be measured. {advice}",
        )
    rotating = [s for s in measured if s.verdict == "rotation"]
    worst = max(s.h_median_px for s in rotating)
    raise GateError(
        "rotation_only",
        f"The camera hardly moves: it only turns on the spot (in {stretches} a single "
        f"homography explains the motion to within {worst:.2f} pixels, better than any view "
        f"with depth), so depth cannot be measured. {advice}",
    )


class StageClock:
    """Wall-clock and CPU seconds (all threads) spent in each stage."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - wall
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - cpu


def sfm_options(args: argparse.Namespace) -> Any:
    """The camera-tracking settings from the command line."""
    from pipeline import sfm  # heavy imports only once the command line is valid

    return sfm.SfmOptions(
        matcher=args.matcher,
        mapper=args.mapper,
        max_image_size=args.max_image_size,
        max_features=args.max_features,
        first_octave=args.first_octave,
        num_threads=args.num_threads,
        camera_model=args.camera_model,
        overlap=args.overlap,
        loop_closure=args.loop_closure,
        seed=args.seed,
    )


def gather_one_video(
    args: argparse.Namespace, rep: Reporter, clock: StageClock, frames_dir: Path
) -> Any:
    """Stage 1 for one video (the usual upload): decode, select; frames keep their names."""
    from pipeline import capture, frames

    video = args.video_path[0]

    def progress(stage: str) -> frames.ProgressFn:
        return lambda current, total: rep.progress(stage, current, total)

    with clock("decode"):
        info, scan = frames.scan_video(
            video, frames_dir, CANDIDATES_PER_FRAME * args.max_frames, progress("decode")
        )
    rep.log(
        f"decoded {info.frames_decoded} frames ({info.width}x{info.height}, {info.codec} "
        f"{info.pix_fmt}, rotation {info.rotation}, {info.duration_s:.1f} s) "
        f"in {clock.wall['decode']:.1f} s"
    )
    if info.frames_decoded < args.min_registered:
        raise frames.PipelineError(
            "too_few_frames",
            f"The video has only {info.frames_decoded} frames; at least {args.min_registered} "
            "are needed. Record a longer video (10 to 60 seconds) moving slowly around the "
            "subject.",
        )
    with clock("select"):
        selection = frames.select_frames(
            scan, args.min_frames, args.max_frames, motion_per_frame=args.frame_spacing
        )
        names = frames.keep_frames(frames_dir, scan, selection, progress("select"))
    frames.save_selection(frames_dir / "selection.json", scan, selection)
    rep.log(
        f"kept {len(names)} frames (target {selection.target}, dropped "
        f"{selection.dropped_blurred} blurred, {selection.dropped_duplicates} duplicates) "
        f"in {clock.wall['select']:.1f} s"
    )
    index_of = {frames.frame_name(i): i for i in selection.indices}
    group = capture.Group(
        label=video.name,
        kind="video",
        file=video.name,
        names=names,
        size=(info.width, info.height),
        images=info.frames_decoded,
        time_of={frames.frame_name(i): float(scan.times[i]) for i in selection.indices},
        motion_of={frames.frame_name(i): float(scan.motion[i]) for i in selection.indices},
        info=info,
        scan=scan,
        selection=selection,
        thumbs=scan.thumbs[[index_of[m] for m in names]] if names else None,
    )
    return capture.Capture([group])


def gather_sources(
    args: argparse.Namespace, rep: Reporter, clock: StageClock, frames_dir: Path
) -> Any:
    """Stage 1 for a capture with several sources (videos, photo sets): each video's frames
    selected inside it, each photo set written upright; the frame budget shared fairly."""
    from pipeline import capture, frames, sources

    found = sources.discover(args.video_path)
    if not found:
        raise frames.PipelineError(
            "video_not_found",
            "No video and no photos found in "
            + ", ".join(p.name for p in args.video_path)
            + ". Upload a video, several videos or photos of the scene.",
        )
    with clock("decode"):
        try:
            result = capture.gather(
                found,
                frames_dir,
                args.min_frames,
                args.max_frames,
                lambda stage: lambda current, total: rep.progress(stage, current, total),
                rep.log,
                args.frame_spacing,
            )
        except sources.SourceError as exc:
            raise frames.PipelineError("bad_photos", exc.message) from None
    (frames_dir / "selection.json").write_text(
        json.dumps(
            {
                "sources": [
                    {"label": g.label, "kind": g.kind}
                    | (
                        frames.selection_record(g.scan, g.selection, f"s{k:02d}_")
                        if g.scan is not None and g.selection is not None
                        else {"frames": [{"name": n, "photo": g.photo_names[n]} for n in g.names]}
                    )
                    for k, g in enumerate(result.groups, 1)
                ]
            },
            indent=1,
        )
    )
    rep.log(
        f"{len(result.groups)} sources, {len(result.names)} frames kept "
        f"in {clock.wall['decode']:.1f} s"
    )
    return result


def gate_parallax(args: argparse.Namespace, rep: Reporter, frames_dir: Path, cap: Any) -> Any:
    """Stage 2, per video source: refuse a capture whose every source is a video that stands
    still or only turns. Returns (combined verdict, seconds, per-group checks)."""
    checks: dict[int, Any] = {}
    for k, group in enumerate(cap.groups):
        if group.kind != "video":
            continue
        checks[k] = parallax_check(frames_dir, group.names)  # about a second each
        rep.log(("" if len(cap.groups) == 1 else f"{group.label}: ") + checks[k].describe())
    refused = [c for c in checks.values() if c.verdict in ("static", "rotation")]
    if checks and len(refused) == len(cap.groups):
        parallax_gate(refused[0], len(cap.groups[next(iter(checks))].names))
    verdicts = [c.verdict for c in checks.values()]
    if not verdicts:  # photos alone: no order to track corners along
        verdict = "not_measured"
    elif len(cap.groups) == 1:
        verdict = verdicts[0]
    elif "parallax" in verdicts:
        verdict = "parallax"
    else:
        verdict = "unknown"
    return verdict, sum(c.seconds for c in checks.values()), checks


def gate_skeleton(
    args: argparse.Namespace,
    rep: Reporter,
    clock: StageClock,
    cap: Any,
    db: Path,
    frames_dir: Path,
    colmap_dir: Path,
    opts: Any,
) -> Any:
    """Stage 3a, for one video: reconstruct its skeleton (pipeline.skeleton) and refuse the
    capture there when the skeleton places too few of its frames. Returns the check (its
    frames' features stay in `db`), or None where no skeleton runs (photos, several sources,
    short captures, --no-early_verdict)."""
    from pipeline import skeleton

    if not args.early_verdict or len(cap.groups) != 1 or cap.groups[0].kind != "video":
        return None
    group = cap.groups[0]
    if any(name not in group.motion_of for name in group.names):
        return None
    motion = [group.motion_of[name] for name in group.names]
    picks = skeleton.positions(motion)
    n = len(group.names)
    if not skeleton.applies(n, picks):
        return None
    with clock("skeleton"):
        check = skeleton.run_skeleton(
            db,
            frames_dir,
            colmap_dir,
            group.names,
            picks,
            group.size,
            opts,
            lambda current, total: rep.progress("features", current, n),
        )
    rep.log(check.describe())
    if check.hopeless and check.pair_stats.median_features < LOW_TEXTURE_FEATURES:
        # Frames with little texture may match only at the full density: the full
        # reconstruction decides (and says so, with the texture it measured).
        rep.log("the skeleton's frames have little texture: the full reconstruction decides")
    elif check.hopeless:
        raise GateError(
            "too_few_registered",
            explain_failure(
                check.registered, len(check.names), check.models, check.pair_stats, skeleton=True
            ),
        )
    return check


def worst_path(args: argparse.Namespace, model: Any, cap: Any) -> Any:
    """The camera-path check of the capture's videos, each on its own frames (photos have no
    order to check); the worst of them, or None for photos alone."""
    from pipeline import sfm

    if len(cap.groups) == 1 and cap.groups[0].kind == "video":
        return sfm.check_path(model, cap.names)
    checks = [sfm.check_path(model, g.names) for g in cap.groups if g.kind == "video"]
    if not checks:
        return None
    jump = args.max_path_jump
    return max(checks, key=lambda c: (c.misplaced(jump), c.suspicious(jump), c.jump_ratio))


def coverage_warnings(cap: Any, model: Any) -> list[str]:
    """A warning per source with under 90 % of its frames in the model, naming what is out."""
    placed = {im.name for im in model.images.values() if im.has_pose}
    found = []
    for group in cap.groups:
        if not group.names or sum(n in placed for n in group.names) >= 0.9 * len(group.names):
            continue
        if group.kind == "video":
            text = coverage_warning(group.names, placed, group.time_of)
        else:
            out = [group.photo_names.get(n, n) for n in group.names if n not in placed]
            more = f" and {len(out) - 5} more" if len(out) > 5 else ""
            text = (
                f"only {len(group.names) - len(out)} of {len(group.names)} photos registered; "
                f"the model leaves out {', '.join(out[:5])}{more}"
            )
        found.append(text if len(cap.groups) == 1 else f"{group.label}: {text}")
    return found


def run(args: argparse.Namespace, rep: Reporter) -> dict[str, Any]:
    """All stages; returns the summary. Raises PipelineError / GateError for user failures."""
    from pipeline import frames, sfm

    started = time.perf_counter()
    if args.frame_spacing is None:  # the default lives with the frame selection
        args.frame_spacing = frames.FRAME_SPACING
    out = args.output_dir
    clean_outputs(out, args.video_path)
    frames_dir, colmap_dir, dataset = out / "frames", out / "colmap", out / DATASET_DIR
    colmap_dir.mkdir(parents=True)
    sfm.configure_logging(args.verbose)
    opts = sfm_options(args)
    clock = StageClock()
    warnings: list[str] = []

    def progress(stage: str) -> frames.ProgressFn:
        return lambda current, total: rep.progress(stage, current, total)

    # 1. Frames: one video as always, or every source of a capture with several
    single = len(args.video_path) == 1 and not args.video_path[0].is_dir()
    cap = (gather_one_video if single else gather_sources)(args, rep, clock, frames_dir)
    for group in cap.groups:
        if group.info is not None and group.info.decode_warning:
            warnings.append(group.info.decode_warning)
            rep.log(f"warning: {group.info.decode_warning}")
    names = cap.names
    if len(names) < args.min_registered:
        raise frames.PipelineError(
            "too_few_frames",
            f"Only {len(names)} usable frames could be taken from the "
            f"{'video' if single else 'upload'}; at least {args.min_registered} are needed. "
            + (
                "Record a longer, steadier video."
                if single
                else "Send more photos, or longer videos, of the scene."
            ),
        )

    # 2. A verdict in seconds: does the camera move through the scene at all?
    parallax_verdict, parallax_seconds, parallax_checks = gate_parallax(args, rep, frames_dir, cap)

    # 3. Camera tracking
    n = len(names)
    required = max(args.min_registered, math.ceil(args.min_registered_fraction * n))
    db = colmap_dir / "database.db"
    skeleton = gate_skeleton(args, rep, clock, cap, db, frames_dir, colmap_dir, opts)
    done_names = set(skeleton.names) if skeleton is not None else set()
    with clock("features"):
        done = len(done_names)
        for k, group in enumerate(cap.groups):  # one camera per source
            base = done
            todo = [name for name in group.names if name not in done_names]
            if todo:
                sfm.extract_features(
                    db,
                    frames_dir,
                    todo,
                    group.size,
                    opts,
                    lambda current, total, base=base: rep.progress("features", base + current, n),
                    camera_id=skeleton.camera_id if skeleton is not None and k == 0 else None,
                )
            done += len(todo)
    rep.log(f"extracted features in {clock.wall['features']:.1f} s")
    if args.matcher == "exhaustive":
        pairs = sfm.all_pairs(n)
    else:
        pairs = sfm.capture_pairs(cap.spans(), args.overlap, args.loop_closure)
    already = skeleton.pairs if skeleton is not None else set()
    with clock("matching"):
        sfm.match_features(db, names, pairs - already, colmap_dir, opts, progress("matching"))
    pairs |= already
    pair_stats = sfm.pair_stats(db, names)
    rep.log(
        f"matched {len(pairs)} pairs ({pair_stats.verified_pairs} verified) "
        f"in {clock.wall['matching']:.1f} s"
    )
    with clock("mapping"):
        models = sfm.run_mapping(
            db, frames_dir, colmap_dir / "sparse", n, required, opts, progress("mapping")
        )
    rep.log(
        f"mapping ({opts.mapper}): {len(models)} model(s), "
        f"sizes {[m.num_reg_images() for m in models]}, "
        f"in {clock.wall['mapping']:.1f} s"
    )

    # 4. Quality gate, with one retry on safer settings when the camera path jumps
    def judge(models: list[Any]) -> tuple[dict[str, Any], Any]:
        stats = sfm.model_stats(models[0]) if models else {"frames_registered": 0, "points3D": 0}
        quality_gate(args, stats, n, len(models), pair_stats)
        return stats, worst_path(args, models[0], cap)

    stats, path = judge(models)
    retried = path is not None and path.suspicious(args.max_path_jump)
    if retried:
        rep.log(
            f"the camera path looks broken ({path}): retrying with exhaustive matching "
            "and the incremental mapper"
        )
        retry = sfm.SfmOptions(**{**vars(opts), "matcher": "exhaustive", "mapper": "incremental"})
        rep.restart("matching", "mapping")
        with clock("retry"):
            missing = sfm.all_pairs(n) - pairs
            sfm.match_features(db, names, missing, colmap_dir, retry, progress("matching"))
            models = sfm.run_mapping(
                db, frames_dir, colmap_dir / "sparse_retry", n, required, retry, progress("mapping")
            )
        stats, path = judge(models)
        if path is not None and path.misplaced(args.max_path_jump):
            raise GateError(
                "inconsistent_path", inconsistent_path_message(path, args.max_path_jump)
            )
        if path is not None and path.suspicious(args.max_path_jump):
            warnings.append(
                f"weakly connected camera path ({path.weakest_link} points join "
                "two parts of the video): check the result"
            )
    best_dir = colmap_dir / "sparse" / "best"
    best_dir.mkdir(parents=True)
    models[0].write(best_dir)
    fraction = stats["frames_registered"] / n
    warnings.extend(coverage_warnings(cap, models[0]))

    # 5. Undistortion
    with clock("undistort"):
        if args.skip_undistortion:
            camera = sfm.copy_distorted(best_dir, frames_dir, dataset, names, progress("undistort"))
        else:
            camera = sfm.undistort(
                best_dir,
                frames_dir,
                dataset,
                stats["frames_registered"],
                opts,
                progress("undistort"),
            )
    if args.skip_undistortion and args.camera_model not in ("PINHOLE", "SIMPLE_PINHOLE"):
        warnings.append(
            f"--skip_undistortion with {args.camera_model}: the trainer reads only "
            "PINHOLE / SIMPLE_PINHOLE cameras"
        )

    # 6. The upright frame, from the dataset's own model (what the trainer and viewer see)
    scene = sfm.scene_of(dataset / "sparse" / "0")
    rep.log(f"scene up {scene['up']} ({scene['method']}), scale {scene['scale']}")

    # 7. Summary
    placed = {im.name for im in models[0].images.values() if im.has_pose}
    sources_summary = []
    for k, group in enumerate(cap.groups):
        entry = group.record() | {"frames_registered": sum(n in placed for n in group.names)}
        if k in parallax_checks:
            entry["parallax_verdict"] = parallax_checks[k].verdict
        sources_summary.append(entry)
    first_video = next((g for g in cap.groups if g.info is not None), None)
    info = first_video.info if first_video is not None else None
    video = None
    if info is not None and first_video is not None:
        video = {
            "file": first_video.file,
            "codec": info.codec,
            "pix_fmt": info.pix_fmt,
            "width": info.width,
            "height": info.height,
            "rotation": info.rotation,
            "fps": round(info.fps, 3),
            "duration_s": round(info.duration_s, 3),
            "has_audio": info.has_audio,
        }
    selections = [g.selection for g in cap.groups if g.selection is not None]
    first_size = cap.groups[0].size
    summary: dict[str, Any] = {
        "summary_version": SUMMARY_VERSION,
        "video": video,
        "sources": sources_summary,
        "frames_decoded": sum(g.images for g in cap.groups),
        "frames_kept": n,
        "frames_dropped_blurred": sum(s.dropped_blurred for s in selections),
        "frames_dropped_duplicates": sum(s.dropped_duplicates for s in selections),
        "frames_registered": stats["frames_registered"],
        "registered_fraction": round(fraction, 4),
        "points3D": stats["points3D"],
        "mean_reprojection_error_px": stats["mean_reprojection_error_px"],
        "mean_track_length": stats["mean_track_length"],
        "models_found": len(models),
        "path_jump_ratio": round(path.jump_ratio, 2) if path is not None else None,
        "weakest_link_points": path.weakest_link if path is not None else None,
        "weakest_link_ratio": round(path.weakest_link_ratio, 3) if path is not None else None,
        "jump_link_points": path.jump_link if path is not None else None,
        "parallax_verdict": parallax_verdict,
        "parallax_seconds": round(parallax_seconds, 2),
        "skeleton": skeleton.record() if skeleton is not None else None,
        "retried_with_exhaustive": retried,
        "image_pairs_matched": len(pairs),
        "image_pairs_verified": pair_stats.verified_pairs,
        "camera": camera,
        "camera_distorted": stats["camera_distorted"],
        "scene": scene,
        "settings": vars(opts)
        | {
            "first_octave": sfm.first_octave_for(*first_size, opts),
            "skip_undistortion": args.skip_undistortion,
            "frame_spacing": args.frame_spacing,
        },
        "stage_seconds": {k: round(v, 2) for k, v in clock.wall.items()},
        "stage_cpu_seconds": {k: round(v, 2) for k, v in clock.cpu.items()},
        "total_seconds": round(time.perf_counter() - started, 2),
        "warnings": warnings,
    }
    if len(cap.groups) > 1:
        summary["cameras"] = sfm.dataset_cameras(dataset)
    return summary


def protocol_stream() -> TextIO:
    """The real stdout, for protocol lines only; from here on, anything else written to
    stdout (native libraries included) goes to stderr, so it cannot break a protocol line."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    return protocol


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the pipeline, report the outcome; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    rep = Reporter(protocol_stream(), sys.stderr)
    try:
        from pipeline.frames import PipelineError

        try:
            summary = run(args, rep)
        except PipelineError as exc:
            if exc.detail:
                rep.log(f"{exc.code}: {exc.detail}")
            rep.error(exc.code, exc.message)
            return exc.exit_code
        except GateError as exc:
            rep.error(exc.code, exc.message)
            return EXIT_QUALITY_GATE
        path = args.output_dir / SUMMARY_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(path)
        rep.log(
            f"done: {summary['frames_registered']} of {summary['frames_kept']} frames "
            f"registered, {summary['points3D']} points, reprojection error "
            f"{summary['mean_reprojection_error_px']} px, {summary['total_seconds']} s"
        )
        return EXIT_OK
    except Exception as exc:  # the contract: traceback on stderr, exit 1
        traceback.print_exc(file=sys.stderr)
        rep.error("internal", f"Unexpected error while preprocessing: {type(exc).__name__}: {exc}")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
