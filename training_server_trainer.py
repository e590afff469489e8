"""What the server knows about gaussian-splatting-lightning (the trainer).

Finding the checkout and checking it can train, the `main.py fit` command line, the output
folder left by an earlier run (resume or start clean), the trainer's tqdm bars turned into
progress, and the result files. No FastAPI and no database here.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

from training_server_process import run_captured

# The trainer's default is 30,000 steps (internal/entrypoints/gspl.py) and it saves an extra
# checkpoint at 7,000 (the `--save_iterations` default in internal/cli.py).
PRESETS: Mapping[str, int] = {"fast": 7_000, "full": 30_000}
DEFAULT_ITERATIONS = 30_000
# Under 100 steps nothing is learnt; learning rates reach their final values at 30,000, so
# 100,000 is generous and stops a typo from holding the only GPU for a day.
ITERATIONS_MIN = 100
ITERATIONS_MAX = 100_000
# For a factor above 1 the Colmap parser reads `images_{factor}/` (prepare_downsampled_images);
# 2, 4 and 8 are the usual `images_N` folders of COLMAP datasets.
DOWN_SAMPLE_FACTORS = (1, 2, 4, 8)
DEFAULT_DOWN_SAMPLE_FACTOR = 1
DEFAULT_KEEP_CHECKPOINT = False
# Lightning redraws its bar every N batches with TQDM_MINITERS=N (by default twice per batch).
PROGRESS_REFRESH_STEPS = 10

_CKPT_RE = re.compile(r"^epoch=(\d+)-step=(\d+)\.ckpt$")
_ITERATION_RE = re.compile(r"^iteration_(\d+)$")
_PROBE = """\
import json
r = {}
try:
    import torch
    r.update(torch=torch.__version__, build=torch.version.cuda, cuda=torch.cuda.is_available())
    if r["cuda"]:
        r["device"] = torch.cuda.get_device_name(0)
        import lightning
except BaseException as e:
    r["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(r), flush=True)
"""


def resolve_iterations(
    iterations: int | None = None, preset: str | None = None, default: int = DEFAULT_ITERATIONS
) -> int:
    """Training steps for a task: `iterations`, else the named preset, else `default`.

    Raises ValueError (a sentence for a 422) for both given, an unknown preset or a bad range.
    """
    if iterations is not None and preset is not None:
        raise ValueError("give either iterations or preset, not both")
    if preset is not None:
        if preset not in PRESETS:
            names = ", ".join(f"{k} ({v} steps)" for k, v in PRESETS.items())
            raise ValueError(f"unknown training preset {preset!r}; choose one of {names}")
        return PRESETS[preset]
    value = default if iterations is None else iterations
    if not ITERATIONS_MIN <= value <= ITERATIONS_MAX:
        raise ValueError(f"iterations must be between {ITERATIONS_MIN} and {ITERATIONS_MAX}")
    return value


def find_trainer_checkout(configured: Path | None, cwd: Path) -> Path | None:
    """The configured checkout (relative to `cwd`), else `cwd` when it is one, else None.

    `cwd` counts when it holds main.py importing the `internal` package and internal/cli.py
    (the user's original way: this server copied into the checkout and started there).
    """
    if configured is not None:
        path = configured.expanduser()
        return path if path.is_absolute() else cwd / path
    main = cwd / "main.py"
    if main.is_file() and (cwd / "internal" / "cli.py").is_file():
        with main.open("rb") as f:
            if b"internal." in f.read(65536):
                return cwd
    return None


def _checkout_problem(checkout: Path) -> str | None:
    if (checkout / "main.py").is_file():
        return None
    what = "has no main.py" if checkout.is_dir() else "does not exist"
    return f"gaussian-splatting-lightning checkout {checkout} {what}"


async def check_training_available(
    python: str, checkout: Path | None, require_cuda: bool, timeout_s: float
) -> tuple[bool, str]:
    """Whether `python` can run the trainer in `checkout`, and a sentence saying why (not).

    With `require_cuda` a short subprocess (killed after `timeout_s`) imports torch, asks for
    a CUDA device and imports lightning; without it, only that the interpreter runs.
    """
    if checkout is None:
        return False, (
            "no gaussian-splatting-lightning checkout configured: set TRAINING_SERVER_TRAINER_PATH"
        )
    if (problem := _checkout_problem(checkout)) is not None:
        return False, problem
    code = _PROBE if require_cuda else "print('{}')"
    try:
        outcome, output = await run_captured(
            [python, "-c", code], cwd=checkout, timeout_s=timeout_s
        )
    except OSError as exc:
        return False, f"python {python} cannot be started: {exc.strerror or exc}"
    if outcome.timed_out:
        return False, f"python {python} did not answer within {timeout_s:g} s (killed)"
    info = _last_json_object(output) if outcome.returncode == 0 else None
    if info is None:
        tail = (output.strip().splitlines() or [f"exit status {outcome.returncode}"])[-1]
        return False, f"python {python} failed: {tail}"
    if not require_cuda:
        return True, f"trainer checkout {checkout} found (CUDA not checked)"
    if "torch" not in info:
        return False, f"python {python} cannot import torch: {info.get('error')}"
    if not info["cuda"]:
        build = f"CUDA {info['build']} build" if info.get("build") else "CPU-only build"
        return False, f"torch sees no CUDA device (torch {info['torch']}, {build})"
    if "device" not in info:
        return False, f"torch cannot use the CUDA device: {info.get('error')}"
    if "error" in info:
        return False, (
            f"python {python} cannot import lightning: {info['error']} "
            "(install the checkout's requirements)"
        )
    return True, f"torch {info['torch']} on {info['device']}"


def _last_json_object(output: str) -> dict[str, Any] | None:
    """The last output line that is a JSON object (warnings may surround it)."""
    for line in reversed(output.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return None


def build_fit_command(
    *,
    python: str,
    checkout: Path,
    dataset_path: Path,
    output_root: Path,
    name: str,
    iterations: int,
    down_sample_factor: int = DEFAULT_DOWN_SAMPLE_FACTOR,
    config: Path | None = None,
    extra_args: Sequence[str] = (),
    resume: bool = False,
) -> list[str]:
    """argv for `main.py fit`, results in `output_root/name/`; run it with cwd=checkout.

    `--data.parser Colmap` precedes `--config`, so a config may choose a Colmap-derived parser
    (jsonargparse applies arguments in order). A relative `config` is found in the checkout.
    """
    if isinstance(extra_args, str):
        raise TypeError("extra_args must be a sequence of arguments, not a string")
    if not name or name in {".", ".."} or "/" in name or "\\" in name:
        raise ValueError(f"experiment name {name!r} must be a single path component")
    resolve_iterations(iterations)
    if down_sample_factor not in DOWN_SAMPLE_FACTORS:
        raise ValueError(f"down_sample_factor must be one of {DOWN_SAMPLE_FACTORS}")
    argv = [python, "-u", str(checkout / "main.py"), "fit", "--data.parser", "Colmap"]
    if config is not None:
        argv += ["--config", str(config if config.is_absolute() else checkout / config)]
    argv += [
        "--data.path", str(dataset_path),
        "--data.parser.down_sample_factor", str(down_sample_factor),
        "-n", name,
        "--output", str(output_root),
        "--max_steps", str(iterations),
        "--model.save_ply", "true",
        *extra_args,
    ]  # fmt: skip
    return [*argv, "--ckpt_path", "last"] if resume else argv


def trainer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the trainer: unbuffered output, full-width bars, fewer redraws."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MINITERS", str(PROGRESS_REFRESH_STEPS))
    env.pop("COLUMNS", None)  # tqdm would cut the metrics off at that width
    env.pop("LINES", None)
    return env


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
            msg = f"Resuming from checkpoint {ckpt.name} (step {step}{of})"
            return ResumePlan("resume", msg, ckpt, step)
        reason = f"Checkpoint {ckpt.name} is at or past step {iterations}" if ckpt else ""
        reason = reason or "No checkpoint found"
    shutil.rmtree(output_dir)
    return ResumePlan("fresh", f"{reason}; starting over in a clean output folder")


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


def result_files(output_dir: Path, keep_checkpoint: bool) -> list[tuple[Path, str]]:
    """(file, name in the ZIP): the final .ply, cameras.json, configs, metrics, checkpoint.

    Only the latest checkpoint, and only with `keep_checkpoint`. Symbolic links and anything
    resolving outside `output_dir` are left out.
    """
    final = _final_ply(output_dir)
    files = [final[1]] if final else []
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


# ------------------------------------------------------------------------------ progress

_ESCAPE = r"\x1b\[[0-9;?]*[ -/]*[@-~]"
_SPLIT_RE = re.compile(rf"\r|\n|{_ESCAPE}")
_TIME = r"\d+(?::\d\d){1,2}"
_RATE = r",\s*(?P<rate>\?|\d+(?:\.\d+)?)(?P<unit>it/s|s/it)(?P<rest>.*)$"
_DESC = r"^(?:(?P<desc>[^|\[]*?):)?\s*"
_BAR_RE = re.compile(
    rf"{_DESC}(?:\d+%)?\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+|\?)\s*"
    rf"\[(?P<elapsed>{_TIME})<(?P<remaining>{_TIME}|\?){_RATE}"
)
_NO_TOTAL_RE = re.compile(rf"{_DESC}(?P<n>\d+)it\s*\[(?P<elapsed>{_TIME}){_RATE}")
_EPOCH_RE = re.compile(r"^Epoch (\d+)$")


def _seconds(text: str | None) -> float | None:
    if text is None or text == "?":
        return None
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return float(seconds)


@dataclass(frozen=True)
class TqdmLine:
    """One redraw of a tqdm bar."""

    description: str
    current: int
    total: int | None
    elapsed_seconds: float | None
    remaining_seconds: float | None  # of this bar only
    rate: float | None  # iterations per second (an `s/it` display is inverted)
    postfix: Mapping[str, str]


def parse_tqdm_line(line: str) -> TqdmLine | None:
    """Parse one tqdm redraw (escape sequences removed); None when it is not a bar."""
    match = _BAR_RE.match(line.strip()) or _NO_TOTAL_RE.match(line.strip())
    if match is None:
        return None
    g = match.groupdict()
    rate = None if g["rate"] == "?" else float(g["rate"])
    if rate is not None and g["unit"] == "s/it":
        rate = 1.0 / rate if rate > 0 else None
    postfix: dict[str, str] = {}
    rest = g["rest"].rstrip()
    if rest.startswith(","):
        pairs = rest[1:].removesuffix("]").split(", ")
        for pair in pairs if rest.endswith("]") else pairs[:-1]:  # cut off: last one partial
            key, sep, value = pair.strip().partition("=")
            if sep:
                postfix[key] = value
    total = g.get("total")
    return TqdmLine(
        description=(g["desc"] or "").strip(),
        current=int(g["n"]),
        total=int(total) if total and total != "?" else None,
        elapsed_seconds=_seconds(g["elapsed"]),
        remaining_seconds=_seconds(g.get("remaining")),
        rate=rate,
        postfix=postfix,
    )


def strip_terminal_controls(text: str) -> str:
    """Remove the cursor movements tqdm writes around bars drawn below the first line."""
    return re.sub(rf"{_ESCAPE}|\x1b", "", text)


def is_progress_output(line: str) -> bool:
    """True for a bar redraw or one of the blank clears tqdm writes (noise in a task log)."""
    text = strip_terminal_controls(line).strip()
    return not text or parse_tqdm_line(text) is not None


def _metric(postfix: Mapping[str, str], keys: Sequence[str]) -> float | None:
    for key in keys:
        with contextlib.suppress(KeyError, ValueError):
            return float(postfix[key])
    return None


@dataclass(frozen=True)
class TrainingProgress:
    """The trainer's progress as the server reports it."""

    step: int
    total: int | None
    percent: float | None
    rate: float | None  # training steps per second
    eta_seconds: float | None  # for the whole run, not counting validation pauses
    loss: float | None  # latest train/loss
    psnr: float | None  # latest val/psnr (validation runs after every epoch)
    epoch: int | None

    def as_progress(self) -> dict[str, Any]:
        """The `progress` object of `/status` during training."""
        return {"stage": "training", "percent": self.percent, "current": self.step,
                "total": self.total, "rate": self.rate, "eta_seconds": self.eta_seconds,
                "loss": self.loss, "psnr": self.psnr, "epoch": self.epoch}  # fmt: skip


class TrainingProgressParser:
    """Turns the trainer's stdout+stderr, in chunks split anywhere, into TrainingProgress.

    Lightning draws `Epoch E: ...| n/batches [elapsed<left, rate, metrics]` (a batch is a step)
    and the trainer its own `Training: ...| step/max_steps [...]`, redrawn only at epoch ends.
    The step is counted from the epoch bars (plus `initial_step` after a resume, possibly over by
    part of an epoch) until the `Training` bar passes its total; the total comes from that bar
    or `total_steps`, the ETA from the epoch bar's rate.
    """

    def __init__(self, total_steps: int | None = None, initial_step: int = 0) -> None:
        """`total_steps`: iterations asked for; `initial_step`: the resumed checkpoint's step."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._total = total_steps
        self._initial = self._step = initial_step
        self._epoch: int | None = None
        self._epoch_steps = self._earlier_epochs_steps = 0
        self._rate: float | None = None
        self._loss: float | None = None
        self._psnr: float | None = None
        self.latest: TrainingProgress | None = None

    def feed(self, chunk: str | bytes) -> TrainingProgress | None:
        """Take raw output; the latest progress when this chunk completed a redraw, else None."""
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        *parts, pending = _SPLIT_RE.split(self._pending + text)
        self._pending = pending[-65536:]
        seen = [self._consume(part) for part in parts]
        if pending.rstrip().endswith("]"):  # a bar with nothing after it yet
            seen.append(self._consume(pending))
        return self.latest if any(seen) else None

    def feed_line(self, line: str) -> TrainingProgress | None:
        """Take one line already split on \\r and \\n; like `feed`."""
        return self.latest if self._consume(line) else None

    def _consume(self, text: str) -> bool:
        if "[" not in text or "it" not in text:  # every bar shows `[... it/s]`: skip the rest
            return False
        bar = parse_tqdm_line(strip_terminal_controls(text))
        if bar is None:
            return False
        if epoch_match := _EPOCH_RE.match(bar.description):
            epoch = int(epoch_match[1])
            if self._epoch is not None and epoch < self._epoch:
                return False
            if epoch != self._epoch:
                self._earlier_epochs_steps += self._epoch_steps
                self._epoch, self._epoch_steps = epoch, 0
            self._epoch_steps = max(self._epoch_steps, bar.current)
            step = self._initial + self._earlier_epochs_steps + self._epoch_steps
            self._rate = bar.rate or self._rate
        elif bar.description == "Training":
            if bar.total and (bar.current or self._total is None):
                self._total = bar.total  # Lightning's bar shows `Training 0/batches` once
            step = bar.current if self._epoch is None else self._step
            if self._total and bar.current >= self._total:  # it passes the total when done
                step = self._total
            if self._epoch is None:
                self._rate = bar.rate or self._rate
        else:
            return False
        if (loss := _metric(bar.postfix, ("train/loss", "loss"))) is not None:
            self._loss = loss
        if (psnr := _metric(bar.postfix, ("val/psnr", "psnr", "train/psnr"))) is not None:
            self._psnr = psnr
        total = self._total
        self._step = max(self._step, min(step, total) if total else step)
        left = total - self._step if total else None
        self.latest = TrainingProgress(
            step=self._step,
            total=total,
            percent=round(100.0 * self._step / total, 2) if total else None,
            rate=self._rate,
            eta_seconds=round(left / self._rate, 1) if left is not None and self._rate else None,
            loss=self._loss,
            psnr=self._psnr,
            epoch=self._epoch,
        )
        return True
