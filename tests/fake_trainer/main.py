"""Stand-in for gaussian-splatting-lightning's `main.py`, used ONLY by this project's tests.

It trains nothing. It accepts the command line that `training_server_trainer.build_fit_command`
builds (`fit --data.parser Colmap --data.path D [--data.parser.split_mode M --data.parser.eval_step
K] -n NAME --output DIR --max_steps N --save_iterations [..] --model.save_ply true
[--config F] [--ckpt_path last] [--print_config] ...`), rejects unknown flags the way the real
CLI (jsonargparse) does (usage + `error: unrecognized arguments: ...`, exit status 2), and
behaves like the real trainer where the server can see it:

- `--print_config` prints the parsed configuration as YAML (top-level `logger`, `viewer`,
  `max_steps`, ...; a config file's top-level `logger:`/`viewer:` count, later flags win) and
  exits 0 before touching the dataset, as LightningCLI does;

- progress on stdout in the real format: Lightning's `Epoch E` bar at line offset 2 and the
  trainer's `Training` bar (global step / max_steps) at offset 1, redrawn with `\\r` and moved
  with `ESC[A`, with `train/loss`, `train/rgb_diff`, `train/ssim` and `val/...` metrics; one
  step per image, a validation bar after every epoch; other messages as the real one prints;
- the real output layout under `{output}/{name}/`: `cameras.json`, `cfg_args`, `input.ply`,
  `lightning_logs/version_K/{config.yaml,hparams.yaml,events.out.tfevents.*}` (the events
  file is a placeholder), `point_cloud/iteration_N/point_cloud.ply` (a valid binary 3D
  Gaussian Splatting PLY: x y z nx ny nz f_dc_0..2 f_rest_0..44 opacity scale_0..2 rot_0..3,
  seeded from `sparse/0/points3D.bin` when readable; the real trainer leaves out the unused
  normals nx ny nz, the original 3DGS writes them), `checkpoints/epoch=E-step=S.ckpt`
  (small zip files) and `checkpoints/epoch=E-step=S-xyz_rgb.ply` exactly where the real one
  saves: at the start of step s for each s in `--save_iterations` below max_steps, named
  after the s - 1 steps done (not again right after resuming from that step), and at the end
  (named epoch+1 as Lightning counts the stopped epoch), and `metrics/val-step=S.csv` (the
  real columns name,loss,rgb_diff,ssim,psnr,lpips, csv line ends, a blank row, a MEAN row)
  with `--model.save_val_metrics true`;
- `--data.parser.split_mode experiment` trains on the images whose index is not a multiple
  of `--data.parser.eval_step` and validates on the others; `reconstruction` (the default)
  trains on all and validates on every eval_step-th; validation figures are lower on
  held-out images;
- it refuses to start when the output folder holds `point_cloud/` or `checkpoints/` and no
  `--ckpt_path` was given, and `--ckpt_path last` continues from the highest-step checkpoint
  inside the epoch it stopped in (Lightning goes on counting that epoch's batches);
- it needs `{data.path}/sparse[/0]/cameras.{bin,txt}` and `{data.path}/images/` (or
  `images_{factor}/` with `--data.parser.down_sample_factor factor`), like the real parser.

Environment:
    FAKE_TRAINER_STEP_SECONDS      sleep per step (default 0.008: 300 steps take ~2.5 s)
    FAKE_TRAINER_MODE              normal | crash | hang | offline
    FAKE_TRAINER_CRASH_AT          step of the crash (default: half way); a traceback, exit 1
    (offline: at set-up, fail as the real trainer does on a machine without internet access,
    when its LPIPS metric tries to download the backbone's weights into the torch cache)
    FAKE_TRAINER_HANG_AT           step where it stops printing and sleeps forever (default:
                                   half way), after starting a child that ignores SIGTERM
                                   (its pid goes to {output}/{name}/fake_trainer_child.pid)
    FAKE_TRAINER_GAUSSIANS         Gaussians in the .ply (default 3000)
    FAKE_TRAINER_MISSING_MODULE    a module the trainer imports that is "not installed": every
                                   run ends at once with Python's ModuleNotFoundError
    TQDM_MINITERS                  redraw the epoch bar every N steps, as Lightning does

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, ClassVar, NoReturn

OUT = sys.stdout
C0 = 0.28209479177387814  # degree-0 spherical harmonic
BLOCKS = " ▏▎▍▌▋▊▉█"
PLY_PROPERTIES = [
    "x", "y", "z", "nx", "ny", "nz",
    *(f"f_dc_{i}" for i in range(3)),
    *(f"f_rest_{i}" for i in range(45)),
    "opacity",
    *(f"scale_{i}" for i in range(3)),
    *(f"rot_{i}" for i in range(4)),
]  # fmt: skip


class OutOfMemoryError(RuntimeError):
    """What the crash mode raises, printed like torch's."""


OutOfMemoryError.__module__ = "torch"


# ------------------------------------------------------------------------------ command line


class CliParser(argparse.ArgumentParser):
    """argparse with jsonargparse's error output (usage, tip, `error: ...`, exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"tip: For details of accepted options run: {self.prog} --help\n")
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def boolean(text: str) -> bool:
    if text.lower() in {"true", "yes", "1"}:
        return True
    if text.lower() in {"false", "no", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


def int_list(text: str) -> list[int]:
    try:
        value = json.loads(text if text.startswith("[") else f"[{text}]")
        return [int(v) for v in value]
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers") from exc


def parse_args(argv: list[str]) -> argparse.Namespace:
    top = CliParser(prog="main.py", allow_abbrev=False)
    if not argv or argv[0] != "fit":
        top.error(f"expected the subcommand 'fit' (the stand-in knows only fit), got {argv[:1]}")
    p = CliParser(prog="main.py fit", allow_abbrev=False)
    p.add_argument("-c", "--config", action="append", default=[])
    p.add_argument("--data.path", dest="data_path")
    p.add_argument("--data.parser", dest="data_parser", default="Colmap")
    p.add_argument("--data.parser.down_sample_factor", dest="factor", type=int, default=1)
    p.add_argument(
        "--data.parser.split_mode",
        dest="split_mode",
        choices=["reconstruction", "experiment"],
        default="reconstruction",
    )
    p.add_argument("--data.parser.eval_step", dest="eval_step", type=int, default=8)
    p.add_argument("-n", "--name")
    p.add_argument("-v", "--version")
    p.add_argument("--output", default=str(Path(__file__).resolve().parent / "outputs"))
    p.add_argument("--max_steps", "--iterations", "--iteration", "--steps", "--step", type=int)
    p.add_argument("--trainer.max_steps", dest="trainer_max_steps", type=int, default=30_000)
    p.add_argument("--trainer.check_val_every_n_epoch", dest="val_every", type=int, default=1)
    p.add_argument("--model.save_ply", dest="save_ply", type=boolean, default=False)
    p.add_argument("--model.save_val_metrics", dest="save_val_metrics", type=boolean)
    p.add_argument("--save_iterations", type=int_list, default=[7_000, 30_000])
    p.add_argument("--ckpt_path")
    p.add_argument("--pbar_rate", type=int)
    p.add_argument("--logger")
    p.add_argument("--viewer", action="store_const", const=True)
    p.add_argument("--print_config", action="store_true")
    args = p.parse_args(argv[1:])
    if args.data_parser not in {"Colmap", "internal.dataparsers.colmap_dataparser.Colmap"}:
        p.error(f'Parser key "data.parser": the stand-in only knows Colmap, not {args.data_parser}')
    if args.data_path is None:
        p.error(
            'Key "data.path" is required but not included in config object or its value is None'
        )
    from_configs: dict[str, str] = {}
    for config in args.config:
        if not Path(config).is_file():
            p.error(f'Parser key "config": Unable to load config "{config}"')
        for line in Path(config).read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key in {"logger", "viewer"}:
                from_configs[key] = value.strip()
    args.logger = args.logger or from_configs.get("logger", "tensorboard")
    args.viewer = args.viewer or from_configs.get("viewer", "false").lower() == "true"
    if args.eval_step <= 1:
        p.error("eval_step must > 1")
    return args


def print_config(args: argparse.Namespace) -> None:
    """What `--print_config` prints (the keys the server reads, in jsonargparse's YAML)."""
    max_steps = args.max_steps if args.max_steps is not None else args.trainer_max_steps
    print(
        "# lightning.pytorch==2.3.3 (printed by the test stand-in)\n"
        f"seed_everything: 42\ntrainer:\n  accelerator: gpu\n  max_steps: {max_steps}\n"
        f"model:\n  save_iterations:\n"
        + "".join(f"  - {s}\n" for s in args.save_iterations)
        + f"  save_ply: {str(args.save_ply).lower()}\n"
        f"data:\n  path: {args.data_path}\n  parser:\n"
        "    class_path: internal.dataparsers.colmap_dataparser.Colmap\n    init_args:\n"
        f"      split_mode: {args.split_mode}\n      eval_step: {args.eval_step}\n"
        f"      down_sample_factor: {args.factor}\n"
        f"max_steps: {args.max_steps if args.max_steps is not None else 'null'}\n"
        f"name: {args.name or 'null'}\nsave_iterations:\n"
        + "".join(f"- {s}\n" for s in args.save_iterations)
        + f"logger: {args.logger}\noutput: {args.output}\n"
        f"viewer: {str(args.viewer).lower()}\nckpt_path: {args.ckpt_path or 'null'}",
        flush=True,
    )


# ------------------------------------------------------------------------------ progress bars


def interval(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def number(value: Any) -> str:
    """A metric as Lightning's Tqdm.format_num shows it (3 significant digits, padded)."""
    if not isinstance(value, float):
        return str(value)
    short = f"{value:.3g}".replace("e+0", "e+").replace("e-0", "e-")
    text = short if len(short) < len(str(value)) else str(value)
    if "e" not in text:
        if "." not in text and len(text) < 5:
            text += "."
        text += "0" * (5 - len(text))
    return text


class Bar:
    """A tqdm bar drawn at a line offset, as Lightning and the trainer configure theirs."""

    open_bars: ClassVar[list[Bar]] = []

    def __init__(
        self, desc: str, position: int, total: int | None, lightning: bool, leave: bool
    ) -> None:
        self.desc, self.position, self.total = desc, position, total
        self.lightning, self.leave = lightning, leave  # lightning: its bar_format (always it/s)
        self.n, self.postfix, self.last_len = 0, "", 0
        self.start = self.last_print = time.monotonic()
        Bar.open_bars.append(self)
        self.refresh()

    def text(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if self.n and elapsed > 0 else None
        rate_text = f"{rate:5.2f}it/s" if rate else "?it/s"
        if rate and not self.lightning and 1 / rate > 1:
            rate_text = f"{1 / rate:5.2f}s/it"
        postfix = f", {self.postfix}" if self.postfix else ""
        total = self.total if self.total and self.n < self.total + 0.5 else None
        if total:
            frac = self.n / total
            full, part = divmod(int(frac * 10 * 8), 8)
            bar = BLOCKS[-1] * full + (BLOCKS[part] + " " * (9 - full) if full < 10 else "")
            left = interval((total - self.n) / rate) if rate else "?"
            return (
                f"{self.desc}: {frac * 100:3.0f}%|{bar}| {self.n}/{total} "
                f"[{interval(elapsed)}<{left}, {rate_text}{postfix}]"
            )
        if self.lightning:
            left = "00:00" if rate else "?"
            times = f"{interval(elapsed)}<{left}"
            return f"{self.desc}: |{' ' * 10}| {self.n}/? [{times}, {rate_text}{postfix}]"
        return f"{self.desc}: {self.n}it [{interval(elapsed)}, {rate_text}{postfix}]"

    def draw(self, text: str, position: int) -> None:
        pad = " " * max(self.last_len - len(text), 0)
        OUT.write("\n" * position + "\r" + text + pad + "\x1b[A" * position)
        OUT.flush()
        self.last_len = len(text)

    def refresh(self) -> None:
        self.draw(self.text(), self.position)

    def reset(self, total: int) -> None:
        self.n, self.total, self.start = 0, total, time.monotonic()
        self.refresh()

    def set_description(self, desc: str) -> None:
        self.desc = desc
        self.refresh()

    def set_postfix(self, metrics: dict[str, Any]) -> None:
        self.postfix = ", ".join(f"{k}={number(v)}" for k, v in metrics.items())
        self.refresh()

    def update(self, steps: int) -> None:
        self.n += steps
        if time.monotonic() - self.last_print >= 0.1:  # tqdm's mininterval
            self.refresh()
            self.last_print = time.monotonic()

    def clear(self) -> None:
        up = "\x1b[A" * self.position
        OUT.write("\n" * self.position + "\r" + " " * self.last_len + "\r" + up)
        self.last_len = 0

    def close(self) -> None:
        Bar.open_bars.remove(self)
        if self.leave:
            self.draw(self.text(), 0)
            OUT.write("\n")
        else:
            self.draw("", self.position)
        OUT.flush()

    @classmethod
    def write(cls, message: str) -> None:
        """Print a line above the bars, as tqdm.write (LightningModule.print) does."""
        for bar in cls.open_bars:
            bar.clear()
        OUT.write(message + "\n")
        for bar in cls.open_bars:
            bar.refresh()


# ------------------------------------------------------------------------------ dataset


def read_camera(sparse: Path, factor: int) -> dict[str, float]:
    """The first camera's size and intrinsics, scaled by `factor` (defaults when unreadable)."""
    camera = {"width": 640.0, "height": 480.0, "fx": 500.0, "fy": 500.0, "cx": 320.0, "cy": 240.0}
    try:
        data = (sparse / "cameras.bin").read_bytes()
        model, width, height = struct.unpack_from("<iQQ", data, 12)
        count = {0: 3, 1: 4}.get(model, 4)  # SIMPLE_PINHOLE, PINHOLE
        params = struct.unpack_from(f"<{count}d", data, 32)
        fx, fy = (params[0], params[0]) if count == 3 else params[:2]
        camera.update(width=width, height=height, fx=fx, fy=fy, cx=params[-2], cy=params[-1])
    except (OSError, struct.error):
        pass
    return {k: v / factor for k, v in camera.items()}


def read_points(
    sparse: Path, limit: int = 100_000
) -> list[tuple[float, float, float, int, int, int]]:
    """xyz and rgb of COLMAP's points3D.bin (empty when it is missing or unreadable)."""
    points = []
    try:
        data = (sparse / "points3D.bin").read_bytes()
        (count,) = struct.unpack_from("<Q", data, 0)
        offset = 8
        for _ in range(min(count, limit)):
            _, x, y, z, r, g, b, _, track = struct.unpack_from("<QdddBBBdQ", data, offset)
            offset += 51 + 8 * track
            points.append((x, y, z, r, g, b))
    except (OSError, struct.error):
        pass
    return points


def load_dataset(args: argparse.Namespace) -> tuple[list[str], dict[str, float], list[Any]]:
    path = Path(args.data_path)
    sparse = path / "sparse" / "0" if (path / "sparse" / "0").is_dir() else path / "sparse"
    if not any((sparse / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
        raise FileNotFoundError(f"no COLMAP cameras.bin or cameras.txt in {sparse}")
    image_dir = path / ("images" if args.factor == 1 else f"images_{args.factor}")
    images = (
        sorted(p.name for p in image_dir.glob("*") if p.is_file()) if image_dir.is_dir() else []
    )
    if not images:
        raise FileNotFoundError(f"[Errno 2] No such file or directory: '{image_dir}' (no images)")
    return images, read_camera(sparse, args.factor), read_points(sparse)


# ------------------------------------------------------------------------------ outputs


def write_ply(path: Path, names: list[str], rows: list[tuple[Any, ...]], fmt: str) -> None:
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(rows)}"]
    types = {"f": "float", "B": "uchar"}
    header += [f"property {types[t]} {name}" for name, t in zip(names, fmt, strict=True)]
    packer = struct.Struct("<" + fmt)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(("\n".join([*header, "end_header"]) + "\n").encode("ascii"))
        f.write(b"".join(packer.pack(*row) for row in rows))
    tmp.replace(path)


def make_gaussians(points: list[Any], count: int, seed: int) -> list[tuple[float, ...]]:
    """`count` Gaussians around the SfM points (or in a unit cube), coloured like them."""
    rnd = random.Random(seed)
    rows = []
    for i in range(count):
        if points:
            x, y, z, r, g, b = points[i % len(points)]
        else:
            x, y, z = (rnd.uniform(-1, 1) for _ in range(3))
            r, g, b = (rnd.randrange(256) for _ in range(3))
        xyz = (x + rnd.gauss(0, 0.01), y + rnd.gauss(0, 0.01), z + rnd.gauss(0, 0.01))
        dc = ((c / 255 - 0.5) / C0 for c in (r, g, b))
        opacity = math.log((p := rnd.uniform(0.3, 0.95)) / (1 - p))
        scales = (math.log(rnd.uniform(0.002, 0.02)) for _ in range(3))
        q = [1.0, *(rnd.gauss(0, 0.1) for _ in range(3))]
        norm = math.sqrt(sum(v * v for v in q))
        rows.append(
            (*xyz, 0.0, 0.0, 0.0, *dc, *([0.0] * 45), opacity, *scales, *(v / norm for v in q))
        )
    return rows


class Run:
    """One fit: the output folder, the Gaussians and the checkpoints."""

    def __init__(
        self, args: argparse.Namespace, output: Path, images: list[str], points: list[Any]
    ) -> None:
        self.args, self.output, self.points = args, output, points
        self.count = int(os.environ.get("FAKE_TRAINER_GAUSSIANS", "3000"))
        self.images = images

    def save(self, epoch: int, step: int) -> None:
        """What GaussianSplatting.save_gaussians writes: the .ply and a checkpoint."""
        if self.args.save_ply:
            folder = self.output / "point_cloud" / f"iteration_{step}"
            folder.mkdir(parents=True, exist_ok=True)
            write_ply(
                folder / "point_cloud.ply",
                PLY_PROPERTIES,
                make_gaussians(self.points, self.count, step),
                "f" * 62,
            )
            Bar.write(f"Gaussians saved to {folder / 'point_cloud.ply'}")
        checkpoints = self.output / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoints / f"epoch={epoch}-step={step}.ckpt"
        state = {"epoch": epoch, "global_step": step, "gaussians": self.count, "stand_in": True}
        with zipfile.ZipFile(ckpt, "w") as z:
            z.writestr("archive/fake_trainer_state.json", json.dumps(state))
        xyz = [(*p[:3], 0.0, 0.0, 0.0, *p[3:]) for p in self.points[:1000]]
        write_ply(
            checkpoints / f"epoch={epoch}-step={step}-xyz_rgb.ply",
            ["x", "y", "z", "nx", "ny", "nz", "red", "green", "blue"],
            xyz,
            "ffffffBBB",
        )
        Bar.write(f"Checkpoint saved to {ckpt}")

    def write_setup_files(self, camera: dict[str, float], version: int) -> None:
        """cameras.json, cfg_args, input.ply, appearance groups and the Lightning logs."""
        n = len(self.images)
        cameras = [
            {"id": i, "img_name": name,
             "width": int(camera["width"]), "height": int(camera["height"]),
             "position": [math.cos(i / n * 2 * math.pi), 0.0, math.sin(i / n * 2 * math.pi)],
             "rotation": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
             "fy": camera["fy"], "fx": camera["fx"], "cx": camera["cx"], "cy": camera["cy"],
             "time": None, "appearance_id": i, "normalized_appearance_id": i / n}
            for i, name in enumerate(self.images)
        ]  # fmt: skip
        (self.output / "cameras.json").write_text(json.dumps(cameras, indent=4))
        groups = {name: [i, i / n] for i, name in enumerate(self.images)}
        (self.output / "appearance_group_ids.json").write_text(json.dumps(groups, indent=4))
        (self.output / "cfg_args").write_text(
            f"Namespace(sh_degree=3, white_background=False, source_path='{self.args.data_path}', "
            "images='images', eval=True, resolution=1, data_device='cpu')"
        )
        xyz = [(*p[:3], 0.0, 0.0, 0.0, *p[3:]) for p in self.points]
        write_ply(
            self.output / "input.ply",
            ["x", "y", "z", "nx", "ny", "nz", "red", "green", "blue"],
            xyz,
            "ffffffBBB",
        )
        logs = self.output / "lightning_logs" / f"version_{version}"
        logs.mkdir(parents=True)
        a = self.args
        (logs / "config.yaml").write_text(
            f"# lightning.pytorch==2.3.3 (written by the test stand-in)\nseed_everything: 42\n"
            f"trainer:\n  accelerator: gpu\n  devices: 1\n  max_steps: {a.max_steps}\n"
            f"model:\n  save_ply: {str(a.save_ply).lower()}\n"
            f"  save_iterations: {a.save_iterations}\n"
            f"data:\n  path: {a.data_path}\n  parser:\n"
            "    class_path: internal.dataparsers.colmap_dataparser.Colmap\n"
            f"    init_args:\n      down_sample_factor: {a.factor}\n"
            f"name: {a.name}\noutput: {a.output}\nckpt_path: {a.ckpt_path}\n"
        )
        (logs / "hparams.yaml").write_text(
            f"output_path: {self.output}\nsave_iterations: {a.save_iterations}\n"
        )
        events = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
        (logs / events).write_bytes(b"placeholder written by the test stand-in\n")

    def write_metrics(self, step: int, rows: list[tuple[str, dict[str, float]]]) -> None:
        """metrics/val-step=S.csv as GaussianSplatting.on_validation_epoch_end writes it."""
        folder = self.output / "metrics"
        folder.mkdir(exist_ok=True)
        fields = list(rows[0][1])
        with (folder / f"val-step={step}.csv").open("w") as f:  # csv's own \r\n line ends
            writer = csv.writer(f)
            writer.writerow(["name", *fields])
            for name, metrics in rows:
                writer.writerow([name, *(f"{metrics[k]:.8f}" for k in fields)])
            writer.writerow([""] * (len(fields) + 1))
            means = (sum(m[k] for _, m in rows) / len(rows) for k in fields)
            writer.writerow(["MEAN", *(f"{v:.8f}" for v in means)])


# ------------------------------------------------------------------------------ training


def find_checkpoint(output: Path) -> Path:
    """`--ckpt_path last`: the checkpoint with the highest step (GaussianModelLoader's rule)."""
    best, best_step = None, -1
    for path in (output / "checkpoints").glob("*.ckpt"):
        try:
            step = int(path.name[path.name.rfind("=") + 1 : path.name.rfind(".")])
        except ValueError:
            continue
        if step > best_step:
            best, best_step = path, step
    if best is None:
        plys = list((output / "point_cloud").glob("iteration_*/point_cloud.ply"))
        assert plys, "not a checkpoint or point cloud can be found"
        raise AssertionError(f"not a checkpoint can be found in {output}")
    print(f"Auto select checkpoint file: {best}", flush=True)
    return best


def load_checkpoint(path: Path) -> tuple[int, int]:
    try:
        with zipfile.ZipFile(path) as z:
            state = json.loads(z.read("archive/fake_trainer_state.json"))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise RuntimeError(
            "PytorchStreamReader failed reading zip archive: failed finding central directory"
        ) from exc
    return int(state["epoch"]), int(state["global_step"])


def stop_here(output: Path) -> NoReturn:
    """FAKE_TRAINER_MODE=hang: start a child that ignores SIGTERM, then never print again."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "while True: time.sleep(3600)",
        ]
    )
    (output / "fake_trainer_child.pid").write_text(str(child.pid))
    while True:
        time.sleep(3600)


def split(images: list[str], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(train, val) as ColmapDataParser.build_step_split_indices picks them."""
    if args.split_mode == "experiment":
        train_set = [n for i, n in enumerate(images) if i % args.eval_step != 0]
        return train_set, images[:: args.eval_step]
    return list(images), images[:: args.eval_step]


def train(args: argparse.Namespace) -> None:
    max_steps = args.max_steps if args.max_steps is not None else args.trainer_max_steps
    name = args.name or "_".join(args.data_path.strip("/").split("/")[-3:])
    output = Path(args.output) / name
    if args.version is not None:
        output = output / args.version
    output.mkdir(parents=True, exist_ok=True)
    print(f"output path: {output}", flush=True)
    ckpt_path = find_checkpoint(output) if args.ckpt_path == "last" else args.ckpt_path
    if ckpt_path is None:
        assert not ((output / "point_cloud").exists() or (output / "checkpoints").exists()), (
            f"checkpoint or point cloud output already exists in '{output}', \n"
            "please specific a different experiment name (-n) or version (-v)"
        )
    images, camera, points = load_dataset(args)
    train_images, val_images = split(images, args)
    print(
        f"[colmap dataparser] train set images: {len(train_images)}, "
        f"val set images: {len(val_images)}, loaded mask: 0",
        flush=True,
    )
    sys.stderr.write(
        "Seed set to 42\nGPU available: True (cuda), used: True\n"
        "TPU available: False, using: 0 TPU cores\n"
    )
    sys.stderr.write(
        "HPU available: False, using: 0 HPUs\nLOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]\n"
    )
    version = (
        sum(1 for _ in (output / "lightning_logs").glob("version_*"))
        if (output / "lightning_logs").is_dir()
        else 0
    )
    if os.environ.get("FAKE_TRAINER_MODE") == "offline":
        fail_to_download()
    run = Run(args, output, train_images, points)
    run.write_setup_files(camera, version)
    epoch, step, restored = 0, 0, -1
    if ckpt_path is not None:
        sys.stderr.write(f"Restoring states from the checkpoint path at {ckpt_path}\n")
        epoch, step = load_checkpoint(Path(ckpt_path))
        restored = step
        sys.stderr.write(f"Restored all states from the checkpoint at {ckpt_path}\n")
    sys.stderr.flush()
    if step >= max_steps:
        sys.stderr.write(f"`Trainer.fit` stopped: `max_steps={max_steps}` reached.\n")
        return

    env = os.environ
    step_seconds = float(env.get("FAKE_TRAINER_STEP_SECONDS", "0.008"))
    mode = env.get("FAKE_TRAINER_MODE", "normal")
    half = max(step + 1, max_steps // 2)
    crash_at = int(env.get("FAKE_TRAINER_CRASH_AT", half)) if mode == "crash" else -1
    hang_at = int(env.get("FAKE_TRAINER_HANG_AT", half)) if mode == "hang" else -1
    refresh = max(int(env.get("TQDM_MINITERS", "1")), args.pbar_rate or 1)
    per_epoch, rnd = len(train_images), random.Random(step)
    held_out = args.split_mode == "experiment"

    sanity = Bar("Sanity Checking", 2, None, lightning=True, leave=False)
    sanity.reset(1)
    sanity.set_description("Sanity Checking DataLoader 0")
    sanity.n = 1
    sanity.refresh()
    sanity.close()
    main_bar = Bar("Training", 2, None, lightning=True, leave=True)
    overall = Bar("Training", 1, max_steps, lightning=False, leave=False)
    overall.n = step  # update(global_step) right after drawing: too soon to redraw
    epoch_metrics: dict[str, Any] = {}
    train_metrics: dict[str, Any] = {}
    # Lightning resumes inside the epoch the checkpoint was saved in, counting on its batches.
    batch = step - epoch * per_epoch if 0 <= step - epoch * per_epoch < per_epoch else 0
    while step < max_steps:
        main_bar.reset(per_epoch)
        main_bar.set_description(f"Epoch {epoch}")
        while batch < per_epoch and step < max_steps:
            if step + 1 in args.save_iterations and step + 1 < max_steps and step != restored:
                run.save(epoch, step)  # the trainer saves before the step, named after step - 1
            if step + 1 == hang_at:
                stop_here(output)
            if step + 1 == crash_at:
                render_step(step + 1)
            time.sleep(step_seconds)
            step, batch = step + 1, batch + 1
            loss = 0.25 * math.exp(-step / 2000) + 0.03 + rnd.uniform(-0.01, 0.01)
            train_metrics = {
                "train/loss": loss,
                "train/rgb_diff": loss * 0.8,
                "train/ssim": 1 - loss * 2,
            }
            if batch % refresh == 0 or batch == per_epoch:
                main_bar.n = batch
                main_bar.refresh()
                main_bar.set_postfix(train_metrics)
        ended_epoch = batch == per_epoch
        if ended_epoch and (epoch + 1) % args.val_every == 0:
            epoch_metrics.update(validate(run, main_bar, step, val_images, held_out))
        main_bar.set_postfix(train_metrics)
        epoch_metrics.update(train_metrics)
        overall.set_postfix(epoch_metrics)
        overall.update(per_epoch)
        epoch, batch = epoch + 1, 0
    sys.stderr.write(f"`Trainer.fit` stopped: `max_steps={max_steps}` reached.\n")
    run.save(epoch, step)
    if not ended_epoch:  # ValidateOnTrainEnd
        validate(run, main_bar, step, val_images, held_out)
    main_bar.close()
    overall.close()


def validate(
    run: Run, main_bar: Bar, step: int, val_images: list[str], held_out: bool
) -> dict[str, Any]:
    bar = Bar("Validation", 3, None, lightning=True, leave=False)
    bar.reset(len(val_images))
    bar.set_description("Validation DataLoader 0")
    rows = []
    # A stand-in's figures: rising with the steps, lower on images the model never saw.
    base = 18.0 + 10.0 * (1 - math.exp(-step / 3000)) - (2.5 if held_out else 0.0)
    for i, name in enumerate(val_images):
        psnr = base + 0.3 * math.sin(i)
        rows.append(
            (name, {"loss": 0.1, "rgb_diff": 0.05, "ssim": 0.6 + psnr / 100,
                    "psnr": psnr, "lpips": 0.5 - psnr / 100})
        )  # fmt: skip
        bar.n = i + 1
        bar.refresh()
    metrics = {
        f"val/{k}": sum(m[k] for _, m in rows) / len(rows)
        for k in ("loss", "rgb_diff", "ssim", "psnr", "lpips")
    }
    main_bar.set_postfix(metrics)
    bar.close()
    if run.args.save_val_metrics:
        run.write_metrics(step, rows)
    return metrics


def fail_to_download() -> NoReturn:
    """FAKE_TRAINER_MODE=offline: what torch.hub prints, then the error urllib raises."""
    import urllib.error

    cache = Path.home() / ".cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth"
    sys.stderr.write(
        f'Downloading: "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" to {cache}\n'
    )
    sys.stderr.flush()
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def render_step(step: int) -> None:
    """FAKE_TRAINER_MODE=crash: fail the way a real run most often does."""
    raise OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.65 GiB "
        f"of which 1.02 GiB is free. (raised on purpose by the test stand-in at step {step})"
    )


def main() -> None:
    if missing := os.environ.get("FAKE_TRAINER_MISSING_MODULE"):
        # What `from internal.entrypoints.gspl import cli` ends in when a requirement is absent.
        raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)
    args = parse_args(sys.argv[1:])
    if args.print_config:
        print_config(args)
        return
    train(args)


if __name__ == "__main__":
    main()
