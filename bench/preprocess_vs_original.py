"""Preprocessing benchmark: `run_pipeline.py` against the original pipeline (Debian's ffmpeg
and colmap, run as the original script did: bench/original_pipeline.py) on the same videos.

    python bench/preprocess_vs_original.py [--repeats 3] [--videos office,cockatoo,...]
        [--long-run 180] [--original-timeout 900] [--quick]

Videos: the real ones in tests/data/ (`office`, `cockatoo`), a synthetic 15 s 960×540
orbit (`orbit960`) and a synthetic 60 s 1920×1080 walk (`walk1080`), rendered with
tests/synthetic_video.py and cached in bench/results/. Both pipelines run as subprocesses with
their default frame limits (100 kept at most, 20 at least), one after the other, alternating
which goes first. Each gets wall time, outcome, frames kept, frames registered and mean
reprojection error; ours also its stage times, and the decode-only time of the video with
PyAV (the floor for frame extraction) is measured beside them.

Runs are repeated `--repeats` times, except that a pipeline whose run took longer than
`--long-run` seconds is not run again on that video (the table says how many runs each figure
has): the original's CPU-only exhaustive matching takes many minutes on long videos, and a
run that long averages the machine's noise over its own length. `--original-timeout` stops a
run of the original that takes too long; its time is then reported as a lower bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
from common import (
    BENCH,
    DATA,
    REPO,
    RESULTS,
    Section,
    Table,
    log,
    median,
    remove,
    render_synthetic,
    require_tools,
    stat,
    verdict,
)

GOAL_TIME_RATIO = 0.5
MAX_FRAMES, MIN_FRAMES = 100, 20
REAL = {"office": "tum_office_orbit.mp4", "cockatoo": "cockatoo_static.mp4"}
ALL_VIDEOS = ("office", "cockatoo", "orbit960", "walk1080")
DESCRIPTIONS = {
    "office": "real, TUM office, 640×480, 8.5 s",
    "cockatoo": "real, 1280×720, 14 s, static camera (must be refused)",
    "orbit960": "synthetic orbit, 960×540, 15 s",
    "walk1080": "synthetic walk, 1920×1080, 60 s",
}


def video_path(name: str) -> Path:
    """The video file for a benchmark name (rendered and cached for synthetic ones)."""
    if name in REAL:
        return DATA / REAL[name]
    return render_synthetic(name)[0]


def decode_floor(video: Path) -> tuple[float, int]:
    """Seconds to decode every frame with PyAV (threaded, no conversion), and the count."""
    start = time.perf_counter()
    count = 0
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in container.decode(stream):
            count += 1
    return time.perf_counter() - start, count


def _run(cmd: list[str], log_path: Path, timeout: float | None) -> tuple[float, int, bool, str]:
    """Run a pipeline; (wall seconds, exit code, stopped by the timeout, its @error line)."""
    start = time.perf_counter()
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        try:
            rc = proc.wait(timeout)
            stopped = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            stopped = True
    seconds = time.perf_counter() - start
    error = ""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("@error "):
            with contextlib.suppress(ValueError):
                error = json.loads(line[7:]).get("code", "")
    return seconds, rc, stopped, error


def run_ours(video: Path, out: Path) -> dict[str, Any]:
    """One run of run_pipeline.py as the server runs it (default frame limits)."""
    remove(out)
    out.mkdir(parents=True)
    cmd = [
        sys.executable,
        str(REPO / "run_pipeline.py"),
        "--video_path",
        str(video),
        "--output_dir",
        str(out),
        "--max_frames",
        str(MAX_FRAMES),
        "--min_frames",
        str(MIN_FRAMES),
    ]
    seconds, rc, _, error = _run(cmd, out.parent / "ours.log", None)
    result: dict[str, Any] = {"s": seconds, "rc": rc, "ok": rc == 0, "error": error}
    summary_path = out / "preprocess_summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        result.update(
            frames_kept=summary.get("frames_kept"),
            frames_registered=summary.get("frames_registered"),
            reprojection_px=summary.get("mean_reprojection_error_px"),
            stages=summary.get("stage_seconds", {}),
        )
    else:  # a refused run writes no summary: read what its log says
        result.update(_from_log((out.parent / "ours.log").read_text(errors="replace")))
    remove(out)
    return result


# run_pipeline.py's log lines for its stages ("[run_pipeline] kept 88 frames ... in 0.0 s").
_LOG_STAGES = {
    "decode": r"decoded .* in ([\d.]+) s",
    "select": r"kept \d+ frames .* in ([\d.]+) s",
    "features": r"extracted features in ([\d.]+) s",
    "matching": r"matched .* in ([\d.]+) s",
    "mapping": r"mapping \(\w+\): .* in ([\d.]+) s",
}


def _from_log(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {"stages": {}}
    for line in text.splitlines():
        if not line.startswith("[run_pipeline]"):
            continue
        kept = re.search(r"kept (\d+) frames", line)
        if kept:
            found["frames_kept"] = int(kept[1])
        for stage, pattern in _LOG_STAGES.items():
            match = re.search(pattern, line)
            if match:
                found["stages"][stage] = float(match[1])
    return found


def run_original(video: Path, out: Path, timeout: float) -> dict[str, Any]:
    """One run of the original pipeline (ffmpeg + colmap CLI)."""
    remove(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(BENCH / "original_pipeline.py"),
        "--video_path",
        str(video),
        "--output_dir",
        str(out),
        "--max_frames",
        str(MAX_FRAMES),
        "--min_frames",
        str(MIN_FRAMES),
    ]
    seconds, rc, stopped, _ = _run(cmd, out.parent / "original.log", timeout)
    result: dict[str, Any] = {"s": seconds, "rc": rc, "ok": rc == 0, "stopped": stopped}
    summary_path = out / "original_summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        result.update(
            frames_kept=summary.get("frames_kept"),
            frames_registered=summary.get("frames_registered"),
            reprojection_px=summary.get("mean_reprojection_error_px"),
            stages=summary.get("step_seconds", {}),
            failed_step=summary.get("failed_step"),
        )
    remove(out)
    return result


def measure_video(
    name: str, repeats: int, long_run: float, timeout: float, work: Path
) -> dict[str, Any]:
    """All runs for one video."""
    video = video_path(name)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "original": []}
    floors: list[float] = []
    frames = 0

    def wanted(which: str) -> bool:
        done = runs[which]
        return not done or (len(done) < repeats and done[0]["s"] <= long_run)

    for r in range(repeats):
        if not (wanted("ours") or wanted("original")):
            break
        seconds, frames = decode_floor(video)
        floors.append(seconds)
        order = ("ours", "original") if r % 2 == 0 else ("original", "ours")
        for which in order:
            if not wanted(which):
                continue
            done = runs[which]
            if which == "ours":
                result = run_ours(video, work / "ours")
            else:
                result = run_original(video, work / "original", timeout)
            done.append(result)
            log(
                f"preprocess {name} run {r + 1}/{repeats} {which}: {result['s']:.1f} s, "
                f"exit {result['rc']}, registered {result.get('frames_registered')}"
                f"/{result.get('frames_kept')}"
            )
    return {"video": str(video), "decoded_frames": frames, "decode_floor_s": floors, **runs}


def _outcome(runs: list[dict[str, Any]]) -> str:
    last = runs[-1]
    if last.get("stopped"):
        return "stopped (timeout)"
    if last["ok"]:
        return "ok"
    if last.get("error"):
        return f"refused: `{last['error']}`"
    if last.get("failed_step"):
        return f"failed at {last['failed_step']}"
    return f"exit {last['rc']}"


def _values(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in runs if r.get(key) is not None]


def _registered(runs: list[dict[str, Any]]) -> str:
    registered = _values(runs, "frames_registered")
    kept = _values(runs, "frames_kept")
    shown_kept = f"{median(kept):.0f}" if kept else "–"
    return f"{median(registered):.0f} / {shown_kept}" if registered else f"– / {shown_kept}"


def _seconds(runs: list[dict[str, Any]]) -> str:
    text = stat([r["s"] for r in runs], 1)
    if any(r.get("stopped") for r in runs):
        text = f"> {text}"
    return f"{text} (n={len(runs)})"


def report(results: dict[str, dict[str, Any]], repeats: int, long_run: float) -> Section:
    """The preprocessing tables."""
    section = Section(
        "preprocess",
        "4. Preprocessing: run_pipeline.py vs the original (ffmpeg + colmap)",
        intro=(
            "Ours: `run_pipeline.py` with its defaults (PyAV decode + frame selection, pycolmap "
            "SIFT, sequential matching with loop closure, incremental mapping, undistortion). "
            "Original: Debian ffmpeg + COLMAP 3.8 CLI as the original script ran them "
            "(`ffmpeg -vf fps=F -q:v 2`, `feature_extractor` with one OPENCV camera, "
            "`exhaustive_matcher`, `mapper`, `image_undistorter`), SIFT on the CPU (no CUDA "
            "here). Both keep at most 100 and at least 20 frames. Wall time of the whole "
            "subprocess. Median (min–max) over n runs (n=1: one run, no spread): "
            + (
                f"up to {repeats} runs, one when a run took over {long_run:g} s. "
                if repeats > 1
                else "one run each (a quick run). "
            )
            + "Registered frames and "
            "reprojection error are from the model each passes on (ours: the dataset it "
            "writes; original: `sparse/0`)."
        ),
    )
    main = Table(
        [
            "video",
            "pipeline",
            "outcome",
            "wall s",
            "ours ÷ original",
            "registered / kept",
            "reprojection px",
        ]
    )
    stages = Table(
        [
            "video",
            "decode floor (PyAV, all frames)",
            "ours: decode",
            "ours: select",
            "ours: features",
            "ours: matching",
            "ours: mapping",
            "original: ffmpeg extract",
            "original: features",
            "original: matching",
            "original: mapping",
        ],
        caption="Stage times, seconds (median of the runs above)",
    )
    goals = Table(["video", "goal", "measured", "verdict"], caption="Goals")
    for name, data in results.items():
        ours, original = data["ours"], data["original"]
        time_ratio = median([r["s"] for r in ours]) / median([r["s"] for r in original])
        stopped = any(r.get("stopped") for r in original)
        ratio_text = f"{'< ' if stopped else ''}{time_ratio:.2f}"
        label = f"{name} ({DESCRIPTIONS.get(name, '')}, {data['decoded_frames']} frames)"
        for which, runs in (("ours", ours), ("original", original)):
            main.add(
                label,
                which,
                _outcome(runs),
                _seconds(runs),
                ratio_text if which == "ours" else "1",
                _registered(runs),
                stat(_values(runs, "reprojection_px"), 3),
            )

        def stage(runs: list[dict[str, Any]], key: str) -> str:
            return stat([r["stages"][key] for r in runs if key in r.get("stages", {})], 1)

        stages.add(
            name,
            stat(data["decode_floor_s"], 2),
            stage(ours, "decode"),
            stage(ours, "select"),
            stage(ours, "features"),
            stage(ours, "matching"),
            stage(ours, "mapping"),
            stage(original, "extract"),
            stage(original, "features"),
            stage(original, "matching"),
            stage(original, "mapping"),
        )
        # A stopped original's time is a lower bound: only a ratio under the goal decides.
        time_met = time_ratio <= GOAL_TIME_RATIO or (None if stopped else False)
        goals.add(
            name,
            f"time ≤ {GOAL_TIME_RATIO} × original",
            ratio_text + (" (original stopped: undecided)" if time_met is None else ""),
            verdict(time_met),
        )
        ours_reg = _values(ours, "frames_registered")
        orig_reg = _values(original, "frames_registered")
        orig_kept = _values(original, "frames_kept")
        if ours_reg and orig_reg:
            met: bool | None = median(ours_reg) >= median(orig_reg)
            measured = f"{median(ours_reg):.0f} vs {median(orig_reg):.0f}"
        elif ours_reg and orig_kept:  # the original did not finish: it keeps at most this
            met = median(ours_reg) >= median(orig_kept)
            measured = f"{median(ours_reg):.0f} vs ≤ {median(orig_kept):.0f} (unfinished)"
        elif not ours_reg and not orig_reg:
            met, measured = None, "neither registered a model"
        else:
            met = not orig_reg
            measured = f"{median(ours_reg) if ours_reg else 0:.0f} vs {median(orig_reg):.0f}"
        goals.add(name, "registered frames ≥ original's", measured, verdict(met))
        if not ours[-1]["ok"] or not original[-1]["ok"]:
            section.notes.append(
                f"{name}: ours {_outcome(ours)} after {median([r['s'] for r in ours]):.0f} s, "
                f"the original {_outcome(original)} after "
                f"{median([r['s'] for r in original]):.0f} s"
                + (
                    " (as expected: the camera does not move, see tests/data/README.md)."
                    if name == "cockatoo"
                    else "."
                )
                + (_why_late(ours) if time_met is False and not ours[-1]["ok"] else "")
            )
        elif time_met is False:
            section.notes.append(_why_slow(name, data))
    section.tables = [main, stages, goals]
    section.raw = {"videos": results, "repeats": repeats, "long_run": long_run}
    return section


def render(raw: dict[str, Any]) -> Section:
    """The section again from its saved raw numbers."""
    return report(raw["videos"], raw["repeats"], raw["long_run"])


def _why_late(ours: list[dict[str, Any]]) -> str:
    """The note on a refusal that misses the time goal: what the verdict waited for."""
    keys = ("decode", "features", "matching", "mapping")
    spent = {k: median([r["stages"][k] for r in ours if k in r.get("stages", {})]) for k in keys}
    shown = ", ".join(f"{k} {v:.1f} s" for k, v in spent.items() if v == v)
    return (
        f" Time goal missed: ours gives its verdict only after the whole reconstruction "
        f"({shown}), because the quality gate judges the finished model. What would move it: "
        "an earlier verdict in run_pipeline.py, e.g. mapping a small spread-out subset of the "
        "frames first and refusing when even that does not form one model."
    )


def _why_slow(name: str, data: dict[str, Any]) -> str:
    """The note on a missed time goal: where our time goes, against the decode floor."""
    ours, original = data["ours"], data["original"]
    keys = sorted({k for r in ours for k in r.get("stages", {})})
    stage_s = {k: median([r["stages"][k] for r in ours if k in r.get("stages", {})]) for k in keys}
    top = sorted(stage_s.items(), key=lambda kv: -kv[1])[:3]
    kept = median(_values(ours, "frames_kept"))
    orig_kept = median(_values(original, "frames_kept"))
    return (
        f"{name}: time goal missed. Our run spends most in "
        + ", ".join(f"{k} ({v:.1f} s)" for k, v in top)
        + f"; decoding every frame takes only {median(data['decode_floor_s']):.1f} s, so frame "
        f"extraction is not the limit. Ours reconstructs from {kept:.0f} frames, the original "
        f"from {orig_kept:.0f}: the per-frame SIFT extraction and the matching scale with that. "
        "What would move it: fewer or smaller frames for feature extraction "
        "(`--max_frames`, `--max_image_size`, `--max_features`), or the GPU SIFT of a CUDA "
        "build of pycolmap."
    )


def run(
    repeats: int = 3,
    videos: tuple[str, ...] = ALL_VIDEOS,
    long_run: float = 180.0,
    timeout: float = 900.0,
) -> Section:
    """Run the preprocessing comparison; returns its section of BENCHMARKS.md."""
    require_tools("ffmpeg", "ffprobe", "colmap")
    start = time.perf_counter()
    work = RESULTS / "preprocess_work"
    remove(work)
    work.mkdir(parents=True)
    try:
        results = {
            name: measure_video(name, repeats, long_run, timeout, work / name) for name in videos
        }
    finally:
        remove(work)
    section = report(results, repeats, long_run)
    section.seconds = time.perf_counter() - start
    return section


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--videos", default=",".join(ALL_VIDEOS))
    parser.add_argument("--long-run", type=float, default=180.0)
    parser.add_argument("--original-timeout", type=float, default=900.0)
    parser.add_argument("--quick", action="store_true", help="the office video, one run")
    args = parser.parse_args()
    videos = ("office",) if args.quick else tuple(args.videos.split(","))
    unknown = set(videos) - set(ALL_VIDEOS)
    if unknown:
        parser.error(f"unknown videos: {', '.join(sorted(unknown))}")
    section = run(1 if args.quick else args.repeats, videos, args.long_run, args.original_timeout)
    section.save()
    print(section.text())


if __name__ == "__main__":
    main()
