"""Benchmark of run_pipeline.py: time per stage and registration result over repeated runs.

    python bench/preprocess.py VIDEO [--repeat N] [pipeline options ...]
    python bench/preprocess.py --render orbit960 [--repeat N] [pipeline options ...]
    python bench/preprocess.py --render walk1080 --render-only

Runs the pipeline as the server does (a subprocess), reads its summary and prints the median
and the spread (min-max) of every stage over the repeats, the registration numbers, peak
memory and, for rendered synthetic videos, the camera-centre error against the ground truth.
Unknown options go to run_pipeline.py unchanged. Rendered videos are cached in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, SYNTHETIC, render_synthetic

import synthetic_video as sv

STAGES = ("decode", "select", "features", "matching", "mapping", "undistort")


def run_once(
    video: Path, out_dir: Path, extra: list[str], baseline: bool = False
) -> dict[str, Any]:
    """One pipeline run (or baseline run); returns its summary plus wall time, exit code and
    peak memory."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if baseline:
        frames = dict(zip(extra[::2], extra[1::2], strict=False))
        cmd = [
            sys.executable,
            __file__,
            "--baseline-child",
            str(video),
            str(out_dir),
            frames.get("--max_frames", "100"),
            frames.get("--min_frames", "20"),
        ]
    else:
        cmd = [
            sys.executable,
            str(REPO / "run_pipeline.py"),
            "--video_path",
            str(video),
            "--output_dir",
            str(out_dir),
            *extra,
        ]
    start = time.perf_counter()
    with (out_dir.parent / f"{out_dir.name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        error = None
        for line in proc.stdout:
            if line.startswith("@error "):
                error = json.loads(line[7:])
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    result: dict[str, Any] = {
        "wall_s": time.perf_counter() - start,
        "rc": proc.returncode,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "error": error,
    }
    summary_path = out_dir / "preprocess_summary.json"
    if summary_path.exists():
        result["summary"] = json.loads(summary_path.read_text())
    return result


def baseline_child(video: Path, out_dir: Path, max_frames: int, min_frames: int) -> int:
    """The "before": the same frames through pycolmap's defaults (8,192 SIFT features with an
    upsampled first octave, sequential matching with quadratic overlap 10, incremental
    mapping, undistortion); writes a summary like run_pipeline.py's."""

    import pycolmap

    from pipeline import frames as pf

    pycolmap.logging.logtostderr = True
    pycolmap.logging.minloglevel = 1
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    marks = [time.perf_counter(), time.process_time()]

    def lap(stage: str) -> None:
        seconds[stage] = time.perf_counter() - marks[0]
        cpu[stage] = time.process_time() - marks[1]
        marks[:] = [time.perf_counter(), time.process_time()]

    frames = out_dir / "frames"
    info, scan = pf.scan_video(video, frames, 3 * max_frames, lambda c, n: None)
    lap("decode")
    selection = pf.select_frames(scan, min_frames, max_frames)
    names = pf.keep_frames(frames, scan, selection, lambda c, n: None)
    lap("select")
    (out_dir / "colmap").mkdir()
    db, sparse = out_dir / "colmap" / "database.db", out_dir / "colmap" / "sparse"
    marks[:] = [time.perf_counter(), time.process_time()]
    pycolmap.extract_features(db, frames, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE)
    lap("features")
    pycolmap.match_sequential(db)
    lap("matching")
    sparse.mkdir()
    models = pycolmap.incremental_mapping(db, frames, sparse)
    lap("mapping")
    if not models:
        return 4
    best_key = max(models, key=lambda k: models[k].num_reg_images())
    best = models[best_key]
    marks[:] = [time.perf_counter(), time.process_time()]
    dataset = out_dir / "images_undistorted"
    pycolmap.undistort_images(dataset, sparse / str(best_key), frames)
    lap("undistort")
    summary = {
        "frames_decoded": info.frames_decoded,
        "frames_kept": len(names),
        "frames_registered": best.num_reg_images(),
        "points3D": best.num_points3D(),
        "mean_reprojection_error_px": best.compute_mean_reprojection_error(),
        "path_jump_ratio": 0.0,
        "image_pairs_matched": pycolmap.Database.open(db).num_matched_image_pairs(),
        "stage_seconds": seconds,
        "stage_cpu_seconds": cpu,
    }
    (dataset / "sparse" / "0").mkdir()
    for f in ("cameras.bin", "images.bin", "points3D.bin"):
        (dataset / "sparse" / f).replace(dataset / "sparse" / "0" / f)
    (out_dir / "preprocess_summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def truth_error(out_dir: Path, video: Path, truth: Path) -> tuple[float, float] | None:
    """Mean and max camera-centre error (% of the scene radius) of the dataset written."""
    import pycolmap  # only needed with a ground truth

    model_dir = out_dir / "images_undistorted" / "sparse" / "0"
    if not model_dir.exists():
        return None
    model = pycolmap.Reconstruction(model_dir)
    est = {
        int(re.search(r"(\d+)", im.name).group(1)): im.projection_center()  # type: ignore[union-attr]
        for im in model.images.values()
        if im.has_pose
    }
    err = sv.centre_errors(est, sv.load_truth(video, truth))
    return 100 * float(err.mean()), 100 * float(err.max())


def spread(values: list[float]) -> str:
    """Median and range of repeated measurements."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:8.1f}"
    return f"{med:8.1f}  ({min(values):.1f}-{max(values):.1f})"


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate run_pipeline.py's options (with their values) from the benchmark's own."""

    import run_pipeline  # light: its heavy imports happen when it runs

    takes_value = {}
    for action in run_pipeline.build_parser()._actions:
        for option in action.option_strings:
            takes_value[option] = action.nargs != 0
    ours: list[str] = []
    theirs: list[str] = []
    k = 0
    while k < len(argv):
        token = argv[k]
        name = token.split("=", 1)[0]
        if name in takes_value and name not in ("-h", "--help"):
            width = 2 if takes_value[name] and "=" not in token else 1
            theirs += argv[k : k + width]
            k += width
        else:
            ours.append(token)
            k += 1
    return ours, theirs


def main() -> int:
    """Parse options, run the pipeline `--repeat` times and print the table."""
    bench_argv, pipeline_argv = split_argv(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("video", nargs="?", type=Path, help="input video")
    parser.add_argument("--render", choices=sorted(SYNTHETIC), help="use a synthetic video")
    parser.add_argument("--render-only", action="store_true", help="render and stop")
    parser.add_argument("--repeat", type=int, default=1, help="number of runs")
    parser.add_argument("--truth", type=Path, help="ground truth .npz of a synthetic video")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "runs", help="run folders")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="run pycolmap's defaults on the same frames instead (the 'before')",
    )
    parser.add_argument("--baseline-child", nargs=4, help=argparse.SUPPRESS)
    args, extra = parser.parse_args(bench_argv), pipeline_argv
    if args.baseline_child:
        video, out, most, least = args.baseline_child
        return baseline_child(Path(video), Path(out), int(most), int(least))
    truth = args.truth
    if args.render:
        args.video, truth = render_synthetic(args.render)
        if args.render_only:
            return 0
    if args.video is None:
        parser.error("give a VIDEO or --render NAME")
    runs = []
    for k in range(args.repeat):
        out_dir = args.workdir / f"run{k}"
        result = run_once(args.video, out_dir, extra, args.baseline)
        if truth is not None and result["rc"] == 0:
            result["truth_error"] = truth_error(out_dir, args.video, truth)
        runs.append(result)
        s = result.get("summary", {})
        print(
            f"run {k + 1}/{args.repeat}: exit {result['rc']}, {result['wall_s']:.1f} s, "
            f"registered {s.get('frames_registered', '-')}/{s.get('frames_kept', '-')}, "
            f"error {result['error']}",
            file=sys.stderr,
            flush=True,
        )
    ok = [r for r in runs if "summary" in r]
    label = "pycolmap defaults (baseline)" if args.baseline else " ".join(extra) or "(defaults)"
    print(f"\nvideo: {args.video}  options: {label}  runs: {len(runs)}")
    print(f"{'stage':<28}{'wall s: median (min-max)':>28}{'CPU s: median (min-max)':>28}")
    for stage in (*STAGES, "retry"):
        walls = [r["summary"]["stage_seconds"].get(stage) for r in ok]
        cpus = [r["summary"].get("stage_cpu_seconds", {}).get(stage) for r in ok]
        walls, cpus = [v for v in walls if v is not None], [v for v in cpus if v is not None]
        if walls:
            print(f"{stage:<28}{spread(walls):>28}{spread(cpus):>28}")
    print(
        f"{'total (incl. start-up)':<28}{spread([r['wall_s'] for r in runs]):>28}"
        f"{spread([r['cpu_s'] for r in runs]):>28}"
    )
    print(f"{'peak memory MB':<28}{spread([r['peak_rss_mb'] for r in runs]):>28}")
    for key in (
        "frames_decoded",
        "frames_kept",
        "frames_registered",
        "points3D",
        "mean_reprojection_error_px",
        "path_jump_ratio",
        "image_pairs_matched",
    ):
        values = [float(r["summary"][key]) for r in ok]
        if values:
            shown = (
                spread(values)
                if key != "mean_reprojection_error_px"
                else (f"{statistics.median(values):.3f}  ({min(values):.3f}-{max(values):.3f})")
            )
            print(f"{key:<28}{shown:>28}")
    errors = [r["truth_error"] for r in ok if r.get("truth_error")]
    if errors:
        print(f"{'centre error mean % radius':<28}{statistics.median(e[0] for e in errors):>20.3f}")
        print(f"{'centre error max % radius':<28}{max(e[1] for e in errors):>20.3f}")
    failed = [r for r in runs if r["rc"] != 0]
    for r in failed:
        print(f"failed: exit {r['rc']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
