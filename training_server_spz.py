"""SPZ (version 3) export of a trained 3D Gaussian Splatting `.ply`, and a reader of SPZ files.

SPZ is Niantic's compressed splat format (github.com/nianticlabs/spz): a 16-byte header
(magic "NGSP", version, point count, SH degree, fractional bits, flags, reserved byte)
followed by six attribute streams, all of it gzip-compressed:

* positions: 3 × 24-bit signed fixed point per Gaussian (`fractional_bits` of fraction);
* alphas: opacity after the sigmoid, 8 bits;
* colours: the SH DC coefficients as `dc * 0.15 * 255 + 127.5`, 8 bits each;
* scales: log scales as `(s + 10) * 16`, 8 bits each;
* rotations (version 3): "smallest three" quaternions in 32 bits, the index of the largest
  component in the top 2 bits, then three 10-bit fields (sign bit + 9-bit magnitude scaled by
  √2) for the other components in x, y, z, w order, the last one in the lowest bits;
* SH coefficients of degree 1–3: signed 8 bits (`x * 128 + 128`), coefficient-major with the
  colour channel varying fastest, kept to 5 bits for degree 1 and 4 bits for degrees 2–3.

Coordinates. SPZ stores RUB coordinates (x right, y up, z back: OpenGL and three.js); a 3DGS
`.ply` from COLMAP is RDF (y down, z forward), so without a transform the writer applies the
spec's RDF → RUB conversion, a half-turn about x (`SPZ_FROM_PLY`). Spark reads SPZ values as
they are, so such a file shows the right way up without any rotation of the mesh. A caller
that knows the scene's upright frame (pipeline/orientation.py) passes that similarity instead:
it replaces the default and should itself map into a y-up frame.

Rotating a Gaussian rotates its view-dependent colour too: the SH coefficients of each band
are turned by that band's rotation matrix (found exactly, by solving on sample directions), so
a transformed file looks the same from the transformed viewpoints.

Command line: `python training_server_spz.py in.ply out.spz [--sh-degree N]`.
"""

from __future__ import annotations

import argparse
import gzip
import math
import struct
import sys
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 0x5053474E  # "NGSP" read as a little-endian uint32
VERSION = 3
HEADER = struct.Struct("<IIIBBBB")  # magic, version, points, sh degree, fractional bits, flags, 0
FLAG_ANTIALIASED = 0x1
COLOR_SCALE = 0.15
MAX_SH_DEGREE = 3  # Spark 2.2.0 reads degrees 0-3
SH1_BITS, SH_REST_BITS = 5, 4  # the spec's default SH quantisation
DEFAULT_FRACTIONAL_BITS = 12  # the spec's choice: 1/4096 of a unit
POSITION_LIMIT = (1 << 23) - 1  # largest 24-bit signed value
SQRT1_2 = math.sqrt(0.5)
COMPRESS_LEVEL = 6  # zlib's default, as the reference writer uses
# Run-length-only matching: the quantised bytes repeat in runs (SH buckets, mostly zero) but
# rarely as longer strings, so on this payload Z_RLE is both smaller than zlib's default
# strategy (about 3 %) and about 6× faster. Any inflater reads it: it is plain deflate.
COMPRESS_STRATEGY = zlib.Z_RLE
SH_SLICE = 1 << 18  # Gaussians whose SH are turned and quantised at a time
COMPRESS_CHUNK = 8 << 20  # bytes per independently deflated piece of the one gzip stream

# The spec's RDF (.ply, COLMAP, OpenCV) -> RUB (SPZ, three.js) conversion: x stays, y and z flip.
SPZ_FROM_PLY = np.diag([1.0, -1.0, -1.0, 1.0])

PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}


class SpzError(ValueError):
    """The input is not a usable 3DGS `.ply`, or not an SPZ file this module reads."""


def sh_coefficients(degree: int) -> int:
    """Higher-order SH coefficients per colour channel for an SH degree (0, 3, 8, 15)."""
    return (degree + 1) ** 2 - 1


def sh_degree_for(coefficients: int) -> int:
    """The SH degree whose higher-order coefficients per channel number `coefficients`."""
    for degree in range(5):
        if sh_coefficients(degree) == coefficients:
            return degree
    raise SpzError(f"{coefficients} SH coefficients per channel match no SH degree")


@dataclass
class Gaussians:
    """A cloud of 3D Gaussians with the raw (pre-activation) values of a 3DGS `.ply`.

    positions (N, 3); scales (N, 3), natural log; rotations (N, 4), quaternions w, x, y, z
    (the `.ply`'s rot_0..3, not necessarily normalised); alphas (N,), opacity logits; colors
    (N, 3), SH DC coefficients (f_dc_0..2); sh (N, K, 3), higher-order SH coefficients,
    coefficient-major with the channel last (K = 0, 3, 8 or 15). float32 throughout.
    """

    positions: np.ndarray
    scales: np.ndarray
    rotations: np.ndarray
    alphas: np.ndarray
    colors: np.ndarray
    sh: np.ndarray

    @property
    def count(self) -> int:
        """Number of Gaussians."""
        return int(self.positions.shape[0])

    @property
    def sh_degree(self) -> int:
        """SH degree of the colours (0–3)."""
        return sh_degree_for(int(self.sh.shape[1]))

    def with_sh_degree(self, degree: int) -> Gaussians:
        """The same Gaussians with the SH bands above `degree` dropped."""
        if not 0 <= degree <= self.sh_degree:
            raise SpzError(f"SH degree {degree} is not between 0 and {self.sh_degree}")
        keep = sh_coefficients(degree)
        return Gaussians(
            self.positions, self.scales, self.rotations, self.alphas, self.colors, self.sh[:, :keep]
        )


@dataclass(frozen=True)
class SpzHeader:
    """The fixed header of an SPZ file."""

    version: int
    count: int
    sh_degree: int
    fractional_bits: int
    antialiased: bool


# -- reading a 3DGS .ply ---------------------------------------------------------------------


def _ply_header(data: bytes | memoryview) -> tuple[int, int, list[tuple[str, str]], str]:
    """Body offset, vertex count, vertex properties (name, numpy type) and byte order."""
    head = bytes(data[: min(len(data), 1 << 16)])
    end = head.find(b"end_header\n")
    if not head.startswith(b"ply") or end < 0:
        raise SpzError("not a PLY file (no 'ply' … 'end_header' header)")
    lines = head[:end].decode("ascii", "replace").splitlines()
    fmt = ""
    count = -1
    properties: list[tuple[str, str]] = []
    element = ""
    before_vertex = 0  # bytes of elements that come before "vertex" (none in 3DGS files)
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in {"comment", "obj_info"}:
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3:
            element = words[1]
            if element == "vertex":
                count = int(words[2])
            elif count < 0 and int(words[2]) > 0:
                before_vertex = 1
        elif words[0] == "property" and element == "vertex":
            if len(words) != 3 or words[1] not in PLY_TYPES:
                raise SpzError(f"unsupported vertex property: {line.strip()!r}")
            properties.append((words[2], PLY_TYPES[words[1]]))
    if fmt not in {"binary_little_endian", "binary_big_endian"}:
        raise SpzError(f"PLY format {fmt or '?'!r} is not supported (binary PLY only)")
    if count < 0:
        raise SpzError("the PLY file has no vertex element")
    if before_vertex:
        raise SpzError("the PLY file has elements before its vertices")
    order = "<" if fmt == "binary_little_endian" else ">"
    return end + len(b"end_header\n"), count, properties, order


def read_ply(path: Path | str) -> Gaussians:
    """Read the Gaussians of a binary 3DGS `.ply` (x, y, z, f_dc_*, f_rest_*, opacity,
    scale_*, rot_*; other properties such as normals are ignored).

    The body is memory-mapped; the SH coefficients of an all-float32 file stay a view of
    the mapping (read when encoded), so the file is never held twice in memory."""
    path = Path(path)
    with path.open("rb") as handle:
        offset, count, properties, order = _ply_header(handle.read(1 << 16))
    dtype = np.dtype([(name, order + kind) for name, kind in properties])
    size = path.stat().st_size
    if size < offset + count * dtype.itemsize:
        raise SpzError(
            f"the PLY body holds {size - offset} bytes, {count} vertices need "
            f"{count * dtype.itemsize}"
        )
    names = [name for name, _ in properties]
    table: np.ndarray | None = None
    if count == 0:
        records = np.zeros(0, dtype=dtype)
    elif all(kind == "f4" for _, kind in properties):
        # The usual case: every property a float32. Read columns of one (N, P) matrix.
        table = np.memmap(path, order + "f4", "r", offset, (count, len(names)))
    else:
        records = np.memmap(path, dtype, "r", offset, (count,))

    if table is not None:

        def columns(wanted: Sequence[str]) -> np.ndarray:
            return table[:, [names.index(n) for n in wanted]].astype(np.float32)

    else:

        def columns(wanted: Sequence[str]) -> np.ndarray:
            out = np.empty((count, len(wanted)), dtype=np.float32)
            for i, n in enumerate(wanted):
                out[:, i] = records[n]
            return out

    required = ["x", "y", "z", "opacity", *(f"f_dc_{i}" for i in range(3))]
    required += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    missing = [n for n in required if n not in names]
    if missing:
        raise SpzError(f"not a 3DGS PLY: missing vertex properties {', '.join(missing)}")
    rest = 0
    while f"f_rest_{rest}" in names:
        rest += 1
    if rest % 3:
        raise SpzError(f"{rest} f_rest properties are not a whole number per colour channel")
    per_channel = rest // 3
    degree = sh_degree_for(per_channel)
    keep = sh_coefficients(min(degree, MAX_SH_DEGREE))
    # .ply order: channel-major (f_rest_{c*K + k}); SPZ order: coefficient-major, channel last.
    first = names.index("f_rest_0") if rest else 0
    in_order = names[first : first + rest] == [f"f_rest_{i}" for i in range(rest)]
    if not keep:
        sh = np.zeros((count, 0, 3), dtype=np.float32)
    elif table is not None and in_order and order == "<" and per_channel == keep:
        # A view: (N, 3·K) channel-major columns seen as (N, K, 3).
        sh = table[:, first : first + rest].reshape(count, 3, keep).transpose(0, 2, 1)
    else:
        wanted = [f"f_rest_{c * per_channel + k}" for k in range(keep) for c in range(3)]
        sh = columns(wanted).reshape(count, keep, 3)
    return Gaussians(
        positions=columns(["x", "y", "z"]),
        scales=columns([f"scale_{i}" for i in range(3)]),
        rotations=columns([f"rot_{i}" for i in range(4)]),
        alphas=columns(["opacity"])[:, 0].copy(),
        colors=columns([f"f_dc_{i}" for i in range(3)]),
        sh=sh,
    )


# -- similarity transforms -----------------------------------------------------------------


def split_similarity(matrix: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale, rotation, translation) of a 4×4 similarity `[s·R | t; 0 0 0 1]`; SpzError when
    it is not one (shear, mirror, or a last row other than 0 0 0 1)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise SpzError("the transform must be a finite 4×4 matrix")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise SpzError("the transform's last row must be 0 0 0 1")
    linear = m[:3, :3]
    det = float(np.linalg.det(linear))
    if det <= 0:
        raise SpzError("the transform must keep handedness (a mirror cannot turn quaternions)")
    scale = det ** (1.0 / 3.0)
    rotation = linear / scale
    if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-5):
        raise SpzError("the transform must be a rotation, a uniform scale and a translation")
    return scale, rotation, m[:3, 3].copy()


def rotation_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """The unit quaternion (w, x, y, z) of a 3×3 rotation matrix."""
    r = np.asarray(rotation, dtype=np.float64)
    # Shepperd's method: start from the largest of the four squared components.
    trace = np.trace(r)
    squares = np.array([trace, r[0, 0], r[1, 1], r[2, 2]])
    i = int(np.argmax(squares))
    if i == 0:
        w = math.sqrt(max(1.0 + trace, 0.0)) / 2
        q = [
            w,
            (r[2, 1] - r[1, 2]) / (4 * w),
            (r[0, 2] - r[2, 0]) / (4 * w),
            (r[1, 0] - r[0, 1]) / (4 * w),
        ]
    else:
        j, k = (i % 3) + 1, ((i + 1) % 3) + 1  # the other two axes, cyclically
        a, b, c = i - 1, j - 1, k - 1
        v = math.sqrt(max(1.0 + 2 * r[a, a] - trace, 0.0)) / 2
        q = [0.0] * 4
        q[0] = (r[c, b] - r[b, c]) / (4 * v)
        q[i] = v
        q[j] = (r[b, a] + r[a, b]) / (4 * v)
        q[k] = (r[c, a] + r[a, c]) / (4 * v)
    out = np.array(q)
    return out / np.linalg.norm(out)


def quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton products a ⊗ b of quaternions (…, 4) in w, x, y, z order."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def sh_basis(directions: np.ndarray, degree: int) -> np.ndarray:
    """The real SH basis functions of band `degree` (1–3) at unit `directions` (M, 3), as the
    3DGS renderers evaluate them (same order and signs): shape (M, 2·degree + 1)."""
    x, y, z = (directions[:, i] for i in range(3))
    if degree == 1:
        c1 = 0.4886025119029199
        return np.stack([-c1 * y, c1 * z, -c1 * x], axis=1)
    xx, yy, zz = x * x, y * y, z * z
    if degree == 2:
        c = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005)
        c += (-1.0925484305920792, 0.5462742152960396)
        terms = [x * y, y * z, 2 * zz - xx - yy, x * z, xx - yy]
        return np.stack([k * t for k, t in zip(c, terms, strict=True)], axis=1)
    if degree == 3:
        c = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154)
        c += (-0.4570457994644658, 1.445305721320277, -0.5900435899266435)
        terms = [
            y * (3 * xx - yy),
            x * y * z,
            y * (4 * zz - xx - yy),
            z * (2 * zz - 3 * xx - 3 * yy),
            x * (4 * zz - xx - yy),
            z * (xx - yy),
            x * (xx - 3 * yy),
        ]
        return np.stack([k * t for k, t in zip(c, terms, strict=True)], axis=1)
    raise SpzError(f"SH band {degree} is not 1, 2 or 3")


def _sample_directions(count: int = 64) -> np.ndarray:
    """Evenly spread unit vectors (a Fibonacci sphere)."""
    i = np.arange(count) + 0.5
    z = 1 - 2 * i / count
    r = np.sqrt(1 - z * z)
    phi = i * math.pi * (3 - math.sqrt(5))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def sh_rotation(rotation: np.ndarray, degree: int) -> np.ndarray:
    """The (2l+1)×(2l+1) matrix D of band l = `degree` such that coefficients `D @ c` give, at
    direction `R d`, the colour that `c` gave at `d` (the band's Wigner-D in the 3DGS basis).

    Each band's functions span a rotation-invariant space, so solving Y(d) D = Y(Rᵀ d) on
    more sample directions than unknowns gives D exactly (up to rounding)."""
    d = _sample_directions()
    a = sh_basis(d, degree)
    b = sh_basis(d @ np.asarray(rotation, dtype=np.float64), degree)  # rows: Rᵀ d
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    return solution


def sh_rotation_block(rotation: np.ndarray, degree: int) -> np.ndarray:
    """The block-diagonal matrix turning all K = (degree+1)² − 1 higher-order coefficients of
    one channel at once (bands 1…degree, each by `sh_rotation`)."""
    k = sh_coefficients(degree)
    block = np.zeros((k, k))
    for band in range(1, degree + 1):
        lo, hi = sh_coefficients(band - 1), sh_coefficients(band)
        block[lo:hi, lo:hi] = sh_rotation(rotation, band)
    return block


def rotate_sh(sh: np.ndarray, rotation: np.ndarray, block: np.ndarray | None = None) -> np.ndarray:
    """Higher-order SH coefficients (N, K, 3) turned by a 3×3 rotation (see `sh_rotation`);
    `block` is `sh_rotation_block(rotation, degree)` when the caller already has it."""
    n, k, _ = sh.shape
    if k == 0:
        return np.zeros((n, 0, 3), dtype=np.float32)
    if block is None:
        block = sh_rotation_block(rotation, sh_degree_for(k))
    diagonal = np.diag(block)
    if np.max(np.abs(block - np.diag(diagonal))) < 1e-9:  # axis flips (the default): signs
        return sh * diagonal.astype(np.float32)[None, :, None]
    # One matrix product over every Gaussian and channel: (N·3, K) @ Dᵀ.
    per_channel = np.ascontiguousarray(sh.transpose(0, 2, 1), dtype=np.float32).reshape(n * 3, k)
    turned = (per_channel @ block.T.astype(np.float32)).reshape(n, 3, k)
    return turned.transpose(0, 2, 1)


def transform_gaussians(gaussians: Gaussians, matrix: np.ndarray) -> Gaussians:
    """The Gaussians moved by a 4×4 similarity: positions p → s·R·p + t, rotations q → q_R ⊗ q,
    log scales + ln s, and each SH band turned by its rotation matrix."""
    scale, rotation, translation = split_similarity(matrix)
    positions = gaussians.positions.astype(np.float64) @ (scale * rotation).T + translation
    turn = rotation_to_quaternion(rotation).astype(np.float32)
    rotations = quaternion_multiply(turn[None, :], gaussians.rotations.astype(np.float32))
    return Gaussians(
        positions=positions.astype(np.float32),
        scales=(gaussians.scales + np.float32(math.log(scale))).astype(np.float32),
        rotations=rotations.astype(np.float32),
        alphas=gaussians.alphas,
        colors=gaussians.colors,
        sh=rotate_sh(gaussians.sh, rotation),
    )


# -- encoding --------------------------------------------------------------------------------


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round to the nearest integer and clamp to 0–255 (the spec's toUint8)."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def choose_fractional_bits(positions: np.ndarray, most: int = DEFAULT_FRACTIONAL_BITS) -> int:
    """The spec's 12 fractional bits, or fewer when the farthest coordinate would not fit in
    24 bits with 12 (beyond ±2048 units)."""
    extent = float(np.max(np.abs(positions))) if positions.size else 0.0
    bits = most
    while bits > 0 and extent * (1 << bits) > POSITION_LIMIT:
        bits -= 1
    return bits


def _pack_positions(positions: np.ndarray, fractional_bits: int) -> np.ndarray:
    """24-bit little-endian fixed point, 9 bytes per Gaussian."""
    fixed = np.rint(positions.astype(np.float64) * (1 << fractional_bits))
    fixed = np.clip(fixed, -POSITION_LIMIT - 1, POSITION_LIMIT).astype("<i4")
    return fixed.view(np.uint8).reshape(-1, 4)[:, :3].reshape(-1)


def _pack_rotations(rotations: np.ndarray) -> np.ndarray:
    """Version-3 smallest-three quaternions, 4 bytes per Gaussian."""
    q = rotations.astype(np.float32)
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    q = np.where(norms > 0, q / np.where(norms > 0, norms, 1), np.float32([1, 0, 0, 0]))
    xyzw = q[:, [1, 2, 3, 0]]  # the spec's component order
    largest = np.argmax(np.abs(xyzw), axis=1)
    rows = np.arange(len(xyzw))
    negate = xyzw[rows, largest] < 0
    comp = largest.astype(np.uint32)
    for i in range(4):
        keep = largest != i
        negbit = ((xyzw[:, i] < 0) ^ negate).astype(np.uint32)
        mag = np.float32(511) * (np.abs(xyzw[:, i]) / np.float32(SQRT1_2)) + np.float32(0.5)
        mag = np.minimum(mag.astype(np.uint32), 511)
        comp = np.where(keep, (comp << 10) | (negbit << 9) | mag, comp)
    return comp.astype("<u4").view(np.uint8)


def _quantize_sh(values: np.ndarray, bits: int) -> np.ndarray:
    """The spec's quantizeSH: 8-bit signed (x·128 + 128), then to the nearest multiple of
    2^(8 − bits) (which gzip then stores cheaply)."""
    bucket = 1 << (8 - bits)
    q = np.rint(values * np.float32(128)).astype(np.int32) + 128
    q = (q + bucket // 2) // bucket * bucket
    return np.clip(q, 0, 255).astype(np.uint8)


def _gzip(data: bytes | memoryview, workers: int = 2) -> bytes:
    """One gzip member (what the spec's readers inflate), deflated in pieces on `workers`
    threads: each piece but the last ends on a sync flush, so the pieces join into a single
    deflate stream (pigz's method)."""
    view = memoryview(data)
    pieces = [view[i : i + COMPRESS_CHUNK] for i in range(0, len(view), COMPRESS_CHUNK)] or [view]

    def deflate(index: int) -> bytes:
        packer = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, -15, 9, COMPRESS_STRATEGY)
        last = index == len(pieces) - 1
        return packer.compress(pieces[index]) + packer.flush(
            zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
        )

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        bodies = list(pool.map(deflate, range(len(pieces))))
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime, unknown OS
    trailer = struct.pack("<II", zlib.crc32(view) & 0xFFFFFFFF, len(view) & 0xFFFFFFFF)
    return b"".join([header, *bodies, trailer])


def encode_spz(
    gaussians: Gaussians,
    *,
    sh_degree: int | None = None,
    transform: np.ndarray | None = None,
    fractional_bits: int | None = None,
    antialiased: bool = False,
    workers: int = 2,
) -> bytes:
    """The Gaussians as SPZ version 3 bytes.

    `sh_degree` (0–3) keeps fewer SH bands than the input has (default: all, at most 3).
    `transform` is the 4×4 similarity from the Gaussians' coordinates to the SPZ's RUB frame
    (default `SPZ_FROM_PLY`, for the RDF frame of a COLMAP-trained `.ply`).
    `fractional_bits` defaults to `choose_fractional_bits`. `workers` threads compress.
    """
    degree = min(gaussians.sh_degree, MAX_SH_DEGREE) if sh_degree is None else sh_degree
    if not 0 <= degree <= min(gaussians.sh_degree, MAX_SH_DEGREE):
        raise SpzError(f"SH degree {degree} is not between 0 and {gaussians.sh_degree}")
    matrix = SPZ_FROM_PLY if transform is None else transform
    _, rotation, _ = split_similarity(matrix)
    source = gaussians.with_sh_degree(degree)
    without_sh = np.zeros((source.count, 0, 3), dtype=np.float32)
    g = Gaussians(
        source.positions, source.scales, source.rotations, source.alphas, source.colors, without_sh
    )
    g = transform_gaussians(g, matrix)
    bits = choose_fractional_bits(g.positions) if fractional_bits is None else fractional_bits
    if not 0 <= bits <= 23:
        raise SpzError(f"fractional bits {bits} are not between 0 and 23")
    n = g.count
    header = HEADER.pack(MAGIC, VERSION, n, degree, bits, FLAG_ANTIALIASED if antialiased else 0, 0)
    logits = np.clip(g.alphas.astype(np.float32), -40, 40)  # beyond, the byte is 0 or 255
    alphas = _to_uint8(255.0 / (1.0 + np.exp(-logits)))
    colors = _to_uint8(g.colors * np.float32(COLOR_SCALE * 255.0) + np.float32(0.5 * 255.0))
    scales = _to_uint8((g.scales + np.float32(10.0)) * np.float32(16.0))
    parts = [
        header,
        _pack_positions(g.positions, bits).tobytes(),
        alphas.tobytes(),
        colors.tobytes(),
        scales.tobytes(),
        _pack_rotations(g.rotations).tobytes(),
    ]
    if degree:
        # In slices of Gaussians, so no full float copy of the largest attribute is made.
        block = sh_rotation_block(rotation, degree)
        sh = np.empty((n, sh_coefficients(degree), 3), dtype=np.uint8)
        for start in range(0, n, SH_SLICE):
            turned = rotate_sh(source.sh[start : start + SH_SLICE], rotation, block)
            sh[start : start + SH_SLICE, :3] = _quantize_sh(turned[:, :3], SH1_BITS)
            sh[start : start + SH_SLICE, 3:] = _quantize_sh(turned[:, 3:], SH_REST_BITS)
        parts.append(sh.tobytes())
    return _gzip(b"".join(parts), workers)


@dataclass(frozen=True)
class SpzResult:
    """What `ply_to_spz` wrote."""

    path: Path
    count: int
    sh_degree: int
    fractional_bits: int
    bytes: int
    ply_bytes: int


def ply_to_spz(
    ply_path: Path | str,
    spz_path: Path | str,
    *,
    sh_degree: int | None = None,
    transform: np.ndarray | None = None,
) -> SpzResult:
    """Read a 3DGS `.ply`, encode it (see `encode_spz`) and write the SPZ file atomically
    (a temporary file beside it, then a rename)."""
    ply_path, spz_path = Path(ply_path), Path(spz_path)
    gaussians = read_ply(ply_path)
    data = encode_spz(gaussians, sh_degree=sh_degree, transform=transform)
    header = read_header(data)
    partial = spz_path.with_name(spz_path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(spz_path)
    return SpzResult(
        spz_path,
        header.count,
        header.sh_degree,
        header.fractional_bits,
        len(data),
        ply_path.stat().st_size,
    )


# -- decoding ----------------------------------------------------------------------------------


def read_header(data: bytes) -> SpzHeader:
    """The header of SPZ bytes (gzip-compressed, versions 1–3)."""
    try:
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, HEADER.size)
    except zlib.error as exc:
        raise SpzError(f"not a gzip-compressed SPZ file: {exc}") from exc
    return _parse_header(head)


def _parse_header(head: bytes) -> SpzHeader:
    if len(head) < HEADER.size:
        raise SpzError("the SPZ data ends inside its header")
    magic, version, count, degree, bits, flags, _ = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise SpzError(f"bad SPZ magic {magic:#010x}")
    if not 1 <= version <= 3:
        raise SpzError(f"SPZ version {version} is not supported (1–3)")
    if degree > MAX_SH_DEGREE:
        raise SpzError(f"SH degree {degree} is not supported (0–3)")
    return SpzHeader(version, count, degree, bits, bool(flags & FLAG_ANTIALIASED))


def _unpack_rotations(packed: np.ndarray) -> np.ndarray:
    """Smallest-three quaternions (N·4 bytes) back to (N, 4) w, x, y, z."""
    comp = packed.view("<u4").astype(np.uint32)
    largest = (comp >> 30).astype(np.intp)
    xyzw = np.zeros((len(comp), 4), dtype=np.float32)
    for i in (3, 2, 1, 0):
        here = largest != i
        value = np.float32(SQRT1_2) * (comp & 511).astype(np.float32) / np.float32(511)
        value = np.where((comp >> 9) & 1, -value, value)
        xyzw[:, i] = np.where(here, value, 0)
        comp = np.where(here, comp >> 10, comp)
    rows = np.arange(len(xyzw))
    xyzw[rows, largest] = np.sqrt(np.maximum(0, 1 - np.sum(xyzw * xyzw, axis=1)))
    return xyzw[:, [3, 0, 1, 2]]


def decode_spz(data: bytes) -> tuple[SpzHeader, Gaussians]:
    """Read SPZ bytes (versions 1–3) back into raw Gaussian values, in the file's own frame
    (RUB for files this module writes): log scales, opacity logits, SH DC colours."""
    try:
        body = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise SpzError(f"not a gzip-compressed SPZ file: {exc}") from exc
    header = _parse_header(body)
    n, k = header.count, sh_coefficients(header.sh_degree)
    position_bytes = 6 if header.version == 1 else 9
    rotation_bytes = 4 if header.version >= 3 else 3
    sizes = [n * position_bytes, n, n * 3, n * 3, n * rotation_bytes, n * k * 3]
    if len(body) < HEADER.size + sum(sizes):
        raise SpzError(f"the SPZ data is too short for {n} Gaussians")
    buf = np.frombuffer(body, dtype=np.uint8, offset=HEADER.size, count=sum(sizes))
    ends = np.cumsum(sizes)
    pos, alpha, color, scale, rot, sh = np.split(buf, ends[:-1])
    if header.version == 1:
        positions = pos.view("<f2").astype(np.float32).reshape(n, 3)
    else:
        triples = pos.reshape(n * 3, 3).astype(np.int32)
        fixed = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        fixed = np.where(fixed & 0x800000, fixed - (1 << 24), fixed)
        positions = (fixed.astype(np.float32) / np.float32(1 << header.fractional_bits)).reshape(
            n, 3
        )
    opacity = alpha.astype(np.float32) / np.float32(255)
    with np.errstate(divide="ignore"):
        alphas = np.log(opacity / (1 - opacity)).astype(np.float32)
    if header.version >= 3:
        rotations = _unpack_rotations(rot.copy())
    else:
        xyz = rot.reshape(n, 3).astype(np.float32) / np.float32(127.5) - 1
        w = np.sqrt(np.maximum(0, 1 - np.sum(xyz * xyz, axis=1)))
        rotations = np.concatenate([w[:, None], xyz], axis=1)
    return header, Gaussians(
        positions=positions,
        scales=(scale.astype(np.float32) / 16 - 10).reshape(n, 3),
        rotations=rotations.astype(np.float32),
        alphas=alphas,
        colors=((color.astype(np.float32) / 255 - 0.5) / np.float32(COLOR_SCALE)).reshape(n, 3),
        sh=((sh.astype(np.float32) - 128) / 128).reshape(n, k, 3),
    )


def read_spz(path: Path | str) -> tuple[SpzHeader, Gaussians]:
    """`decode_spz` of a file."""
    return decode_spz(Path(path).read_bytes())


# -- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python training_server_spz.py in.ply out.spz [--sh-degree N]`."""
    parser = argparse.ArgumentParser(description="Convert a 3DGS .ply to an SPZ (version 3) file.")
    parser.add_argument("ply", type=Path, help="the trained model's .ply")
    parser.add_argument("spz", type=Path, help="the .spz file to write")
    parser.add_argument(
        "--sh-degree",
        type=int,
        choices=range(MAX_SH_DEGREE + 1),
        default=None,
        help="keep SH bands up to this degree (default: all the .ply has, at most 3)",
    )
    args = parser.parse_args(argv)
    try:
        result = ply_to_spz(args.ply, args.spz, sh_degree=args.sh_degree)
    except (OSError, SpzError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{result.path}: {result.count} Gaussians, SH degree {result.sh_degree}, "
        f"{result.bytes} bytes ({result.bytes / max(result.ply_bytes, 1):.3f}× the .ply)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
