"""One Ray Job of a stage, followed through the Jobs API: its log (read quickly while the job
is young, then Ray's tail), its status to its end (or its loss with its node), and its stop.
The executor around it (submission, the cluster's resources, shared storage) is
training_server_ray.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from training_server_executor import Ref, RunLostError
from training_server_models import Stage

if TYPE_CHECKING:
    from training_server_ray import ClusterView, RayExecutor

log = logging.getLogger("training_server")
POLL = 0.5  # seconds between job status polls
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# A job of ours counts as shown in the cluster's usage snapshot only when it was placed this
# long before the snapshot was taken (see RayExecutor.capacity).
USAGE_LAG = 1.5
FIRST_OUTPUT_POLL = 0.2  # seconds between reads of a young job's whole (small) log
FIRST_OUTPUT_WINDOW = 15.0  # seconds after submission the log is read that way, then tailed
FIRST_OUTPUT_MAX = 64 * 1024  # characters: past this, too, Ray's tail follows the log
PERSIST_DELIVERED = 5.0  # seconds between records of how much of the log is in the task log


class ClusterUnreachableError(RuntimeError):
    """The cluster's Jobs address did not answer."""


def is_not_found(exc: BaseException) -> bool:
    text = str(exc)
    return "does not exist" in text or "404" in text or "not found" in text.lower()


class RayHandle:
    """A submitted Ray Job, followed through the Jobs API."""

    def __init__(self, executor: RayExecutor, ref: Ref, stage: Stage) -> None:
        self.executor = executor
        self.ref = ref
        self.stage = stage
        self.submission_id: str = ref["submission_id"]
        self.placed = False  # the cluster reported it running on a node
        self.placed_at: float | None = None  # when this server first saw it running
        self.ended_at = 0.0  # when this server saw it end
        self.was_running = False
        self.on_ref_change: Callable[[Ref], Any] | None = None
        self._returncode: int | None = None
        # Characters of the job's log delivered to the sink; after a reattach, what the task
        # log already holds (recorded in the ref every few seconds) is not delivered again.
        self._delivered = int(ref.get("log_delivered") or 0)
        self._persisted_at = time.monotonic()
        self._on_output: Callable[[bytes], None] | None = None
        self._tail: asyncio.Task[None] | None = None

    @property
    def returncode(self) -> int | None:
        """The exit code once it ended, else None."""
        return self._returncode

    def follow(self, on_output: Callable[[bytes], None]) -> None:
        """Deliver the job's log (from its start) to `on_output`, live."""
        self._on_output = on_output
        self._tail = asyncio.get_running_loop().create_task(self._follow())

    def shown_in(self, view: ClusterView) -> bool:
        """Whether the cluster's usage figures in `view` already count this job."""
        return self.placed_at is not None and view.figures_at >= self.placed_at + USAGE_LAG

    def _deliver(self, text: str) -> None:
        if self._on_output is not None and text:
            self._delivered += len(text)
            self._on_output(text.encode())

    async def _persist_delivered(self) -> None:
        """Record how much of the log the task log holds (for a reattach), now and then."""
        if self.on_ref_change is None or time.monotonic() - self._persisted_at < PERSIST_DELIVERED:
            return
        self._persisted_at = time.monotonic()
        self.ref["log_delivered"] = self._delivered
        with contextlib.suppress(Exception):
            await self.on_ref_change(dict(self.ref))

    async def _first_output(self) -> None:
        """Read a young job's whole log a few times a second: Ray's tail polls its file once a
        second and waits a second more at each end of file, which delays the first lines."""
        until = time.monotonic() + FIRST_OUTPUT_WINDOW
        while self._returncode is None and time.monotonic() < until:
            with contextlib.suppress(ClusterUnreachableError):
                logs = await self.executor.call("get_job_logs", self.submission_id)
                self._deliver(logs[self._delivered :])
                await self._persist_delivered()
                if len(logs) >= FIRST_OUTPUT_MAX:
                    return
            await asyncio.sleep(FIRST_OUTPUT_POLL)

    async def _follow(self) -> None:
        with contextlib.suppress(Exception):  # e.g. not found yet: the tail below goes on
            await self._first_output()
        while self._returncode is None:
            try:
                client = await self.executor.client()
                seen = 0
                async for chunk in client.tail_job_logs(self.submission_id):
                    skip = max(0, min(len(chunk), self._delivered - seen))
                    seen += len(chunk)
                    self._deliver(chunk[skip:])
                    await self._persist_delivered()
                if self._returncode is None:
                    await asyncio.sleep(1.0)  # the stream ended early: follow it again
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1.0)  # cluster away: wait() decides whether it is lost

    async def _catch_up(self) -> None:
        """After the end: what the live tail has not delivered yet, from the full log (Ray's
        tail would end only a second or two later)."""
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._tail
        with contextlib.suppress(Exception):
            logs = await self.executor.call("get_job_logs", self.submission_id)
            self._deliver(logs[self._delivered :])

    async def _info(self) -> Any:
        """The job's info; None while the cluster is unreachable; RunLostError when the
        cluster does not know the job (it restarted, or the job was never submitted)."""
        try:
            return await self.executor.call("get_job_info", self.submission_id)
        except ClusterUnreachableError:
            return None
        except Exception as exc:
            if is_not_found(exc):
                raise RunLostError(
                    f"the Ray cluster no longer knows job {self.submission_id} "
                    "(the cluster restarted, or the job was never submitted)"
                ) from exc
            raise

    async def wait(self) -> int | None:
        """Its exit code once it ended; RunLostError when the job was lost with its node."""
        while True:
            info = await self._info()
            if info is None:
                await asyncio.sleep(1.0)
                continue
            status = str(info.status).split(".")[-1]
            node = getattr(info, "driver_node_id", None)
            if status == "RUNNING":
                self.placed = self.was_running = True
                if self.placed_at is None:
                    self.placed_at = time.monotonic()
                if node and self.ref.get("node_id") != node:
                    self.ref["node_id"] = node
                    self.ref["node"] = await self.executor.node_name(node)
                    if self.on_ref_change is not None:
                        with contextlib.suppress(Exception):
                            await self.on_ref_change(dict(self.ref))
            if status in TERMINAL:
                self.ended_at = time.monotonic()
                error_type = str(getattr(info, "error_type", "") or "").split(".")[-1]
                if status == "FAILED" and error_type != "JOB_ENTRYPOINT_COMMAND_ERROR":
                    self._returncode = -1
                    await self._catch_up()
                    raise RunLostError(
                        f"Ray job {self.submission_id} was lost ({error_type or 'failed'}: "
                        f"{info.message})"
                    )
                if status == "SUCCEEDED":
                    self._returncode = 0
                elif status == "STOPPED":
                    self._returncode = -15
                else:
                    code = getattr(info, "driver_exit_code", None)
                    self._returncode = code if code not in (None, 0) else 1
                await self._catch_up()
                return self._returncode
            await asyncio.sleep(POLL)

    async def stop(self, grace: float) -> None:
        """Stop the job (SIGTERM, Ray's wait, SIGKILL of its process tree) and confirm it
        ended; while the cluster is unreachable, give up after a bounded wait."""
        if self._returncode is not None or self.executor.detaching:
            return
        deadline = time.monotonic() + grace + 20
        while time.monotonic() < deadline:
            try:
                info = await self._info()
            except RunLostError:
                return
            if info is not None:
                status = str(info.status).split(".")[-1]
                if status in TERMINAL:
                    self._returncode = self._returncode or (-15 if status == "STOPPED" else 1)
                    self.ended_at = self.ended_at or time.monotonic()
                    return
                if status == "RUNNING":
                    self.was_running = True
                with contextlib.suppress(Exception):
                    await self.executor.call("stop_job", self.submission_id)
            await asyncio.sleep(POLL)
        log.warning("could not confirm that Ray job %s ended", self.submission_id)

    async def close(self) -> None:
        """Stop following its log (when the server detaches, record how much of it the task
        log holds, so that the next start does not write it twice)."""
        if self._tail is not None and not self._tail.done():
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._tail
        if self.executor.detaching and self._returncode is None:
            self._persisted_at = 0.0
            await self._persist_delivered()
        self.executor.forget(self)
