"""Installs the trainer (gaussian-splatting-lightning) into a project folder on a GPU machine.

`python training_server_install.py --root third_party` fetches the trainer and its two CUDA
extensions by git at pinned commits, makes a virtual environment for them, reuses or installs
PyTorch from PyPI, installs the trainer's pinned requirements, builds the extensions for the
GPU and runs the server's availability dry run. Each step is recorded in
`ROOT/trainer-install.json`, so a rerun skips what is done and the server can say what failed
(`install_problem`). `--exports` prints the shell lines that point the server at the result.

Settings (environment, a `.env` file in the working directory, or the options of the same
meaning): TRAINING_SERVER_INSTALL_TRAINER (auto | never | always), TRAINING_SERVER_TRAINER_PATH
(an explicit checkout: nothing is installed in `auto`), TRAINING_SERVER_INSTALL_PYTHON (the
interpreter the trainer's venv is made from; its torch is reused when it fits),
TRAINING_SERVER_TRAINER_SOURCES (git base URL, a local mirror or a `file://` path),
TRAINING_SERVER_TRAINER_PINS (JSON {repository name: commit} overriding the pins),
TRAINING_SERVER_INSTALL_BUILD_COMMAND (JSON argv building one extension, `{python}` and
`{source}` replaced; by default pip builds it without isolation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

HERE = Path(__file__).resolve().parent
STATUS_NAME = "trainer-install.json"
DEFAULT_ROOT = Path("third_party")
DEFAULT_SOURCES = "https://github.com"
DEFAULT_REQUIREMENTS = HERE / "requirements-trainer.txt"
LOG_TAIL_LINES = 20
HEARTBEAT_S = 15.0
# The floor of the pinned Lightning (2.6) and the C++ extension API the rasterizer uses.
TORCH_MIN = (2, 1)
Mode = Literal["auto", "never", "always"]


@dataclass(frozen=True)
class Source:
    """A git repository fetched at a pinned commit (`path` set for a submodule)."""

    owner: str
    name: str
    pin: str
    path: str | None = None

    def url(self, base: str) -> str:
        """The repository's address under a base URL or local folder."""
        return f"{base.rstrip('/')}/{self.owner}/{self.name}"


# The commits the project is tested against (gaussian-splatting-lightning's requirements name
# the rasterizer and simple-knn commits; the rasterizer's tree records the glm commit).
TRAINER = Source("yzslab", "gaussian-splatting-lightning", "ee022aa")
RASTERIZER = Source("graphdeco-inria", "diff-gaussian-rasterization", "59f5f77")
GLM = Source("g-truc", "glm", "5c46b9c", path="third_party/glm")
SIMPLE_KNN = Source("yzslab", "simple-knn", "44f7642")
EXTENSIONS = {RASTERIZER.name: "diff_gaussian_rasterization", SIMPLE_KNN.name: "simple_knn"}


@dataclass(frozen=True)
class TorchPair:
    """A torch/torchvision pair on PyPI and the CUDA version its Linux wheels are built for."""

    torch: str
    torchvision: str
    cuda: tuple[int, int]

    @property
    def cuda_text(self) -> str:
        return f"{self.cuda[0]}.{self.cuda[1]}"


# Newest first; the first is the one the GPU check ran with. PyPI has one CUDA build per torch
# version (read from each wheel's requirements), so an older driver gets an older torch.
TORCH_PAIRS = (
    TorchPair("2.11.0", "0.26.0", (13, 0)),
    TorchPair("2.9.1", "0.24.1", (12, 8)),
    TorchPair("2.7.1", "0.22.1", (12, 6)),
    TorchPair("2.5.1", "0.20.1", (12, 4)),
)
TESTED_TORCH = TORCH_PAIRS[0]


class StepFailed(Exception):
    """A step could not finish; `message` is a sentence, `log` the file with the details."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log = log


@dataclass
class Gpu:
    """What nvidia-smi (or the interpreter's torch) says about the machine's GPUs."""

    names: list[str] = field(default_factory=list)
    driver: str | None = None
    cuda: tuple[int, int] | None = None  # the newest CUDA the driver supports
    capabilities: list[str] = field(default_factory=list)  # e.g. ["9.0"]
    source: str = "nvidia-smi"

    def describe(self) -> str:
        parts = [", ".join(self.names) or "an NVIDIA GPU"]
        if self.driver:
            parts.append(f"driver {self.driver}")
        if self.cuda:
            parts.append(f"CUDA {self.cuda[0]}.{self.cuda[1]}")
        if self.capabilities:
            parts.append("compute capability " + ", ".join(self.capabilities))
        return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0]


# -- pure decisions ----------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string ("2.11.0+cu130" -> (2, 11, 0))."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


def parse_nvidia_smi(query_csv: str, banner: str) -> Gpu | None:
    """A Gpu from `nvidia-smi --query-gpu=name,driver_version,compute_cap` and its banner."""
    gpu = Gpu()
    for line in query_csv.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if not fields or not fields[0]:
            continue
        gpu.names.append(fields[0])
        if len(fields) > 1 and fields[1]:
            gpu.driver = fields[1]
        cap = fields[2] if len(fields) > 2 else ""
        if re.fullmatch(r"\d+\.\d+", cap) and cap not in gpu.capabilities:
            gpu.capabilities.append(cap)
    if not gpu.names:
        return None
    if match := re.search(r"CUDA Version:\s*(\d+)\.(\d+)", banner):
        gpu.cuda = (int(match.group(1)), int(match.group(2)))
    return gpu


def choose_torch(driver_cuda: tuple[int, int] | None) -> tuple[TorchPair, str]:
    """The torch/torchvision pair to install for a driver, and a sentence saying why.

    Raises StepFailed when even the oldest offered pair needs a newer driver.
    """
    if driver_cuda is None:
        return TESTED_TORCH, (
            f"the driver's CUDA version is unknown: installing torch {TESTED_TORCH.torch} "
            f"(CUDA {TESTED_TORCH.cuda_text}), the version this project is tested with"
        )
    have = f"{driver_cuda[0]}.{driver_cuda[1]}"
    for pair in TORCH_PAIRS:
        if pair.cuda <= driver_cuda:
            if pair is TESTED_TORCH:
                return pair, (
                    f"the driver supports CUDA {have}: installing torch {pair.torch} "
                    f"(CUDA {pair.cuda_text}), the version this project is tested with"
                )
            return pair, (
                f"the driver supports CUDA up to {have}, older than the CUDA "
                f"{TESTED_TORCH.cuda_text} that torch {TESTED_TORCH.torch} from PyPI is built "
                f"for: installing torch {pair.torch} (CUDA {pair.cuda_text}) instead, which this "
                "project is not tested with; a newer NVIDIA driver gets the tested version"
            )
    oldest = TORCH_PAIRS[-1]
    raise StepFailed(
        f"the NVIDIA driver supports CUDA up to {have}, but the oldest torch offered here "
        f"(torch {oldest.torch}) is built for CUDA {oldest.cuda_text}: install a newer "
        "driver, or point TRAINING_SERVER_INSTALL_PYTHON at an interpreter that already has "
        "a CUDA torch"
    )


def reusable_torch(info: Mapping[str, Any], gpu_present: bool) -> str | None:
    """None when the probed torch can be reused, else a sentence saying why not."""
    if "torch" not in info:
        return f"it cannot import torch ({info.get('error', 'not installed')})"
    version = str(info["torch"])
    if parse_version(version)[:2] < TORCH_MIN:
        return f"its torch {version} is older than {TORCH_MIN[0]}.{TORCH_MIN[1]}"
    if not info.get("build"):
        return f"its torch {version} is a CPU-only build"
    if gpu_present and not info.get("cuda"):
        return f"its torch {version} (CUDA {info['build']}) sees no CUDA device"
    return None


def arch_list(gpu: Gpu | None, environ: Mapping[str, str]) -> str | None:
    """TORCH_CUDA_ARCH_LIST for the build: the user's, else the GPUs' compute capabilities."""
    if environ.get("TORCH_CUDA_ARCH_LIST"):
        return environ["TORCH_CUDA_ARCH_LIST"]
    if gpu and gpu.capabilities:
        return ";".join(sorted(gpu.capabilities, key=parse_version))
    return None


def find_nvcc(environ: Mapping[str, str]) -> Path | None:
    """The CUDA compiler torch's extension builder would use (CUDA_HOME, PATH, /usr/local/cuda)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var) and (Path(environ[var]) / "bin" / "nvcc").is_file():
            return Path(environ[var]) / "bin" / "nvcc"
    if found := shutil.which("nvcc", path=environ.get("PATH")):
        return Path(found)
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.is_file() else None


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from `nvcc --version` ("Cuda compilation tools, release 13.0, ...")."""
    match = re.search(r"release (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def compiler_problem(
    nvcc: Path | None, nvcc_version: tuple[int, int] | None, torch_cuda: str | None
) -> str | None:
    """None when nvcc can build extensions for this torch, else a sentence saying why not."""
    want = f"CUDA {torch_cuda}" if torch_cuda else "CUDA"
    if nvcc is None:
        return (
            f"no CUDA compiler found (nvcc is not on the PATH, CUDA_HOME is not set and "
            f"/usr/local/cuda has none): install the {want} toolkit, or set CUDA_HOME"
        )
    if nvcc_version is None:
        return f"{nvcc} --version does not say its CUDA release"
    torch_major = parse_version(torch_cuda or "")[:1]
    if torch_major and torch_major[0] != nvcc_version[0]:
        return (
            f"{nvcc} is CUDA {nvcc_version[0]}.{nvcc_version[1]} but torch is built for "
            f"{want}; the extensions need the same CUDA major version: install the {want} "
            "toolkit and set CUDA_HOME to it"
        )
    return None


def fingerprint(*parts: object) -> str:
    """A short stable digest of what a step's result depends on."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# -- the status file ---------------------------------------------------------------------


def status_path(root: Path) -> Path:
    return root / STATUS_NAME


def read_status(root: Path) -> dict[str, Any]:
    """The recorded install status, or an empty one when absent or unreadable."""
    try:
        value = json.loads(status_path(root).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_status(root: Path, status: Mapping[str, Any]) -> None:
    """Replace the status file in one step (a reader never sees half of it)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = status_path(root).with_suffix(".tmp")
    tmp.write_text(json.dumps({**status, "updated_at": _now()}, indent=2) + "\n")
    os.replace(tmp, status_path(root))


def install_problem(root: Path) -> str | None:
    """A sentence for /health when the last trainer install failed or was cut off, else None."""
    status = read_status(root)
    state = status.get("state")
    if state not in {"failed", "running"}:
        return None
    step = status.get("failed_step") or status.get("current_step") or "?"
    log = status.get("log")
    where = f"; its log is {log}" if log else ""
    if state == "running":
        return (
            f"the trainer install in {root} stopped during step {step!r}{where}; "
            "restart ./serve.sh to resume it (finished steps are skipped)"
        )
    return (
        f"the trainer install in {root} failed at step {step!r}: {status.get('message')}{where}; "
        "fix that and restart ./serve.sh to retry (finished steps are skipped), or set "
        "TRAINING_SERVER_TRAINER_PATH to an existing checkout"
    )


def shell_exports(root: Path, environ: Mapping[str, str]) -> str:
    """`export` lines pointing the server at a finished install, unless the user chose one."""
    status = read_status(root)
    if status.get("state") != "done" or environ.get("TRAINING_SERVER_TRAINER_PATH"):
        return ""
    lines = [f"export TRAINING_SERVER_TRAINER_PATH={shlex.quote(status['trainer_path'])}"]
    if not environ.get("TRAINING_SERVER_TRAINER_PYTHON"):
        lines.append(
            f"export TRAINING_SERVER_TRAINER_PYTHON={shlex.quote(status['trainer_python'])}"
        )
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- subprocesses ------------------------------------------------------------------------


def run_logged(
    argv: Sequence[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], str | None] | None = None,
    heartbeat: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run `argv`, appending its output to `log`; return the exit status.

    Lines for which `echo` returns text are printed; with `heartbeat`, a line saying the
    elapsed time is printed every HEARTBEAT_S seconds while it runs.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("a", encoding="utf-8", errors="replace") as sink:
        sink.write(f"\n$ {shlex.join(argv)}\n")
        sink.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
            )
        except OSError as exc:
            sink.write(f"cannot start: {exc}\n")
            return 127

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                if echo and (text := echo(line.rstrip("\n"))):
                    print(text, file=out, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while True:
            try:
                proc.wait(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                if heartbeat:
                    elapsed = time.monotonic() - started
                    print(f"  {heartbeat}: {elapsed:.0f} s elapsed", file=out, flush=True)
        reader.join()
        sink.write(f"[exit status {proc.returncode} after {time.monotonic() - started:.1f} s]\n")
    return proc.returncode


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return text.rstrip("\n").splitlines()[-lines:]


def capture(argv: Sequence[str], timeout: float = 60, env: Mapping[str, str] | None = None) -> str:
    """The standard output of a short command, or '' when it fails or cannot run."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _pip_echo(line: str) -> str | None:
    """pip's download and result lines (with sizes), shown as progress."""
    text = line.strip()
    if text.startswith(
        ("Downloading ", "Successfully installed", "Requirement already satisfied: torch")
    ):
        return "  " + text
    if text.startswith("ERROR:"):
        return "  " + text
    return None


_TORCH_PROBE = """\
import json, sys
r = {"python": sys.version.split()[0]}
try:
    import torch
    r.update(torch=torch.__version__, build=torch.version.cuda, site=__import__("os").path.dirname(
        __import__("os").path.dirname(torch.__file__)))
    r["cuda"] = bool(torch.cuda.is_available())
    if r["cuda"]:
        r["device"] = torch.cuda.get_device_name(0)
        r["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
except BaseException as e:
    r["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(r))
"""


def probe_torch(python: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What `python` says about its torch (version, CUDA build, device, where it lives)."""
    output = capture([python, "-c", _TORCH_PROBE], timeout=120, env=env)
    for line in reversed(output.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return {"error": f"{python} did not run"}


def detect_gpu() -> Gpu | None:
    """The GPUs nvidia-smi reports, or None when it is missing or sees none."""
    query = capture(
        ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
        timeout=30,
    )
    if not query.strip():
        return None
    return parse_nvidia_smi(query, capture(["nvidia-smi"], timeout=30))


# -- the installer -----------------------------------------------------------------------


@dataclass
class Options:
    """What to install where, resolved from options, the environment and `.env`."""

    root: Path
    mode: Mode = "auto"
    python: str = "python3"
    sources: str = DEFAULT_SOURCES
    pins: dict[str, str] = field(default_factory=dict)
    requirements: Path = DEFAULT_REQUIREMENTS
    build_command: list[str] | None = None
    explicit_trainer: str | None = None
    require_cuda: bool = True

    def pin(self, source: Source) -> str:
        return self.pins.get(source.name, source.pin)


class Installer:
    """Runs the install steps in order, recording each in the status file."""

    def __init__(self, options: Options, out: TextIO = sys.stdout) -> None:
        self.o = options
        self.out = out
        self.root = options.root.resolve()
        self.logs = self.root / "logs"
        self.venv = self.root / "trainer-venv"
        self.status: dict[str, Any] = {}
        self.gpu: Gpu | None = None
        self.torch_info: dict[str, Any] = {}

    # paths
    @property
    def checkout(self) -> Path:
        return self.root / TRAINER.name

    @property
    def venv_python(self) -> Path:
        return self.venv / "bin" / "python"

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def child_env(self, **extra: str) -> dict[str, str]:
        """The environment of the trainer venv's commands: no PYTHONPATH leaking in."""
        env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
        env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1", **extra)
        return env

    # orchestration
    def run(self) -> int:
        """Install what is missing; 0 when the trainer is ready or nothing was to be done."""
        if self.o.mode == "never":
            self.say("trainer install: off (TRAINING_SERVER_INSTALL_TRAINER=never)")
            self._mark_skipped("TRAINING_SERVER_INSTALL_TRAINER=never")
            return 0
        if self.o.explicit_trainer and self.o.mode == "auto":
            self.say(
                f"trainer install: not needed, TRAINING_SERVER_TRAINER_PATH is "
                f"{self.o.explicit_trainer}"
            )
            self._mark_skipped("TRAINING_SERVER_TRAINER_PATH is set")
            return 0
        self.gpu = detect_gpu()
        if self.gpu is None:
            self.torch_info = probe_torch(self.o.python)
            if self.torch_info.get("cuda"):
                self.gpu = Gpu(
                    names=[self.torch_info.get("device", "CUDA device")],
                    capabilities=[self.torch_info["capability"]]
                    if self.torch_info.get("capability")
                    else [],
                    source=f"torch in {self.o.python}",
                )
        if self.gpu is None and self.o.mode == "auto":
            self.say(
                "trainer install: no NVIDIA GPU found (nvidia-smi does not answer and "
                f"{self.o.python} has no torch that sees CUDA): installing nothing, training "
                "stays unavailable (TRAINING_SERVER_INSTALL_TRAINER=always installs anyway)"
            )
            self._mark_skipped("no NVIDIA GPU found")
            return 0
        where = self.gpu.describe() if self.gpu else "no GPU seen (always)"
        self.say(f"trainer install into {self.root} for {where}")
        self.status = read_status(self.root)
        steps: dict[str, Any] = (
            self.status.get("steps", {}) if isinstance(self.status.get("steps"), dict) else {}
        )
        self.status = {"state": "running", "steps": steps, "root": str(self.root)}
        keys = self.step_keys()
        plan: list[tuple[str, Callable[[], str], Callable[[], bool]]] = [
            (f"fetch {TRAINER.name}", lambda: self.fetch(TRAINER), self.at_pin(TRAINER)),
            (
                f"fetch {RASTERIZER.name}",
                lambda: self.fetch(RASTERIZER, GLM),
                self.at_pin(RASTERIZER),
            ),
            (f"fetch {SIMPLE_KNN.name}", lambda: self.fetch(SIMPLE_KNN), self.at_pin(SIMPLE_KNN)),
            ("venv", self.make_venv, self.venv_python.exists),
            ("torch", self.install_torch, self.venv_python.exists),
            ("requirements", self.install_requirements, self.venv_python.exists),
            (f"build {RASTERIZER.name}", lambda: self.build(RASTERIZER), self.venv_python.exists),
            (f"build {SIMPLE_KNN.name}", lambda: self.build(SIMPLE_KNN), self.venv_python.exists),
            ("check", self.check, self.venv_python.exists),
        ]
        total = len(plan)
        started_all = time.monotonic()
        for index, (name, action, still_there) in enumerate(plan, 1):
            prior = steps.get(name, {})
            if prior.get("state") == "done" and prior.get("key") == keys[name] and still_there():
                self.say(f"[{index}/{total}] {name}: done before ({prior.get('detail')})")
                continue
            self.say(f"[{index}/{total}] {name} ...")
            self.status["current_step"] = name
            write_status(self.root, self.status)
            started = time.monotonic()
            try:
                detail = action()
            except StepFailed as exc:
                return self._fail(name, exc, steps, time.monotonic() - started)
            seconds = round(time.monotonic() - started, 1)
            steps[name] = {
                "state": "done",
                "key": keys[name],
                "detail": detail,
                "seconds": seconds,
            }
            self.say(f"[{index}/{total}] {name}: {detail} ({seconds:g} s)")
            write_status(self.root, self.status)
        self.status.update(
            state="done",
            current_step=None,
            failed_step=None,
            message=None,
            log=None,
            log_tail=[],
            trainer_path=str(self.checkout),
            trainer_python=str(self.venv_python),
        )
        write_status(self.root, self.status)
        self.say(
            f"trainer ready in {time.monotonic() - started_all:.0f} s: {self.checkout} "
            f"with {self.venv_python}"
        )
        return 0

    def step_keys(self) -> dict[str, str]:
        """What each step's result depends on; a step whose key changed runs again."""
        keys: dict[str, str] = {}
        for source in (TRAINER, RASTERIZER, SIMPLE_KNN):
            glm = self.o.pin(GLM) if source is RASTERIZER else ""
            keys[f"fetch {source.name}"] = fingerprint(
                source.url(self.o.sources), self.o.pin(source), glm
            )
        keys["venv"] = fingerprint(self.o.python)
        keys["torch"] = fingerprint(keys["venv"], self.gpu.cuda if self.gpu else None)
        keys["requirements"] = fingerprint(keys["torch"], _file_digest(self.o.requirements))
        arch = arch_list(self.gpu, os.environ)
        for source in (RASTERIZER, SIMPLE_KNN):
            keys[f"build {source.name}"] = fingerprint(
                keys["requirements"], keys[f"fetch {source.name}"], arch, self.o.build_command
            )
        keys["check"] = fingerprint(sorted(keys.items()), self.o.require_cuda)
        return keys

    def at_pin(self, source: Source) -> Callable[[], bool]:
        """Whether the source's checkout is still at its pinned commit."""

        def check() -> bool:
            head = capture(["git", "-C", str(self.root / source.name), "rev-parse", "HEAD"])
            return bool(head.strip()) and head.strip().startswith(self.o.pin(source))

        return check

    def _fail(self, name: str, exc: StepFailed, steps: dict[str, Any], seconds: float) -> int:
        tail = log_tail(exc.log) if exc.log else []
        steps[name] = {"state": "failed", "detail": exc.message, "seconds": round(seconds, 1)}
        self.status.update(
            state="failed",
            current_step=None,
            failed_step=name,
            message=exc.message,
            log=str(exc.log) if exc.log else None,
            log_tail=tail,
            retry="fix the cause and restart ./serve.sh; finished steps are skipped",
        )
        write_status(self.root, self.status)
        self.say(f"trainer install FAILED at step {name!r}: {exc.message}")
        if tail:
            self.say(f"last lines of {exc.log}:")
            for line in tail:
                self.say(f"  | {line}")
        self.say(
            "the server starts without training; restart ./serve.sh to retry "
            "(finished steps are skipped)"
        )
        return 1

    def _mark_skipped(self, reason: str) -> None:
        """Turn a stale failure into 'skipped' so /health stops reporting it."""
        status = read_status(self.root)
        if status and status.get("state") != "done":
            status.update(state="skipped", message=reason, failed_step=None, current_step=None)
            write_status(self.root, status)

    # steps: each returns (key, detail) or raises StepFailed
    def git(self, args: Sequence[str], log: Path, cwd: Path | None = None) -> None:
        local = "://" not in self.o.sources or self.o.sources.startswith("file://")
        extra = ["-c", "protocol.file.allow=always"] if local else []
        argv = ["git", *extra, *args]
        env = self.child_env(GIT_TERMINAL_PROMPT="0")
        if run_logged(argv, log, cwd=cwd, env=env, echo=_git_echo) != 0:
            raise StepFailed(f"git {args[0]} failed", log)

    def fetch(self, source: Source, submodule: Source | None = None) -> str:
        log = self.logs / f"fetch-{source.name}.log"
        dest = self.root / source.name
        url = source.url(self.o.sources)
        pin = self.o.pin(source)
        if not (dest / ".git").exists():
            partial = dest.with_name(dest.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            self.say(f"  cloning {url}")
            self.git(["clone", "--no-checkout", url, str(partial)], log)
            partial.rename(dest)
        commit = self._resolve(dest, pin, log)
        if commit is None:
            self.say(f"  commit {pin} not in the clone: fetching {url}")
            self.git(["fetch", "origin"], log, cwd=dest)
            commit = self._resolve(dest, pin, log)
        if commit is None:
            raise StepFailed(f"{url} has no commit {pin}", log)
        self.git(["checkout", "--detach", "--force", commit], log, cwd=dest)
        head = capture(["git", "-C", str(dest), "rev-parse", "HEAD"]).strip()
        if not head.startswith(pin):
            raise StepFailed(f"{dest} is at {head[:12]}, not at the pinned {pin}", log)
        detail = f"{source.name} at {head[:7]}"
        if submodule is not None:
            sub_pin = self.o.pin(submodule)
            sub_url = submodule.url(self.o.sources)
            self.git(["submodule", "init"], log, cwd=dest)
            self.git(["config", f"submodule.{submodule.path}.url", sub_url], log, cwd=dest)
            self.git(["submodule", "update", "--force", "--", str(submodule.path)], log, cwd=dest)
            sub_head = capture(["git", "-C", str(dest / str(submodule.path)), "rev-parse", "HEAD"])
            if not sub_head.strip().startswith(sub_pin):
                raise StepFailed(
                    f"{source.name}'s {submodule.path} is at {sub_head.strip()[:12] or 'nothing'}, "
                    f"not at the pinned {submodule.name} {sub_pin}",
                    log,
                )
            detail += f", {submodule.name} at {sub_head.strip()[:7]}"
        return detail

    def _resolve(self, repo: Path, pin: str, log: Path) -> str | None:
        if not re.fullmatch(r"[0-9a-fA-F]{4,40}", pin):
            raise StepFailed(f"pin {pin!r} is not a commit hash (branches are not accepted)", log)
        out = capture(
            ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{pin}^{{commit}}"]
        )
        commit = out.strip()
        return commit if commit.lower().startswith(pin.lower()) else None

    def make_venv(self) -> str:
        log = self.logs / "venv.log"
        shutil.rmtree(self.venv, ignore_errors=True)
        if run_logged([self.o.python, "-m", "venv", str(self.venv)], log) != 0:
            raise StepFailed(f"{self.o.python} -m venv {self.venv} failed", log)
        version = capture(
            [str(self.venv_python), "-c", "import sys; print(sys.version.split()[0])"]
        )
        return f"{self.venv} (Python {version.strip()})"

    def install_torch(self) -> str:
        log = self.logs / "torch.log"
        _remove_reuse_links(self.venv)
        info = self.torch_info or probe_torch(self.o.python)
        reason = reusable_torch(info, gpu_present=self.gpu is not None)
        if reason is None:
            site = _site_packages(self.venv)
            (site / "_training_server_reuse.pth").write_text(info["site"] + "\n")
            got = probe_torch(str(self.venv_python), env=self.child_env())
            if got.get("torch") != info["torch"]:
                raise StepFailed(
                    f"torch {info['torch']} of {self.o.python} is not importable from the venv: "
                    f"{got.get('error')}",
                    log,
                )
            return (
                f"reusing torch {info['torch']} (CUDA {info['build']}) of {self.o.python} "
                f"from {info['site']}"
            )
        pair, why = choose_torch(self.gpu.cuda if self.gpu else None)
        self.say(f"  {self.o.python} cannot lend its torch: {reason}")
        self.say(f"  {why}")
        argv = [
            str(self.venv_python),
            "-m",
            "pip",
            "install",
            "--progress-bar",
            "off",
            f"torch=={pair.torch}",
            f"torchvision=={pair.torchvision}",
        ]
        if run_logged(argv, log, env=self.child_env(), echo=_pip_echo, heartbeat="torch") != 0:
            raise StepFailed(f"pip could not install torch {pair.torch}", log)
        got = probe_torch(str(self.venv_python), env=self.child_env())
        if "torch" not in got:
            raise StepFailed(f"torch was installed but does not import: {got.get('error')}", log)
        seen = "sees" if got.get("cuda") else "does not see"
        return f"installed torch {got['torch']} (CUDA {got.get('build')}), which {seen} the GPU"

    def install_requirements(self) -> str:
        log = self.logs / "requirements.log"
        if not self.o.requirements.is_file():
            raise StepFailed(f"no requirements file at {self.o.requirements}")
        argv = [str(self.venv_python), "-m", "pip", "install", "--progress-bar", "off"]
        argv += ["-r", str(self.o.requirements)]
        env = self.child_env()
        if run_logged(argv, log, env=env, echo=_pip_echo, heartbeat="requirements") != 0:
            raise StepFailed(f"pip could not install {self.o.requirements.name}", log)
        return f"installed {self.o.requirements.name}"

    def build(self, source: Source) -> str:
        name = f"build {source.name}"
        log = self.logs / f"build-{source.name}.log"
        src = self.root / source.name
        arch = arch_list(self.gpu, os.environ)
        if arch is None:
            info = probe_torch(str(self.venv_python), env=self.child_env())
            arch = info.get("capability")
        if not arch:
            raise StepFailed(
                "the GPU's compute capability is unknown: set TORCH_CUDA_ARCH_LIST (e.g. 8.6)"
            )
        env = self.child_env(TORCH_CUDA_ARCH_LIST=arch)
        nvcc = find_nvcc(env)
        nvcc_version = parse_nvcc_version(capture([str(nvcc), "--version"])) if nvcc else None
        torch_cuda = probe_torch(str(self.venv_python), env=self.child_env()).get("build")
        if problem := compiler_problem(nvcc, nvcc_version, torch_cuda):
            raise StepFailed(problem)
        if nvcc is not None and not env.get("CUDA_HOME"):
            env["CUDA_HOME"] = str(nvcc.parent.parent)
        if self.o.build_command:
            argv = [
                part.replace("{python}", str(self.venv_python)).replace("{source}", str(src))
                for part in self.o.build_command
            ]
        else:
            argv = [str(self.venv_python), "-m", "pip", "install", "-v", "--no-build-isolation"]
            argv += ["--progress-bar", "off", str(src)]
        self.say(f"  building with {nvcc} for TORCH_CUDA_ARCH_LIST={arch}; log: {log}")
        if run_logged(argv, log, cwd=src, env=env, heartbeat=name) != 0:
            raise StepFailed(f"building {source.name} failed", log)
        module = EXTENSIONS[source.name]
        check = [str(self.venv_python), "-c", f"import torch, {module}._C"]
        if run_logged(check, log, env=self.child_env()) != 0:
            raise StepFailed(f"{source.name} was built but {module}._C does not import", log)
        return f"{module} built for {arch}"

    def check(self) -> str:
        from training_server_trainer import check_training_available

        log = self.logs / "check.log"
        ok, detail = asyncio.run(
            check_training_available(str(self.venv_python), self.checkout, self.o.require_cuda, 120)
        )
        with log.open("a") as f:
            f.write(f"{_now()} available={ok}: {detail}\n")
        if not ok:
            raise StepFailed(f"the availability dry run says: {detail}", log)
        return detail


def _git_echo(line: str) -> str | None:
    return "  " + line.strip() if line.startswith(("fatal:", "error:")) else None


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages"))
    if not found:
        raise StepFailed(f"{venv} has no site-packages folder")
    return found[0]


def _remove_reuse_links(venv: Path) -> None:
    for pth in venv.glob("lib/python*/site-packages/_training_server_reuse.pth"):
        pth.unlink()


# -- command line ------------------------------------------------------------------------


def _settings(environ: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """TRAINING_SERVER_* values from `.env` in `cwd`, overridden by the environment."""
    values: dict[str, str] = {}
    with contextlib.suppress(ImportError):
        from dotenv import dotenv_values

        env_file = cwd / ".env"
        if env_file.is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(environ)
    return {k: v for k, v in values.items() if k.startswith("TRAINING_SERVER_")}


def options_from(args: argparse.Namespace, settings: Mapping[str, str]) -> Options:
    """Options from the command line, falling back to the settings."""
    mode = (args.mode or settings.get("TRAINING_SERVER_INSTALL_TRAINER") or "auto").lower()
    if mode not in {"auto", "never", "always"}:
        raise SystemExit(f"TRAINING_SERVER_INSTALL_TRAINER must be auto, never or always: {mode}")
    pins_text = args.pins or settings.get("TRAINING_SERVER_TRAINER_PINS") or "{}"
    build_text = args.build_command or settings.get("TRAINING_SERVER_INSTALL_BUILD_COMMAND")
    try:
        pins = json.loads(pins_text)
        build = json.loads(build_text) if build_text else None
    except ValueError as exc:
        raise SystemExit(f"pins and build command must be JSON: {exc}") from exc
    if not isinstance(pins, dict) or (build is not None and not isinstance(build, list)):
        raise SystemExit("pins must be a JSON object and the build command a JSON list")
    require = settings.get("TRAINING_SERVER_TRAINER_REQUIRE_CUDA", "true").lower()
    return Options(
        root=Path(args.root),
        mode=mode,  # type: ignore[arg-type]
        python=args.python or settings.get("TRAINING_SERVER_INSTALL_PYTHON") or "python3",
        sources=args.sources or settings.get("TRAINING_SERVER_TRAINER_SOURCES") or DEFAULT_SOURCES,
        pins={str(k): str(v) for k, v in pins.items()},
        requirements=Path(args.requirements) if args.requirements else DEFAULT_REQUIREMENTS,
        build_command=[str(x) for x in build] if build else None,
        explicit_trainer=settings.get("TRAINING_SERVER_TRAINER_PATH") or None,
        require_cuda=require not in {"0", "false", "no", "off"},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: install (default) or print the server's exports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="install folder")
    parser.add_argument("--mode", choices=["auto", "never", "always"], default=None)
    parser.add_argument("--python", help="interpreter the trainer's venv is made from")
    parser.add_argument("--sources", help="git base URL or folder of the source repositories")
    parser.add_argument("--pins", help='JSON {"repository": "commit"} overriding the pins')
    parser.add_argument("--requirements", help="the trainer's requirements file")
    parser.add_argument("--build-command", help="JSON argv building one extension")
    parser.add_argument(
        "--exports", action="store_true", help="print the shell lines for a finished install"
    )
    args = parser.parse_args(argv)
    settings = _settings(os.environ, Path.cwd())
    if args.exports:
        sys.stdout.write(shell_exports(Path(args.root).resolve(), settings))
        return 0
    return Installer(options_from(args, settings)).run()


if __name__ == "__main__":
    sys.exit(main())
