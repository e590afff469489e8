"""A real Ray cluster on loopback for the Ray executor's tests and benchmark: a head with no
GPU (2 CPUs) and worker nodes advertising one GPU each (none is needed), each node with agent
ports of its own, started with `ray start` and stopped by killing its own processes (found by
its temp folder and GCS port), never with `ray stop`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port

RAY = Path(sys.executable).parent / "ray"


class Cluster:
    """A head (no GPU) and two worker nodes (one "GPU" each), started with `ray start`;
    stopped by killing the processes that carry its temp dir or its port."""

    def __init__(self, unshare_over: Path | None = None) -> None:
        # Ray's socket paths must stay under 108 bytes: a short folder of its own.
        self.temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.port = free_port()
        self.dashboard = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.unshare_over = unshare_over
        self.node_pids: dict[int, list[int]] = {}  # agent port -> the node's processes
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000",
        }

    def _ray_start(self, args: list[str]) -> None:
        # Each node on this one machine needs agent ports of its own (the defaults collide).
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--metrics-export-port", "--runtime-env-agent-port"]  # fmt: skip
        argv = [str(RAY), "start", *args]
        agent_port = free_port()
        argv += ["--dashboard-agent-listen-port", str(agent_port)]
        for flag in ports[1:]:
            argv += [flag, str(free_port())]
        before = set(self.pids())
        if self.unshare_over is not None:  # a node whose view of the temp dir is its own
            where = str(self.unshare_over)
            script = f'mkdir -p "{where}" && mount -t tmpfs none "{where}" && exec "$@"'
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
        # A head started again on its old port right after a kill can find the port not yet
        # free on a busy machine (seen once with two test workers): one more try after what the
        # failed start left is killed; a second failure shows Ray's own words.
        for attempt in (1, 2):
            done = subprocess.run(argv, env=self.env, capture_output=True, timeout=120, check=False)
            if done.returncode == 0:
                break
            tail = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
            for pid in set(self.pids()) - before:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if attempt == 2:
                raise RuntimeError(f"ray start {args[0]} exited {done.returncode}:\n{tail}")
            print(f"ray start {args[0]} exited {done.returncode}, trying again:\n{tail}")
            time.sleep(3)
        self.node_pids[agent_port] = sorted(set(self.pids()) - before)

    def start_head(self, gpus: int = 0) -> None:
        self._ray_start(
            ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(self.dashboard), "--ray-client-server-port",
             str(free_port()), "--num-cpus", "2", "--num-gpus", str(gpus),
             "--object-store-memory", "100000000", "--temp-dir", str(self.temp),
             "--include-dashboard", "true", "--disable-usage-stats"]
        )  # fmt: skip

    def add_worker(self) -> None:
        self._ray_start(
            ["--address", f"127.0.0.1:{self.port}", "--num-cpus", "1", "--num-gpus", "1",
             "--object-store-memory", "80000000", "--disable-usage-stats"]
        )  # fmt: skip

    def wait_nodes(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                nodes = ray_nodes(self.address)
                if sum(1 for n in nodes if n["raylet"]["state"] == "ALIVE") >= count:
                    return
            time.sleep(0.5)
        raise AssertionError(f"the cluster did not reach {count} nodes")

    def pids(self) -> list[int]:
        """Processes of this cluster: those naming its temp dir, its GCS port, or a session
        under its temp dir."""
        needles = [str(self.temp).encode(), f"127.0.0.1:{self.port}".encode(),
                   f"--gcs-address=127.0.0.1:{self.port}".encode()]  # fmt: skip
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(entry.path, "cmdline").read_bytes()
                if any(n in cmdline for n in needles):
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        for _ in range(3):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)


def ray_nodes(address: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{address}/nodes?view=summary", timeout=5) as response:
        return json.loads(response.read())["data"]["summary"]
