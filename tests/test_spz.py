"""SPZ export (training_server_spz.py): a 3DGS .ply written with plyfile is encoded, then read
back by this module's decoder and by Niantic's own reader (the spz library compiled to
WebAssembly, npm @spz-loader/core, run with node), and every field is compared with the .ply
within the quantisation bounds the SPZ format allows.

The bounds (half of one quantisation step, plus float32 rounding):
  positions  2^-(fractional_bits+1) units (24-bit fixed point)
  alphas     0.5/255 in opacity (after the sigmoid; 8 bits)
  colours    0.5/(0.15·255) ≈ 0.0131 in SH DC units (8 bits over ±3.33)
  scales     1/32 in natural-log scale (8 bits, 16 steps per unit)
  rotations  0.3° of rotation angle: each of the three smallest components is off by at most
             (1/√2)/511/2 ≈ 6.9e-4, the recomputed largest by at most 3× that, so the
             quaternion moves by ≤ √12·6.9e-4 and the angle (≈ 2·|Δq|) by ≤ 0.275°
  SH         degree 1: 4.5/128 (8-bit rounding, then to a multiple of 8); degrees 2–3:
             8.5/128 (then to a multiple of 16)
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

import training_server_spz as spz

REPO = Path(__file__).resolve().parents[1]
SPZ_LOADER = REPO / "node_modules" / "@spz-loader" / "core" / "dist" / "index.js"

POSITION_BOUND = 2.0**-13 + 4e-6  # 12 fractional bits; inputs within ±50 (float32 rounding)
ALPHA_BOUND = 0.5 / 255 + 1e-6
COLOR_BOUND = 0.5 / (0.15 * 255) + 1e-5
SCALE_BOUND = 1 / 32 + 1e-5
ROTATION_BOUND_DEG = 0.3
SH1_BOUND = 4.5 / 128 + 1e-6
SH_REST_BOUND = 8.5 / 128 + 1e-6

# The reference 3DGS renderer's real SH basis (graphdeco-inria sh_utils.eval_sh), written out
# here independently of the module under test.
C1 = 0.4886025119029199
C2 = [1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792]
C2 += [0.5462742152960396]
C3 = [-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154]
C3 += [-0.4570457994644658, 1.445305721320277, -0.5900435899266435]


def eval_sh(sh: np.ndarray, d: np.ndarray) -> np.ndarray:
    """View-dependent colour (without the DC term) of coefficients (N, 15, 3) towards unit
    directions d (M, 3): (N, M, 3)."""
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    xx, yy, zz = x * x, y * y, z * z
    basis = [
        -C1 * y,
        C1 * z,
        -C1 * x,
        C2[0] * x * y,
        C2[1] * y * z,
        C2[2] * (2 * zz - xx - yy),
        C2[3] * x * z,
        C2[4] * (xx - yy),
        C3[0] * y * (3 * xx - yy),
        C3[1] * x * y * z,
        C3[2] * y * (4 * zz - xx - yy),
        C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
        C3[4] * x * (4 * zz - xx - yy),
        C3[5] * z * (xx - yy),
        C3[6] * x * (xx - 3 * yy),
    ]
    y_mat = np.stack(basis[: sh.shape[1]], axis=1)  # (M, K)
    return np.einsum("mk,nkc->nmc", y_mat, sh.astype(np.float64))


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) of quaternions (N, 4) in w, x, y, z order (normalised)."""
    q = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees of the rotation between rotation matrices a and b (N, 3, 3)."""
    # ‖a − b‖_F = 2√2·sin(θ/2): well conditioned for small angles, unlike the trace.
    chord = np.linalg.norm(a - b, axis=(1, 2)) / (2 * math.sqrt(2))
    return np.degrees(2 * np.arcsin(np.clip(chord, 0, 1)))


def opacity(logits: np.ndarray) -> np.ndarray:
    """The sigmoid, safe for ±inf."""
    return 0.5 * (1 + np.tanh(np.asarray(logits, dtype=np.float64) / 2))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def write_3dgs_ply(path: Path, n: int, degree: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A binary 3DGS .ply written by plyfile, with values inside SPZ's ranges; returns them."""
    rng = np.random.default_rng(seed)
    k = spz.sh_coefficients(degree)
    values = {
        "positions": rng.uniform(-50, 50, (n, 3)),
        "colors": rng.uniform(-3.2, 3.2, (n, 3)),
        "sh": rng.uniform(-0.95, 0.95, (n, k, 3)),  # coefficient-major, channel last
        "alphas": rng.uniform(-6, 6, n),
        "scales": rng.uniform(-9.5, 5.5, (n, 3)),
        "rotations": rng.normal(size=(n, 4)) * rng.uniform(0.5, 2, (n, 1)),  # not normalised
    }
    values = {key: v.astype(np.float32) for key, v in values.items()}
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * k)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    rest = values["sh"].transpose(0, 2, 1).reshape(n, 3 * k)  # .ply: channel-major
    columns = [values["positions"], np.zeros((n, 3), np.float32), values["colors"], rest]
    columns += [values["alphas"][:, None], values["scales"], values["rotations"]]
    table = np.concatenate(columns, axis=1)
    vertex = np.empty(n, dtype=[(name, "f4") for name in names])
    for i, name in enumerate(names):
        vertex[name] = table[:, i]
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
    return values


def covariances(scales: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Σ = R S² Rᵀ for log scales and w, x, y, z quaternions."""
    r = quat_to_matrix(rotations)
    s2 = np.exp(2 * scales.astype(np.float64))
    return np.einsum("nij,nj,nkj->nik", r, s2, r)


def check_fields(decoded: spz.Gaussians, truth: dict[str, np.ndarray], bits: int = 12) -> None:
    """Every field of `decoded` within the format's bounds of `truth` (same frame)."""
    assert decoded.count == len(truth["positions"])
    position_bound = 2.0 ** -(bits + 1) + 4e-6
    assert np.max(np.abs(decoded.positions - truth["positions"])) <= position_bound
    assert np.max(np.abs(opacity(decoded.alphas) - opacity(truth["alphas"]))) <= ALPHA_BOUND
    assert np.max(np.abs(decoded.colors - truth["colors"])) <= COLOR_BOUND
    assert np.max(np.abs(decoded.scales - truth["scales"])) <= SCALE_BOUND
    angle = rotation_angle_deg(
        quat_to_matrix(decoded.rotations), quat_to_matrix(truth["rotations"])
    )
    assert np.max(angle) <= ROTATION_BOUND_DEG
    k = decoded.sh.shape[1]
    assert k == truth["sh"].shape[1]
    if k:
        assert np.max(np.abs(decoded.sh[:, :3] - truth["sh"][:, :3])) <= SH1_BOUND
    if k > 3:
        assert np.max(np.abs(decoded.sh[:, 3:] - truth["sh"][:, 3:])) <= SH_REST_BOUND


@pytest.fixture
def ply(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "point_cloud.ply"
    return path, write_3dgs_ply(path, 4000)


def test_read_ply_matches_plyfile(ply: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, truth = ply
    g = spz.read_ply(path)
    assert g.count == 4000
    assert g.sh_degree == 3
    for key in truth:
        np.testing.assert_array_equal(getattr(g, key), truth[key])


def test_round_trip_every_field_within_quantisation(ply: tuple[Path, dict]) -> None:
    path, truth = ply
    data = spz.encode_spz(spz.read_ply(path), transform=np.eye(4))
    body = gzip.decompress(data)
    magic, version, count, degree, bits, flags, reserved = struct.unpack_from("<IIIBBBB", body)
    assert body[:4] == b"NGSP" and magic == 0x5053474E
    assert (version, count, degree, bits, flags, reserved) == (3, 4000, 3, 12, 0, 0)
    # Header, then positions 9, alpha 1, colour 3, scale 3, rotation 4, SH 45 bytes each.
    assert len(body) == 16 + 4000 * (9 + 1 + 3 + 3 + 4 + 45)
    header, decoded = spz.decode_spz(data)
    assert header == spz.SpzHeader(3, 4000, 3, 12, False)
    check_fields(decoded, truth)


def test_default_frame_is_the_specs_rub(ply: tuple[Path, dict]) -> None:
    """Without a transform the .ply's RDF frame becomes SPZ's RUB: y and z flip, and the
    Gaussians' shapes and view-dependent colours turn with them."""
    path, truth = ply
    _, decoded = spz.decode_spz(spz.encode_spz(spz.read_ply(path)))
    flip = np.array([1.0, -1.0, -1.0])
    assert np.max(np.abs(decoded.positions - truth["positions"] * flip)) <= POSITION_BOUND
    want = np.einsum("i,nij,j->nij", flip, covariances(truth["scales"], truth["rotations"]), flip)
    got = covariances(decoded.scales, decoded.rotations)
    rel = np.linalg.norm(got - want, axis=(1, 2)) / np.linalg.norm(want, axis=(1, 2))
    assert np.max(rel) < 0.08  # 1/32 in log scale is ≤ 6.5 % in scale², plus the angle
    # The spec's sign table for this flip (coordinateConverter's flipSh, x=1, y=z=-1).
    flip_sh = np.array([-1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, 1, -1, 1], dtype=np.float32)
    expected = truth["sh"] * flip_sh[None, :, None]
    assert np.max(np.abs(decoded.sh[:, :3] - expected[:, :3])) <= SH1_BOUND
    assert np.max(np.abs(decoded.sh[:, 3:] - expected[:, 3:])) <= SH_REST_BOUND


def test_sh_degree_reduction(ply: tuple[Path, dict]) -> None:
    path, truth = ply
    g = spz.read_ply(path)
    sizes = []
    for degree in (3, 2, 1, 0):
        data = spz.encode_spz(g, sh_degree=degree, transform=np.eye(4))
        header, decoded = spz.decode_spz(data)
        assert header.sh_degree == degree
        assert decoded.sh.shape == (4000, spz.sh_coefficients(degree), 3)
        kept = {**truth, "sh": truth["sh"][:, : spz.sh_coefficients(degree)]}
        check_fields(decoded, kept)
        sizes.append(len(data))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1.5 * sizes[-1]
    with pytest.raises(spz.SpzError):
        spz.encode_spz(g.with_sh_degree(1), sh_degree=2)


def test_similarity_transform_moves_everything(tmp_path: Path) -> None:
    path = tmp_path / "in.ply"
    truth = write_3dgs_ply(path, 3000, seed=3)
    truth["positions"] = truth["positions"] / 10  # keep s·R·p + t inside the 24-bit range
    g = spz.read_ply(path)
    g.positions = truth["positions"]
    rng = np.random.default_rng(7)
    rot, s, t = random_rotation(rng), 2.5, np.array([3.0, -1.0, 4.0])
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = s * rot, t

    # In float, before quantisation: the rendering equation is unchanged.
    moved = spz.transform_gaussians(g, matrix)
    np.testing.assert_allclose(moved.positions, truth["positions"] @ (s * rot).T + t, atol=1e-4)
    np.testing.assert_allclose(moved.scales, truth["scales"] + math.log(s), atol=1e-5)
    want_r = np.einsum("ij,njk->nik", rot, quat_to_matrix(truth["rotations"]))
    assert np.max(rotation_angle_deg(quat_to_matrix(moved.rotations), want_r)) < 0.01
    d = rng.normal(size=(40, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    before = eval_sh(truth["sh"], d)  # old colour towards d
    after = eval_sh(moved.sh, d @ rot.T)  # new colour towards R·d
    np.testing.assert_allclose(after, before, atol=1e-4)

    # Through the file: the decoded values are the moved ones within the format's bounds.
    header, decoded = spz.decode_spz(spz.encode_spz(g, transform=matrix))
    assert header.fractional_bits == 12
    assert np.max(np.abs(decoded.positions - moved.positions)) <= POSITION_BOUND
    representable = np.clip(moved.scales, -10, 255 / 16 - 10)  # ln 2.5 pushes some past
    assert np.max(np.abs(decoded.scales - representable)) <= SCALE_BOUND
    angle = rotation_angle_deg(quat_to_matrix(decoded.rotations), want_r)
    assert np.max(angle) <= ROTATION_BOUND_DEG
    clipped = np.clip(moved.sh, -1, 127 / 128)  # rotated coefficients may leave [-1, 1)
    assert np.max(np.abs(decoded.sh[:, :3] - clipped[:, :3])) <= SH1_BOUND
    assert np.max(np.abs(decoded.sh[:, 3:] - clipped[:, 3:])) <= SH_REST_BOUND


def test_far_positions_use_fewer_fractional_bits(tmp_path: Path) -> None:
    path = tmp_path / "far.ply"
    truth = write_3dgs_ply(path, 500, seed=4)
    g = spz.read_ply(path)
    g.positions = truth["positions"] * 100  # up to ±5000 units: 12 bits would overflow 24
    header, decoded = spz.decode_spz(spz.encode_spz(g, transform=np.eye(4)))
    assert header.fractional_bits == 10
    assert np.max(np.abs(decoded.positions - g.positions)) <= 2.0**-11 + 1e-3 * 2**-10


@pytest.mark.parametrize(
    "matrix",
    [
        np.diag([1.0, 1.0, -1.0, 1.0]),  # a mirror
        np.array([[1.0, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),  # a shear
        np.diag([1.0, 2.0, 3.0, 1.0]),  # not uniform
        np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]),  # projective
    ],
)
def test_rejects_transforms_that_are_not_similarities(ply: tuple[Path, dict], matrix) -> None:
    path, _ = ply
    with pytest.raises(spz.SpzError):
        spz.encode_spz(spz.read_ply(path), transform=matrix)


def test_rejects_files_that_are_not_binary_3dgs(tmp_path: Path) -> None:
    ascii_ply = tmp_path / "ascii.ply"
    vertex = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(vertex, "vertex")], text=True).write(str(ascii_ply))
    with pytest.raises(spz.SpzError, match="binary"):
        spz.read_ply(ascii_ply)
    points_only = tmp_path / "points.ply"
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(points_only))
    with pytest.raises(spz.SpzError, match="missing vertex properties"):
        spz.read_ply(points_only)
    with pytest.raises(spz.SpzError):
        spz.decode_spz(b"not gzip at all")
    with pytest.raises(spz.SpzError, match="version"):
        spz.decode_spz(gzip.compress(struct.pack("<IIIBBBB", 0x5053474E, 4, 0, 0, 12, 0, 0)))


def test_cli_writes_a_smaller_file(ply: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = ply
    out = tmp_path / "model.spz"
    cmd = [sys.executable, str(REPO / "training_server_spz.py"), str(path), str(out)]
    done = subprocess.run([*cmd, "--sh-degree", "1"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "4000 Gaussians, SH degree 1" in done.stdout
    header, _ = spz.read_spz(out)
    assert (header.count, header.sh_degree) == (4000, 1)
    assert out.stat().st_size < 0.2 * path.stat().st_size
    assert not list(tmp_path.glob("*.partial"))
    bad = subprocess.run(
        [*cmd[:2], str(tmp_path / "missing.ply"), str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "error:" in bad.stderr


NODE_READER = r"""
// Reads an SPZ file with @spz-loader/core (Niantic's spz library as WebAssembly) and writes
// each decoded attribute as raw float32 into an output folder, plus a JSON summary.
import { readFileSync, writeFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
const [loaderPath, spzPath, outDir, frame] = process.argv.slice(2);
process.type = "renderer"; // the package is a browser build: take its non-Node code path
const { loadSpz } = await import(pathToFileURL(loaderPath).href);
const g = await loadSpz(new Uint8Array(readFileSync(spzPath)), {
  colorScaleFactor: 1.0,
  unpackOptions: { coordinateSystem: frame },
});
for (const key of ["positions", "scales", "rotations", "alphas", "colors", "sh"]) {
  const bytes = Buffer.from(g[key].buffer, g[key].byteOffset, g[key].byteLength);
  writeFileSync(`${outDir}/${key}.f32`, bytes);
}
const summary = { numPoints: g.numPoints, shDegree: g.shDegree };
writeFileSync(`${outDir}/summary.json`, JSON.stringify(summary));
"""


def read_with_niantic(tmp_path: Path, spz_path: Path, frame: str) -> tuple[dict, dict]:
    """Decode with the reference library in node; (summary, arrays)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not SPZ_LOADER.is_file():
        pytest.skip("npm ci has not installed @spz-loader/core")
    script = tmp_path / "read_spz.mjs"
    script.write_text(NODE_READER)
    out = tmp_path / f"niantic-{frame}"
    out.mkdir()
    subprocess.run(
        ["node", str(script), str(SPZ_LOADER), str(spz_path), str(out), frame],
        check=True,
        timeout=120,
    )
    summary = json.loads((out / "summary.json").read_text())
    arrays = {p.stem: np.fromfile(p, dtype="<f4") for p in out.glob("*.f32")}
    return summary, arrays


def test_niantic_reader_gets_the_ply_back(tmp_path: Path) -> None:
    """The reference reader, asked for the .ply's RDF frame, undoes our RDF → RUB conversion:
    count, degree, positions, sizes, opacities, colours, shapes and SH all match the .ply.
    150,000 Gaussians make the gzip stream two deflate pieces joined at a sync flush."""
    ply_path = tmp_path / "big.ply"
    n = 150_000
    truth = write_3dgs_ply(ply_path, n, seed=11)
    spz_path = tmp_path / "big.spz"
    result = spz.ply_to_spz(ply_path, spz_path)
    assert len(gzip.decompress(spz_path.read_bytes())) > spz.COMPRESS_CHUNK
    assert (result.count, result.sh_degree, result.fractional_bits) == (n, 3, 12)
    summary, a = read_with_niantic(tmp_path, spz_path, "RDF")
    assert summary == {"numPoints": n, "shDegree": 3}
    positions = a["positions"].reshape(n, 3)
    assert np.max(np.abs(positions - truth["positions"])) <= POSITION_BOUND
    log_scales = np.log(a["scales"].reshape(n, 3))  # the loader returns exp(log scale)
    assert np.max(np.abs(log_scales - truth["scales"])) <= SCALE_BOUND + 1e-5
    assert np.max(np.abs(a["alphas"] - opacity(truth["alphas"]))) <= ALPHA_BOUND + 1e-6
    colors = a["colors"].reshape(n, 3) - 0.5  # the loader returns dc · factor + 0.5
    assert np.max(np.abs(colors - truth["colors"])) <= COLOR_BOUND
    xyzw = a["rotations"].reshape(n, 4)
    got = covariances(log_scales, xyzw[:, [3, 0, 1, 2]])
    want = covariances(truth["scales"], truth["rotations"])
    rel = np.linalg.norm(got - want, axis=(1, 2)) / np.linalg.norm(want, axis=(1, 2))
    assert np.max(rel) < 0.08
    sh = a["sh"].reshape(n, 15, 3)
    assert np.max(np.abs(sh[:, :3] - truth["sh"][:, :3])) <= SH1_BOUND
    assert np.max(np.abs(sh[:, 3:] - truth["sh"][:, 3:])) <= SH_REST_BOUND


def test_niantic_reader_reads_the_stored_rub_frame(ply: tuple[Path, dict], tmp_path: Path) -> None:
    """Asked for RUB (the stored frame) the reference reader converts nothing: our own
    decoder and it agree exactly on a transformed, degree-reduced file."""
    path, _ = ply
    matrix = np.eye(4)
    matrix[:3, :3] = random_rotation(np.random.default_rng(5)) * 0.5
    spz_path = tmp_path / "turned.spz"
    spz.ply_to_spz(path, spz_path, sh_degree=2, transform=matrix)
    summary, a = read_with_niantic(tmp_path, spz_path, "RUB")
    header, ours = spz.read_spz(spz_path)
    assert summary == {"numPoints": header.count, "shDegree": 2}
    np.testing.assert_allclose(a["positions"].reshape(-1, 3), ours.positions, atol=1e-7)
    np.testing.assert_allclose(
        a["rotations"].reshape(-1, 4), ours.rotations[:, [1, 2, 3, 0]], atol=1e-6
    )
    np.testing.assert_allclose(np.log(a["scales"].reshape(-1, 3)), ours.scales, atol=1e-5)
    np.testing.assert_allclose(a["sh"].reshape(-1, 8, 3), ours.sh, atol=1e-7)


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_lower_degree_plys_round_trip(tmp_path: Path, degree: int) -> None:
    path = tmp_path / f"degree{degree}.ply"
    truth = write_3dgs_ply(path, 1000, degree=degree, seed=degree)
    header, decoded = spz.decode_spz(spz.encode_spz(spz.read_ply(path), transform=np.eye(4)))
    assert header.sh_degree == degree
    check_fields(decoded, truth)


def test_reads_plys_with_other_property_types(tmp_path: Path) -> None:
    """Positions as doubles and an extra uchar property: the structured (slower) read."""
    plain = tmp_path / "plain.ply"
    truth = write_3dgs_ply(plain, 500, degree=1, seed=12)
    source = PlyData.read(str(plain))["vertex"].data
    fields = [(n, "f8" if n in {"x", "y", "z"} else "f4") for n in source.dtype.names]
    mixed = np.empty(len(source), dtype=[*fields, ("flag", "u1")])
    for name in source.dtype.names:
        mixed[name] = source[name]
    mixed["flag"] = 7
    path = tmp_path / "mixed.ply"
    PlyData([PlyElement.describe(mixed, "vertex")], byte_order=">").write(str(path))
    g = spz.read_ply(path)
    for key in truth:
        np.testing.assert_array_equal(getattr(g, key), truth[key])
