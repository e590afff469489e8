"""Video decoding and frame selection for run_pipeline.py.

Decodes a video with PyAV (no ffmpeg binary), scores every frame for sharpness and camera
motion, chooses which frames to keep and writes them upright as JPEG files.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from pipeline.probe import HEAD_BYTES, sniff_container

EXIT_BAD_INPUT = 3

ProgressFn = Callable[[int, int | None], None]

THUMB_WIDTH = 160
# Kept frames are spread one per this much image motion (in image widths), within the frame
# limits. 0.04 since 2026-12 (was 0.02): on the synthetic 15 s 960x540 orbit, 58 frames
# instead of 100 register every frame in 0.47x the time, camera centres 0.032-0.034 against
# 0.033 % of the scene radius from the truth (mean; 0.049 before the skeleton's wider pairs,
# pipeline/skeleton.py); the office sample steps 6 % of the width per
# frame and registers every frame, every second frame (12 %) loses 2 of 9. Training on fewer
# views is not measured here (no GPU): --frame_spacing 0.02 keeps the old density. See
# README, "How many frames", and BENCHMARKS.md.
FRAME_SPACING = 0.04
MOTION_RATE_HZ = 10.0
JPEG_QUALITY = 95


class PipelineError(Exception):
    """A failure the user can act on: a stable code, a message for the user, the exit code,
    and technical detail for the log."""

    def __init__(
        self, code: str, message: str, exit_code: int = EXIT_BAD_INPUT, detail: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code
        self.detail = detail


@dataclass
class VideoInfo:
    """What the decoder found out about the video stream."""

    codec: str
    pix_fmt: str
    width: int
    height: int
    rotation: int
    fps: float
    duration_s: float
    has_audio: bool
    frames_decoded: int = 0
    decode_warning: str | None = None


@dataclass
class FrameScan:
    """Per-frame measurements of a whole video, in decode order."""

    times: np.ndarray
    sharpness: np.ndarray
    motion: np.ndarray  # cumulative image motion in image widths
    thumbs: np.ndarray  # tiny grey thumbnails for loop-closure retrieval
    candidates: np.ndarray | None = None  # frames written as JPEG files; None: every frame


@dataclass
class Selection:
    """The frames chosen to reconstruct from, and why others were left out."""

    indices: list[int]
    target: int = 0
    dropped_blurred: int = 0
    dropped_duplicates: int = 0
    motion_widths: float = 0.0


def frame_name(index: int, prefix: str = "") -> str:
    """File name of the kept frame with decode index `index` (`prefix` names the source of a
    capture with several, e.g. `s02_`)."""
    return f"{prefix}frame_{index:06d}.jpg"


def open_video(path: Path) -> av.container.InputContainer:
    """Open `path` for decoding, raising PipelineError with a user-facing reason if impossible."""
    if not path.is_file():
        raise PipelineError("video_not_found", f"The video file {path.name} does not exist.")
    if path.stat().st_size == 0:
        raise PipelineError("not_a_video", f"The file {path.name} is empty.")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        with path.open("rb") as f:
            known_container = sniff_container(f.read(HEAD_BYTES)) is not None
        if known_container:
            raise PipelineError(
                "corrupt_video",
                f"The video {path.name} is damaged or incomplete (the upload may have been cut "
                "off) and cannot be read. Upload the complete file again.",
                detail=str(exc),
            ) from exc
        raise PipelineError(
            "not_a_video",
            f"The file {path.name} is not a video that can be read. Upload a video file "
            "such as MP4 (H.264/H.265) or MOV.",
            detail=str(exc),
        ) from exc
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        what = f"only {' and '.join(kinds)}" if kinds else "no streams"
        raise PipelineError(
            "no_video_stream",
            f"The file {path.name} has no video track ({what}). Upload a video recording.",
        )
    return container


def _rotate(image: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a decoded image upright; `rotation` is counter-clockwise degrees as PyAV reports."""
    k = (round(rotation / 90) % 4) if rotation else 0
    return np.ascontiguousarray(np.rot90(image, k=k)) if k else image


# 8-bit formats whose first plane is the luma (grey) image, read without conversion.
LUMA_FORMATS = frozenset(
    ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "nv21", "gray")
)
# Frames wider than this are scored at half size (a quarter of the work, same ranking).
SCORE_MAX_WIDTH = 1280


def _luma(frame: av.VideoFrame) -> np.ndarray:
    """The frame's grey image, a view of the decoder's buffer where the format allows."""
    if frame.format.name in LUMA_FORMATS:
        plane = frame.planes[0]
        rows = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
        return rows[:, : frame.width]
    return frame.to_ndarray(format="gray")


def sharpness_of(gray: np.ndarray) -> float:
    """Focus measure of a grey image: variance of its Laplacian."""
    _, std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_16S))
    return float(std[0, 0] ** 2)


def _flow_magnitude(prev: np.ndarray, cur: np.ndarray) -> float:
    """Median feature displacement between two thumbnails, in thumbnail widths (NaN if lost)."""
    pts = cv2.goodFeaturesToTrack(prev, maxCorners=120, qualityLevel=0.01, minDistance=4)
    if pts is None or len(pts) < 8:
        return math.nan
    moved, status, _ = cv2.calcOpticalFlowPyrLK(prev, cur, pts, None, winSize=(15, 15), maxLevel=3)
    ok = status.ravel() == 1
    if ok.sum() < 8:
        return math.nan
    return (
        float(np.median(np.linalg.norm((moved - pts).reshape(-1, 2)[ok], axis=1))) / prev.shape[1]
    )


def _write_jpeg(path: Path, frame: av.VideoFrame, rotation: int) -> None:
    image = _rotate(frame.to_ndarray(format="bgr24"), rotation)
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")


class _JpegWriter:
    """Writes candidate frames on two worker threads while decoding goes on: the conversion
    to BGR and the JPEG encoding release the GIL, and they cost more than the decoding.
    Measured on 2 cores, old (written in the decoding loop) against new, median of 3
    alternating runs: the 1280x720 cockatoo sample (280 frames written) 4.19 -> 2.88 s, the
    960x540 synthetic orbit (225 of 450 written) 3.21 -> 2.76 s. At most QUEUE frames wait
    (decoded frames are large); a failed write raises on a later write or on close()."""

    QUEUE = 4

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="jpeg")
        self._pending: deque[Future[None]] = deque()

    def write(self, path: Path, frame: av.VideoFrame, rotation: int) -> None:
        while len(self._pending) >= self.QUEUE:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(_write_jpeg, path, frame, rotation))

    def close(self) -> None:
        """Wait for every write; raises the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def scan_video(
    path: Path, out_dir: Path, max_candidates: int, progress: ProgressFn, *, prefix: str = ""
) -> tuple[VideoInfo, FrameScan]:
    """Decode the video once: sharpness, motion and a thumbnail for every frame, stream facts,
    and the sharpest frame of every slot of consecutive frames (about `max_candidates` in all)
    written upright to `out_dir` as a candidate for selection (named with `prefix`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        ctx = stream.codec_context
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
        duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
        if not duration and container.duration:
            duration = container.duration / 1e6
        expected = stream.frames or (round(duration * fps) if duration else None)
        slot = math.ceil(expected / max_candidates) if expected else round(fps / 4)
        slot = max(1, slot)
        info = VideoInfo(
            ctx.name,
            ctx.pix_fmt or "?",
            ctx.width,
            ctx.height,
            0,
            fps,
            duration,
            bool(container.streams.audio),
        )
        times: list[float] = []
        sharp: list[float] = []
        thumbs: list[np.ndarray] = []
        candidates: list[int] = []
        best: tuple[int, float, av.VideoFrame] | None = None  # sharpest of the current slot
        steps: list[tuple[int, float]] = []  # (frame index, motion since previous anchor)
        anchor: np.ndarray | None = None
        next_anchor_time = -math.inf
        thumb_size = (THUMB_WIDTH, max(8, round(THUMB_WIDTH * ctx.height / max(ctx.width, 1))))
        progress(0, expected)
        writer = _JpegWriter()
        try:
            try:
                for index, frame in enumerate(container.decode(stream)):
                    if index == 0:
                        info.rotation = int(frame.rotation or 0)
                    gray = _luma(frame)
                    if gray.shape[1] > SCORE_MAX_WIDTH:
                        gray = cv2.pyrDown(gray)
                    t = float(frame.time) if frame.time is not None else index / fps
                    times.append(t)
                    sharp.append(sharpness_of(gray))
                    thumb = cv2.resize(gray, thumb_size, interpolation=cv2.INTER_AREA)
                    small = (32, max(4, thumb_size[1] // 5))
                    thumbs.append(cv2.resize(thumb, small, interpolation=cv2.INTER_AREA))
                    if t >= next_anchor_time:
                        if anchor is not None:
                            steps.append((index, _flow_magnitude(anchor, thumb)))
                        anchor, next_anchor_time = thumb, t + 1.0 / MOTION_RATE_HZ
                    if best is not None and best[0] // slot != index // slot:
                        writer.write(out_dir / frame_name(best[0], prefix), best[2], info.rotation)
                        candidates.append(best[0])
                        best = None
                    if best is None or sharp[-1] > best[1]:
                        best = (index, sharp[-1], frame)
                    if index % 10 == 9:
                        progress(index + 1, expected)
            except (av.error.FFmpegError, ValueError) as exc:
                info.decode_warning = f"decoding stopped after {len(times)} frames: {exc}"
            if best is not None:
                writer.write(out_dir / frame_name(best[0], prefix), best[2], info.rotation)
                candidates.append(best[0])
        finally:
            writer.close()
    finally:
        container.close()
    if not times:
        raise PipelineError(
            "corrupt_video",
            f"No picture could be decoded from {path.name}: the file is damaged or incomplete. "
            "Upload the complete file again.",
        )
    info.frames_decoded = len(times)
    if info.rotation % 180:
        info.width, info.height = info.height, info.width
    if len(times) > 1 and times[-1] > times[0]:
        info.duration_s = max(info.duration_s, times[-1] - times[0])
    progress(len(times), len(times))
    motion = _cumulative_motion(len(times), steps)
    scan = FrameScan(
        np.array(times), np.array(sharp), motion, np.array(thumbs), np.array(candidates)
    )
    return info, scan


def _cumulative_motion(n: int, steps: list[tuple[int, float]]) -> np.ndarray:
    """Cumulative motion per frame, linear between anchor frames; lost tracks count as typical."""
    if not steps:
        return np.zeros(n)
    idx = np.array([i for i, _ in steps])
    val = np.array([v for _, v in steps])
    good = np.isfinite(val)
    fill = float(np.median(val[good])) if good.any() else 0.0
    val = np.where(good, val, fill)
    anchors = np.concatenate([[0], idx])
    cum = np.concatenate([[0.0], np.cumsum(val)])
    return np.interp(np.arange(n), anchors, cum)


def select_frames(
    scan: FrameScan,
    min_frames: int,
    max_frames: int,
    *,
    motion_per_frame: float = FRAME_SPACING,
    time_weight: float = 0.2,
    blur_ratio: float = 0.4,
    duplicate_motion: float = 0.004,
) -> Selection:
    """Choose frames spread over the video's motion (and a little over time), keeping the
    sharpest frame of each window, skipping windows that are blurred relative to their
    neighbourhood and near-duplicates where the camera stands still.

    The count is `total motion / motion_per_frame` (motion in image widths) clamped to
    `[min_frames, max_frames]` and to the number of frames; videos shorter than that keep all.
    """
    n = len(scan.times)
    cand = np.arange(n) if scan.candidates is None else np.asarray(scan.candidates, dtype=int)
    total_motion = float(scan.motion[-1]) if n else 0.0
    wanted = round(total_motion / motion_per_frame)
    target = min(len(cand), max(min_frames, min(max_frames, wanted)))
    sel = Selection([], target=target, motion_widths=total_motion)
    if n == 0 or len(cand) == 0:
        return sel
    span = scan.times[-1] - scan.times[0]
    time_u = (scan.times - scan.times[0]) / span if span > 0 else np.linspace(0, 1, n)
    if total_motion > 1e-6:
        u = time_weight * time_u + (1 - time_weight) * scan.motion / total_motion
    else:
        u = time_u
    # Local sharpness reference: median over 2.5 windows or one second either side, whichever
    # is longer, so that a blur burst filling a whole window stands out.
    rate = (n - 1) / span if span > 0 else 1.0
    half = max(2, round(2.5 * n / max(target, 1)), round(rate))
    if target >= len(cand):
        windows = [np.array([i]) for i in cand]
    else:
        bins = np.minimum((u[cand] * target).astype(int), target - 1)
        windows = [cand[bins == k] for k in range(target)]
    chosen: list[int] = []
    for members in windows:
        if len(members) == 0:
            continue
        best = int(members[np.argmax(scan.sharpness[members])])
        lo, hi = max(0, best - half), min(n, best + half + 1)
        local = float(np.median(scan.sharpness[lo:hi]))
        if scan.sharpness[best] < blur_ratio * local:
            sel.dropped_blurred += 1
            continue
        chosen.append(best)
    # Near-duplicates: too little motion since the previous kept frame (never below min_frames).
    kept: list[int] = []
    removable = len(chosen) - min_frames
    for i in chosen:
        if kept and removable > 0 and scan.motion[i] - scan.motion[kept[-1]] < duplicate_motion:
            sel.dropped_duplicates += 1
            removable -= 1
            continue
        kept.append(i)
    sel.indices = kept
    return sel


def keep_frames(
    out_dir: Path, scan: FrameScan, selection: Selection, progress: ProgressFn, prefix: str = ""
) -> list[str]:
    """Delete the candidate frames that were not selected; returns the kept file names."""
    kept = set(selection.indices)
    cand = range(len(scan.times)) if scan.candidates is None else scan.candidates
    for index in cand:
        if int(index) not in kept:
            (out_dir / frame_name(int(index), prefix)).unlink(missing_ok=True)
    names = [
        frame_name(i, prefix) for i in sorted(kept) if (out_dir / frame_name(i, prefix)).is_file()
    ]
    progress(len(names), len(names))
    return names


def save_selection(path: Path, scan: FrameScan, selection: Selection) -> None:
    """Record which frames were kept, with their time and sharpness, for later inspection."""
    path.write_text(json.dumps(selection_record(scan, selection), indent=1))


def selection_record(scan: FrameScan, selection: Selection, prefix: str = "") -> dict[str, Any]:
    """The kept frames of one video with their time and sharpness, and the selection's
    numbers (what selection.json holds, per video source for a capture with several)."""
    frames = [
        {
            "name": frame_name(i, prefix),
            "index": i,
            "time_s": round(float(scan.times[i]), 4),
            "sharpness": round(float(scan.sharpness[i]), 2),
            "motion_widths": round(float(scan.motion[i]), 4),
        }
        for i in selection.indices
    ]
    summary = {k: v for k, v in asdict(selection).items() if k != "indices"}
    return {**summary, "frames": frames}
