"""What the server knows about gaussian-splatting-lightning (the trainer).

Finding the checkout and checking it can train (a CUDA probe and a dry run of the real command
line), the `main.py fit` command line and the validation figures. What a run leaves in its
output folder is training_server_trainer_output.py; the trainer's tqdm bars turned into
progress are training_server_trainer_progress.py. No FastAPI and no database here.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import struct
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

from training_server_process import run_process
from training_server_trainer_progress import TrainingProgressParser

# The trainer's default is 30,000 steps (internal/entrypoints/gspl.py) and it saves an extra
# checkpoint at 7,000 (the `--save_iterations` default in internal/cli.py).
PRESETS: Mapping[str, int] = {"fast": 7_000, "full": 30_000}
DEFAULT_ITERATIONS = 30_000
# Under 100 steps nothing is learnt; learning rates reach their final values at 30,000, so
# 100,000 is generous and stops a typo from holding the only GPU for a day.
ITERATIONS_MIN = 100
ITERATIONS_MAX = 100_000
# For a factor above 1 the Colmap parser reads `images_{factor}/` (prepare_downsampled_images);
# 2, 4 and 8 are the usual `images_N` folders of COLMAP datasets and what a task may ask for.
# The factor chosen from `max_image_size` may be any integer up to DOWN_SAMPLE_FACTOR_MAX.
DOWN_SAMPLE_FACTORS = (1, 2, 4, 8)
DOWN_SAMPLE_FACTOR_MAX = 64
DEFAULT_DOWN_SAMPLE_FACTOR = 1
DEFAULT_KEEP_CHECKPOINT = False
# The reference 3DGS code trains images wider than 1.6K at 1.6K; so do we, on the longest side.
DEFAULT_MAX_IMAGE_SIZE = 1_600
IMAGE_SIZE_MIN, IMAGE_SIZE_MAX = 200, 16_384
# A checkpoint and a .ply snapshot every N steps, so an interrupted run loses at most N steps.
DEFAULT_CHECKPOINT_EVERY = 2_000
CHECKPOINT_EVERY_MIN = 100
# The Colmap parser's default: with split_mode experiment every 8th image is held out (the
# Mip-NeRF 360 convention the 3DGS papers report on).
DEFAULT_EVAL_STEP = 8
DEFAULT_HOLD_OUT = True
# A trainer check older than this is run again before a training starts.
DEFAULT_RECHECK_AFTER = 300.0
# Lightning redraws its bar every N batches with TQDM_MINITERS=N (by default twice per batch).
PROGRESS_REFRESH_STEPS = 10

_PROBE = """\
import json
r = {}
try:
    import torch
    r.update(torch=torch.__version__, build=torch.version.cuda, cuda=torch.cuda.is_available())
    if r["cuda"]:
        r["device"] = torch.cuda.get_device_name(0)
        r["hub"] = torch.hub.get_dir()
        import lightning
except BaseException as e:
    r["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(r), flush=True)
"""
# What torchvision downloads for each LPIPS backbone of the trainer's metric (lpips_net_type).
LPIPS_WEIGHTS = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


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


async def _capture(
    argv: Sequence[str],
    *,
    cwd: Path,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    limit: int = 256 * 1024,
) -> tuple[bool, int | None, str]:
    """Run a short command to its end: (timed out, exit status, its first and last output)."""
    head, tail = bytearray(), bytearray()

    def keep(chunk: bytes) -> None:
        room = limit // 2 - len(head)
        if room > 0:
            head.extend(chunk[:room])
            chunk = chunk[room:]
        tail.extend(chunk)
        del tail[: max(0, len(tail) - limit // 2)]

    outcome = await run_process(
        argv, cwd=cwd, timeout_s=timeout_s, on_output=keep, env=env, kill_grace=1
    )
    text = (head + tail).decode("utf-8", "replace")
    return outcome.timed_out, outcome.returncode, text


@dataclass(frozen=True)
class TrainerSetup:
    """How the server runs the trainer: what a dry run must check and a real run uses."""

    python: str
    checkout: Path | None
    require_cuda: bool = True
    timeout_s: float = 120.0
    config: Path | None = None
    extra_args: tuple[str, ...] = ()
    iterations: int = DEFAULT_ITERATIONS
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    hold_out: bool = DEFAULT_HOLD_OUT
    eval_step: int = DEFAULT_EVAL_STEP
    env: tuple[tuple[str, str], ...] | None = None  # None: the server's environment

    def environment(self) -> dict[str, str]:
        """The trainer's environment (trainer_environment of `env` or the server's)."""
        return trainer_environment(None if self.env is None else dict(self.env))


_LAST_CHECKS: dict[TrainerSetup, tuple[float, bool, str]] = {}


async def check_training_available(
    python: str,
    checkout: Path | None,
    require_cuda: bool,
    timeout_s: float,
    *,
    setup: TrainerSetup | None = None,
) -> tuple[bool, str]:
    """Whether `python` can run the trainer in `checkout`, and a sentence saying why (not).

    With `require_cuda` a short subprocess (killed after `timeout_s`) imports torch, asks for
    a CUDA device and imports lightning. Then the exact `main.py fit` command line the server
    would run (on a tiny dataset made for it) runs with `--print_config`: it imports everything
    the trainer imports and parses every flag and config, and its printed configuration is
    checked for settings that cannot work unattended. `setup` gives the config, extra
    arguments and options (its python, checkout, require_cuda and timeout_s are replaced by
    the positional arguments). The answer is remembered for `check_if_stale`.
    """
    base = setup or TrainerSetup(python, checkout)
    setup = TrainerSetup(
        **{**base.__dict__, "python": python, "checkout": checkout,
           "require_cuda": require_cuda, "timeout_s": timeout_s}
    )  # fmt: skip
    ok, detail = await _check(setup)
    _LAST_CHECKS[setup] = (time.monotonic(), ok, detail)
    return ok, detail


async def check_if_stale(setup: TrainerSetup, max_age_s: float) -> tuple[bool, str]:
    """The last check of `setup` when younger than `max_age_s`, else a new one."""
    last = _LAST_CHECKS.get(setup)
    if last is not None and time.monotonic() - last[0] < max_age_s:
        return last[1], last[2]
    return await check_training_available(
        setup.python, setup.checkout, setup.require_cuda, setup.timeout_s, setup=setup
    )


async def _check(setup: TrainerSetup) -> tuple[bool, str]:
    python, checkout, timeout_s = setup.python, setup.checkout, setup.timeout_s
    if checkout is None:
        return False, (
            "no gaussian-splatting-lightning checkout configured: set TRAINING_SERVER_TRAINER_PATH"
        )
    if (problem := _checkout_problem(checkout)) is not None:
        return False, problem
    code = _PROBE if setup.require_cuda else "print('{}')"
    try:
        timed_out, code_, output = await _capture(
            [python, "-c", code], cwd=checkout, timeout_s=timeout_s, env=setup.environment()
        )
    except OSError as exc:
        return False, f"python {python} cannot be started: {exc.strerror or exc}"
    if timed_out:
        return False, f"python {python} did not answer within {timeout_s:g} s (killed)"
    info = _last_json_object(output) if code_ == 0 else None
    if info is None:
        tail = (output.strip().splitlines() or [f"exit status {code_}"])[-1]
        return False, f"python {python} failed: {tail}"
    found = f"trainer checkout {checkout} found (CUDA not checked)"
    if setup.require_cuda:
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
        found = f"torch {info['torch']} on {info['device']}"
    problem = await dry_run(setup)
    if problem is not None:
        return False, problem
    lpips = lpips_weights_note(info.get("hub"), setup.extra_args)
    return True, f"{found}; the trainer's command line passed a dry run" + (
        f"; {lpips}" if lpips else ""
    )


def lpips_weights_note(hub: str | None, extra_args: Sequence[str]) -> str | None:
    """A sentence when the LPIPS backbone's weights are not in the trainer's torch hub cache."""
    if not hub:
        return None
    net = "alex"
    for i, arg in enumerate(extra_args[:-1]):
        if arg == "--model.metric.lpips_net_type":
            net = extra_args[i + 1]
    name = LPIPS_WEIGHTS.get(net)
    if name is None or (Path(hub) / "checkpoints" / name).is_file():
        return None
    return (
        f"LPIPS weights {name} are not in {hub}/checkpoints: the first training downloads "
        "them (offline it fails; see the README)"
    )


DRY_RUN_NAME = "availability-check"


async def dry_run(setup: TrainerSetup) -> str | None:
    """Run the server's `main.py fit` command line with `--print_config` on a tiny dataset;
    None when it passes, else a sentence naming what is wrong."""
    assert setup.checkout is not None
    with tempfile.TemporaryDirectory(prefix="gs-trainer-check-") as folder:
        root = Path(folder)
        dataset = write_probe_dataset(root / "dataset")
        argv = build_fit_command(
            python=setup.python,
            checkout=setup.checkout,
            dataset_path=dataset,
            output_root=root / "output",
            name=DRY_RUN_NAME,
            iterations=setup.iterations,
            config=setup.config,
            extra_args=setup.extra_args,
            checkpoint_every=setup.checkpoint_every,
            hold_out=setup.hold_out,
            eval_step=setup.eval_step,
            print_config=True,
        )
        try:
            timed_out, code, output = await _capture(
                argv, cwd=setup.checkout, timeout_s=setup.timeout_s, env=setup.environment()
            )
        except OSError as exc:
            return f"python {setup.python} cannot be started: {exc.strerror or exc}"
    if timed_out:
        return (
            f"the trainer's dry run (main.py fit --print_config) did not end within "
            f"{setup.timeout_s:g} s and was stopped"
        )
    if code != 0:
        return explain_trainer_failure(output, code)
    return config_problem(output, setup.environment())


_MISSING_MODULE = re.compile(r"No module named '([^']+)'")
_IMPORT_NAME = re.compile(r"ImportError: (cannot import name .*)$", re.MULTILINE)
_CLI_ERROR = re.compile(r"^error: (.*)", re.MULTILINE | re.DOTALL)


def explain_trainer_failure(output: str, code: int | None) -> str:
    """One sentence for a trainer that failed before training: what is missing or wrong."""
    if missing := _MISSING_MODULE.findall(output):
        module = missing[-1].split(".")[0]
        if module == "internal":
            return (
                "the trainer's main.py cannot import its own `internal` package: "
                "the checkout is incomplete or not gaussian-splatting-lightning"
            )
        return f"the trainer's Python cannot import {module}: install the trainer's requirements"
    if name := _IMPORT_NAME.findall(output):
        return (
            f"the trainer's Python fails an import ({name[-1].strip()}): "
            "install the trainer's requirements"
        )
    if cli := _CLI_ERROR.search(output):
        message = " ".join(cli[1].split())[:400]
        return f"the trainer rejects the server's command line or config: {message}"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    last = lines[-1].strip()[:400] if lines else f"exit status {code}"
    return f"the trainer's dry run failed (exit status {code}): {last}"


_TOP_LEVEL = re.compile(r"^(logger|viewer|max_steps):[ \t]*(.*?)[ \t]*$", re.MULTILINE)
WANDB_QUIET_MODES = {"offline", "disabled", "dryrun"}


def config_problem(printed: str, env: Mapping[str, str]) -> str | None:
    """A sentence for a printed trainer configuration that cannot run unattended, or None."""
    values = dict(_TOP_LEVEL.findall(printed))
    if values.get("viewer", "").lower() == "true":
        return (
            "the trainer's configuration turns its web viewer on (viewer: true): training "
            "would wait for the viewer forever after its last step; remove it"
        )
    logger = values.get("logger", "").strip("'\"")
    online = env.get("WANDB_MODE", "").lower() not in WANDB_QUIET_MODES
    if logger == "wandb" and online and not env.get("WANDB_API_KEY"):
        return (
            "the trainer's configuration logs to wandb online but no WANDB_API_KEY is "
            "set: it would wait for a login; set WANDB_API_KEY or WANDB_MODE=offline"
        )
    return None


def _png(width: int, height: int, rgb: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\0" + rgb[y * width * 3 : (y + 1) * width * 3] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_probe_dataset(folder: Path, images: int = 3, width: int = 32, height: int = 24) -> Path:
    """A tiny valid COLMAP dataset (PINHOLE camera, `images` PNG frames, 8 points) in `folder`."""
    sparse = folder / "sparse" / "0"
    sparse.mkdir(parents=True)
    (folder / "images").mkdir()
    focal = float(width)
    (sparse / "cameras.bin").write_bytes(
        struct.pack("<QiiQQ4d", 1, 1, 1, width, height, focal, focal, width / 2, height / 2)
    )
    records = [struct.pack("<Q", images)]
    for i in range(images):
        name = f"frame_{i:03d}.png"
        pixels = bytes((x * 7 + y * 5 + i * 40) % 256 for y in range(height)
                       for x in range(width) for _ in range(3))  # fmt: skip
        png = _png(width, height, pixels)
        (folder / "images" / name).write_bytes(png)
        records.append(struct.pack("<i7di", i + 1, 1.0, 0, 0, 0, 0.1 * i, 0, 0, 1))
        records.append(name.encode() + b"\0" + struct.pack("<Q", 0))
    (sparse / "images.bin").write_bytes(b"".join(records))
    points = [struct.pack("<Q", 8)]
    for j in range(8):
        x, y, z = (j & 1) - 0.5, ((j >> 1) & 1) - 0.5, 3.0 + ((j >> 2) & 1)
        points.append(struct.pack("<Q3d3Bd", j + 1, x, y, z, 128, 128, 128, 0.5))
        points.append(struct.pack("<Q", 1) + struct.pack("<ii", 1, 0))
    (sparse / "points3D.bin").write_bytes(b"".join(points))
    return folder


def _last_json_object(output: str) -> dict[str, Any] | None:
    """The last output line that is a JSON object (warnings may surround it)."""
    for line in reversed(output.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return None


def checkpoint_steps(iterations: int, every: int) -> list[int]:
    """Steps before the last that leave a checkpoint and a .ply: every `every` steps (the
    trainer always saves at the last step too)."""
    if every < 1:
        raise ValueError("the checkpoint interval must be at least 1 step")
    return list(range(every, iterations, every))


def save_iterations_for(steps: Sequence[int]) -> list[int]:
    """`--save_iterations` for checkpoints named after `steps`.

    The trainer saves at the start of training step `s` (counted from 1) when `s` is listed,
    with the `s - 1` steps done so far in the names: `epoch=E-step={s-1}.ckpt` and
    `point_cloud/iteration_{s-1}/` (GaussianSplatting.training_step, internal/cli.py).
    """
    return [step + 1 for step in steps]


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
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    hold_out: bool = DEFAULT_HOLD_OUT,
    eval_step: int = DEFAULT_EVAL_STEP,
    print_config: bool = False,
) -> list[str]:
    """argv for `main.py fit`, results in `output_root/name/`; run it with cwd=checkout.

    `--data.parser Colmap` precedes `--config`, so a config may choose a Colmap-derived parser
    (jsonargparse applies arguments in order); the server's own options follow the config and
    `extra_args` follow them, so both may override. A relative `config` is found in the
    checkout. A checkpoint and a .ply are saved every `checkpoint_every` steps; `hold_out`
    keeps every `eval_step`-th image out of training (split_mode experiment) and validates
    on those; the validation figures go to `metrics/val-step=S.csv`.
    """
    if isinstance(extra_args, str):
        raise TypeError("extra_args must be a sequence of arguments, not a string")
    if not name or name in {".", ".."} or "/" in name or "\\" in name:
        raise ValueError(f"experiment name {name!r} must be a single path component")
    resolve_iterations(iterations)
    if not 1 <= down_sample_factor <= DOWN_SAMPLE_FACTOR_MAX:
        raise ValueError(f"down_sample_factor must be between 1 and {DOWN_SAMPLE_FACTOR_MAX}")
    if eval_step < 2:
        raise ValueError("eval_step must be at least 2")
    saves = save_iterations_for(checkpoint_steps(iterations, checkpoint_every))
    argv = [python, "-u", str(checkout / "main.py"), "fit", "--data.parser", "Colmap"]
    if config is not None:
        argv += ["--config", str(config if config.is_absolute() else checkout / config)]
    argv += [
        "--data.path", str(dataset_path),
        "--data.parser.down_sample_factor", str(down_sample_factor),
        "--data.parser.split_mode", "experiment" if hold_out else "reconstruction",
        "--data.parser.eval_step", str(eval_step),
        "-n", name,
        "--output", str(output_root),
        "--max_steps", str(iterations),
        "--save_iterations", json.dumps(saves, separators=(",", ":")),
        "--model.save_ply", "true",
        "--model.save_val_metrics", "true",
        *extra_args,
    ]  # fmt: skip
    if resume:
        argv += ["--ckpt_path", "last"]
    return [*argv, "--print_config"] if print_config else argv


def trainer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the trainer: unbuffered output, full-width bars, fewer redraws, and
    wandb offline unless the environment configures it (WANDB_MODE or WANDB_API_KEY)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MINITERS", str(PROGRESS_REFRESH_STEPS))
    env.pop("COLUMNS", None)  # tqdm would cut the metrics off at that width
    env.pop("LINES", None)
    if "WANDB_MODE" not in env and "WANDB_API_KEY" not in env:
        env["WANDB_MODE"] = "offline"  # a wandb config must never wait for a login
    return env


# ------------------------------------------------------------------------------ quality

_VAL_CSV_RE = re.compile(r"^val-step=(\d+)\.csv$")


def read_validation_csv(path: Path) -> tuple[dict[str, float], int]:
    """The MEAN row of a `metrics/val-step=S.csv` the trainer writes, and its image count."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["name"]:
        raise ValueError(f"{path.name} has no header")
    fields = rows[0][1:]
    images = sum(1 for row in rows[1:] if row and row[0] not in {"", "MEAN"})
    mean = next((row for row in rows if row[:1] == ["MEAN"]), None)
    if mean is None:
        raise ValueError(f"{path.name} has no MEAN row")
    return {k: float(v) for k, v in zip(fields, mean[1:], strict=False) if v}, images


class Quality(TypedDict):
    """`metadata.training.quality`: the final validation figures and what they were measured on."""

    psnr: float | None
    ssim: float | None
    lpips: float | None
    eval_images: int | None
    split: Literal["held_out", "training_views"]
    step: int | None  # the training step they were measured at
    source: Literal["metrics_csv", "progress_bar"]
    note: str


def training_quality(
    output_dir: Path, iterations: int, parser: TrainingProgressParser, hold_out: bool
) -> Quality | None:
    """The final validation figures: the trainer's `metrics/val-step=S.csv` with the highest
    step (8 decimals), else the last `val/...` figures of its progress bar (3 significant
    digits); None when the trainer reported neither."""
    figures: dict[str, float] = {}
    images: int | None = None
    step: int | None = None
    source: Literal["metrics_csv", "progress_bar"] = "metrics_csv"
    folder = output_dir / "metrics"
    found = sorted(
        (int(m[1]), p)
        for p in (folder.iterdir() if folder.is_dir() else ())
        if (m := _VAL_CSV_RE.match(p.name)) and int(m[1]) <= iterations
    )
    for csv_step, path in reversed(found):
        with contextlib.suppress(OSError, ValueError):
            figures, images = read_validation_csv(path)
            step = csv_step
            break
    if not figures and parser.validation:
        figures, step, source = dict(parser.validation), parser.validation_step, "progress_bar"
        images = parser.image_counts[1] if parser.image_counts else None
    if not figures:
        return None
    count = f"{images} " if images is not None else ""
    if hold_out:
        note = f"PSNR and SSIM on {count}held-out frames the model never saw"
    else:
        note = (
            f"PSNR and SSIM on {count}training views (no frames held out), so they flatter "
            "the model; hold frames out for a fair score"
        )
    if "lpips" not in figures:
        note += "; LPIPS skipped (the trainer reported none)"
    return Quality(
        psnr=figures.get("psnr"),
        ssim=figures.get("ssim"),
        lpips=figures.get("lpips"),
        eval_images=images,
        split="held_out" if hold_out else "training_views",
        step=step,
        source=source,
        note=note,
    )
