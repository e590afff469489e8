"""The queues: FIFO per stage with a capacity each (the executor's: fixed slot counts here,
the free resources of a Ray cluster), filled by one loop that wakes when
work arrives or a slot frees (and every few seconds in any case). A claim is the named state
operation `claim`; the row it returns goes straight to the runner. Tasks the database shows
running that no runner here runs are re-queued (reconcile), with a growing pause for a task
that keeps coming back, so nothing spins."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import training_server_state as state
from training_server_db import Database, TaskNotFoundError
from training_server_health import StageHealth
from training_server_models import Progress, ServerConfig, Stage, TaskStatus
from training_server_records import Records
from training_server_runner import Runner

log = logging.getLogger("training_server")
IDLE_WAKE = 5.0  # seconds between fills when nothing wakes the loop
# While queued work waits for a cluster's resources (which change without telling us), the
# queues are looked at this often.
CLUSTER_WAKE = 1.0
RECONCILE_BACKOFF_MAX = 300.0  # longest pause before a task lost again is re-queued again


class Scheduler:
    """Decides which queued task runs next, and starts it."""

    def __init__(
        self,
        settings: ServerConfig,
        db: Database,
        records: Records,
        runner: Runner,
        health: StageHealth,
    ) -> None:
        self.settings = settings
        self.db = db
        self.records = records
        self.runner = runner
        self.health = health
        self.accepting = False
        self._wake = asyncio.Event()
        self._cluster_waiting = False  # queued work waited for the cluster at the last fill
        self._lost: dict[str, tuple[int, float]] = {}  # task -> (times lost, not before)
        self._limits: dict[Stage, int] = {
            Stage.PREPROCESSING: settings.preprocess_slots,
            Stage.TRAINING: settings.training_slots,
        }
        self.waiting: dict[Stage, str | None] = {stage: None for stage in Stage}

    def wake(self) -> None:
        """Look at the queues soon (work arrived or a slot freed)."""
        self._wake.set()

    def slots(self) -> dict[Stage, int]:
        """How many runs of each stage may run at once (as the executor said last)."""
        return dict(self._limits)

    async def _capacity(self, stage: Stage) -> int:
        """Ask the executor how many runs of `stage` may be in flight; remember why queued
        tasks wait when none more may start."""
        ask = getattr(self.runner.executor, "capacity", None)
        if ask is None:  # an executor without a say: the settings' slot counts
            return self._limits[stage]
        try:
            capacity = await ask(stage, self.runner.busy(stage))
        except Exception:
            log.exception("could not read the capacity for %s", stage.value)
            return self.runner.busy(stage)
        self._limits[stage] = capacity.limit
        self.waiting[stage] = capacity.waiting
        return capacity.limit

    async def _say_waiting(self, stage: Stage, task_ids: list[str]) -> None:
        """Put why they wait in the queued tasks' message (written only when it changes)."""
        message = self.waiting[stage]
        if not message:
            return
        waiting_status = (
            TaskStatus.PENDING
            if stage == Stage.PREPROCESSING
            else (TaskStatus.PREPROCESSING_COMPLETED)
        )
        for task_id in task_ids[:50]:
            with contextlib.suppress(TaskNotFoundError):
                row = await self.db.get_task(task_id)
                if row["message"] == message or row["queued_for"] != stage.value:
                    continue
                written = await self.db.update_fields(
                    task_id,
                    {"message": message, "updated_at": state.now_iso()},
                    only_if_status=[waiting_status.value],
                )
                if written is not None:
                    await self.records.publish(written)

    async def run_forever(self) -> None:
        """The scheduling loop (a named, watched background task)."""
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancel that lands
            # as the event is set, which left shutdown waiting on this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLUSTER_WAKE if self._cluster_waiting else IDLE_WAKE):
                    await self._wake.wait()
            self._wake.clear()
            await self.fill_slots()

    async def fill_slots(self) -> None:
        """Start queued tasks while their stage has free slots."""
        await self._reconcile()
        self._cluster_waiting = False
        for stage in Stage:
            queued = await self.db.queued(stage.value)
            if not queued:
                continue
            limit = await self._capacity(stage)
            busy = self.runner.busy(stage)
            if busy >= limit:
                if self.accepting:
                    await self._say_waiting(stage, queued)
                self._cluster_waiting |= self.waiting[stage] is not None
                continue
            for task_id in queued:
                if not self.accepting or busy >= limit:
                    break
                if self.runner.is_running(task_id):
                    continue
                if stage == Stage.TRAINING and not self.health.training.available:
                    await self._unqueue_training(task_id)
                    continue
                if await self._claim(task_id, stage):
                    busy += 1

    async def _claim(self, task_id: str, stage: Stage) -> bool:
        progress = Progress(stage=stage, percent=0.0).model_dump(mode="json")
        try:
            row = await state.claim(self.db, task_id, stage, progress)
        except (state.InvalidTransitionError, TaskNotFoundError):
            return False
        self.runner.start(row, stage)
        await self.records.publish(row)
        return True

    async def _unqueue_training(self, task_id: str) -> None:
        message = (
            f"Preprocessing completed; training is not available: {self.health.training.detail}"
        )
        with contextlib.suppress(state.InvalidTransitionError, TaskNotFoundError):
            await self.records.publish(await state.unqueue_training(self.db, task_id, message))

    async def _reconcile(self) -> None:
        """Re-queue tasks the database shows running that no stage of this server runs
        (their end could not be recorded, e.g. on a full disk)."""
        now = time.monotonic()
        for row in await self.db.tasks_in([s.value for s in state.RUNNING]):
            task_id = row["id"]
            if self.runner.is_running(task_id):
                continue
            count, not_before = self._lost.get(task_id, (0, 0.0))
            if now < not_before:
                continue
            self._lost[task_id] = (count + 1, now + min(RECONCILE_BACKOFF_MAX, 2.0**count))
            log.warning("task %s was left %s without a running stage", task_id, row["status"])
            with contextlib.suppress(state.InvalidTransitionError, TaskNotFoundError):
                requeued = await state.requeue_interrupted(
                    self.db,
                    task_id,
                    TaskStatus(row["status"]),
                    message="The end of its last run could not be recorded; queued to run again",
                    run_ref=None,
                )
                await self.records.publish(requeued)
