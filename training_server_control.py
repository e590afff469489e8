"""What users ask of tasks: create one from a verified upload, cancel, retry, train, delete.
Each request is one named state operation whose guard decides; a request that lost a race (or
asks for what the task's state does not allow) is a 409 with the task's current state, a task
whose files the cleanup removed a 410, and the scheduler is woken whenever work was queued."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import training_server_state as state
import training_server_trainer as trainer
from training_server_db import Database, TaskNotFoundError
from training_server_health import StageHealth
from training_server_models import (
    ConflictError,
    EndReason,
    GoneError,
    NotFoundError,
    ServiceUnavailableError,
    Stage,
    TaskParams,
    TaskPublic,
    TrainingOptions,
)
from training_server_process import TaskLog, await_shielded
from training_server_records import Records
from training_server_runner import Runner
from training_server_scheduler import Scheduler
from training_server_utils import Paths

S = state.S
GONE = "The task's files were removed by the cleanup; upload the video again."
CANCEL_ROUNDS = 50  # looks at a task that keeps moving while it is being cancelled


class Control:
    """The control requests, each a guarded state operation."""

    def __init__(
        self,
        db: Database,
        records: Records,
        runner: Runner,
        scheduler: Scheduler,
        health: StageHealth,
        paths: Paths,
        log_max_bytes: int,
    ) -> None:
        self.db = db
        self.records = records
        self.runner = runner
        self.scheduler = scheduler
        self.health = health
        self.paths = paths
        self.log_max_bytes = log_max_bytes

    async def create(
        self,
        task_id: str,
        *,
        params: TaskParams,
        video_filename: str,
        video_size: int,
        original_filename: str | None,
        video_info: dict[str, Any],
    ) -> TaskPublic:
        """Store a fully received, verified upload as a PENDING task and wake the queue. The
        log is opened first: if it cannot be written, no row is made (all or nothing)."""
        with TaskLog(self.paths.log_file(task_id), self.log_max_bytes) as task_log:
            task_log.event(
                f"Task created from {original_filename or 'an upload'} "
                f"({video_size} bytes, {video_info.get('width')}x{video_info.get('height')}, "
                f"{video_info.get('duration')} s)"
            )
        try:
            row = await state.create(
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
            task = await self.records.publish(row)
        except BaseException:
            await await_shielded(self._undo_create(task_id))
            raise
        self.scheduler.wake()
        return task

    async def _undo_create(self, task_id: str) -> None:
        try:
            if await self.db.delete_task(task_id):
                self.records.removed(task_id)
        finally:
            await asyncio.to_thread(shutil.rmtree, self.paths.logs_dir / task_id, True)

    async def cancel(self, task_id: str) -> TaskPublic:
        """Stop a running stage (its whole process tree) or take a task off its queue."""
        for _ in range(CANCEL_ROUNDS):
            row = await self.records.row(task_id)
            if await self.runner.stop(task_id, EndReason.CANCELLED, "Cancelled by user"):
                return await self.records.public(task_id)
            status = S(row["status"])
            if status in state.RUNNING:
                # Claimed by the scheduler a moment ago; its runner is about to start.
                self.runner.stop_when_started(task_id, EndReason.CANCELLED, "Cancelled by user")
                await asyncio.sleep(0.02)
                continue
            if row["queued_for"] is None:
                raise ConflictError(
                    f"The task is {status.value} and runs nothing: there is nothing to cancel."
                )
            try:
                return await self.records.publish(
                    await state.cancel_queued(self.db, task_id, "Cancelled by user")
                )
            except state.InvalidTransitionError:
                continue  # it moved meanwhile: look again
            except TaskNotFoundError:
                raise NotFoundError(f"No task with id {task_id}.") from None
        raise ConflictError("The task changed state repeatedly while cancelling; try again.")

    async def retry(self, task_id: str) -> TaskPublic:
        """Run a failed or cancelled task again from the stage that did not finish."""
        row = await self.records.row(task_id)
        status = S(row["status"])
        if status not in {S.FAILED, S.CANCELLED}:
            raise ConflictError(
                f"Only failed or cancelled tasks can be retried; this one is {status.value}."
            )
        if row["expired_at"] is not None:
            raise GoneError(GONE)
        from_training = (
            row["stage"] == Stage.TRAINING.value and self.paths.dataset_dir(task_id).is_dir()
        )
        operation = state.retry(self.db, task_id, from_training=from_training)
        task = await self._apply(task_id, operation)
        self.scheduler.wake()
        return task

    async def train(self, task_id: str, options: TrainingOptions | None) -> TaskPublic:
        """Queue a task resting after preprocessing for training (optionally new options)."""
        row = await self.records.row(task_id)
        status = S(row["status"])
        if status != S.PREPROCESSING_COMPLETED or row["queued_for"] is not None:
            waiting = " and already waits for training" if row["queued_for"] else ""
            raise ConflictError(
                f"Only a task resting in preprocessing_completed can start training; "
                f"this one is {status.value}{waiting}."
            )
        if row["expired_at"] is not None:
            raise GoneError(GONE)
        training = await self.health.training_ready()
        if not training.available:
            raise ServiceUnavailableError(f"Training is not available: {training.detail}")
        params = TaskParams.model_validate(row["params"])
        if options is not None:
            params = _with_training_options(params, options)
        task = await self._apply(
            task_id, state.queue_training(self.db, task_id, params.model_dump())
        )
        self.scheduler.wake()
        return task

    async def delete(self, task_id: str) -> None:
        """Cancel the task if it runs, then remove its record and its files."""
        await self.records.row(task_id)
        await self.runner.stop(task_id, EndReason.CANCELLED, "Deleted by user")
        if not await self.db.delete_task(task_id):
            raise NotFoundError(f"No task with id {task_id}.")
        await asyncio.to_thread(remove_files, self.paths, task_id)
        self.records.removed(task_id)

    async def _apply(self, task_id: str, operation: Any) -> TaskPublic:
        """Run a state operation; its lost race is a 409 (or 410/404) in words."""
        try:
            return await self.records.publish(await operation)
        except TaskNotFoundError:
            raise NotFoundError(f"No task with id {task_id}.") from None
        except state.InvalidTransitionError as exc:
            row = await self.records.row(task_id)
            if row["expired_at"] is not None:
                raise GoneError(GONE) from None
            raise ConflictError(
                f"The task changed meanwhile: it is {exc.current} now; look at it again."
            ) from None


def _with_training_options(params: TaskParams, options: TrainingOptions) -> TaskParams:
    """The task's parameters with the training options of a train request in place."""
    update = {
        name: value
        for name, value in options.model_dump().items()
        if name in TaskParams.model_fields and name != "iterations"
    }
    update["iterations"] = trainer.resolve_iterations(
        options.iterations, options.preset, params.iterations
    )
    return params.model_copy(update=update)


def remove_files(paths: Paths, task_id: str) -> None:
    """Remove a task's folder, its training output and its logs."""
    for folder in (paths.task_dir(task_id), paths.output_dir(task_id), paths.logs_dir / task_id):
        shutil.rmtree(folder, ignore_errors=True)
