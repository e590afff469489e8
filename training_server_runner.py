"""Running one claimed stage of a task to its end: build its context from the row the claim
returned, run it through the executor, record the ending with the named state operation, and
stop it on request. Every ending has an explicit reason (succeeded, failed, timed out,
cancelled, interrupted); it is written in `finally` under a shield, so a cancel cannot leave a
task running, and a failure to record it is retried with a bounded backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import training_server_stages as stages
import training_server_state as state
from training_server_db import Database, TaskNotFoundError
from training_server_executor import Executor, RunHandle, RunLostError
from training_server_health import StageHealth
from training_server_models import EndReason, ServerConfig, Stage, TaskParams
from training_server_process import TaskLog, await_shielded
from training_server_progress import ProgressWriter
from training_server_records import Records
from training_server_stages import StageContext, StageResult
from training_server_utils import Paths

log = logging.getLogger("training_server")
Row = dict[str, Any]
RECORD_ATTEMPTS = 5  # tries to write a stage's ending before leaving it to the reconcile
RECORD_BACKOFF = 0.2  # seconds before the first retry; doubles each time


@dataclass
class _Running:
    stage: Stage
    task: asyncio.Task[None]
    stop_reason: EndReason | None = None
    stop_message: str | None = None
    # Set by the run's first step. A task cancelled before it has taken one never enters its
    # coroutine (asyncio throws the cancel in at the top), so nothing would record the end:
    # until then a stop is left for the run to find as it starts.
    started: bool = False


class Runner:
    """The stages running now, one asyncio task each."""

    def __init__(
        self,
        settings: ServerConfig,
        paths: Paths,
        db: Database,
        records: Records,
        executor: Executor,
        health: StageHealth,
        on_slot_free: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.db = db
        self.records = records
        self.executor = executor
        self.health = health
        self._on_slot_free = on_slot_free
        self._running: dict[str, _Running] = {}
        self._pending_stop: dict[str, tuple[EndReason, str]] = {}
        self.progress = ProgressWriter(db, records.publish)
        self._background: set[asyncio.Task[None]] = set()

    # -- reading ---------------------------------------------------------------------------

    def running_ids(self, stage: Stage) -> list[str]:
        """Ids of the tasks whose `stage` runs now."""
        return [task_id for task_id, entry in self._running.items() if entry.stage == stage]

    def is_running(self, task_id: str) -> bool:
        """Whether a stage of this task runs in this server."""
        return task_id in self._running

    def busy(self, stage: Stage) -> int:
        """How many runs of `stage` take a slot now."""
        return sum(1 for entry in self._running.values() if entry.stage == stage)

    # -- starting and stopping ---------------------------------------------------------------

    def start(self, row: Row, stage: Stage, attached: RunHandle | None = None) -> None:
        """Run a task just claimed for `stage` (its row as the claim returned it), or follow
        `attached`, its run that outlived a server restart. Registered before anything
        awaits, so a stop request always finds it."""
        task_id = row["id"]
        task = asyncio.create_task(self._run(row, stage, attached), name=f"{stage.value}:{task_id}")
        self._running[task_id] = _Running(stage=stage, task=task)

    async def stop(self, task_id: str, reason: EndReason, message: str) -> bool:
        """End the task's running stage with `reason`; False when none runs here. A task
        claimed a moment ago whose runner has not started yet is stopped as it starts."""
        entry = self._running.get(task_id)
        if entry is None:
            return False
        self._cancel(task_id, entry, reason, message)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({entry.task}, timeout=self.settings.kill_grace + 15)
        return True

    def _cancel(self, task_id: str, entry: _Running, reason: EndReason, message: str) -> None:
        if not entry.started:  # its first step will find the stop and end as it says
            self._pending_stop[task_id] = (reason, message)
            return
        entry.stop_reason = reason
        entry.stop_message = message
        entry.task.cancel()

    def stop_when_started(self, task_id: str, reason: EndReason, message: str) -> None:
        """Remember a stop for a task claimed by the scheduler that is about to start."""
        self._pending_stop[task_id] = (reason, message)

    async def shutdown(self) -> None:
        """End every running stage as interrupted (it runs again at the next start); with an
        executor that can detach (Ray), its jobs keep running and stay recorded as running."""
        running = list(self._running.values())
        detach = getattr(self.executor, "detach", None)
        if detach is not None:  # jobs on a cluster go on; the next start follows them again
            detach()
        for task_id, entry in list(self._running.items()):
            message = "Interrupted by server shutdown; it runs again at the next start"
            self._cancel(task_id, entry, EndReason.INTERRUPTED, message)
        if running:
            await asyncio.gather(*(entry.task for entry in running), return_exceptions=True)

    # -- one run -------------------------------------------------------------------------------

    async def _run(self, row: Row, stage: Stage, attached: RunHandle | None = None) -> None:
        task_id = row["id"]
        result: StageResult | None = None
        task_log: TaskLog | None = None
        try:
            entry = self._running[task_id]
            entry.started = True
            pending = self._pending_stop.pop(task_id, None)
            if pending is not None:  # cancelled between its claim and this start
                entry.stop_reason, entry.stop_message = pending
                raise asyncio.CancelledError
            task_log = TaskLog(self.paths.log_file(task_id), self.settings.log_max_bytes)
            how = "reattached after a server restart" if attached else "started"
            task_log.event(f"Stage {stage.value} {how} (attempt {row['attempts']})")
            ctx = StageContext(
                task_id=task_id,
                row=row,
                params=TaskParams.model_validate(row["params"]),
                settings=self.settings,
                paths=self.paths,
                log=task_log,
                report_progress=lambda fields: self._report_progress(task_id, fields),
                record_ref=lambda ref: self._record_ref(task_id, ref),
                record_metadata=lambda extra: self._record_metadata(row, extra),
                executor=self.executor,
                stage=stage,
                attempt=row["attempts"],
                checkout=self.health.checkout,
                attached=attached,
            )
            if not self.paths.task_dir(task_id).is_dir():
                result = StageResult(
                    EndReason.FAILED,
                    f"{stage.value.capitalize()} failed",
                    "The task's folder is gone (removed outside the server, or by the "
                    "cleanup): upload the video again.",
                )
            elif stage == Stage.PREPROCESSING:
                result = await stages.preprocess(ctx)
            else:
                result = await stages.train(ctx)
        except asyncio.CancelledError:
            entry = self._running.get(task_id)
            reason = entry.stop_reason if entry else None
            message = (entry.stop_message if entry else None) or "Cancelled"
            if reason == EndReason.INTERRUPTED and getattr(self.executor, "detaching", False):
                if task_log is not None:
                    task_log.event("Server shut down; the job goes on and is followed again")
                    task_log.close()
                    task_log = None
                return  # nothing recorded: the next start reattaches to it
            result = StageResult(
                reason=reason or EndReason.CANCELLED,
                message=message,
                error=None if reason == EndReason.INTERRUPTED else message,
            )
        except RunLostError as exc:
            result = self._lost(row, stage, exc)
        except Exception as exc:
            log.exception("stage %s of task %s crashed", stage.value, task_id)
            result = StageResult(
                EndReason.FAILED,
                f"{stage.value.capitalize()} failed",
                f"Internal error in the server while running {stage.value}: {exc!r}",
            )
        finally:
            await await_shielded(self._finish(row, stage, result, task_log))

    def _lost(self, row: Row, stage: Stage, exc: RunLostError) -> StageResult:
        """A run lost with its machine: queued again at its old place (training resumes from
        its last checkpoint), until it has been tried ray_max_attempts times."""
        attempts, limit = row["attempts"], self.settings.ray_max_attempts
        if attempts >= limit:
            return StageResult(
                EndReason.FAILED,
                f"{stage.value.capitalize()} failed",
                f"Its run was lost {attempts} times (the last time: {exc}); not retried again.",
            )
        return StageResult(
            EndReason.INTERRUPTED,
            f"Its run was lost ({exc}); queued to run again (attempt {attempts} of {limit})",
        )

    async def _finish(
        self, row: Row, stage: Stage, result: StageResult | None, task_log: TaskLog | None
    ) -> None:
        task_id = row["id"]
        try:
            if result is None:
                return
            if task_log is not None:
                task_log.end_output()
                task_log.event(
                    f"Stage {stage.value} ended: {result.reason.value}: {result.message}"
                )
                if result.error and result.reason != EndReason.SUCCEEDED:
                    task_log.event(result.error)
                task_log.close()
            await self.progress.flush(task_id)
            task_dir = self.paths.task_dir(task_id)
            if (
                stage == Stage.PREPROCESSING
                and result.reason not in {EndReason.SUCCEEDED, EndReason.INTERRUPTED}
                and task_dir.is_dir()
            ):
                # Partial frames and models are of no use and may be what filled the disk;
                # the video stays for a retry.
                await asyncio.to_thread(stages.clear_outputs, task_dir, row["video_filename"])
            await self._record_ending(row, stage, result)
        finally:
            self._running.pop(task_id, None)
            self.progress.forget(task_id)
            self._pending_stop.pop(task_id, None)
            self._on_slot_free()

    async def _record_ending(self, row: Row, stage: Stage, result: StageResult) -> None:
        """Write the ending with `state.finish`, retrying a failed write a few times with a
        growing pause; what still fails is left to the scheduler's reconcile (logged)."""
        fields: dict[str, Any] = {"message": result.message, "error_message": result.error}
        if result.metadata is not None:
            fields["metadata"] = {**(row["metadata"] or {}), **result.metadata}
        queue_training = False
        succeeded = stage == Stage.PREPROCESSING and result.reason == EndReason.SUCCEEDED
        if succeeded and row["params"]["auto_training"]:
            training = self.health.training
            if training.available:
                queue_training = True
                fields["message"] = "Preprocessing completed; waiting for the GPU to train"
            else:
                fields["message"] = (
                    f"Preprocessing completed; training is not available: {training.detail}"
                )
        if result.reason == EndReason.INTERRUPTED:
            fields = {"message": result.message}
        delay = RECORD_BACKOFF
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                ended = await state.finish(
                    self.db,
                    row["id"],
                    stage,
                    result.reason,
                    queue_training=queue_training,
                    **fields,
                )
            except (TaskNotFoundError, state.InvalidTransitionError):
                return  # deleted, or ended by someone else, while it ran
            except Exception:
                log.exception(
                    "could not record the end of %s for task %s (attempt %d of %d)",
                    stage.value,
                    row["id"],
                    attempt,
                    RECORD_ATTEMPTS,
                )
                if attempt == RECORD_ATTEMPTS:
                    return
                await asyncio.sleep(delay)
                delay *= 2
                continue
            await self.records.publish(ended)
            return

    def _record_metadata(self, row: Row, extra: dict[str, Any]) -> None:
        """Merge `extra` into the running task's metadata (e.g. a new training preview) and
        publish it; written in the background, dropped once the run has ended."""
        row["metadata"] = {**(row["metadata"] or {}), **extra}
        write = asyncio.get_running_loop().create_task(self._write_metadata(row))
        self._background.add(write)
        write.add_done_callback(self._background.discard)

    async def _write_metadata(self, row: Row) -> None:
        try:
            written = await self.db.update_fields(
                row["id"],
                {"metadata": row["metadata"], "updated_at": state.now_iso()},
                only_if_status=[s.value for s in state.RUNNING],
            )
        except Exception:
            log.exception("could not record the metadata of task %s", row["id"])
            return
        if written is not None:
            await self.records.publish(written)

    async def _record_ref(self, task_id: str, ref: dict[str, Any]) -> None:
        await self.db.update_fields(
            task_id,
            {"pid": ref.get("pid"), "pid_start_time": ref.get("start_time"), "run_ref": ref},
            only_if_status=[s.value for s in state.RUNNING],
        )

    def _report_progress(self, task_id: str, fields: dict[str, Any]) -> None:
        entry = self._running.get(task_id)
        if entry is not None:  # a report after the stage ended is dropped
            self.progress.report(task_id, entry.stage, fields)
