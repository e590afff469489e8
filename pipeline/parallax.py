"""A parallax pre-check on the selected frames, before the (expensive) reconstruction.

Structure-from-Motion needs the camera to move: a camera that stands still, or only turns on
the spot, shows the scene from one viewpoint, and depth cannot be measured. This module finds
that in about a second instead of after the whole reconstruction.

Corners are tracked (pyramidal Lucas-Kanade, forward-backward checked) through the selected
frames in a few well-spread segments of the video. For the first and last frame of each
segment a homography and a fundamental matrix are fitted with RANSAC and compared with Torr's
GRIC (Geometric Robust Information Criterion). A homography explains every pair of views of a
camera that only turns; a fundamental matrix is needed once the camera moves through a scene
with depth. The verdict is conservative: the video is refused only when *no* segment shows
parallax (every measured segment is static or better explained by a homography).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

WORK_WIDTH = 640  # frames are scaled to this width for tracking (cheap, enough for the test)
MAX_CORNERS = 600
MIN_TRACKS = 40  # fewer tracks through a segment: no verdict on that segment
SEGMENTS = 8
# A segment ends at the last frame through which this fraction of its corners survive (and
# MIN_TRACKS): the pair judged is as wide as the tracking allows.
KEEP_FRACTION = 0.3
# A segment where the tracked corners moved less than this (median, in work-width pixels,
# about 0.3 % of the width) is static. Handheld shake and encoder noise on a tripod video stay
# well below; a camera moving enough to triangulate moves corners by tens of pixels.
STATIC_PX = 2.0
# GRIC's noise level: LK tracks on 640-pixel frames are good to about half a pixel.
SIGMA_PX = 0.7
# A segment counts as rotation-only when GRIC(H) beats GRIC(F) by this fraction of the tracks
# (GRIC differences grow with the number of tracks). A camera that moves through depth gives
# GRIC(F) far below GRIC(H); a pure rotation gives GRIC(H) lower by about 1.4 per track (F's
# extra dimension), so a margin of 0.2 per track stays on the safe side of noise.
ROTATION_MARGIN = 0.2
# Every segment must also have a homography that fits to within this median error (px).
ROTATION_MAX_MEDIAN_PX = 1.5


@dataclass
class SegmentCheck:
    """One segment of the video: from frame position `first` to `last`."""

    first: int
    last: int
    tracks: int
    median_motion_px: float = 0.0
    gric_h: float = 0.0
    gric_f: float = 0.0
    h_median_px: float = 0.0
    verdict: str = "unknown"  # "static", "rotation", "parallax" or "unknown"


@dataclass
class ParallaxCheck:
    """The pre-check's outcome over the whole video."""

    segments: list[SegmentCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def measured(self) -> list[SegmentCheck]:
        """Segments with enough tracks to judge."""
        return [s for s in self.segments if s.verdict != "unknown"]

    @property
    def verdict(self) -> str:
        """ "static" when every measured segment is static, "rotation" when every one is static
        or rotation-only (and some rotate), else "parallax" (or "unknown": nothing measured, or
        fewer than half the segments measured, so no refusal)."""
        measured = self.measured
        if not measured or 2 * len(measured) < len(self.segments):
            return "unknown"
        kinds = {s.verdict for s in measured}
        if kinds == {"static"}:
            return "static"
        if kinds <= {"static", "rotation"}:
            return "rotation"
        return "parallax"

    def describe(self) -> str:
        """One line for the log with the numbers behind the verdict."""
        parts = [
            f"{s.first}-{s.last}: {s.verdict} ({s.tracks} tracks, moved {s.median_motion_px:.1f}"
            f" px, GRIC H {s.gric_h:.0f} F {s.gric_f:.0f}, H err {s.h_median_px:.2f} px)"
            for s in self.segments
        ]
        return f"parallax pre-check: {self.verdict} in {self.seconds:.2f} s; " + "; ".join(parts)


def gric(residuals_sq: np.ndarray, sigma: float, d: int, k: int, r: int = 4) -> float:
    """Torr's GRIC of a two-view model: robust residual cost plus penalties for the model's
    dimension `d` (2 for a homography, 3 for a fundamental matrix) and its `k` parameters
    (8 and 7); `r` = 4 is the dimension of a correspondence. Lower is better."""
    n = len(residuals_sq)
    rho = np.minimum(residuals_sq / sigma**2, 2.0 * (r - d))
    return float(rho.sum() + math.log(r) * d * n + math.log(r * n) * k)


def homography_errors(h: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared symmetric transfer error / 2 of each correspondence under homography `h`."""

    def transfer(m: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        ph = np.c_[p, np.ones(len(p))] @ m.T
        with np.errstate(divide="ignore", invalid="ignore"):
            proj = ph[:, :2] / ph[:, 2:3]
        err = ((proj - q) ** 2).sum(axis=1)
        return np.where(np.isfinite(err), err, 1e12)

    try:
        inv = np.linalg.inv(h)
    except np.linalg.LinAlgError:
        return np.full(len(a), 1e12)
    return 0.5 * (transfer(h, a, b) + transfer(inv, b, a))


def sampson_errors(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Sampson distance of each correspondence to fundamental matrix `f`."""
    ah = np.c_[a, np.ones(len(a))]
    bh = np.c_[b, np.ones(len(b))]
    fa = ah @ f.T  # epipolar lines in b
    ftb = bh @ f  # epipolar lines in a
    num = (bh * fa).sum(axis=1) ** 2
    den = fa[:, 0] ** 2 + fa[:, 1] ** 2 + ftb[:, 0] ** 2 + ftb[:, 1] ** 2
    return num / np.maximum(den, 1e-12)


# JPEG decoding at 1/2, 1/4 or 1/8 size (libjpeg scales while decoding: half the time of a
# full decode and resize for 1280x720 frames).
_REDUCED = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def reduction_for(width: int) -> int:
    """The largest JPEG decoding reduction that keeps frames of `width` at least WORK_WIDTH."""
    return max((k for k in (1, 2, 4, 8) if width >= k * WORK_WIDTH), default=1)


def _load(path: Path, reduce: int = 1) -> np.ndarray:
    image = cv2.imread(str(path), _REDUCED.get(reduce, cv2.IMREAD_GRAYSCALE))
    if image is None:
        raise OSError(f"could not read {path}")
    return _fit(image)


def _width(path: Path) -> int:
    """A frame's width from its header alone (0 if unreadable: no reduction)."""
    try:
        with Image.open(path) as image:
            return image.width
    except (OSError, UnidentifiedImageError):
        return 0


def _fit(image: np.ndarray) -> np.ndarray:
    """A grey frame scaled down to WORK_WIDTH (never up)."""
    if image.shape[1] > WORK_WIDTH:
        height = round(image.shape[0] * WORK_WIDTH / image.shape[1])
        image = cv2.resize(image, (WORK_WIDTH, height), interpolation=cv2.INTER_AREA)
    return image


_LK = {"winSize": (21, 21), "maxLevel": 3}


def _track(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Corners of the first image and where they are in the farthest image through which
    enough of them survive (every step tracked, forward-backward checked); returns them and
    that image's position in `images`."""
    start = cv2.goodFeaturesToTrack(images[0], MAX_CORNERS, 0.01, 8)
    if start is None:
        return np.empty((0, 2)), np.empty((0, 2)), 0
    first = start.reshape(-1, 2).astype(np.float64)
    pts = start.reshape(-1, 1, 2).astype(np.float32)
    alive = np.ones(len(pts), bool)
    keep = max(MIN_TRACKS, round(KEEP_FRACTION * len(pts)))
    best = (first, first, 0)
    for k, (prev, cur) in enumerate(itertools.pairwise(images), 1):
        nxt, st, _ = cv2.calcOpticalFlowPyrLK(prev, cur, pts, None, **_LK)
        back, st2, _ = cv2.calcOpticalFlowPyrLK(cur, prev, nxt, None, **_LK)
        fb = np.linalg.norm((back - pts).reshape(-1, 2), axis=1)
        alive &= (st.ravel() == 1) & (st2.ravel() == 1) & (fb < 1.0)
        if alive.sum() < keep:
            break
        pts = nxt
        best = (first[alive], pts.reshape(-1, 2)[alive].astype(np.float64), k)
    return best


def check_segment(images: list[np.ndarray], first: int, last: int) -> SegmentCheck:
    """The verdict on one segment of consecutive selected frames."""
    a, b, reach = _track(images)
    seg = SegmentCheck(first, first + reach, len(a))
    if reach == 0 or len(a) < MIN_TRACKS:
        return seg
    seg.median_motion_px = float(np.median(np.linalg.norm(b - a, axis=1)))
    if seg.median_motion_px < STATIC_PX:
        seg.verdict = "static"
        return seg
    h, _ = cv2.findHomography(a, b, cv2.RANSAC, 2.0, maxIters=2000, confidence=0.999)
    f, _ = cv2.findFundamentalMat(a, b, cv2.FM_RANSAC, 1.0, 0.999, 2000)
    if h is None or f is None or f.shape != (3, 3):
        return seg
    eh, ef = homography_errors(h, a, b), sampson_errors(f, a, b)
    seg.gric_h = gric(eh, SIGMA_PX, d=2, k=8)
    seg.gric_f = gric(ef, SIGMA_PX, d=3, k=7)
    seg.h_median_px = float(np.sqrt(np.median(eh)))
    rotation = (
        seg.gric_h < seg.gric_f - ROTATION_MARGIN * len(a)
        and seg.h_median_px < ROTATION_MAX_MEDIAN_PX
    )
    seg.verdict = "rotation" if rotation else "parallax"
    return seg


def check_parallax(paths: list[Path], segments: int = SEGMENTS) -> ParallaxCheck:
    """Track corners through `segments` equal, consecutive stretches of the selected frames
    (in video order) and judge each one; see the module docstring."""
    started = time.perf_counter()
    out = ParallaxCheck()
    n = len(paths)
    if n < 2:
        return out
    count = min(segments, n - 1)
    bounds = np.linspace(0, n - 1, count + 1).round().astype(int)
    cache: dict[int, np.ndarray] = {}
    reduce = reduction_for(_width(paths[0]))
    for first, last in itertools.pairwise(bounds):
        if last <= first:
            continue
        images = []
        for k in range(int(first), int(last) + 1):
            if k not in cache:
                cache[k] = _load(paths[k], reduce)
            images.append(cache[k])
        out.segments.append(check_segment(images, int(first), int(last)))
        for k in list(cache):
            if k < last:
                del cache[k]
    out.seconds = time.perf_counter() - started
    return out
