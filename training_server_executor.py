"""Where stage commands run: the seam between the task runner and the machines.

The runner hands an executor a `StageCommand` and gets a handle back; the handle is followed
(output to a sink), waited for, and stopped (terminate, grace, kill) through one lifecycle,
`training_server_process.follow_to_end`, whatever runs it. Each handle has a JSON `ref` that
the runner persists before anything else can happen, so a restarted server can find what
survived it: reattach and follow it again where the executor can (a job on a cluster), or kill
it (a local process group, whose output pipe died with the old server).

`LocalExecutor` runs commands as process groups on this machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from training_server_models import Stage
from training_server_process import (
    TASK_MARKER,
    LocalProcess,
    ProcessOutcome,
    await_shielded,
    follow_to_end,
    kill_marked,
    kill_stale_group,
)

Ref = dict[str, Any]


class RunLostError(RuntimeError):
    """The run was lost with the machine it ran on (a cluster node died, the cluster
    forgot it): it did not fail by itself, so it is queued to run again."""


@dataclass(frozen=True)
class Capacity:
    """How many runs of a stage may be in flight now, and, when no more may start, why a
    queued one waits (in words for its status)."""

    limit: int
    waiting: str | None = None


@dataclass(frozen=True)
class StageCommand:
    """One run of a stage's command, as the executor needs it."""

    task_id: str
    stage: Stage
    attempt: int
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 3600.0


class RunHandle(Protocol):
    """A started run of a command, wherever it runs."""

    ref: Ref  # JSON-safe; where the run lives, persisted by the runner

    @property
    def returncode(self) -> int | None:
        """The exit code once it ended, else None."""

    def follow(self, on_output: Callable[[bytes], None]) -> None:
        """Start delivering its output to `on_output`."""

    async def wait(self) -> int | None:
        """Its exit code once it has ended."""

    async def stop(self, grace: float) -> None:
        """End it (terminate, wait up to `grace`, kill) and confirm that it ended."""

    async def close(self) -> None:
        """Release what following it holds (pipes, streams)."""


class Executor(Protocol):
    """Runs stage commands somewhere and finds them again after a restart."""

    name: str

    async def start(self, command: StageCommand) -> RunHandle:
        """Start the command; a started run is never lost to a cancel (it is stopped)."""

    async def reattach(self, ref: Ref) -> RunHandle | None:
        """The run `ref` names, followed again from where it is, or None when it cannot be."""

    async def clear_leftovers(self, task_id: str, ref: Ref | None) -> int:
        """End whatever of the task's runs survived a restart; returns how many were ended."""

    def planned_ref(self, command: StageCommand) -> Ref | None:
        """Where the run will live, when that is known before it starts (persisted first)."""

    async def capacity(self, stage: Stage, running: int) -> Capacity:
        """How many runs of `stage` may be in flight now (`running` of them run already)."""


class _LocalHandle(LocalProcess):
    @property
    def ref(self) -> Ref:
        return {"executor": "local", "pid": self.pid, "start_time": self.start_time}


class LocalExecutor:
    """Stage commands as process groups on this machine (each marked with its task id, so
    what escaped its group is found too)."""

    name = "local"

    def __init__(self, kill_grace: float, slots: dict[Stage, int] | None = None) -> None:
        self.kill_grace = kill_grace
        self.slots = slots or {Stage.PREPROCESSING: 1, Stage.TRAINING: 1}

    def planned_ref(self, command: StageCommand) -> Ref | None:
        """Unknown before the start: a local run is named by its pid."""
        return None

    async def capacity(self, stage: Stage, running: int) -> Capacity:
        """The settings' fixed slot count."""
        return Capacity(self.slots[stage])

    async def start(self, command: StageCommand) -> RunHandle:
        """Spawn the command in its own process group."""
        return await _LocalHandle.spawn(
            command.argv,
            cwd=command.cwd,
            env={**command.env, TASK_MARKER: command.task_id},
            kill_grace=self.kill_grace,
        )

    async def reattach(self, ref: Ref) -> RunHandle | None:
        """Never: the output pipe of a local run dies with the server that followed it."""
        return None

    async def clear_leftovers(self, task_id: str, ref: Ref | None) -> int:
        """Kill the recorded process group (unless its pid was reused) and every process
        carrying the task's marker."""
        killed = 0
        if ref and ref.get("pid"):
            killed += await asyncio.to_thread(
                kill_stale_group, int(ref["pid"]), ref.get("start_time")
            )
        killed += await asyncio.to_thread(kill_marked, task_id)
        return killed


async def run_command(
    executor: Executor,
    command: StageCommand,
    *,
    on_output: Callable[[bytes], None],
    on_started: Callable[[Ref], Awaitable[None]],
    kill_grace: float,
) -> ProcessOutcome:
    """Start `command`, persist where it runs (`on_started`, before anything else), follow it
    to its end or its timeout, and always stop it."""
    started = asyncio.get_running_loop().time()
    plan = getattr(executor, "planned_ref", None)
    planned = plan(command) if plan is not None else None
    if planned is not None:  # a job elsewhere: persist its name before it exists
        await on_started(planned)
    handle = await executor.start(command)
    if hasattr(handle, "on_ref_change"):  # e.g. the node it landed on, once known
        handle.on_ref_change = on_started
    try:
        await on_started(handle.ref)
    except BaseException:
        await await_shielded(_stop(handle, kill_grace))
        raise
    elapsed = asyncio.get_running_loop().time() - started
    return await follow_handle(handle, command.timeout_s - elapsed, on_output, kill_grace)


async def follow_handle(
    handle: RunHandle,
    timeout_s: float,
    on_output: Callable[[bytes], None],
    kill_grace: float,
    on_ref_change: Callable[[Ref], Awaitable[None]] | None = None,
) -> ProcessOutcome:
    """Follow a started (or reattached) run to its end or its timeout; always stop it."""
    if on_ref_change is not None and hasattr(handle, "on_ref_change"):
        handle.on_ref_change = on_ref_change
    return await follow_to_end(
        handle,
        timeout_s=max(0.0, timeout_s),
        on_output=on_output,
        kill_grace=kill_grace,
    )


async def _stop(handle: RunHandle, grace: float) -> None:
    try:
        await handle.stop(grace)
    finally:
        await handle.close()
