"""Previews of a task's COLMAP dataset for the web page: the kept frames (and cached JPEG
thumbnails of them) and a compact, subsampled copy of the sparse model (points and camera
poses). Plain synchronous functions; the routes run them in worker threads.

Nothing here follows a symbolic link: folders are checked with lstat and files are opened with
O_NOFOLLOW, so a link planted in a task folder can never expose a file outside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.protocol import SUMMARY_NAME
from pipeline.scene import scene_object, valid_scene

FRAME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.(?:jpg|jpeg|png)", re.IGNORECASE)
THUMBNAIL_MIN, THUMBNAIL_MAX = 64, 1024
THUMBNAIL_STEP = 64  # sizes are rounded up to a multiple of this, so the cache stays small
THUMBNAIL_QUALITY = 82
MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_SPARSE_POINTS = 50_000
MAX_SUMMARY_BYTES = 16 * 1024 * 1024
THUMBNAIL_DIR = "thumbnails"
PREVIEW_DIR = "preview"
SPARSE_FILES = ("cameras.bin", "images.bin", "points3D.bin")

# COLMAP camera model id -> number of parameters (colmap/src/colmap/sensor/models.h).
CAMERA_PARAMS = {0: 3, 1: 4, 2: 4, 3: 5, 4: 8, 5: 8, 6: 12, 7: 5, 8: 4, 9: 5, 10: 12, 11: 16}


class PreviewError(Exception):
    """The dataset (or the file asked for) is missing; the message is meant for the user."""


class PreviewCorruptError(PreviewError):
    """The dataset's files exist but cannot be parsed."""


@dataclass(frozen=True)
class Frame:
    """One kept frame of the dataset."""

    name: str
    size: int
    mtime_ns: int


# -- files without symlinks ---------------------------------------------------------------


def _real_dir(path: Path) -> bool:
    """Whether `path` is a directory and not a symbolic link."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _dirs_real(root: Path, *parts: str) -> Path | None:
    """`root/parts...` when every folder on the way below `root` is a real directory."""
    path = root
    if not _real_dir(path):
        return None
    for part in parts:
        path = path / part
        if not _real_dir(path):
            return None
    return path


def read_no_follow(path: Path, limit: int) -> bytes:
    """The bytes of a regular file, refusing symbolic links and files over `limit` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise PreviewError(f"{path.name} cannot be read") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PreviewError(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise PreviewError(f"{path.name} is too large to preview")
        return f.read(limit + 1)


def cache_folder(root: Path, *parts: str) -> Path | None:
    """`root/parts...`, created as needed, when `root` and every folder below it are real
    folders (None when one of them is a symbolic link or cannot be made)."""
    if not _real_dir(root):
        return None
    path = root
    for part in parts:
        path = path / part
        try:
            path.mkdir(exist_ok=True)
        except OSError:
            return None
        if not _real_dir(path):
            return None
    return path


def write_atomic(folder: Path, name: str, data: bytes) -> None:
    """Write `folder/name` through a temporary file, so readers never see half a file."""
    tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with tmp.open("xb") as f:
            f.write(data)
        tmp.replace(folder / name)
    except OSError:
        tmp.unlink(missing_ok=True)


# -- frames and thumbnails ----------------------------------------------------------------


def images_dir(dataset: Path) -> Path | None:
    """The dataset's `images/` folder, when it and the dataset folder are real folders."""
    return _dirs_real(dataset, "images")


def list_frames(dataset: Path) -> list[Frame]:
    """The dataset's frames (regular files with a frame name), sorted by name."""
    folder = images_dir(dataset)
    if folder is None:
        return []
    frames = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not FRAME_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            info = entry.stat(follow_symlinks=False)
            frames.append(Frame(entry.name, info.st_size, info.st_mtime_ns))
    return sorted(frames, key=lambda f: f.name)


def find_frame(dataset: Path, name: str) -> Frame | None:
    """The frame called `name`, when the name is well formed and the frame is listed."""
    if not FRAME_NAME.fullmatch(name):
        return None
    folder = images_dir(dataset)
    if folder is None:
        return None
    try:
        info = os.lstat(folder / name)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return Frame(name, info.st_size, info.st_mtime_ns)


def thumbnail_size(size: int) -> int:
    """The thumbnail's long side for a requested `size`: rounded up to THUMBNAIL_STEP."""
    size = max(THUMBNAIL_MIN, min(THUMBNAIL_MAX, size))
    return -(-size // THUMBNAIL_STEP) * THUMBNAIL_STEP


def frame_bytes(dataset: Path, frame: Frame) -> bytes:
    """The frame file itself."""
    folder = images_dir(dataset)
    if folder is None:
        raise PreviewError("The dataset's images are missing.")
    return read_no_follow(folder / frame.name, MAX_FRAME_BYTES)


def thumbnail(dataset: Path, cache_root: Path, frame: Frame, size: int) -> bytes:
    """A JPEG of `frame` whose long side is at most `size` pixels (never enlarged), made with
    OpenCV on first use and kept under `cache_root/{size}/`; remade when the frame changes."""
    import cv2  # imported here: only thumbnails need OpenCV in the server process

    cached = cache_root / str(size) / f"{frame.name}.jpg"
    try:
        info = os.lstat(cached)
        if stat.S_ISREG(info.st_mode) and info.st_mtime_ns >= frame.mtime_ns:
            return read_no_follow(cached, MAX_FRAME_BYTES)
    except (OSError, PreviewError):
        pass
    data = frame_bytes(dataset, frame)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise PreviewCorruptError(f"{frame.name} is not a readable image.")
    height, width = image.shape[:2]
    scale = size / max(height, width)
    if scale < 1:
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, new_size, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
    if not ok:
        raise PreviewError(f"{frame.name} could not be encoded as a thumbnail.")
    jpeg = encoded.tobytes()
    folder = cache_folder(cache_root.parent, cache_root.name, str(size))
    if folder is not None:
        write_atomic(folder, cached.name, jpeg)
    return jpeg


# -- the sparse model ---------------------------------------------------------------------


def _qvec_to_rotation(qw: float, qx: float, qy: float, qz: float) -> np.ndarray:
    """COLMAP's world-to-camera rotation matrix from its (w, x, y, z) quaternion."""
    q = np.array([qw, qx, qy, qz], float)
    q /= np.linalg.norm(q) or 1.0
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def read_cameras(data: bytes) -> dict[int, dict[str, Any]]:
    """COLMAP cameras.bin: camera id -> width, height and focal lengths."""
    (count,) = struct.unpack_from("<Q", data, 0)
    offset = 8
    cameras = {}
    for _ in range(count):
        camera_id, model, width, height = struct.unpack_from("<iiQQ", data, offset)
        offset += 24
        n = CAMERA_PARAMS.get(model)
        if n is None:
            raise PreviewCorruptError(f"cameras.bin uses an unknown camera model ({model}).")
        params = struct.unpack_from(f"<{n}d", data, offset)
        offset += 8 * n
        # SIMPLE_* and the radial models have one focal length, the others two.
        fx, fy = (params[0], params[1]) if model in {1, 4, 5, 6, 7, 10, 11} else params[:1] * 2
        cameras[camera_id] = {"width": width, "height": height, "fx": fx, "fy": fy}
    return cameras


def read_images(data: bytes) -> list[dict[str, Any]]:
    """COLMAP images.bin: each registered image's name, camera id and pose (R, t)."""
    (count,) = struct.unpack_from("<Q", data, 0)
    offset = 8
    images = []
    for _ in range(count):
        image_id, qw, qx, qy, qz, tx, ty, tz, camera_id = struct.unpack_from(
            "<i4d3di", data, offset
        )
        offset += 64
        end = data.index(b"\0", offset)
        name = data[offset:end].decode("utf-8", "replace")
        offset = end + 1
        (points2d,) = struct.unpack_from("<Q", data, offset)
        offset += 8 + 24 * points2d
        rotation = _qvec_to_rotation(qw, qx, qy, qz)
        images.append(
            {
                "id": image_id,
                "name": name,
                "camera_id": camera_id,
                "rotation": rotation,
                "translation": np.array([tx, ty, tz]),
            }
        )
    return sorted(images, key=lambda image: image["name"])


def read_points(data: bytes, limit: int) -> tuple[np.ndarray, np.ndarray, int]:
    """COLMAP points3D.bin: positions (float64) and colours (uint8) of at most `limit`
    points (an even random sample, the same on every call), and the model's point count."""
    (count,) = struct.unpack_from("<Q", data, 0)
    starts = np.empty(count, np.int64)
    offset = 8
    track = struct.Struct("<Q")
    for i in range(count):
        starts[i] = offset
        (length,) = track.unpack_from(data, offset + 43)
        offset += 51 + 8 * length
    if offset > len(data):
        raise struct.error("points3D.bin is truncated")
    if count > limit:
        starts = starts[np.sort(np.random.default_rng(0).choice(count, limit, replace=False))]
    raw = np.frombuffer(data, np.uint8)
    # Each record: id (8 bytes), xyz (3 doubles), rgb (3 bytes), error, track.
    fields = raw[starts[:, None] + np.arange(8, 35)]
    xyz = fields[:, :24].copy().view("<f8").reshape(len(starts), 3)
    rgb = fields[:, 24:27].copy()
    return xyz, rgb, count


def sparse_signature(sparse: Path, summary: Path | None = None) -> str:
    """A short key that changes whenever one of the model's files (or the summary beside
    the dataset, when given: it holds the scene's upright frame) changes."""
    parts = []
    for name in SPARSE_FILES:
        info = os.lstat(sparse / name)
        parts.append(f"{name}:{info.st_size}:{info.st_mtime_ns}")
    if summary is not None:
        try:
            info = os.lstat(summary)
            parts.append(f"summary:{info.st_size}:{info.st_mtime_ns}")
        except OSError:
            parts.append("summary:none")
    return hashlib.sha1("|".join(parts).encode(), usedforsecurity=False).hexdigest()[:16]


def _decimals(extent: float) -> int:
    """Decimal places that keep about 1/100,000 of the scene's extent."""
    if not np.isfinite(extent) or extent <= 0:
        return 4
    return int(min(8, max(0, np.ceil(5 - np.log10(extent)))))


def stored_scene(summary: Path) -> dict[str, Any] | None:
    """The `scene` object (the upright frame) of a preprocessing summary, or None when the
    summary is missing, unreadable or older than the scene."""
    try:
        data = json.loads(read_no_follow(summary, MAX_SUMMARY_BYTES))
    except (PreviewError, ValueError, UnicodeDecodeError):
        return None
    scene = data.get("scene") if isinstance(data, dict) else None
    return scene if valid_scene(scene) else None


def build_sparse(
    sparse: Path, max_points: int = MAX_SPARSE_POINTS, scene: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The sparse model in the web page's shape: at most `max_points` points (flat xyz and
    rgb arrays), every camera's centre (-Rᵀt), viewing direction and up vector, a suggested
    view (centre, radius and the cameras' mean up direction), and the scene's upright frame
    (`scene`: the one given, as stored with the dataset, else computed from this model; None
    without registered cameras) with `source` saying which."""
    try:
        cameras = read_cameras(read_no_follow(sparse / "cameras.bin", 64 * 1024 * 1024))
        images = read_images(read_no_follow(sparse / "images.bin", 2 * 1024**3))
        points = read_no_follow(sparse / "points3D.bin", 2 * 1024**3)
        xyz, rgb, total = read_points(points, max_points)
    except (struct.error, ValueError, IndexError) as exc:
        raise PreviewCorruptError(f"The sparse model cannot be read: {exc}") from exc
    finite = np.isfinite(xyz).all(axis=1)
    xyz, rgb = xyz[finite], rgb[finite]

    views = []
    for image in images:
        rt = image["rotation"].T
        centre = -rt @ image["translation"]
        camera = cameras.get(image["camera_id"], {})
        views.append(
            {
                "name": image["name"],
                "center": centre,
                "direction": rt @ np.array([0.0, 0.0, 1.0]),
                "up": rt @ np.array([0.0, -1.0, 0.0]),
                "width": camera.get("width"),
                "height": camera.get("height"),
                "fx": camera.get("fx"),
                "fy": camera.get("fy"),
            }
        )

    if len(xyz):
        centre = np.median(xyz, axis=0)
        radius = float(np.percentile(np.linalg.norm(xyz - centre, axis=1), 90))
    elif views:
        centre = np.mean([v["center"] for v in views], axis=0)
        radius = 1.0
    else:
        centre, radius = np.zeros(3), 1.0
    up = np.sum([v["up"] for v in views], axis=0) if views else np.array([0.0, -1.0, 0.0])
    up = up / np.linalg.norm(up) if np.linalg.norm(up) > 1e-9 else np.array([0.0, -1.0, 0.0])
    extent = float(np.ptp(xyz, axis=0).max()) if len(xyz) else radius * 2
    places = _decimals(extent)

    def vector(values: np.ndarray, digits: int = places) -> list[float]:
        return [round(float(v), digits) for v in values]

    if scene is not None:
        scene = {**scene, "source": "summary"}
    elif images:
        try:
            scene = scene_object(
                np.array([image["rotation"] for image in images]),
                np.array([image["translation"] for image in images]),
                xyz if len(xyz) else None,
            )
            scene["source"] = "computed"
        except ValueError:  # degenerate cameras: no up direction
            scene = None

    return {
        "points": {
            "total": total,
            "count": len(xyz),
            "positions": np.round(xyz, places).ravel().tolist(),
            "colors": rgb.astype(int).ravel().tolist(),
        },
        "cameras": [
            {
                **v,
                "center": vector(v["center"]),
                "direction": vector(v["direction"], 5),
                "up": vector(v["up"], 5),
            }
            for v in views
        ],
        "center": vector(centre),
        "radius": round(max(radius, 1e-6), places + 2),
        "up": vector(up, 5),
        "scene": scene,
    }


def sparse_preview(dataset: Path, cache_dir: Path) -> tuple[bytes, str]:
    """The sparse preview as JSON bytes and its signature (an ETag), built once per model
    version and cached as `cache_dir/sparse-{signature}.json`."""
    sparse = _dirs_real(dataset, "sparse", "0")
    if sparse is None:
        raise PreviewError("The dataset has no sparse model (sparse/0).")
    summary = dataset.parent / SUMMARY_NAME
    try:
        signature = sparse_signature(sparse, summary)
    except OSError as exc:
        raise PreviewError("The sparse model is incomplete.") from exc
    cached = cache_dir / f"sparse-{signature}.json"
    try:
        return read_no_follow(cached, 256 * 1024 * 1024), signature
    except PreviewError:
        pass
    payload = build_sparse(sparse, scene=stored_scene(summary))
    body = json.dumps(payload, separators=(",", ":")).encode()
    folder = cache_folder(cache_dir.parent, cache_dir.name)
    if folder is not None:
        for old in folder.glob("sparse-*.json"):
            old.unlink(missing_ok=True)
        write_atomic(folder, cached.name, body)
    return body, signature
