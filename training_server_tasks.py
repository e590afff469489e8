"""The task runner: FIFO queues with slot counts per stage, the two pipeline stages run as
subprocesses, restart recovery, cancel / retry / train / delete. What the API shows of a task
lives in training_server_views, progress writes in training_server_progress, the retention
sweep in training_server_cleanup.

Every status change goes through training_server_state.transition; the final status of a
stage run is written in `finally` under a shield, so a cancel cannot leave a task running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import training_server_cleanup as cleanup
import training_server_stages as stages
import training_server_state as state
import training_server_trainer as trainer
from training_server_db import Database, TaskNotFoundError
from training_server_models import (
    CommandHealth,
    ConflictError,
    EndReason,
    GoneError,
    NotFoundError,
    Progress,
    ServerConfig,
    ServiceUnavailableError,
    Stage,
    TaskParams,
    TaskPublic,
    TaskStatus,
    TrainingOptions,
)
from training_server_process import TaskLog, await_shielded, kill_marked, kill_stale_group
from training_server_progress import ProgressWriter
from training_server_stages import StageContext, StageResult
from training_server_utils import Paths, is_task_id
from training_server_views import EventBus, StatusCache, task_public

log = logging.getLogger("training_server")
S = TaskStatus


@dataclass
class _Running:
    stage: Stage
    task: asyncio.Task[None]
    stop_reason: EndReason | None = None
    stop_message: str | None = None


@dataclass
class TaskManager:
    """Owns the queues, the running stages and every task status change."""

    settings: ServerConfig
    db: Database
    events: EventBus = field(default_factory=EventBus)

    def __post_init__(self) -> None:
        self.paths = Paths(self.settings.temp_dir.resolve(), self.settings.logs_dir.resolve())
        self._running: dict[str, _Running] = {}
        self._pending_stop: dict[str, tuple[EndReason, str]] = {}
        self._progress = ProgressWriter(self.db, self._publish)
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._accepting = False
        self._status_cache = StatusCache()
        self.db.on_change = self._status_cache.forget
        self.checkout = trainer.find_trainer_checkout(self.settings.trainer_path, Path.cwd())
        self.preprocess_health = CommandHealth(available=False, detail="not checked yet")
        self.training_health = CommandHealth(available=False, detail="not checked yet")

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Recover from an earlier run, check the stage commands, start the queue and cleanup."""
        self.paths.temp_dir.mkdir(parents=True, exist_ok=True)
        self.paths.logs_dir.mkdir(parents=True, exist_ok=True)
        await self._recover()
        await asyncio.gather(self.check_preprocessing(), self.check_training())
        self._accepting = True
        self._loops = [
            asyncio.create_task(self._scheduler(), name="scheduler"),
            asyncio.create_task(
                cleanup.run_forever(self.settings.cleanup_interval, self.cleanup_expired),
                name="cleanup",
            ),
        ]
        self._wake.set()

    async def shutdown(self) -> None:
        """Stop taking work; end running stages (terminate, grace, kill) and record why."""
        self._accepting = False
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        running = list(self._running.items())
        for _, entry in running:
            entry.stop_reason = EndReason.INTERRUPTED
            entry.stop_message = "Interrupted by server shutdown; it runs again at the next start"
            entry.task.cancel()
        if running:
            await asyncio.gather(*(entry.task for _, entry in running), return_exceptions=True)

    async def _recover(self) -> None:
        """Re-queue tasks a dead server left running (killing their leftover processes) and
        remove upload folders that never became tasks."""
        for row in await self.db.tasks_in([S.PREPROCESSING.value, S.TRAINING.value]):
            killed = 0
            if row["pid"]:
                killed = await asyncio.to_thread(
                    kill_stale_group, int(row["pid"]), row["pid_start_time"]
                )
            # Also what escaped the group, or started before its pid was recorded.
            killed += await asyncio.to_thread(kill_marked, row["id"])
            if killed:
                log.warning("killed %d leftover processes of task %s", killed, row["id"])
            stage = Stage(row["stage"]) if row["stage"] else Stage.PREPROCESSING
            message = "Interrupted by server restart; queued to run again"
            await self._requeue_interrupted(row["id"], S(row["status"]), message)
            self._append_log(row["id"], f"{message} (stage {stage.value})")
        known = await self.db.all_ids()
        if self.paths.temp_dir.is_dir():
            for entry in self.paths.temp_dir.iterdir():
                if entry.is_dir() and is_task_id(entry.name) and entry.name not in known:
                    log.info("removing unfinished upload %s", entry.name)
                    shutil.rmtree(entry, ignore_errors=True)

    async def _requeue_interrupted(self, task_id: str, status: TaskStatus, message: str) -> None:
        fields: dict[str, Any] = {
            "message": message,
            "end_reason": EndReason.INTERRUPTED.value,
            "pid": None,
            "pid_start_time": None,
        }
        if status == S.PREPROCESSING:
            await self._transition(task_id, S.PENDING, keep_queue_place=True, **fields)
        else:
            await self._transition(
                task_id,
                S.PREPROCESSING_COMPLETED,
                queue=Stage.TRAINING,
                keep_queue_place=True,
                **fields,
            )

    # -- health --------------------------------------------------------------------------

    async def check_preprocessing(self) -> CommandHealth:
        """Whether the preprocessing command and its libraries are usable."""
        self.preprocess_health = await stages.check_preprocessing(self.settings)
        return self.preprocess_health

    async def check_training(self) -> CommandHealth:
        """Whether the trainer can run here (checkout present, torch with CUDA)."""
        self.checkout = trainer.find_trainer_checkout(self.settings.trainer_path, Path.cwd())
        ok, detail = await trainer.check_training_available(
            self.settings.trainer_python,
            self.checkout,
            self.settings.trainer_require_cuda,
            self.settings.trainer_check_timeout,
        )
        self.training_health = CommandHealth(available=ok, detail=detail)
        return self.training_health

    # -- reading -------------------------------------------------------------------------

    async def public(self, task_id: str) -> TaskPublic:
        """The task as the API shows it; NotFoundError when absent."""
        try:
            row = await self.db.get_task(task_id)
        except TaskNotFoundError:
            raise NotFoundError(f"No task with id {task_id}.") from None
        position = await self.db.queue_position(row["id"]) if row["queued_for"] else None
        return task_public(row, position)

    async def public_json(self, task_id: str) -> bytes:
        """`public(task_id)` as JSON, served from a cache that every write to the task clears
        and every publish of a change refills (status polling is the busiest request)."""
        cached = self._status_cache.get(task_id)
        if cached is not None:
            return cached
        return (await self._read_and_cache(task_id))[1]

    async def _read_and_cache(self, task_id: str) -> tuple[TaskPublic, bytes]:
        generation = self._status_cache.generation
        task = await self.public(task_id)
        body = task.model_dump_json().encode()
        if task.queued_for is None:  # a queued task's place changes when others move
            self._status_cache.put(task_id, body, generation)
        return task, body

    async def list_public(
        self, statuses: list[TaskStatus], limit: int, offset: int
    ) -> tuple[list[TaskPublic], int]:
        """A page of tasks, newest first, and the total that match."""
        rows, total = await self.db.list_tasks([s.value for s in statuses], limit, offset)
        positions = await self.db.queue_positions() if any(r["queued_for"] for r in rows) else {}
        return [task_public(r, positions.get(r["id"])) for r in rows], total

    def running_ids(self, stage: Stage) -> list[str]:
        """Ids of the tasks whose `stage` runs now."""
        return [task_id for task_id, entry in self._running.items() if entry.stage == stage]

    def is_active(self, task: TaskPublic) -> bool:
        """Whether the task runs or waits for something (its log may still grow)."""
        return task.status in state.RUNNING or task.queued_for is not None

    # -- creating and changing tasks -----------------------------------------------------

    async def create_task(
        self,
        task_id: str,
        *,
        params: TaskParams,
        video_filename: str,
        video_size: int,
        original_filename: str | None,
        video_info: dict[str, Any],
    ) -> TaskPublic:
        """Store a fully received, verified upload as a PENDING task and wake the queue."""
        await state.create(
            self.db,
            {
                "id": task_id,
                "message": "Queued for preprocessing",
                "original_filename": original_filename,
                "video_filename": video_filename,
                "video_size": video_size,
                "params": params.model_dump(),
                "metadata": {"video": video_info},
            },
        )
        self._append_log(
            task_id,
            f"Task created from {original_filename or 'an upload'} "
            f"({video_size} bytes, {video_info.get('width')}x{video_info.get('height')}, "
            f"{video_info.get('duration')} s)",
        )
        self._wake.set()
        return await self._publish(task_id)

    async def _transition(self, task_id: str, to: TaskStatus, **kwargs: Any) -> TaskPublic:
        await state.transition(self.db, task_id, to, **kwargs)
        return await self._publish(task_id)

    async def _publish(self, task_id: str) -> TaskPublic:
        task, _ = await self._read_and_cache(task_id)
        self.events.publish({"type": "task", "task": task.model_dump(mode="json")})
        return task

    async def cancel(self, task_id: str) -> TaskPublic:
        """Stop a running stage (its whole process tree) or take a task off its queue."""
        for _ in range(50):
            task = await self.public(task_id)
            entry = self._running.get(task_id)
            if entry is not None:
                await self._stop_running(task_id, entry, EndReason.CANCELLED, "Cancelled by user")
                return await self.public(task_id)
            if task.status in state.RUNNING:
                # Claimed by the scheduler a moment ago; its runner is about to register.
                self._pending_stop[task_id] = (EndReason.CANCELLED, "Cancelled by user")
                await asyncio.sleep(0.02)
                continue
            if task.queued_for is None:
                raise ConflictError(
                    f"The task is {task.status.value} and runs nothing: there is nothing to cancel."
                )
            try:
                return await self._transition(
                    task_id,
                    S.CANCELLED,
                    expected={task.status},
                    require_queued=True,
                    message="Cancelled by user",
                    error_message="Cancelled by user",
                    end_reason=EndReason.CANCELLED.value,
                )
            except state.InvalidTransitionError:
                continue  # it moved meanwhile: look again
        raise ConflictError("The task changed state repeatedly while cancelling; try again.")

    async def _stop_running(
        self, task_id: str, entry: _Running, reason: EndReason, message: str
    ) -> None:
        entry.stop_reason = reason
        entry.stop_message = message
        entry.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({entry.task}, timeout=self.settings.kill_grace + 15)

    async def retry(self, task_id: str) -> TaskPublic:
        """Run a failed or cancelled task again from the stage that did not finish."""
        task = await self.public(task_id)
        if task.status not in {S.FAILED, S.CANCELLED}:
            raise ConflictError(
                f"Only failed or cancelled tasks can be retried; this one is {task.status.value}."
            )
        if task.expired:
            raise GoneError("The task's files were removed by the cleanup; upload the video again.")
        row = await self.db.get_task(task_id)
        message = "Retry requested"
        if row["stage"] == Stage.TRAINING.value and self.paths.dataset_dir(task_id).is_dir():
            return await self._transition(
                task_id,
                S.PREPROCESSING_COMPLETED,
                expected={task.status},
                queue=Stage.TRAINING,
                message=f"{message}; queued for training",
                error_message=None,
                end_reason=None,
            )
        return await self._transition(
            task_id,
            S.PENDING,
            expected={task.status},
            message=f"{message}; queued for preprocessing",
            error_message=None,
            end_reason=None,
        )

    async def train(self, task_id: str, options: TrainingOptions | None) -> TaskPublic:
        """Queue a task resting after preprocessing for training (optionally new options)."""
        task = await self.public(task_id)
        if task.status != S.PREPROCESSING_COMPLETED or task.queued_for is not None:
            waiting = " and already waits for training" if task.queued_for else ""
            raise ConflictError(
                f"Only a task resting in preprocessing_completed can start training; "
                f"this one is {task.status.value}{waiting}."
            )
        if task.expired:
            raise GoneError("The task's files were removed by the cleanup; upload the video again.")
        if not self.training_health.available:
            await self.check_training()
        if not self.training_health.available:
            raise ServiceUnavailableError(
                f"Training is not available: {self.training_health.detail}"
            )
        params = task.params
        if options is not None:
            params = self._with_training_options(params, options)
        self._wake.set()
        return await self._transition(
            task_id,
            S.PREPROCESSING_COMPLETED,
            expected={S.PREPROCESSING_COMPLETED},
            require_queued=False,
            queue=Stage.TRAINING,
            params=params.model_dump(),
            message="Queued for training",
            error_message=None,
        )

    def _with_training_options(self, params: TaskParams, options: TrainingOptions) -> TaskParams:
        iterations = trainer.resolve_iterations(
            options.iterations, options.preset, params.iterations
        )
        return params.model_copy(
            update={
                "iterations": iterations,
                "down_sample_factor": options.down_sample_factor,
                "keep_checkpoint": options.keep_checkpoint,
            }
        )

    async def delete(self, task_id: str) -> None:
        """Cancel the task if it runs, then remove its files and its record."""
        await self.public(task_id)
        entry = self._running.get(task_id)
        if entry is not None:
            await self._stop_running(task_id, entry, EndReason.CANCELLED, "Deleted by user")
        await self.db.delete_task(task_id)
        await asyncio.to_thread(self._remove_files, task_id)
        self.events.publish({"type": "deleted", "task_id": task_id})

    def _remove_files(self, task_id: str) -> None:
        for folder in (
            self.paths.task_dir(task_id),
            self.paths.output_dir(task_id),
            self.paths.logs_dir / task_id,
        ):
            shutil.rmtree(folder, ignore_errors=True)

    # -- the queue -----------------------------------------------------------------------

    async def _scheduler(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 5)
            self._wake.clear()
            try:
                await self._fill_slots()
            except Exception:
                log.exception("scheduler error; retrying")
                await asyncio.sleep(1)

    async def _reconcile(self) -> None:
        """Re-queue tasks the database shows running that no stage of this server runs (their
        end could not be recorded, e.g. on a full disk): nothing stays running forever."""
        for row in await self.db.tasks_in([s.value for s in state.RUNNING]):
            if row["id"] in self._running:
                continue
            log.warning("task %s was left %s without a running stage", row["id"], row["status"])
            await self._requeue_interrupted(
                row["id"],
                S(row["status"]),
                "The end of its last run could not be recorded; queued to run again",
            )

    async def _fill_slots(self) -> None:
        await self._reconcile()
        slots = {
            Stage.PREPROCESSING: self.settings.preprocess_slots,
            Stage.TRAINING: self.settings.training_slots,
        }
        for stage, limit in slots.items():
            busy = sum(1 for entry in self._running.values() if entry.stage == stage)
            if busy >= limit:
                continue
            for task_id in await self.db.queued(stage.value):
                if not self._accepting or busy >= limit:
                    break
                if task_id in self._running:
                    continue
                if stage == Stage.TRAINING and not self.training_health.available:
                    await self._unqueue_training(task_id)
                    continue
                if await self._claim(task_id, stage):
                    busy += 1

    async def _unqueue_training(self, task_id: str) -> None:
        with contextlib.suppress(state.InvalidTransitionError, TaskNotFoundError):
            await self._transition(
                task_id,
                S.PREPROCESSING_COMPLETED,
                expected={S.PREPROCESSING_COMPLETED},
                require_queued=True,
                message=f"Preprocessing completed; training is not available: "
                f"{self.training_health.detail}",
            )

    async def _claim(self, task_id: str, stage: Stage) -> bool:
        row = await self.db.get_task(task_id)
        try:
            await state.transition(
                self.db,
                task_id,
                state.STAGE_STATUS[stage],
                expected={S.PENDING if stage == Stage.PREPROCESSING else S.PREPROCESSING_COMPLETED},
                require_queued=True,
                stage=stage.value,
                started_at=row["started_at"] or state.now_iso(),
                attempts=row["attempts"] + 1 if row["stage"] == stage.value else 1,
                progress=Progress(stage=stage, percent=0.0).model_dump(mode="json"),
                message=f"Starting {stage.value}",
                error_message=None,
                end_reason=None,
            )
        except (state.InvalidTransitionError, TaskNotFoundError):
            return False
        # Registered before anything else awaits, so cancel() always finds a claimed task.
        task = asyncio.create_task(self._run(task_id, stage), name=f"{stage.value}:{task_id}")
        self._running[task_id] = _Running(stage=stage, task=task)
        with contextlib.suppress(NotFoundError):
            await self._publish(task_id)
        return True

    # -- running a stage -----------------------------------------------------------------

    async def _run(self, task_id: str, stage: Stage) -> None:
        result: StageResult | None = None
        task_log: TaskLog | None = None
        try:
            entry = self._running[task_id]
            pending = self._pending_stop.pop(task_id, None)
            if pending is not None:  # cancelled between its claim and this start
                entry.stop_reason, entry.stop_message = pending
                raise asyncio.CancelledError
            row = await self.db.get_task(task_id)
            task_log = TaskLog(self.paths.log_file(task_id), self.settings.log_max_bytes)
            task_log.event(f"Stage {stage.value} started (attempt {row['attempts']})")
            ctx = StageContext(
                task_id=task_id,
                row=row,
                params=TaskParams.model_validate(row["params"]),
                settings=self.settings,
                paths=self.paths,
                log=task_log,
                report_progress=lambda fields: self._report_progress(task_id, fields),
                record_pid=lambda pid, start: self._record_pid(task_id, pid, start),
                checkout=self.checkout,
            )
            if stage == Stage.PREPROCESSING:
                result = await stages.preprocess(ctx)
            else:
                result = await stages.train(ctx)
        except asyncio.CancelledError:
            entry = self._running.get(task_id)
            reason = entry.stop_reason if entry else None
            message = (entry.stop_message if entry else None) or "Cancelled"
            result = StageResult(
                reason=reason or EndReason.CANCELLED,
                message=message,
                error=None if reason == EndReason.INTERRUPTED else message,
            )
        except TaskNotFoundError:
            result = None  # deleted before it started
        except Exception as exc:
            log.exception("stage %s of task %s crashed", stage.value, task_id)
            result = StageResult(
                EndReason.FAILED,
                f"{stage.value.capitalize()} failed",
                f"Internal error in the server while running {stage.value}: {exc!r}",
            )
        finally:
            await await_shielded(self._finish(task_id, stage, result, task_log))

    async def _finish(
        self,
        task_id: str,
        stage: Stage,
        result: StageResult | None,
        task_log: TaskLog | None,
    ) -> None:
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
            await self._progress.flush(task_id)
            fields: dict[str, Any] = {
                "message": result.message,
                "error_message": result.error,
                "end_reason": result.reason.value,
                "pid": None,
                "pid_start_time": None,
            }
            if result.metadata is not None:
                row = await self.db.get_task(task_id)
                fields["metadata"] = {**(row["metadata"] or {}), **result.metadata}
            current = state.STAGE_STATUS[stage]
            if stage == Stage.PREPROCESSING and result.reason not in {
                EndReason.SUCCEEDED,
                EndReason.INTERRUPTED,
            }:
                # Partial frames and models are of no use and may be what filled the disk;
                # the video stays for a retry.
                row = await self.db.get_task(task_id)
                await asyncio.to_thread(
                    stages.clear_outputs, self.paths.task_dir(task_id), row["video_filename"]
                )
            if result.reason == EndReason.SUCCEEDED:
                await self._succeeded(task_id, stage, fields)
            elif result.reason == EndReason.INTERRUPTED:
                await self._requeue_interrupted(task_id, current, result.message)
            elif result.reason == EndReason.CANCELLED:
                await self._transition(task_id, S.CANCELLED, expected={current}, **fields)
            else:
                await self._transition(task_id, S.FAILED, expected={current}, **fields)
        except (TaskNotFoundError, NotFoundError):
            pass  # deleted while it ran
        except Exception:
            log.exception("could not record the end of %s for task %s", stage.value, task_id)
        finally:
            self._running.pop(task_id, None)
            self._progress.forget(task_id)
            self._pending_stop.pop(task_id, None)
            self._wake.set()

    async def _succeeded(self, task_id: str, stage: Stage, fields: dict[str, Any]) -> None:
        current = state.STAGE_STATUS[stage]
        if stage == Stage.TRAINING:
            await self._transition(task_id, S.TRAINING_COMPLETED, expected={current}, **fields)
            return
        row = await self.db.get_task(task_id)
        queue = None
        if row["params"]["auto_training"]:
            if self.training_health.available:
                queue = Stage.TRAINING
                fields["message"] = "Preprocessing completed; waiting for the GPU to train"
            else:
                fields["message"] = (
                    f"Preprocessing completed; training is not available: "
                    f"{self.training_health.detail}"
                )
        await self._transition(
            task_id, S.PREPROCESSING_COMPLETED, expected={current}, queue=queue, **fields
        )

    async def _record_pid(self, task_id: str, pid: int, start_time: int | None) -> None:
        await self.db.update_fields(
            task_id,
            {"pid": pid, "pid_start_time": start_time},
            only_if_status=[s.value for s in state.RUNNING],
        )

    # -- progress and cleanup ------------------------------------------------------------

    def _report_progress(self, task_id: str, fields: dict[str, Any]) -> None:
        entry = self._running.get(task_id)
        if entry is not None:  # a report after the stage ended is dropped
            self._progress.report(task_id, entry.stage, fields)

    async def cleanup_expired(self) -> list[str]:
        """Remove the files of tasks that ended more than cleanup_ttl ago; keep their record."""
        return await cleanup.sweep(self.settings, self.db, self._remove_files, self._publish)

    # -- helpers -------------------------------------------------------------------------

    def _append_log(self, task_id: str, text: str) -> None:
        with TaskLog(self.paths.log_file(task_id), self.settings.log_max_bytes) as task_log:
            task_log.event(text)
