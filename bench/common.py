"""Shared pieces of the benchmarks: statistics over repeats, tables, the machine's
description, real servers started the way the tests start them, and outside measurements of a
process (peak RSS growth and CPU time, polled with psutil).

Speed claims are ratios measured in the same run on the same machine; every figure is
repeated and shown as `median (min–max)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
DATA = REPO / "tests" / "data"
OFFICE_VIDEO = DATA / "tum_office_orbit.mp4"
MIB = 1024 * 1024
GIB = 1024 * MIB

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from conftest import ServerProcess, free_port, settings_env  # noqa: E402

PACKAGES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "python-multipart",
    "aiofiles",
    "aiosqlite",
    "pydantic",
    "zipstream-ng",
    "av",
    "opencv-python-headless",
    "pycolmap",
    "numpy",
    "psutil",
    "httpx",
)
TOOLS = {
    "ffmpeg": ["ffmpeg", "-version"],
    "colmap": ["colmap", "help"],
    "curl": ["curl", "--version"],
    "wrk": ["wrk", "--version"],
    "zip": ["zip", "-v"],
    "cp": ["cp", "--version"],
}


# -- statistics --------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def stat(values: Sequence[float], digits: int = 2, unit: str = "") -> str:
    """`median (min–max)` of repeated measurements, or the one value, or `–`."""
    clean = [v for v in values if v == v]  # drop NaN
    if not clean:
        return "–"
    suffix = f" {unit}" if unit else ""
    med = f"{median(clean):.{digits}f}"
    if len(clean) == 1:
        return f"{med}{suffix}"
    return f"{med}{suffix} ({min(clean):.{digits}f}–{max(clean):.{digits}f})"


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-repeat ratios of paired measurements (run i of A over run i of B)."""
    return [a / b for a, b in zip(numerators, denominators, strict=False) if b]


def verdict(met: bool | None) -> str:
    """A goal's outcome in a table cell."""
    return {True: "met", False: "**missed**", None: "–"}[met]


# -- report pieces -----------------------------------------------------------------------


@dataclass
class Table:
    """A table printed to the console and written as Markdown."""

    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""

    def add(self, *cells: object) -> None:
        """Append one row (cells are turned into text)."""
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        """The table as GitHub Markdown."""
        lines = [f"*{self.caption}*", ""] if self.caption else []
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.headers) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self.rows]
        return "\n".join(lines)

    def text(self) -> str:
        """The table as aligned plain text."""
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]
        lines = [self.caption] if self.caption else []
        lines.append("  ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=False)))
        lines.append("  ".join("-" * w for w in widths))
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in self.rows
        ]
        return "\n".join(lines)


@dataclass
class Section:
    """One benchmark's results: tables, notes, and the raw numbers for bench/results/."""

    key: str
    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def markdown(self) -> str:
        """The section as Markdown."""
        parts = [f"## {self.title}", ""]
        if self.intro:
            parts += [self.intro, ""]
        for table in self.tables:
            parts += [table.markdown(), ""]
        if self.notes:
            parts += [f"- {n}" for n in self.notes] + [""]
        parts.append(f"<sub>This section took {self.seconds:.0f} s.</sub>")
        return "\n".join(parts) + "\n"

    def text(self) -> str:
        """The section as plain text for the console."""
        parts = [f"== {self.title} ==", ""]
        for table in self.tables:
            parts += [table.text(), ""]
        parts += [f"* {n}" for n in self.notes]
        return "\n".join(parts)

    def save(self) -> Path:
        """Write the raw numbers (and the section's duration) to bench/results/{key}.json."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.key}.json"
        saved = {"seconds": self.seconds, "measured_at": time.strftime("%Y-%m-%d %H:%M %Z")}
        path.write_text(json.dumps({**saved, "raw": self.raw}, indent=1, default=str))
        return path


def log(message: str) -> None:
    """Progress on stderr, so stdout keeps only the tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the machine -------------------------------------------------------------------------


def _tool_version(cmd: list[str]) -> str:
    """`name version` from the first line of a tool's version output."""
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]} not installed"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        for line in (out.stdout + out.stderr).splitlines():
            found = re.search(r"\d+(?:\.\d+)+\S*", line)
            if found:
                return f"{cmd[0]} {found[0]}"
    return f"{cmd[0]} (version unknown)"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _output(cmd: list[str], cwd: Path | None = None) -> str:
    """A short command's stdout, stripped; OSError / SubprocessError pass to the caller."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()


def _disk(path: Path) -> str:
    usage = shutil.disk_usage(path)
    fs = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        fs = _output(["findmnt", "-no", "SOURCE,FSTYPE", "-T", str(path)])
    return f"{fs}, {usage.total / GIB:.0f} GiB, {usage.free / GIB:.0f} GiB free"


def _git_revision() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = _output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO)
        dirty = _output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)
        return f"{rev}{' + uncommitted changes' if dirty else ''}"
    return "unknown"


def machine_info() -> dict[str, str]:
    """What the figures were measured on."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (absent)")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical cores",
        "memory": f"{psutil.virtual_memory().total / GIB:.1f} GiB",
        "disk (repository)": _disk(REPO),
        "OS": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "Python": platform.python_version(),
        "packages": ", ".join(versions),
        "tools": ", ".join(_tool_version(cmd) for cmd in TOOLS.values()),
        "commit": _git_revision(),
        "load average at start (1, 5, 15 min)": load,
    }


# -- processes -----------------------------------------------------------------------------


class ProcessMeter:
    """Peak RSS growth and CPU time of one process, polled from outside.

    `with ProcessMeter(pid) as m: ...` then `m.peak_growth_mb`, `m.cpu_seconds`.
    """

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.cpu_seconds = 0.0
        self._cpu0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _rss(self) -> int:
        try:
            return self.process.memory_info().rss
        except psutil.Error:
            return 0

    def _cpu(self) -> float:
        try:
            times = self.process.cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessMeter:
        self.baseline = self.peak = self._rss()
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.cpu_seconds = self._cpu() - self._cpu0

    @property
    def peak_growth_mb(self) -> float:
        """Largest RSS seen minus the RSS at the start, in MiB."""
        return (self.peak - self.baseline) / MIB


def timed(cmd: list[str], **kwargs: Any) -> float:
    """Wall seconds of a command run to completion (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, **kwargs)
    return time.perf_counter() - start


def settle() -> None:
    """Write back dirty pages before a timed run, so one run's writes do not slow the next."""
    os.sync()


def remove(path: Path) -> None:
    """Remove a file or a folder if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- servers ---------------------------------------------------------------------------------


def start_training_server(
    root: Path, env: dict[str, str] | None = None, **overrides: Any
) -> ServerProcess:
    """`python training_server.py` on a loopback port with its files under `root`, the stand-in
    stages of the tests unless `overrides` say otherwise, and extra environment `env`."""
    root.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(root, {**settings_env(root, **overrides), **(env or {})})
    return server.start(timeout=120)


class AppProcess:
    """A throwaway app from bench/apps.py under uvicorn, in its own process group."""

    def __init__(self, root: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / f"app-{self.port}.log"
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(BENCH / "apps.py"), *args, "--port", str(self.port)],
                cwd=root,
                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, self.proc, self.log_path)

    @property
    def pid(self) -> int:
        """The app's process id."""
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait until something accepts connections on the loopback `port`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited early:\n{log_path.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"app did not start:\n{log_path.read_text(errors='replace')}")


def stop_server(server: ServerProcess) -> None:
    """Stop a training server gracefully (SIGTERM), killing it if it does not stop."""
    try:
        server.terminate(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = ""
) -> None:
    """Poll `predicate` until it holds; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what or predicate}")


def require_tools(*tools: str) -> None:
    """Stop with a clear message when a command-line tool the benchmark needs is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            f"missing tools: {', '.join(missing)} (Debian: apt-get install "
            f"{' '.join(sorted(set(missing)))})"
        )


def runs_text(repeats: int) -> str:
    """How a section's figures were aggregated, for its introduction."""
    if repeats == 1:
        return "One run each (a quick run: no spread)."
    return f"Median (min–max) of {repeats} runs."


def completed_task(server: Any) -> dict[str, Any]:
    """Upload the office video and run it to training_completed; returns its status."""
    with httpx.Client(base_url=server.url, timeout=60) as client, OFFICE_VIDEO.open("rb") as f:
        answer = client.post(
            "/upload", files={"file": (OFFICE_VIDEO.name, f, "video/mp4")}
        ).raise_for_status()
        task_id = answer.json()["task_id"]
        wait_until(
            lambda: (
                client.get(f"/status/{task_id}").json()["status"]
                in {"training_completed", "failed"}
            ),
            timeout=300,
            what="the task to finish training",
        )
        status = client.get(f"/status/{task_id}").json()
    if status["status"] != "training_completed":
        raise RuntimeError(f"the stand-in task did not complete: {status}")
    return status


# Synthetic benchmark videos: name -> (renderer in tests/synthetic_video.py, its arguments).
SYNTHETIC: dict[str, tuple[str, dict[str, Any]]] = {
    "orbit960": ("render_orbit", {"seconds": 15.0, "fps": 30.0, "width": 960, "height": 540}),
    "walk1080": ("render_walk", {"seconds": 60.0, "fps": 30.0, "width": 1920, "height": 1080}),
}


def render_synthetic(name: str) -> tuple[Path, Path]:
    """Render (or reuse) a synthetic benchmark video; returns the video and its truth file."""
    import synthetic_video as sv  # numpy and OpenCV: only when a video must be rendered

    RESULTS.mkdir(parents=True, exist_ok=True)
    video, truth = RESULTS / f"{name}.mp4", RESULTS / f"{name}.truth.npz"
    if video.exists() and truth.exists():
        return video, truth
    function, kwargs = SYNTHETIC[name]
    start = time.perf_counter()

    def progress(i: int, n: int) -> None:
        if i % 100 == 0 or i == n:
            print(f"rendering {name}: {i}/{n} frames", file=sys.stderr, flush=True)

    partial = video.with_suffix(".partial.mp4")
    result = getattr(sv, function)(partial, progress=progress, **kwargs)
    sv.save_truth(result, truth)
    partial.replace(video)
    print(f"rendered {video} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return video, truth
