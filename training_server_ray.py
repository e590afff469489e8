"""Stage runs as Ray Jobs: `RayExecutor` submits each stage command to a Ray cluster's Jobs
API with the resources the stage needs (a GPU for training, CPUs for preprocessing), follows
its logs, stops it on request, and finds it again after the server restarts (by its
submission id, which is derived from task, stage and attempt and persisted before the
submission). It also reads the cluster's nodes and free resources for the scheduler and
`/health`, and checks that the temp folder is the same storage on the nodes. One submitted job
(its log, status, end and stop) is a `RayHandle` (training_server_ray_job.py).

Ray's client library is imported only when this executor is used (requirements-ray.txt).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import shlex
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training_server_executor import Capacity, Ref, RunLostError, StageCommand
from training_server_models import ServerConfig, Stage
from training_server_process import TASK_MARKER
from training_server_ray_job import (
    POLL,
    TERMINAL,
    USAGE_LAG,
    ClusterUnreachableError,
    RayHandle,
    is_not_found,
)

log = logging.getLogger("training_server")
HTTP_TIMEOUT = 5.0  # seconds for one call to the cluster
STORAGE_EXIT = 97  # the entrypoint's exit code when the node does not see the shared folder
PROBE_NAME = ".ray_storage_probe"
CLUSTER_TTL = 1.0  # seconds a read of the cluster's resources is reused
# The usage figures the dashboard gives are the autoscaler's snapshot, written every 5 s
# (AUTOSCALER_UPDATE_INTERVAL_S) with its time: a job of ours counts as shown in them only
# when it was placed this long before the snapshot, and one that ended after the snapshot has
# its resources counted free again. Without a time, a snapshot is taken to be this old.
SNAPSHOT_AGE = 5.0
ENDED_MEMORY = 60.0  # seconds the server remembers where its ended jobs ran


def submission_id(command: StageCommand) -> str:
    """The job's id: one per task, stage and attempt."""
    return f"ts-{command.task_id}-{command.stage.value}-{command.attempt}"


@dataclass
class NodeInfo:
    """One node of the cluster as /health shows it."""

    node_id: str
    ip: str
    hostname: str
    alive: bool
    is_head: bool
    gpus_total: float = 0.0
    gpus_free: float = 0.0
    cpus_total: float = 0.0
    cpus_free: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe fields."""
        return dict(self.__dict__)


@dataclass
class ClusterView:
    """What the cluster holds now (or why it could not be read)."""

    reachable: bool
    ray_version: str | None = None
    nodes: list[NodeInfo] = field(default_factory=list)
    problem: str | None = None
    read_at: float = 0.0  # time.monotonic() of the read
    figures_at: float = 0.0  # time.monotonic() of the usage snapshot it carries

    def free(self, resource: str) -> list[float]:
        """Free amount of `resource` on each live node."""
        key = "gpus_free" if resource == "GPU" else "cpus_free"
        return [getattr(n, key) for n in self.nodes if n.alive]

    def total(self, resource: str) -> float:
        key = "gpus_total" if resource == "GPU" else "cpus_total"
        return sum(getattr(n, key) for n in self.nodes if n.alive)


class RayExecutor:
    """Stage commands as Ray Jobs on the cluster at `settings.ray_address`."""

    name = "ray"

    def __init__(self, settings: ServerConfig, temp_dir: Path) -> None:
        self.settings = settings
        self.address = settings.ray_address.rstrip("/")
        self.temp_dir = temp_dir
        self.kill_grace = settings.kill_grace
        self._client: Any = None
        self._view = ClusterView(reachable=False, problem="not checked yet")
        self.storage_problem: str | None = "the shared storage has not been checked yet"
        self._probe_token = secrets.token_hex(8)
        self.settings_problem = _settings_problem(settings)
        self._handles: dict[str, RayHandle] = {}  # submission id -> live handle
        # Our jobs that ended lately: (node id, stage, placed at, ended at), monotonic times.
        self._ended: list[tuple[str, Stage, float, float]] = []
        self.detaching = False  # the server shuts down: its jobs go on without it

    def detach(self) -> None:
        """Let running jobs go on when the server stops (they are reattached at its start)."""
        self.detaching = True

    # -- the client ---------------------------------------------------------------------

    def _client_sync(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as exc:
                raise ClusterUnreachableError(
                    f"the Ray cluster at {self.address} is unreachable: {exc}"
                ) from exc
        return self._client

    async def client(self) -> Any:
        """The Jobs client (made on first use; its constructor asks the cluster)."""
        return await asyncio.to_thread(self._client_sync)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One Jobs API call in a thread; a connection failure drops the client."""
        client = await self.client()
        try:
            return await asyncio.to_thread(getattr(client, method), *args, **kwargs)
        except Exception as exc:
            if is_not_found(exc):
                raise
            if _is_connection_error(exc):
                self._client = None
                raise ClusterUnreachableError(
                    f"the Ray cluster at {self.address} is unreachable: {exc}"
                ) from exc
            raise

    def _get_json(self, path: str) -> Any:
        url = self.address + path  # http(s) only: _settings_problem refuses anything else
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:  # noqa: S310
            return json.loads(response.read())

    # -- the cluster ----------------------------------------------------------------------

    async def cluster(self, max_age: float = CLUSTER_TTL) -> ClusterView:
        """Nodes and free resources, read from the dashboard (reused for `max_age` s)."""
        if time.monotonic() - self._view.read_at < max_age:
            return self._view
        try:
            version, nodes, status = await asyncio.gather(
                asyncio.to_thread(self._get_json, "/api/version"),
                asyncio.to_thread(self._get_json, "/nodes?view=summary"),
                asyncio.to_thread(self._get_json, "/api/cluster_status"),
            )
            view = _parse_cluster(version, nodes, status)
            as_of = (status["data"].get("clusterStatus") or {}).get("time")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            view = ClusterView(
                reachable=False, problem=f"the Ray cluster at {self.address} is unreachable: {exc}"
            )
            as_of = None
        view.read_at = time.monotonic()
        age = time.time() - as_of if isinstance(as_of, int | float) else SNAPSHOT_AGE
        view.figures_at = view.read_at - min(max(age, 0.0), 60.0)
        self._view = view
        return view

    def needs(self, stage: Stage) -> dict[str, float]:
        """The resources one run of `stage` asks for."""
        if stage == Stage.TRAINING:
            return {"GPU": self.settings.ray_training_gpus, "CPU": self.settings.ray_training_cpus}
        return {"GPU": 0.0, "CPU": self.settings.ray_preprocess_cpus}

    async def capacity(self, stage: Stage, running: int) -> Capacity:
        """How many runs of `stage` may be in flight now (those running included), from the
        cluster's free resources, and why a queued one waits when none more may start."""
        if self.settings_problem:
            return Capacity(running, self.settings_problem)
        view = await self.cluster()
        if not view.reachable:
            return Capacity(running, f"waiting for the Ray cluster: {view.problem}")
        if self.storage_problem:
            return Capacity(running, f"waiting: {self.storage_problem}")
        need = self.needs(stage)
        # Our runs that the usage figures do not count yet: those claimed but not submitted
        # (no handle yet), submitted but not placed, or placed after (or just before) the
        # snapshot. And what our jobs that ended since the snapshot freed, per node.
        shown = sum(1 for h in self._handles.values() if h.stage == stage and h.shown_in(view))
        pending = max(0, running - shown)
        freed = self._freed_since(view)
        startable = 0
        for node in (n for n in view.nodes if n.alive):
            back = freed.get(node.node_id, {})
            fits = [
                math.floor((free + back.get(res, 0.0)) / need[res] + 1e-9)
                for res, free in (("GPU", node.gpus_free), ("CPU", node.cpus_free))
                if need[res] > 0
            ]
            startable += min(fits) if fits else self.settings.preprocess_slots
        startable = max(0, startable - pending)
        if startable > 0:
            return Capacity(running + startable, None)
        main = "GPU" if need["GPU"] > 0 else "CPU"
        # What the cluster reports free, less what our runs it does not show yet will take.
        free = max(0, sum(math.floor(f) for f in view.free(main)) - pending * int(need[main]))
        total = math.floor(view.total(main))
        what = "a free GPU" if main == "GPU" else f"{need['CPU']:g} free CPUs"
        return Capacity(running, f"waiting for {what} in the cluster ({free} of {total} free)")

    def _freed_since(self, view: ClusterView) -> dict[str, dict[str, float]]:
        """Resources per node that our jobs held in the snapshot of `view` and have freed."""
        now = time.monotonic()
        self._ended = [e for e in self._ended if now - e[3] < ENDED_MEMORY]
        freed: dict[str, dict[str, float]] = {}
        for node_id, stage, placed_at, ended_at in self._ended:
            if placed_at + USAGE_LAG <= view.figures_at < ended_at:
                back = freed.setdefault(node_id, {"GPU": 0.0, "CPU": 0.0})
                for res, amount in self.needs(stage).items():
                    back[res] += amount
        return freed

    def _nodes_now(self, view: ClusterView) -> list[NodeInfo]:
        """The nodes of `view` with its usage snapshot brought up to now, as capacity() counts:
        less what our runs placed since the snapshot hold, plus what our runs ended since it
        gave back (the snapshot is up to 5 s old; a training just started shows at once)."""
        freed = self._freed_since(view)
        taken: dict[str, dict[str, float]] = {}
        for handle in self._handles.values():
            node_id = handle.ref.get("node_id")
            if not node_id or handle.returncode is not None or handle.placed_at is None:
                continue
            if not handle.shown_in(view):
                held = taken.setdefault(node_id, {"GPU": 0.0, "CPU": 0.0})
                for res, amount in self.needs(handle.stage).items():
                    held[res] += amount

        def now(node: NodeInfo, res: str, free: float, total: float) -> float:
            change = freed.get(node.node_id, {}).get(res, 0.0)
            change -= taken.get(node.node_id, {}).get(res, 0.0)
            return min(total, max(0.0, free + change))

        return [
            dataclasses.replace(
                node,
                gpus_free=now(node, "GPU", node.gpus_free, node.gpus_total),
                cpus_free=now(node, "CPU", node.cpus_free, node.cpus_total),
            )
            for node in view.nodes
        ]

    async def node_name(self, node_id: str | None) -> str | None:
        """`host (ip, node id-prefix)` of a node id, as far as the last cluster read knows it."""
        if not node_id:
            return None
        view = await self.cluster(max_age=30)
        for node in view.nodes:
            if node.node_id == node_id:
                return f"{node.hostname} ({node.ip}, node {node_id[:8]})"
        return node_id[:12]

    async def health(self) -> dict[str, Any]:
        """The cluster as /health shows it."""
        view = await self.cluster()
        nodes = self._nodes_now(view)
        problem = self.settings_problem or view.problem or self.storage_problem
        return {
            "executor": self.name,
            "address": self.address,
            "reachable": view.reachable,
            "ray_version": view.ray_version,
            "nodes": [n.as_dict() for n in nodes],
            "gpus_total": view.total("GPU"),
            "gpus_free": sum(n.gpus_free for n in nodes if n.alive),
            "problem": problem,
        }

    # -- shared storage --------------------------------------------------------------------

    def probe_path(self) -> Path:
        return self.temp_dir / PROBE_NAME

    def _storage_guard(self) -> str:
        """Shell that ends the job with STORAGE_EXIT when the node does not see the probe."""
        probe = shlex.quote(str(self.probe_path()))
        token = shlex.quote(self._probe_token)
        message = shlex.quote(
            f"TRAINING_SERVER_TEMP_DIR ({self.temp_dir}) is not the server's storage on this "
            "node: mount the same shared folder at the same path on every Ray node"
        )
        return (
            f'if [ "$(cat {probe} 2>/dev/null)" != {token} ]; then '
            f'echo {message} "($(hostname))" >&2; exit {STORAGE_EXIT}; fi'
        )

    async def check_storage(self) -> str | None:
        """Write a probe file and run a tiny job that reads it; the problem in words, or None."""
        try:
            await asyncio.to_thread(self.probe_path().write_text, self._probe_token)
            job = f"ts-storage-probe-{secrets.token_hex(4)}"
            await self.call(
                "submit_job",
                entrypoint=self._storage_guard() + "; echo storage-ok",
                submission_id=job,
                entrypoint_num_cpus=0,
            )
            deadline = time.monotonic() + 60
            status = "PENDING"
            while time.monotonic() < deadline:
                status = str(await self.call("get_job_status", job)).split(".")[-1]
                if status in TERMINAL:
                    break
                await asyncio.sleep(POLL)
            info = await self.call("get_job_info", job)
            with contextlib.suppress(Exception):
                await self.call("delete_job", job)
        except OSError as exc:
            self.storage_problem = f"the temp folder {self.temp_dir} cannot be written: {exc}"
            return self.storage_problem
        except Exception as exc:  # unreachable, or not ready ("No available agent ...")
            self.storage_problem = f"the shared storage is not checked yet ({exc})"
            return self.storage_problem
        if status == "SUCCEEDED":
            self.storage_problem = None
        elif getattr(info, "driver_exit_code", None) == STORAGE_EXIT:
            self.storage_problem = (
                f"storage not shared: a Ray node does not see the server's "
                f"TRAINING_SERVER_TEMP_DIR ({self.temp_dir}); mount the same shared folder at "
                "the same path on every node"
            )
        else:
            self.storage_problem = f"the storage probe job ended {status}: {info.message}"
        return self.storage_problem

    # -- runs ------------------------------------------------------------------------------

    def planned_ref(self, command: StageCommand) -> Ref:
        """Where the run will live, known (and persisted) before it is submitted."""
        return {"executor": self.name, "submission_id": submission_id(command), "node": None}

    def entrypoint(self, command: StageCommand) -> str:
        """The shell line the job runs: the storage guard, then the argv in its folder."""
        return (
            f"{self._storage_guard()}; cd {shlex.quote(str(command.cwd))} && "
            f"exec {shlex.join(command.argv)}"
        )

    async def start(self, command: StageCommand) -> RayHandle:
        """Submit the command as a Ray Job asking for the stage's resources."""
        need = self.needs(command.stage)
        env = {k: v for k, v in command.env.items() if os.environ.get(k) != v}
        env.update({k: os.environ[k] for k in self.settings.ray_pass_env if k in os.environ})
        env[TASK_MARKER] = command.task_id
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, math.ceil(self.kill_grace)))
        ref = self.planned_ref(command)
        try:
            await self._submit(command, ref, need, env)
        except Exception as exc:  # not submitted: it waits and runs again (counted)
            raise RunLostError(f"the job could not be submitted: {exc}") from exc
        return self._handle(ref, command.stage)

    async def _submit(
        self, command: StageCommand, ref: Ref, need: dict[str, float], env: dict[str, str]
    ) -> None:
        await self.call(
            "submit_job",
            entrypoint=self.entrypoint(command),
            submission_id=ref["submission_id"],
            entrypoint_num_gpus=need["GPU"] or None,
            entrypoint_num_cpus=need["CPU"] or None,
            runtime_env={"env_vars": env},
            metadata={"task_id": command.task_id, "stage": command.stage.value},
        )

    def _handle(self, ref: Ref, stage: Stage) -> RayHandle:
        handle = RayHandle(self, dict(ref), stage)
        self._handles[handle.submission_id] = handle
        return handle

    async def reattach(self, ref: Ref) -> RayHandle | None:
        """Follow the job `ref` names again (even while the cluster is unreachable: the
        handle waits for it, and a job the cluster no longer knows is reported lost)."""
        if ref.get("executor") != self.name or not ref.get("submission_id"):
            return None
        stage = Stage.TRAINING if "-training-" in ref["submission_id"] else Stage.PREPROCESSING
        return self._handle(ref, stage)

    async def clear_leftovers(self, task_id: str, ref: Ref | None) -> int:
        """Stop the task's recorded job if it still runs; returns how many were stopped."""
        if not ref or ref.get("executor") != self.name:
            return 0
        handle = self._handle(ref, Stage.PREPROCESSING)
        try:
            await handle.stop(self.kill_grace)
        finally:
            await handle.close()
        return 1 if handle.was_running else 0

    def forget(self, handle: RayHandle) -> None:
        """Drop a closed handle; remember where an ended job ran (see _freed_since)."""
        if self._handles.pop(handle.submission_id, None) is None:
            return
        node_id = handle.ref.get("node_id")
        if handle.placed_at is not None and node_id and handle.returncode is not None:
            self._ended.append((node_id, handle.stage, handle.placed_at, handle.ended_at))


def _is_connection_error(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, requests.exceptions.ConnectionError | ConnectionError | TimeoutError)


def _settings_problem(settings: ServerConfig) -> str | None:
    """A sentence when the Ray settings cannot work, else None."""
    address = settings.ray_address
    if not address.startswith(("http://", "https://")):
        return (
            f"TRAINING_SERVER_RAY_ADDRESS={address!r} is not the cluster's Jobs address "
            "(it looks like http://head:8265)"
        )
    try:
        import ray  # noqa: F401
    except ImportError:
        return (
            "TRAINING_SERVER_EXECUTOR=ray but Ray is not installed: "
            "pip install -r requirements-ray.txt"
        )
    return None


def _parse_cluster(version: Any, nodes: Any, status: Any) -> ClusterView:
    usage = status["data"]["clusterStatus"]["loadMetricsReport"].get("usageByNode") or {}
    found = []
    for entry in nodes["data"]["summary"]:
        raylet = entry.get("raylet") or {}
        node_id = raylet.get("nodeId", "")
        alive = raylet.get("state") == "ALIVE"
        total = raylet.get("resourcesTotal") or {}
        used = usage.get(node_id, {})
        gpu_used, gpu_total = used.get("GPU", [0.0, total.get("GPU", 0.0)])
        cpu_used, cpu_total = used.get("CPU", [0.0, total.get("CPU", 0.0)])
        found.append(
            NodeInfo(
                node_id=node_id,
                ip=entry.get("ip") or raylet.get("nodeManagerAddress", ""),
                hostname=entry.get("hostname", ""),
                alive=alive,
                is_head=bool(raylet.get("isHeadNode")),
                gpus_total=gpu_total,
                gpus_free=max(0.0, gpu_total - gpu_used),
                cpus_total=cpu_total,
                cpus_free=max(0.0, cpu_total - cpu_used),
            )
        )
    return ClusterView(reachable=True, ray_version=version.get("ray_version"), nodes=found)
