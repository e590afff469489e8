"""Stand-in for run_pipeline.py, used ONLY by the server's tests.

It accepts run_pipeline.py's command line (`--video_path` a video, repeated, or a folder of
sources as the server lays out uploads of several files), prints `@progress` lines in the
stage protocol (docs/stage-protocol.md) over FAKE_PIPELINE_SECONDS, and writes the real output
layout: a small COLMAP dataset (`images_undistorted/images/*.jpg`,
`images_undistorted/sparse/0/*.bin`, PINHOLE) and `preprocess_summary.json`. Its behaviour is
chosen by environment variables:

    FAKE_PIPELINE_MODE     ok | fail | crash | hang | spawn | flood | silent | close_stdout | fill
    FAKE_PIPELINE_SECONDS  how long an `ok` run takes (default 1.0)
    FAKE_PIPELINE_FLOOD_MB how much output `flood` writes (default 200)

`hang` and `spawn` start a child that ignores SIGTERM; every pid started is appended to
`{output_dir}/fake_pids.txt` so tests can check that none survive.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

FRAMES = 12
WIDTH, HEIGHT = 160, 120


def emit(tag: str, **data: object) -> None:
    print(f"@{tag} {json.dumps(data)}", flush=True)


def record_pid(output_dir: Path, pid: int) -> None:
    with (output_dir / "fake_pids.txt").open("a") as f:
        f.write(f"{pid}\n")


def spawn_stubborn_child(output_dir: Path) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "while True: time.sleep(1)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    record_pid(output_dir, child.pid)


def write_colmap(sparse: Path, names: list[str]) -> int:
    """A tiny valid COLMAP binary model: PINHOLE camera, cameras on a circle, a point grid."""
    sparse.mkdir(parents=True, exist_ok=True)
    focal = 0.9 * WIDTH
    with (sparse / "cameras.bin").open("wb") as f:
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<iiQQ", 1, 1, WIDTH, HEIGHT))
        f.write(struct.pack("<4d", focal, focal, WIDTH / 2, HEIGHT / 2))
    points = [
        (x * 0.2, y * 0.2, z * 0.2)
        for x in range(-3, 4)
        for y in range(-3, 4)
        for z in range(-1, 2)
    ]
    with (sparse / "images.bin").open("wb") as f:
        f.write(struct.pack("<Q", len(names)))
        for index, name in enumerate(names):
            angle = 2 * math.pi * index / len(names)
            # World-to-camera rotation about the y axis, camera 4 units from the origin.
            qw, qy = math.cos(-angle / 2), math.sin(-angle / 2)
            f.write(struct.pack("<i4d3di", index + 1, qw, 0.0, qy, 0.0, 0.0, 0.0, 4.0, 1))
            f.write(name.encode() + b"\0")
            f.write(struct.pack("<Q", 0))
    with (sparse / "points3D.bin").open("wb") as f:
        f.write(struct.pack("<Q", len(points)))
        for index, (x, y, z) in enumerate(points):
            f.write(struct.pack("<Q3d3Bd", index + 1, x, y, z, 200, 120, 40, 0.5))
            f.write(struct.pack("<Q", 2))
            f.write(struct.pack("<iiii", 1, 0, 2, 0))
    return len(points)


def describe_sources(paths: list[Path]) -> list[dict[str, object]]:
    """What run_pipeline.py's summary says of its sources (`sources`): one per video file,
    one per folder of photos inside a folder of inputs, and the photos directly in it."""
    found: list[dict[str, object]] = []
    for path in paths:
        if not path.is_dir():
            found.append({"label": path.name, "kind": "video", "file": path.name, "images": 120})
            continue
        photos = [p for p in sorted(path.iterdir()) if p.is_file() and is_photo(p)]
        for entry in sorted(path.iterdir()):
            if entry.is_dir():
                count = sum(1 for p in entry.iterdir() if is_photo(p))
                label = entry.name.split("_", 1)[-1]
                entry_info = {"label": label, "kind": "photos", "file": entry.name}
                found.append(entry_info | {"images": count})
            elif entry not in photos:
                label = entry.name.split("_", 1)[-1]
                found.append({"label": label, "kind": "video", "file": entry.name, "images": 120})
        if photos:
            found.append(
                {"label": path.name, "kind": "photos", "file": path.name, "images": len(photos)}
            )
    for entry in found:
        entry |= {"frames_kept": FRAMES, "frames_registered": FRAMES}
    return found


def is_photo(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(16)
    heif = head[4:8] == b"ftyp" and head[8:12] in {b"heic", b"heix", b"heim", b"heis", b"mif1"}
    return head.startswith((b"\xff\xd8\xff", b"\x89PNG")) or heif


def write_dataset(output_dir: Path, inputs: list[Path]) -> None:
    images = output_dir / "images_undistorted" / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(FRAMES):
        frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        frame[:] = (40 + 15 * index, 90, 160)
        cv2.putText(frame, str(index), (50, 80), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255,) * 3, 3)
        name = f"frame_{index:05d}.jpg"
        cv2.imwrite(str(images / name), frame)
        names.append(name)
    points = write_colmap(output_dir / "images_undistorted" / "sparse" / "0", names)
    summary = {  # a subset of run_pipeline.py's summary (docs/stage-protocol.md)
        "summary_version": 1,
        "frames_decoded": FRAMES * 10,
        "frames_kept": FRAMES,
        "frames_registered": FRAMES,
        "registered_fraction": 1.0,
        "points3D": points,
        "mean_reprojection_error_px": 0.42,
        "sources": describe_sources(inputs),
    }
    (output_dir / "preprocess_summary.json").write_text(json.dumps(summary))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--video_path", required=True, type=Path, action="append")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_frames", type=int, default=100)
    parser.add_argument("--min_frames", type=int, default=20)
    parser.add_argument("--skip_undistortion", action="store_true")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    if not all(p.is_file() or p.is_dir() for p in args.video_path):
        emit("error", code="video_not_found", message="The video file does not exist.")
        return 3
    record_pid(output_dir, os.getpid())
    mode = os.environ.get("FAKE_PIPELINE_MODE", "ok")
    seconds = float(os.environ.get("FAKE_PIPELINE_SECONDS", "1.0"))
    print(f"fake pipeline: mode {mode}, {args.max_frames} frames at most", flush=True)

    if mode in {"hang", "spawn"}:
        spawn_stubborn_child(output_dir)
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    if mode == "silent":
        time.sleep(3600)
    if mode == "close_stdout":
        os.close(1)
        os.close(2)
        time.sleep(3600)
    if mode == "fill":  # write frames until the disk is full, as a real run would
        block = os.urandom(1024 * 1024)
        try:
            with (output_dir / "frames.bin").open("wb") as f:
                while True:
                    f.write(block)
                    f.flush()
        except OSError as exc:
            print(
                f"Traceback (most recent call last):\nOSError: {exc}", file=sys.stderr, flush=True
            )
            return 1
    if mode == "flood":
        line = ("x" * 199 + "\n").encode()
        block = line * 5000
        total = int(float(os.environ.get("FAKE_PIPELINE_FLOOD_MB", "200")) * 1024 * 1024)
        written = 0
        while written < total:
            sys.stdout.buffer.write(block)
            written += len(block)
        sys.stdout.flush()

    steps = ["decode", "features", "matching", "mapping", "undistort"]
    for step in steps:
        for done in range(0, FRAMES + 1, 3):
            emit("progress", stage=step, current=done, total=FRAMES)
            time.sleep(seconds / (len(steps) * 5))
        if mode == "spawn" and step == "features":
            while True:
                time.sleep(1)
    if mode == "fail":
        emit(
            "error",
            code="too_few_registered",
            message="Only 2 of 40 frames could be placed: the camera hardly moves. "
            "Walk around the subject while filming.",
        )
        print("quality gate: 2/40 registered", file=sys.stderr, flush=True)
        return 4
    if mode == "crash":
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "fake_pipeline.py", line 1, in <module>', file=sys.stderr)
        print("RuntimeError: simulated crash in mapping", file=sys.stderr, flush=True)
        return 1
    write_dataset(output_dir, args.video_path)
    print("fake pipeline: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
