"""Synthetic test videos with ground-truth camera poses.

A room with procedurally textured walls, floor and a few boxes is rendered exactly (each face
is a plane, drawn by its homography with a per-pixel depth test) from a known camera path and
encoded with PyAV. Tests and benchmarks use the poses to check recovered cameras.

Camera convention is COLMAP's: x right, y down, z forward; `rotation` maps world to camera and
`center` is the camera centre in world coordinates (z up in the world).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

NEAR = 0.05


@dataclass(frozen=True)
class Pose:
    """A camera pose: world-to-camera rotation and camera centre."""

    rotation: np.ndarray
    center: np.ndarray

    @property
    def translation(self) -> np.ndarray:
        """World-to-camera translation."""
        return -self.rotation @ self.center


@dataclass(frozen=True)
class Quad:
    """A textured rectangle: texel (0, 0) at `origin`, the texture spans `edge_u` and `edge_v`."""

    origin: np.ndarray
    edge_u: np.ndarray
    edge_v: np.ndarray
    mips: tuple[np.ndarray, ...]


@dataclass
class SyntheticVideo:
    """A rendered video and the ground truth for every decoded frame."""

    path: Path
    width: int
    height: int
    fps: float
    focal: float
    poses: list[Pose]
    scene_radius: float
    blurred: set[int] = field(default_factory=set)

    @property
    def centers(self) -> np.ndarray:
        """Camera centres, one row per frame."""
        return np.array([p.center for p in self.poses])


def look_at(center: np.ndarray, target: np.ndarray, roll: float = 0.0) -> Pose:
    """Pose of a camera at `center` looking at `target` with the world z axis up."""
    forward = target - center
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    if roll:
        c, s = math.cos(roll), math.sin(roll)
        right, down = c * right + s * down, -s * right + c * down
    return Pose(np.stack([right, down, forward]), np.asarray(center, dtype=float))


def make_texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A feature-rich, non-repeating BGR texture: coloured noise, shapes and letters."""
    img = np.zeros((height, width, 3), np.float32)
    for octave in range(5):
        cells = 4 * 2**octave
        small = rng.random((max(2, cells * height // width), cells, 3), dtype=np.float32)
        img += cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC) / 1.6**octave
    img = img - img.min()
    img = (img / img.max() * 200 + 20).astype(np.uint8)
    area = width * height
    for _ in range(area // 2500):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(4, max(6, min(90, min(width, height) // 12))))
        kind = rng.integers(0, 5)
        if kind == 0:
            cv2.circle(img, (x, y), size, color, -1 if rng.random() < 0.6 else 2, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(img, (x, y), (x + size, y + int(size * rng.uniform(0.3, 2))), color, -1)
        elif kind == 2:
            pts = rng.integers(-size, size, (3, 2)) + np.array([x, y])
            cv2.fillPoly(img, [pts.astype(np.int32)], color, cv2.LINE_AA)
        elif kind == 3:
            end = (x + int(rng.integers(-3, 4)) * size, y + int(rng.integers(-3, 4)) * size)
            cv2.line(img, (x, y), end, color, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            text = "".join(chr(int(c)) for c in rng.integers(65, 91, int(rng.integers(2, 6))))
            scale = size / 12
            cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 2, cv2.LINE_AA)
    return img


def _mips(texture: np.ndarray) -> tuple[np.ndarray, ...]:
    levels = [texture]
    while min(levels[-1].shape[:2]) > 16:
        levels.append(cv2.pyrDown(levels[-1]))
    return tuple(levels)


def _quad(
    origin: Iterable[float],
    edge_u: Iterable[float],
    edge_v: Iterable[float],
    rng: np.random.Generator,
    texels_per_metre: float,
) -> Quad:
    eu, ev = np.asarray(edge_u, float), np.asarray(edge_v, float)
    w = int(np.clip(np.linalg.norm(eu) * texels_per_metre, 64, 4096))
    h = int(np.clip(np.linalg.norm(ev) * texels_per_metre, 64, 4096))
    return Quad(np.asarray(origin, float), eu, ev, _mips(make_texture(rng, w, h)))


def _box(
    center: Iterable[float],
    size: Iterable[float],
    rng: np.random.Generator,
    texels_per_metre: float,
) -> list[Quad]:
    cx, cy, cz = center
    sx, sy, sz = size
    x0, x1, y0, y1, z1 = cx - sx / 2, cx + sx / 2, cy - sy / 2, cy + sy / 2, cz + sz
    t = texels_per_metre
    return [
        _quad((x0, y0, z1), (sx, 0, 0), (0, 0, -sz), rng, t),
        _quad((x1, y1, z1), (-sx, 0, 0), (0, 0, -sz), rng, t),
        _quad((x1, y0, z1), (0, sy, 0), (0, 0, -sz), rng, t),
        _quad((x0, y1, z1), (0, -sy, 0), (0, 0, -sz), rng, t),
        _quad((x0, y1, z1), (sx, 0, 0), (0, -sy, 0), rng, t),
    ]


def make_room(seed: int = 0, half_size: float = 5.0, height: float = 3.0) -> list[Quad]:
    """A textured room (floor, four walls) around a group of textured boxes near the origin."""
    rng = np.random.default_rng(seed)
    s, h = half_size, height
    quads = [
        _quad((-s, s, 0), (2 * s, 0, 0), (0, -2 * s, 0), rng, 200),
        _quad((-s, -s, h), (2 * s, 0, 0), (0, 0, -h), rng, 180),
        _quad((s, -s, h), (0, 2 * s, 0), (0, 0, -h), rng, 180),
        _quad((s, s, h), (-2 * s, 0, 0), (0, 0, -h), rng, 180),
        _quad((-s, s, h), (0, -2 * s, 0), (0, 0, -h), rng, 180),
    ]
    quads += _box((0.0, 0.0, 0.0), (0.8, 0.6, 0.7), rng, 700)
    quads += _box((0.7, 0.5, 0.0), (0.4, 0.5, 0.4), rng, 700)
    quads += _box((-0.6, 0.4, 0.0), (0.35, 0.35, 1.0), rng, 700)
    return quads


def _clip_near(points: np.ndarray) -> np.ndarray:
    """Clip a convex polygon (camera coordinates, one row per vertex) to z >= NEAR."""
    out = []
    for i in range(len(points)):
        a, b = points[i], points[(i + 1) % len(points)]
        if a[2] >= NEAR:
            out.append(a)
        if (a[2] >= NEAR) != (b[2] >= NEAR):
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out)


def render(
    quads: list[Quad], pose: Pose, width: int, height: int, focal: float, supersample: int = 2
) -> np.ndarray:
    """Render the scene from `pose` as a BGR image with a pinhole camera."""
    s = supersample
    w, h, f = width * s, height * s, focal * s
    cx, cy = w / 2, h / 2
    k = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
    image = np.full((h, w, 3), 90, np.uint8)
    depth = np.full((h, w), np.inf, np.float32)
    rot, trans = pose.rotation, pose.translation
    for quad in quads:
        corners = np.array(
            [
                quad.origin,
                quad.origin + quad.edge_u,
                quad.origin + quad.edge_u + quad.edge_v,
                quad.origin + quad.edge_v,
            ]
        )
        cam = _clip_near(corners @ rot.T + trans)
        if len(cam) < 3:
            continue
        proj = cam[:, :2] / cam[:, 2:] * f + (cx, cy)
        x0, y0 = np.floor(proj.min(axis=0)).astype(int)
        x1, y1 = np.ceil(proj.max(axis=0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x0 >= x1 or y0 >= y1:
            continue
        # Texture level from the texel density at the closest visible corner.
        mip0 = quad.mips[0]
        texel = np.linalg.norm(quad.edge_u) / mip0.shape[1]
        pixel = cam[:, 2].min() / f
        level = int(np.clip(math.floor(math.log2(max(pixel / texel, 1.0))), 0, len(quad.mips) - 1))
        tex = quad.mips[level]
        th, tw = tex.shape[:2]
        m = np.column_stack(
            [rot @ quad.edge_u / tw, rot @ quad.edge_v / th, rot @ quad.origin + trans]
        )
        shift = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1.0]])
        hom = shift @ k @ m
        roi_w, roi_h = x1 - x0, y1 - y0
        warped = cv2.warpPerspective(
            tex, hom, (roi_w, roi_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        normal = rot @ np.cross(quad.edge_u, quad.edge_v)
        normal /= np.linalg.norm(normal)
        dist = normal @ (rot @ quad.origin + trans)
        xs = (np.arange(x0, x1, dtype=np.float32) - cx) / f
        ys = (np.arange(y0, y1, dtype=np.float32) - cy) / f
        denom = normal[0] * xs[None, :] + normal[1] * ys[:, None] + normal[2]
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (dist / denom).astype(np.float32)
        mask = np.zeros((roi_h, roi_w), np.uint8)
        cv2.fillPoly(
            mask, [np.round((proj - (x0, y0)) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4
        )
        roi_depth = depth[y0:y1, x0:x1]
        visible = (mask > 0) & (z > NEAR) & (z < roi_depth)
        roi_depth[visible] = z[visible]
        image[y0:y1, x0:x1][visible] = warped[visible]
    if s > 1:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return image


def orbit_poses(
    n: int,
    radius: float = 2.6,
    height: float = 1.5,
    turns: float = 1.0,
    jitter: float = 0.02,
    seed: int = 0,
) -> list[Pose]:
    """Camera poses on a (slightly shaky) orbit around the boxes, looking at them."""
    rng = np.random.default_rng(seed + 1000)
    phase = rng.uniform(0, 2 * math.pi, 6)
    poses = []
    for i in range(n):
        u = i / max(n - 1, 1)
        a = 2 * math.pi * turns * u
        wob = jitter * np.array(
            [math.sin(7 * a + phase[0]), math.sin(5 * a + phase[1]), math.sin(3 * a + phase[2])]
        )
        c = np.array([radius * math.cos(a), radius * math.sin(a), height + 0.2 * math.sin(2 * a)])
        target = np.array([0.0, 0.0, 0.45]) + wob * 5
        poses.append(look_at(c + wob, target, roll=0.03 * math.sin(4 * a + phase[3])))
    return poses


def walk_poses(
    n: int, fps: float, pauses: tuple[tuple[float, float], ...] = ((12, 3), (38, 3)), seed: int = 0
) -> list[Pose]:
    """A hand-held walk around the room on an ellipse, with pauses (start, seconds) standing still.

    The view turns between the boxes in the middle and the walls ahead.
    """
    rng = np.random.default_rng(seed + 2000)
    phase = rng.uniform(0, 2 * math.pi, 6)
    times = np.arange(n) / fps
    moving = np.ones(n)
    for start, length in pauses:
        moving[(times >= start) & (times < start + length)] = 0.0
    progress = np.cumsum(moving)
    progress /= max(progress[-1], 1)
    poses = []
    for t, u in zip(times, progress, strict=True):
        a = 2 * math.pi * 1.1 * u
        c = np.array(
            [3.4 * math.cos(a), 2.4 * math.sin(a), 1.55 + 0.03 * math.sin(2 * math.pi * t)]
        )
        ahead = np.array([3.4 * math.cos(a + 0.5), 2.4 * math.sin(a + 0.5), 1.2])
        mix = 0.5 + 0.5 * math.sin(2 * math.pi * u * 3 + phase[0])
        target = mix * np.array([0.0, 0.0, 0.5]) + (1 - mix) * ahead
        shake = 0.01 * np.array([math.sin(9 * t + phase[1]), math.sin(11 * t + phase[2]), 0])
        poses.append(look_at(c + shake, target, roll=0.02 * math.sin(3 * t + phase[3])))
    return poses


def write_video(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rotation: int = 0,
    crf: int = 20,
    audio: bool = False,
    timestamps: Iterable[float] | None = None,
) -> None:
    """Encode upright BGR frames; `rotation` (degrees counter-clockwise, as PyAV reports it)
    is stored as display metadata with the frames stored turned the other way, like a phone
    does. `timestamps` (seconds) give a variable frame rate."""
    time_base = Fraction(1, 90000)
    stamps = iter(timestamps) if timestamps is not None else None
    with av.open(str(path), "w") as container:
        stream = None
        astream = container.add_stream("aac", rate=48000) if audio else None
        if astream is not None:
            astream.layout = "mono"
        sample = 0
        for i, frame in enumerate(frames):
            stored = (
                np.ascontiguousarray(np.rot90(frame, k=-(rotation // 90))) if rotation else frame
            )
            if stream is None:
                rate = Fraction(fps).limit_denominator(1001)
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height = stored.shape[1], stored.shape[0]
                stream.pix_fmt = pix_fmt
                stream.time_base = time_base
                stream.codec_context.time_base = time_base
                stream.options = {"crf": str(crf), "preset": "veryfast", "g": str(round(fps))}
                if rotation:
                    stream.set_display_rotation(rotation)
            t = next(stamps) if stamps is not None else i / fps
            vf = av.VideoFrame.from_ndarray(stored, format="bgr24").reformat(format=pix_fmt)
            vf.pts = round(t / time_base)
            vf.time_base = time_base
            container.mux(stream.encode(vf))
            if astream is not None:
                end = round((t + 1 / fps) * 48000)
                while sample < end:
                    tone = 0.1 * np.sin(2 * math.pi * 440 * (sample + np.arange(1024)) / 48000)
                    af = av.AudioFrame.from_ndarray(
                        tone[None].astype(np.float32), format="fltp", layout="mono"
                    )
                    af.sample_rate, af.pts = 48000, sample
                    container.mux(astream.encode(af))
                    sample += 1024
        if stream is None:
            raise ValueError("no frames to write")
        container.mux(stream.encode(None))
        if astream is not None:
            container.mux(astream.encode(None))


def write_audio_only(path: Path, seconds: float = 2.0) -> None:
    """Write an AAC file with no video stream."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48000)
        stream.layout = "mono"
        for pts in range(0, int(seconds * 48000), 1024):
            tone = 0.1 * np.sin(2 * math.pi * 440 * (pts + np.arange(1024)) / 48000)
            af = av.AudioFrame.from_ndarray(
                tone[None].astype(np.float32), format="fltp", layout="mono"
            )
            af.sample_rate, af.pts = 48000, pts
            container.mux(stream.encode(af))
        container.mux(stream.encode(None))


def motion_blur(image: np.ndarray, length: int = 25, angle: float = 0.3) -> np.ndarray:
    """Blur an image as a fast camera shake would."""
    kernel = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    dx, dy = math.cos(angle) * c, math.sin(angle) * c
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1)
    return cv2.filter2D(image, -1, kernel / kernel.sum())


def render_video(
    path: Path,
    poses: list[Pose],
    *,
    width: int,
    height: int,
    fps: float,
    hfov_deg: float = 65.0,
    seed: int = 0,
    supersample: int = 2,
    blurred: Iterable[int] = (),
    noise: float = 1.5,
    progress: Callable[[int, int], None] | None = None,
    **encode: object,
) -> SyntheticVideo:
    """Render `poses` of the room scene into a video file at `path` and return the truth.

    `width`/`height` are the upright (displayed) size; `encode` goes to `write_video`.
    """
    quads = make_room(seed)
    focal = width / 2 / math.tan(math.radians(hfov_deg) / 2)
    blurred = set(blurred)
    rng = np.random.default_rng(seed + 3000)

    def frames() -> Iterator[np.ndarray]:
        for i, pose in enumerate(poses):
            img = render(quads, pose, width, height, focal, supersample)
            if i in blurred:
                img = motion_blur(img)
            if noise:
                img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
            if progress is not None:
                progress(i + 1, len(poses))
            yield img

    write_video(path, frames(), fps, **encode)  # type: ignore[arg-type]
    radius = float(np.median(np.linalg.norm(np.array([p.center for p in poses])[:, :2], axis=1)))
    return SyntheticVideo(Path(path), width, height, fps, focal, poses, radius, blurred)


def render_orbit(
    path: Path,
    *,
    seconds: float = 15.0,
    fps: float = 30.0,
    width: int = 960,
    height: int = 540,
    turns: float = 1.0,
    seed: int = 0,
    **kwargs: object,
) -> SyntheticVideo:
    """Render a hand-held orbit around the boxes (the 15 s 960×540 benchmark video by default)."""
    poses = orbit_poses(round(seconds * fps), turns=turns, seed=seed)
    return render_video(path, poses, width=width, height=height, fps=fps, seed=seed, **kwargs)  # type: ignore[arg-type]


def render_walk(
    path: Path,
    *,
    seconds: float = 60.0,
    fps: float = 30.0,
    width: int = 1920,
    height: int = 1080,
    seed: int = 0,
    **kwargs: object,
) -> SyntheticVideo:
    """Render a hand-held walk around the room with two pauses (the 60 s 1080p benchmark)."""
    poses = walk_poses(round(seconds * fps), fps, seed=seed)
    kwargs.setdefault("supersample", 1)
    return render_video(path, poses, width=width, height=height, fps=fps, seed=seed, **kwargs)  # type: ignore[arg-type]


def save_truth(video: SyntheticVideo, path: Path) -> None:
    """Store the ground truth of a rendered video next to it (.npz)."""
    np.savez(
        path,
        centers=video.centers,
        rotations=np.array([p.rotation for p in video.poses]),
        width=video.width,
        height=video.height,
        fps=video.fps,
        focal=video.focal,
        scene_radius=video.scene_radius,
        blurred=np.array(sorted(video.blurred), dtype=int),
    )


def load_truth(video_path: Path, truth_path: Path) -> SyntheticVideo:
    """Read a ground truth stored by `save_truth`."""
    data = np.load(truth_path)
    poses = [Pose(r, c) for r, c in zip(data["rotations"], data["centers"], strict=True)]
    return SyntheticVideo(
        Path(video_path),
        int(data["width"]),
        int(data["height"]),
        float(data["fps"]),
        float(data["focal"]),
        poses,
        float(data["scene_radius"]),
        set(data["blurred"].tolist()),
    )


def similarity_align(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale, rotation and translation that best map points `src` onto `dst` (Umeyama)."""
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_s, dst - mu_d
    u, s, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.eye(3)
    if np.linalg.det(u @ vt) < 0:
        d[2, 2] = -1
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(s) @ d) / (a**2).sum(axis=1).mean())
    return scale, rot, mu_d - scale * rot @ mu_s


def centre_errors(estimated: dict[int, np.ndarray], video: SyntheticVideo) -> np.ndarray:
    """Distances between estimated camera centres (by decoded frame index) and the truth
    after a similarity alignment, as fractions of the scene radius."""
    idx = sorted(estimated)
    est = np.array([estimated[i] for i in idx])
    truth = video.centers[idx]
    scale, rot, trans = similarity_align(est, truth)
    aligned = scale * est @ rot.T + trans
    return np.linalg.norm(aligned - truth, axis=1) / video.scene_radius


def pan_poses(
    n: int,
    degrees: float = 60.0,
    center: tuple[float, float, float] = (2.6, 0.0, 1.5),
    shake: float = 0.0,
    seed: int = 0,
) -> list[Pose]:
    """A camera standing at `center` that only turns: yaw over `degrees`, starting towards the
    boxes (a rotation-only pan, which cannot be triangulated). `shake` moves the centre by up
    to that many metres (hand tremor)."""
    rng = np.random.default_rng(seed + 4000)
    c = np.array(center, dtype=float)
    start = math.atan2(-c[1], -c[0])
    poses = []
    for i in range(n):
        a = start + math.radians(degrees) * (i / max(n - 1, 1) - 0.5)
        pos = c + shake * rng.uniform(-1, 1, 3)
        target = pos + np.array([math.cos(a), math.sin(a), -0.25])
        poses.append(look_at(pos, target))
    return poses


def orbit_poses_at(
    fractions: Iterable[float], turns: float = 1.0, seed: int = 0, **kwargs: float
) -> list[Pose]:
    """Poses of `orbit_poses` at chosen fractions of the orbit (0 start, 1 end) instead of
    evenly spaced ones: a camera that speeds up for a step, or a video with frames dropped."""
    fractions = list(fractions)
    dense = 4000
    path = orbit_poses(dense + 1, turns=turns, seed=seed, **kwargs)
    return [path[round(u * dense)] for u in fractions]
