"""Preprocessing speed against an earlier version of run_pipeline.py, in the same run.

    python bench/preprocess_speed.py [--baseline REF] [--repeats 2] [--cases orbit960,...]
        [--original]

The baseline is `run_pipeline.py` as it was at git revision REF (default: the last commit
before the 2026-12 speed work), checked out with `git worktree` under bench/results/ and run
with the same Python; "new" is the working tree. Both run as subprocesses on the same inputs,
one after the other, alternating which goes first. Cases:

- `orbit960`: the synthetic 15 s 960×540 orbit (bench/common.py), each version's defaults;
- `orbit960x100`: the same video with 100 frames forced (`--min_frames 100 --max_frames 100`):
  the per-frame speed, without the change in how many frames are kept;
- `office`, `cockatoo`: the real samples in tests/data/ (the second must be refused).

With `--original`, bench/original_pipeline.py (Debian's ffmpeg and colmap) runs beside them
on each video at its defaults (once where it takes over two minutes): the early-verdict goal
(a refusal in at most 0.25× its time) and "never slower than the original".
Prints a Markdown table with the medians, the ratios and, for the synthetic video, the camera
centres' error against the ground truth (% of the scene radius).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import DATA, REPO, RESULTS, median, render_synthetic
from preprocess import truth_error

LONG_RUN_S = 120.0  # the original is not run again on a video where it took longer
BASELINE = "9d6452f"  # main before the frame-spacing and bundle-adjustment changes
CASES: dict[str, tuple[str, list[str]]] = {
    "orbit960": ("orbit960", []),
    "orbit960x100": ("orbit960", ["--min_frames", "100", "--max_frames", "100"]),
    "office": ("tum_office_orbit.mp4", []),
    "cockatoo": ("cockatoo_static.mp4", []),
}


def baseline_tree(ref: str) -> Path:
    """A checkout of `ref` beside the results (made once, reused)."""
    tree = RESULTS / f"baseline-{ref}"
    if not (tree / "run_pipeline.py").exists():
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=REPO, check=True)
    return tree


def run(
    script: Path, video: Path, out: Path, extra: list[str], truth: Path | None
) -> dict[str, Any]:
    """One pipeline run; wall time, outcome, frames and accuracy."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, str(script), "--video_path", str(video), "--output_dir", str(out)]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, cwd=script.parent)
    result: dict[str, Any] = {"wall_s": time.perf_counter() - start, "rc": proc.returncode}
    for line in proc.stdout.splitlines():
        if line.startswith("@error "):
            result["error"] = json.loads(line[7:])["code"]
    summary = out / "preprocess_summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        if "frames_kept" in s:
            result.update(
                kept=s["frames_kept"],
                registered=s["frames_registered"],
                px=s["mean_reprojection_error_px"],
            )
    if truth is not None and proc.returncode == 0:
        result["centres"] = truth_error(out, video, truth)
    return result


def original(video: Path, out: Path) -> dict[str, Any]:
    """The original ffmpeg + colmap pipeline (bench/original_pipeline.py)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    script = REPO / "bench" / "original_pipeline.py"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), "--video_path", str(video), "--output_dir", str(out)],
        capture_output=True,
        text=True,
    )
    return {"wall_s": time.perf_counter() - start, "rc": proc.returncode}


def describe(runs: list[dict[str, Any]]) -> str:
    r = runs[0]
    if r.get("error"):
        return f"refused `{r['error']}`"
    if r["rc"] != 0:
        return f"exit {r['rc']}"
    text = f"{r.get('registered')}/{r.get('kept')} frames, {r.get('px', 0):.3f} px"
    if r.get("centres"):
        text += f", centres {r['centres'][0]:.3f} / {r['centres'][1]:.3f} %"
    return text


def spread(runs: list[dict[str, Any]]) -> str:
    walls = [r["wall_s"] for r in runs]
    if len(walls) == 1:
        return f"{walls[0]:.1f}"
    return f"{median(walls):.1f} ({min(walls):.1f}–{max(walls):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--original", action="store_true", help="also the original pipeline")
    args = parser.parse_args()
    versions = {"before": baseline_tree(args.baseline) / "run_pipeline.py"}
    versions["new"] = REPO / "run_pipeline.py"
    work = RESULTS / "speed_runs"
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for case in args.cases.split(","):
        source, extra = CASES[case]
        if not source.endswith(".mp4"):  # a synthetic video, rendered once
            video, truth = render_synthetic(source)
        else:
            video, truth = DATA / source, None
        results[case] = {name: [] for name in [*versions, "original"]}
        for k in range(args.repeats):
            order = list(versions) if k % 2 == 0 else list(reversed(versions))
            for name in order:
                r = run(versions[name], video, work / f"{case}-{name}", extra, truth)
                results[case][name].append(r)
                print(f"{case} {name} run {k + 1}: {r}", flush=True)
            done = results[case]["original"]
            again = not done or done[0]["wall_s"] < LONG_RUN_S
            if args.original and not extra and again:
                r = original(video, work / f"{case}-original")
                results[case]["original"].append(r)
                print(f"{case} original run {k + 1}: {r}", flush=True)
    (RESULTS / "preprocess_speed.json").write_text(json.dumps(results, indent=1))
    print(f"\nbaseline: {args.baseline}; {args.repeats} runs each, median (min–max) wall s\n")
    print("| case | before s | new s | new ÷ before | before: outcome | new: outcome |", end="")
    print(" original s | new ÷ original |" if args.original else "")
    print("| --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if args.original else ""))
    for case, by in results.items():
        wall = {name: median([r["wall_s"] for r in runs]) for name, runs in by.items()}
        ratio = wall["new"] / wall["before"]
        row = (
            f"| {case} | {spread(by['before'])} | {spread(by['new'])} | {ratio:.2f} | "
            f"{describe(by['before'])} | {describe(by['new'])} |"
        )
        if args.original:
            if by["original"]:
                ours = wall["new"] / wall["original"]
                row += f" {spread(by['original'])} | {ours:.2f} |"
            else:
                row += " – | – |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
