"""The frames of a capture: from each source (pipeline.sources) the frames the reconstruction
reads, in one folder, with where each source's frames sit in the capture.

A video's frames are selected as always (pipeline.frames: sharp, spread over its motion);
a photo set's photos are all written upright (EXIF orientation applied), evenly thinned only
when the capture holds more than `max_frames`. One video alone keeps its frames' names
(`frame_NNNNNN.jpg`); with several sources each name starts with its source (`s01_`, `s02_`,
...), so that the frames sort by source, then by time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline import frames
from pipeline.sfm import SourceSpan
from pipeline.sources import Source, SourceError, write_upright

# Decoding keeps the sharpest frame of each stretch of the video as a candidate, this many per
# frame wanted: selection then needs no second decoding pass.
CANDIDATES_PER_FRAME = 3

ProgressFn = Callable[[int, int | None], None]
LogFn = Callable[[str], None]


@dataclass
class Group:
    """One source's frames in the capture."""

    label: str
    kind: str  # "video" or "photos"
    file: str  # its name on disk
    names: list[str]  # the kept frames, in time (or name) order
    size: tuple[int, int]  # upright width and height of its frames
    images: int  # frames decoded (video) or photos received
    time_of: dict[str, float] = field(default_factory=dict)  # video frames' times (s)
    # Video frames' cumulative image motion (image widths), for the skeleton.
    motion_of: dict[str, float] = field(default_factory=dict)
    info: frames.VideoInfo | None = None
    scan: frames.FrameScan | None = None
    selection: frames.Selection | None = None
    thumbs: np.ndarray | None = None  # kept frames' thumbnails, for loop closure
    photo_names: dict[str, str] = field(default_factory=dict)  # frame -> the photo's name

    def record(self) -> dict[str, Any]:
        """What the summary's `sources` says of it (registration is added later)."""
        entry: dict[str, Any] = {
            "label": self.label,
            "kind": self.kind,
            "file": self.file,
            "images": self.images,
            "frames_kept": len(self.names),
            "width": self.size[0],
            "height": self.size[1],
        }
        if self.info is not None:
            entry |= {"fps": round(self.info.fps, 3), "duration_s": round(self.info.duration_s, 3)}
        return entry


@dataclass
class Capture:
    """Every source's frames, in one list of names."""

    groups: list[Group]

    @property
    def names(self) -> list[str]:
        return [name for group in self.groups for name in group.names]

    def spans(self) -> list[SourceSpan]:
        """Where each source's frames sit in `names`, for matching."""
        spans, start = [], 0
        for group in self.groups:
            ordered = group.kind == "video"
            spans.append(SourceSpan(start, len(group.names), ordered, group.thumbs))
            start += len(group.names)
        return spans


def share_frames(caps: list[int | None], total: int) -> list[int]:
    """Split `total` frames between sources fairly: each gets an equal share, and what a
    source cannot use (a photo set smaller than its share; None: no cap) goes to the others."""
    shares = [0] * len(caps)
    left = total
    order = sorted(range(len(caps)), key=lambda k: math.inf if caps[k] is None else caps[k])
    for done, k in enumerate(order):
        fair = left // (len(caps) - done)
        cap = caps[k]
        shares[k] = fair if cap is None else min(cap, fair)
        left -= shares[k]
    return shares


def gather_video(
    path: Path,
    frames_dir: Path,
    min_frames: int,
    max_frames: int,
    progress_decode: ProgressFn,
    progress_select: ProgressFn,
    *,
    prefix: str = "",
    label: str | None = None,
    spacing: float = frames.FRAME_SPACING,
) -> Group:
    """Decode one video and keep its sharp, well-spread frames (pipeline.frames)."""
    info, scan = frames.scan_video(
        path, frames_dir, CANDIDATES_PER_FRAME * max_frames, progress_decode, prefix=prefix
    )
    selection = frames.select_frames(
        scan, min(min_frames, max_frames), max_frames, motion_per_frame=spacing
    )
    names = frames.keep_frames(frames_dir, scan, selection, progress_select, prefix)
    index_of = {frames.frame_name(i, prefix): i for i in selection.indices}
    return Group(
        label=label or path.name,
        kind="video",
        file=path.name,
        names=names,
        size=(info.width, info.height),
        images=info.frames_decoded,
        time_of={name: float(scan.times[i]) for name, i in index_of.items()},
        motion_of={name: float(scan.motion[i]) for name, i in index_of.items()},
        info=info,
        scan=scan,
        selection=selection,
        thumbs=scan.thumbs[[index_of[m] for m in names]] if names else None,
    )


def gather_photos(
    source: Source, frames_dir: Path, limit: int, prefix: str, progress: ProgressFn
) -> Group:
    """Write a photo set's photos upright as the capture's frames (at most `limit`, evenly
    spread over the set in name order); refuses a set whose upright sizes differ."""
    photos = source.images
    if len(photos) > limit:
        keep = np.unique(np.round(np.linspace(0, len(photos) - 1, limit)).astype(int))
        photos = [photos[k] for k in keep]
    names: list[str] = []
    shown: dict[str, str] = {}
    sizes: dict[tuple[int, int], str] = {}
    progress(0, len(photos))
    for k, photo in enumerate(photos, 1):
        name = f"{prefix}photo_{k:04d}.jpg"
        size = write_upright(photo, frames_dir / name)
        sizes.setdefault(size, photo.name)
        names.append(name)
        shown[name] = photo.name
        progress(k, len(photos))
    if len(sizes) > 1:
        listed = ", ".join(f"{w} x {h} ({n})" for (w, h), n in sizes.items())
        raise SourceError(
            "unprocessable",
            f"The photos of {source.label} have different sizes once upright ({listed}): one "
            "camera per source. Put each camera's (or orientation's) photos in its own folder.",
        )
    size = next(iter(sizes)) if sizes else (0, 0)
    thumbs = [_thumb(frames_dir / name) for name in names]
    return Group(
        label=source.label,
        kind="photos",
        file=source.path.name,
        names=names,
        size=size,
        images=len(source.images),
        photo_names=shown,
        thumbs=np.array(thumbs) if thumbs else None,
    )


def _thumb(path: Path) -> np.ndarray:
    """The tiny grey thumbnail loop closure compares (as pipeline.frames makes for video)."""
    gray = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_4)
    width = frames.THUMB_WIDTH
    height = max(8, round(width * gray.shape[0] / max(gray.shape[1], 1)))
    thumb = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
    return cv2.resize(thumb, (32, max(4, height // 5)), interpolation=cv2.INTER_AREA)


def gather(
    sources: list[Source],
    frames_dir: Path,
    min_frames: int,
    max_frames: int,
    progress: Callable[[str], ProgressFn],
    log: LogFn,
    spacing: float = frames.FRAME_SPACING,
) -> Capture:
    """The frames of every source of a capture with several (names prefixed by source)."""
    frames_dir.mkdir(parents=True, exist_ok=True)
    caps = [len(s.images) if s.kind == "photos" else None for s in sources]
    shares = share_frames(caps, max_frames)
    decoded = _Counter(progress("decode"))
    groups: list[Group] = []
    for k, (source, share) in enumerate(zip(sources, shares, strict=True), 1):
        prefix = f"s{k:02d}_"
        if source.kind == "photos":
            group = gather_photos(source, frames_dir, max(share, 1), prefix, decoded.part())
            if len(group.names) < group.images:
                log(
                    f"{source.label}: kept {len(group.names)} of {group.images} photos "
                    f"(max_frames {max_frames} for the whole capture)"
                )
        else:
            share = max(share, 2)
            wanted = max(2, math.ceil(min_frames * share / max_frames))
            group = gather_video(
                source.path,
                frames_dir,
                wanted,
                share,
                decoded.part(),
                lambda current, total: None,  # reported once for all sources, below
                prefix=prefix,
                label=source.label,
                spacing=spacing,
            )
        log(f"source {k} ({group.kind} {group.label}): {group.images} in, {len(group.names)} kept")
        groups.append(group)
    decoded.finish()
    kept = sum(len(g.names) for g in groups)
    progress("select")(0, kept)
    progress("select")(kept, kept)
    return Capture(groups)


class _Counter:
    """One stage's progress over several sources: each source's counts add to the previous
    sources' totals, so the stage's count never goes down."""

    def __init__(self, report: ProgressFn) -> None:
        self.report = report
        self.base = 0
        self.last = 0

    def part(self) -> ProgressFn:
        self.base += self.last
        self.last = 0

        def report(current: int, total: int | None) -> None:
            self.last = max(self.last, current if total is None else total)
            self.report(self.base + current, None)

        return report

    def finish(self) -> None:
        done = self.base + self.last
        self.report(done, done)
