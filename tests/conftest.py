"""Shared fixtures: settings on temp dirs, and real servers (uvicorn in a subprocess on a
loopback port) driven over HTTP, with stand-in stage commands that are real scripts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
STAND_INS = Path(__file__).resolve().parent / "stand_ins"
FAKE_PIPELINE = STAND_INS / "fake_pipeline.py"
FAKE_TRAINER_DIR = Path(__file__).resolve().parent / "fake_trainer"
OFFICE_VIDEO = DATA / "tum_office_orbit.mp4"
STATIC_VIDEO = DATA / "cockatoo_static.mp4"
TERMINAL = {"training_completed", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_env(root: Path, **overrides: Any) -> dict[str, str]:
    """TRAINING_SERVER_* variables for a server whose files all live under `root`, with the
    stand-in pipeline and the stand-in trainer (tests only)."""
    values: dict[str, Any] = {
        "temp_dir": root / "temp_workspace",
        "logs_dir": root / "logs",
        "db_path": root / "training_server.db",
        "preprocess_command": json.dumps([sys.executable, str(FAKE_PIPELINE)]),
        "trainer_path": FAKE_TRAINER_DIR,
        "trainer_require_cuda": "false",
        "trainer_iterations": 300,
        "kill_grace": 2,
        "min_free_bytes": 0,
    }
    values.update(overrides)
    env = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = json.dumps(value)
        env[f"TRAINING_SERVER_{key.upper()}"] = str(value)
    return env


class ServerProcess:
    """`python training_server.py` on a loopback port, in its own process group."""

    def __init__(self, root: Path, env: dict[str, str], port: int | None = None) -> None:
        self.root = root
        self.env = env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / f"server-{self.port}.log"

    def start(self, timeout: float = 30) -> ServerProcess:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_SERVER_")}
        # Quick stand-ins unless a test asks otherwise (it sets FAKE_* before starting).
        quick = {"FAKE_PIPELINE_SECONDS": "0.5", "FAKE_TRAINER_STEP_SECONDS": "0.004"}
        env = {**quick, **inherited, **self.env, "PYTHONUNBUFFERED": "1"}
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "training_server.py"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=self.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        headers = self.auth_headers()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", headers=headers, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.output()}")

    def auth_headers(self) -> dict[str, str]:
        token = self.env.get("TRAINING_SERVER_API_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.auth_headers(), timeout=30, **kwargs)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the server alone (its stage processes live in their own groups)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout)
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers on temp dirs: `start_server(**settings)`; all are killed after."""
    servers: list[ServerProcess] = []

    def start(root: Path | None = None, port: int | None = None, **overrides: Any) -> ServerProcess:
        base = root or tmp_path
        server = ServerProcess(base, settings_env(base, **overrides), port)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()
    _kill_leftover_stages(tmp_path)


def _kill_leftover_stages(root: Path) -> None:
    for pid_file in root.rglob("fake_pids.txt"):
        for line in pid_file.read_text().split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line), signal.SIGKILL)


def upload(client: httpx.Client, video: Path = OFFICE_VIDEO, **params: Any) -> httpx.Response:
    with video.open("rb") as f:
        return client.post(
            "/upload", files={"file": (video.name, f, "video/mp4")}, params=params or None
        )


def wait_for(
    client: httpx.Client,
    task_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 120,
    interval: float = 0.1,
) -> dict[str, Any]:
    """Poll /status until `predicate(status)` holds; fail with the last status otherwise."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/status/{task_id}")
        if response.status_code == 200:
            status = response.json()
            if predicate(status):
                return status
        time.sleep(interval)
    raise AssertionError(f"condition not reached in {timeout} s; last status: {status}")


def wait_status(
    client: httpx.Client, task_id: str, statuses: set[str] | str, timeout: float = 120
) -> dict[str, Any]:
    wanted = {statuses} if isinstance(statuses, str) else statuses
    return wait_for(client, task_id, lambda s: s["status"] in wanted, timeout)


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def recorded_pids(root: Path) -> list[int]:
    pids = []
    for pid_file in root.rglob("fake_pids.txt"):
        pids += [int(x) for x in pid_file.read_text().split()]
    return pids
