"""What a training run leaves in its output folder, for gaussian-splatting-lightning: the
training resolution (the dataset's image size and the down-sampled copies the Colmap parser
reads), the folder left by an earlier run (resume from its last checkpoint, or start clean)
and its snapshots, and the result files (the final .ply read back, what the download holds)."""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

from training_server_trainer import DOWN_SAMPLE_FACTOR_MAX

_CKPT_RE = re.compile(r"^epoch=(\d+)-step=(\d+)\.ckpt$")
_CKPT_PLY_RE = re.compile(r"^epoch=(\d+)-step=(\d+)-xyz_rgb\.ply$")
_ITERATION_RE = re.compile(r"^iteration_(\d+)$")


# ------------------------------------------------------------------------------ resolution

# COLMAP camera models and their parameter counts (src/colmap/sensor/models.h).
_CAMERA_PARAMS = {0: 3, 1: 4, 2: 4, 3: 5, 4: 8, 5: 8, 6: 12, 7: 5, 8: 4, 9: 5, 10: 12}


def dataset_image_size(dataset_path: Path) -> tuple[int, int]:
    """(width, height) of the dataset's largest camera, from sparse/0/cameras.bin or .txt.

    Raises ValueError when neither can be read."""
    sparse = dataset_path / "sparse" / "0"
    if not sparse.is_dir():
        sparse = dataset_path / "sparse"
    sizes: list[tuple[int, int]] = []
    binary, text = sparse / "cameras.bin", sparse / "cameras.txt"
    try:
        if binary.is_file():
            data = binary.read_bytes()
            (count,) = struct.unpack_from("<Q", data, 0)
            offset = 8
            for _ in range(count):
                _, model, width, height = struct.unpack_from("<iiQQ", data, offset)
                offset += 24 + 8 * _CAMERA_PARAMS[model]
                sizes.append((width, height))
        elif text.is_file():
            for line in text.read_text().splitlines():
                words = line.split()
                if len(words) >= 4 and not line.startswith("#"):
                    sizes.append((int(words[2]), int(words[3])))
    except (OSError, struct.error, KeyError, ValueError) as exc:
        raise ValueError(f"cannot read the dataset's cameras in {sparse}: {exc}") from exc
    if not sizes:
        raise ValueError(f"no cameras in {sparse}")
    return max(sizes, key=max)


def choose_down_sample_factor(size: tuple[int, int], max_image_size: int) -> int:
    """The smallest integer factor that brings the longest side to `max_image_size` or less."""
    return min(DOWN_SAMPLE_FACTOR_MAX, max(1, math.ceil(max(size) / max_image_size)))


def down_sampled_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """The image size the trainer sees at `factor` (the parser's default rounding)."""
    return (max(1, round(size[0] / factor)), max(1, round(size[1] / factor)))


def prepare_downsampled_images(dataset_path: Path, factor: int) -> Path:
    """Write `images_{factor}/` beside `images/`, which the Colmap parser reads for factor > 1.

    Sizes follow the parser's default rounding (half to even); existing files are kept.
    """
    source = dataset_path / "images"
    if factor == 1:
        return source
    import cv2  # heavy, and needed only here

    target = dataset_path / f"images_{factor}"
    for image_path in sorted(p for p in source.rglob("*") if p.is_file()):
        out = target / image_path.relative_to(source)
        image = None if out.exists() else cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        if image is None:
            continue
        size = tuple(max(1, round(n / factor)) for n in (image.shape[1], image.shape[0]))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{out.name}")
        if not cv2.imwrite(str(tmp), cv2.resize(image, size, interpolation=cv2.INTER_AREA)):
            raise OSError(f"cannot write {tmp}")
        tmp.replace(out)
    return target


# ------------------------------------------------------------------------------ output folder


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the regular `checkpoints/epoch=E-step=S.ckpt` files, by step."""
    folder = output_dir / "checkpoints"
    if folder.is_symlink() or not folder.is_dir():
        return []
    found = [(int(m[2]), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted((s, p) for s, p in found if p.is_file() and not p.is_symlink())


def _usable(checkpoint: Path) -> bool:
    # Lightning writes torch.save()'s zip format in one go: a cut-off file has no zip directory.
    return zipfile.is_zipfile(checkpoint)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The usable checkpoint with the highest step (what `--ckpt_path last` loads), or None."""
    usable = [p for _, p in _checkpoints(output_dir) if _usable(p)]
    return usable[-1] if usable else None


def _final_ply(output_dir: Path) -> tuple[int, Path] | None:
    folder = output_dir / "point_cloud"
    if folder.is_symlink() or not folder.is_dir():
        return None
    found = [(int(m[1]), d) for d in folder.iterdir() if (m := _ITERATION_RE.match(d.name))]
    plys = [(n, d / "point_cloud.ply") for n, d in found if not d.is_symlink()]
    return max(((n, p) for n, p in plys if p.is_file() and not p.is_symlink()), default=None)


@dataclass(frozen=True)
class ResumePlan:
    """What to do with a task's output folder before starting the trainer."""

    action: Literal["fresh", "resume", "complete"]  # complete: the final .ply is there already
    message: str  # one sentence for the task log
    checkpoint: Path | None = None  # what `--ckpt_path last` will load
    start_step: int = 0  # the step the run continues from (for TrainingProgressParser)

    @property
    def resume(self) -> bool:
        """True when the command needs `--ckpt_path last`."""
        return self.action == "resume"


def prepare_output_dir(
    output_dir: Path, iterations: int | None = None, *, allow_resume: bool = True
) -> ResumePlan:
    """Make `output_dir` safe to start the trainer on, resuming from a checkpoint if possible.

    A fresh fit refuses to start when `point_cloud/` or `checkpoints/` exists (internal/cli.py),
    so without a usable checkpoint below `iterations` the folder is removed. Cut-off
    checkpoints are renamed `*.ckpt.corrupt` so that the trainer's `last` passes them over.
    Pass `iterations`: a checkpoint at or past it cannot be resumed (Lightning would stop at
    once without writing the .ply), and a final .ply at exactly it means the run is complete.
    """
    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        output_dir.unlink()
    if not output_dir.exists():
        return ResumePlan("fresh", "Starting training in a new output folder")
    final = _final_ply(output_dir)
    if final is not None and final[0] == iterations:
        with contextlib.suppress(ValueError, OSError):
            read_ply_header(final[1])
            done = final[1].relative_to(output_dir)
            return ResumePlan(
                "complete", f"Training already finished: {done} exists", None, final[0]
            )
    reason = "Resuming is turned off for this run"
    if allow_resume:
        for _, path in _checkpoints(output_dir):
            if not _usable(path):
                path.rename(path.with_name(path.name + ".corrupt"))
        ckpt = latest_checkpoint(output_dir)
        step = next((s for s, p in _checkpoints(output_dir) if p == ckpt), 0)
        if ckpt is not None and (iterations is None or step < iterations):
            of = f" of {iterations}" if iterations else ""
            msg = f"Training resumed from step {step}{of} (checkpoint checkpoints/{ckpt.name})"
            return ResumePlan("resume", msg, ckpt, step)
        reason = f"Checkpoint {ckpt.name} is at or past step {iterations}" if ckpt else ""
        reason = reason or "No checkpoint found"
    shutil.rmtree(output_dir)
    return ResumePlan("fresh", f"{reason}; starting over in a clean output folder")


def prune_snapshots(output_dir: Path, final_step: int | None = None) -> list[str]:
    """Remove every checkpoint and .ply snapshot but the newest usable ones and the final
    `point_cloud/iteration_{final_step}`; returns what was removed (relative paths).

    Files at a step above the newest usable checkpoint (one being written) are left alone.
    """
    removed: list[str] = []
    ckpt = latest_checkpoint(output_dir)
    if ckpt is not None:
        newest = int(_CKPT_RE.match(ckpt.name)[2])  # type: ignore[index]
        folder = output_dir / "checkpoints"
        for path in sorted(folder.iterdir()):
            match = _CKPT_RE.match(path.name) or _CKPT_PLY_RE.match(path.name)
            old = match is not None and int(match[2]) < newest
            if (old or path.name.endswith(".ckpt.corrupt")) and path.is_file():
                path.unlink()
                removed.append(path.relative_to(output_dir).as_posix())
    plys = output_dir / "point_cloud"
    if plys.is_dir() and not plys.is_symlink():
        steps = sorted((int(m[1]), d) for d in plys.iterdir() if (m := _ITERATION_RE.match(d.name)))
        readable = [n for n, d in steps if _readable_ply(d / "point_cloud.ply")]
        newest_ply = readable[-1] if readable else None
        for n, folder in steps:
            if newest_ply is not None and n < newest_ply and n != final_step:
                if folder.is_symlink():
                    folder.unlink()
                else:
                    shutil.rmtree(folder)
                removed.append(folder.relative_to(output_dir).as_posix())
    return removed


def _readable_ply(path: Path) -> bool:
    try:
        read_ply_header(path)
    except (OSError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------ results


class TrainingResultError(ValueError):
    """The trainer's output folder holds no usable result."""


@dataclass(frozen=True)
class PlyHeader:
    """What the server needs from a PLY header."""

    format: str  # binary_little_endian, binary_big_endian or ascii
    vertex_count: int
    properties: tuple[str, ...]  # vertex property names, in file order


_PLY_SIZES = {"char": 1, "uchar": 1, "short": 2, "ushort": 2, "int": 4, "uint": 4, "float": 4,
              "double": 8}  # fmt: skip


def read_ply_header(path: Path) -> PlyHeader:
    """Parse a PLY header without reading the body; a cut-off binary body raises ValueError."""
    with path.open("rb") as f:
        head = f.read(65536)
    end = head.find(b"end_header")
    if not head.startswith(b"ply") or end < 0:
        raise ValueError(f"{path.name} is not a PLY file")
    fmt, count, props, row, element = "", 0, [], 0, ""
    for words in (line.split() for line in head[:end].decode("ascii", "replace").splitlines()):
        if words[:1] == ["format"]:
            fmt = words[1]
        elif words[:1] == ["element"]:
            element, count = words[1], int(words[2]) if words[1] == "vertex" else count
        elif words[:1] == ["property"] and element == "vertex":
            props.append(words[-1])
            bits = re.sub(r"\D", "", words[1])  # int8, float32, ... name their size
            row += int(bits) // 8 if bits else _PLY_SIZES.get(words[1], -(10**9))
    body = path.stat().st_size - head.index(b"\n", end) - 1
    if fmt.startswith("binary") and row > 0 and body < count * row:
        raise ValueError(f"{path.name} is cut off: {count} vertices do not fit in the file")
    return PlyHeader(fmt, count, tuple(props))


class TrainingResults(TypedDict):
    """A finished training for the task's metadata (paths relative to the output folder)."""

    ply_path: str  # point_cloud/iteration_N/point_cloud.ply with the highest N
    ply_size_bytes: int
    gaussian_count: int
    iterations: int
    checkpoints: list[str]
    other_files: list[str]  # cameras.json, configs, metrics that a download includes


def collect_results(output_dir: Path) -> TrainingResults:
    """Describe the final result; TrainingResultError when there is no readable final .ply."""
    final = _final_ply(output_dir)
    if final is None:
        raise TrainingResultError(
            f"the trainer wrote no point_cloud/iteration_*/point_cloud.ply in {output_dir}"
        )
    try:
        header = read_ply_header(final[1])
    except (OSError, ValueError) as exc:
        raise TrainingResultError(f"the final .ply cannot be used: {exc}") from exc
    ply = final[1].relative_to(output_dir).as_posix()
    return TrainingResults(
        ply_path=ply,
        ply_size_bytes=final[1].stat().st_size,
        gaussian_count=header.vertex_count,
        iterations=final[0],
        checkpoints=[p.relative_to(output_dir).as_posix() for _, p in _checkpoints(output_dir)],
        other_files=[a for _, a in result_files(output_dir, keep_checkpoint=False) if a != ply],
    )


def _reached_without_links(root: Path, path: Path) -> bool:
    rel = path.relative_to(root)
    if any(root.joinpath(*rel.parts[: i + 1]).is_symlink() for i in range(len(rel.parts))):
        return False
    return path.is_file() and path.resolve().is_relative_to(root.resolve())


MODEL_SPZ = "model.spz"  # the final model as SPZ (training_server_exports), when it was made


def result_files(output_dir: Path, keep_checkpoint: bool) -> list[tuple[Path, str]]:
    """(file, name in the ZIP): the final .ply, its SPZ, cameras.json, configs, metrics,
    checkpoint.

    Only the latest checkpoint, and only with `keep_checkpoint`. Symbolic links and anything
    resolving outside `output_dir` are left out.
    """
    final = _final_ply(output_dir)
    files = [final[1], output_dir / MODEL_SPZ] if final else []
    files += [output_dir / n for n in ("cameras.json", "cfg_args", "config.yaml")]
    for version in sorted(output_dir.glob("lightning_logs/version_*")):
        files += [version / "config.yaml", version / "hparams.yaml"]
        files += sorted(version.glob("events.out.tfevents.*"))
    files += sorted(output_dir.glob("metrics/*.csv"))
    if keep_checkpoint and (checkpoint := latest_checkpoint(output_dir)):
        files.append(checkpoint)
    return [
        (p, p.relative_to(output_dir).as_posix())
        for p in files
        if _reached_without_links(output_dir, p)
    ]
