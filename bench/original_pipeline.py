"""The original project's preprocessing, reproduced for comparison: Debian's `ffmpeg` and
`colmap` (3.8) command-line programs, run the way the original script ran them.

    python bench/original_pipeline.py --video_path V --output_dir D [--max_frames 100]
                                      [--min_frames 20]

1. frames: `ffmpeg -i V -vf fps=F -q:v 2 D/input/%06d.jpg`, F = 2 for videos up to 30 s,
   1 up to 120 s, else 0.5, clamped so that the frame count stays within the frame limits
   (and F never above the video's own frame rate: ffmpeg would duplicate frames);
2. `colmap feature_extractor --ImageReader.single_camera 1 --ImageReader.camera_model OPENCV`;
3. `colmap exhaustive_matcher`;
4. `colmap mapper`;
5. `colmap image_undistorter` of `sparse/0` into `D/undistorted` (COLMAP layout).

Debian's COLMAP is built without CUDA, so SIFT extraction and matching run on the CPU
(`--SiftExtraction.use_gpu 0 --SiftMatching.use_gpu 0`); everything else is COLMAP's
defaults, as in the original. Writes `D/original_summary.json` (again after every step, so a
run stopped midway leaves what it did): the seconds of every step, the frames extracted, and
(read with pycolmap) the registered frames, 3D points and mean reprojection error of
`sparse/0`, the model the original passed on to training. Exits 0 when a model was written,
1 otherwise (the summary says which step failed).
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

STEPS = ("extract", "features", "matching", "mapping", "undistort")


def probe(video: Path) -> tuple[float, float]:
    """(duration in seconds, frame rate) of the first video stream, from ffprobe."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=avg_frame_rate,duration:format=duration",
            "-of",
            "json",
            str(video),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info = json.loads(out)
    stream = info["streams"][0]
    num, _, den = stream.get("avg_frame_rate", "0/1").partition("/")
    rate = float(num) / float(den or 1) if float(den or 1) else 0.0
    duration = float(stream.get("duration") or info["format"]["duration"])
    return duration, rate


def sample_rate(duration: float, video_fps: float, max_frames: int, min_frames: int) -> float:
    """The original's frame rate for `ffmpeg -vf fps=F`, clamped to the frame limits."""
    fps = 2.0 if duration <= 30 else 1.0 if duration <= 120 else 0.5
    if duration * fps > max_frames:
        fps = max_frames / duration
    if duration * fps < min_frames:
        fps = min_frames / duration
    if video_fps > 0:
        fps = min(fps, video_fps)
    return fps


def run_step(cmd: list[str], log: Path) -> None:
    """Run one program with its output appended to `log`; raise on a non-zero exit."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)


def model_stats(model_dir: Path) -> dict[str, Any]:
    """Registered frames, 3D points and mean reprojection error of a COLMAP model."""
    import pycolmap

    model = pycolmap.Reconstruction(str(model_dir))
    return {
        "frames_registered": model.num_reg_images(),
        "points3D": model.num_points3D(),
        "mean_reprojection_error_px": round(model.compute_mean_reprojection_error(), 4),
    }


def run(video: Path, out: Path, max_frames: int, min_frames: int) -> dict[str, Any]:
    """Run the original pipeline on `video` into `out`; returns the summary."""
    if out.exists():
        shutil.rmtree(out)
    images, sparse, dense = out / "input", out / "sparse", out / "undistorted"
    images.mkdir(parents=True)
    sparse.mkdir()
    database = out / "database.db"
    log = out / "original.log"
    summary: dict[str, Any] = {"video": str(video), "step_seconds": {}, "ok": False}
    seconds = summary["step_seconds"]

    start = time.perf_counter()
    duration, rate = probe(video)
    fps = sample_rate(duration, rate, max_frames, min_frames)
    summary.update(duration_s=round(duration, 3), video_fps=rate, sample_fps=round(fps, 4))
    colmap_steps: list[tuple[str, list[str]]] = [
        (
            "features",
            [
                "colmap",
                "feature_extractor",
                "--database_path",
                str(database),
                "--image_path",
                str(images),
                "--ImageReader.single_camera",
                "1",
                "--ImageReader.camera_model",
                "OPENCV",
                "--SiftExtraction.use_gpu",
                "0",
            ],
        ),
        (
            "matching",
            [
                "colmap",
                "exhaustive_matcher",
                "--database_path",
                str(database),
                "--SiftMatching.use_gpu",
                "0",
            ],
        ),
        (
            "mapping",
            [
                "colmap",
                "mapper",
                "--database_path",
                str(database),
                "--image_path",
                str(images),
                "--output_path",
                str(sparse),
            ],
        ),
        (
            "undistort",
            [
                "colmap",
                "image_undistorter",
                "--image_path",
                str(images),
                "--input_path",
                str(sparse / "0"),
                "--output_path",
                str(dense),
                "--output_type",
                "COLMAP",
            ],
        ),
    ]
    extract = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-i",
        str(video),
        "-vf",
        f"fps={fps:.6f}",
        "-q:v",
        "2",
        str(images / "%06d.jpg"),
    ]
    summary_path = out / "original_summary.json"
    step = "extract"
    try:
        run_step(extract, log)
        seconds["extract"] = round(time.perf_counter() - start, 3)
        summary["frames_kept"] = len(list(images.glob("*.jpg")))
        summary_path.write_text(json.dumps(summary, indent=2))  # what a stopped run leaves
        for step, cmd in colmap_steps:
            if step == "undistort" and not (sparse / "0").is_dir():
                raise RuntimeError("the mapper wrote no model")
            t = time.perf_counter()
            run_step(cmd, log)
            seconds[step] = round(time.perf_counter() - t, 3)
            summary_path.write_text(json.dumps(summary, indent=2))
        summary["models"] = len([p for p in sparse.iterdir() if p.is_dir()])
        summary.update(model_stats(sparse / "0"))
        summary["ok"] = True
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        summary["failed_step"] = step
        summary["error"] = str(exc)
    summary["total_seconds"] = round(time.perf_counter() - start, 3)
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def main() -> int:
    """Command line: run once and print the summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video_path", type=Path, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--max_frames", type=int, default=100)
    parser.add_argument("--min_frames", type=int, default=20)
    args = parser.parse_args()
    for tool in ("ffmpeg", "ffprobe", "colmap"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install ffmpeg colmap)", file=sys.stderr)
            return 2
    summary = run(args.video_path, args.output_dir, args.max_frames, args.min_frames)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
