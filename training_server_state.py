"""The task state machine: the one table of allowed transitions, what each status lets a user
do, and the named operations that are the only code writing a task's status or queue place.

Each operation is one guarded UPDATE (`... WHERE id = ? AND status IN (allowed predecessors)
AND <its own guard>`) that returns the row it wrote (`RETURNING *`), so callers never read the
task again. A caller that lost a race gets `InvalidTransitionError` (or `TaskNotFoundError`
when the task is gone), never a silently skipped state. Modelled on procrastinate's
`finish_job` / `cancel_job` / `retry_job`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from training_server_db import NEXT_QUEUE_KEY, Database, Sql
from training_server_models import EndReason, Stage, TaskStatus

S = TaskStatus
Row = dict[str, Any]

# from-status -> the statuses it may move to.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    S.PENDING: frozenset({S.PREPROCESSING, S.CANCELLED}),
    # PENDING again: interrupted by a restart or shutdown, re-queued at its old place.
    S.PREPROCESSING: frozenset({S.PREPROCESSING_COMPLETED, S.FAILED, S.CANCELLED, S.PENDING}),
    # Itself: queued for training, or taken off that queue.
    S.PREPROCESSING_COMPLETED: frozenset({S.PREPROCESSING_COMPLETED, S.TRAINING, S.CANCELLED}),
    # PREPROCESSING_COMPLETED: interrupted, waits for the GPU again.
    S.TRAINING: frozenset({S.TRAINING_COMPLETED, S.FAILED, S.CANCELLED, S.PREPROCESSING_COMPLETED}),
    S.TRAINING_COMPLETED: frozenset(),
    # Retry: back to the stage that did not finish.
    S.FAILED: frozenset({S.PENDING, S.PREPROCESSING_COMPLETED}),
    S.CANCELLED: frozenset({S.PENDING, S.PREPROCESSING_COMPLETED}),
}

RUNNING = frozenset({S.PREPROCESSING, S.TRAINING})
ENDED = frozenset({S.PREPROCESSING_COMPLETED, S.TRAINING_COMPLETED, S.FAILED, S.CANCELLED})
STAGE_STATUS: dict[Stage, TaskStatus] = {
    Stage.PREPROCESSING: S.PREPROCESSING,
    Stage.TRAINING: S.TRAINING,
}
# The status a task waits in before each stage.
WAITING_STATUS: dict[Stage, TaskStatus] = {
    Stage.PREPROCESSING: S.PENDING,
    Stage.TRAINING: S.PREPROCESSING_COMPLETED,
}
# Statuses whose task has a complete COLMAP dataset (unless it failed in preprocessing).
_WITH_DATASET = frozenset({S.PREPROCESSING_COMPLETED, S.TRAINING, S.TRAINING_COMPLETED})


class InvalidTransitionError(Exception):
    """The task is not in a status from which the requested one can be reached."""

    def __init__(self, task_id: str, current: str, wanted: TaskStatus | str) -> None:
        wanted_text = wanted.value if isinstance(wanted, TaskStatus) else wanted
        super().__init__(f"task {task_id} is {current}; it cannot become {wanted_text}")
        self.task_id = task_id
        self.current = current
        self.wanted = wanted


def now_iso() -> str:
    """The current UTC time as the ISO-8601 text stored in the database."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def predecessors(to: TaskStatus) -> set[TaskStatus]:
    """Statuses from which `to` may be reached."""
    return {src for src, targets in TRANSITIONS.items() if to in targets}


def is_ended(status: TaskStatus, queued_for: str | None) -> bool:
    """Whether a task in this status runs nothing and waits for nothing."""
    if status == S.PREPROCESSING_COMPLETED:
        return queued_for is None
    return status in {S.TRAINING_COMPLETED, S.FAILED, S.CANCELLED}


def is_active(status: TaskStatus, queued_for: str | None) -> bool:
    """Whether the task runs or waits in a queue (its log may still grow)."""
    return status in RUNNING or queued_for is not None


def allowed_actions(status: TaskStatus, queued_for: str | None, expired: bool) -> list[str]:
    """The control requests the server accepts for a task in this state, in button order."""
    actions = []
    if is_active(status, queued_for):
        actions.append("cancel")
    if status in {S.FAILED, S.CANCELLED} and not expired:
        actions.append("retry")
    if status == S.PREPROCESSING_COMPLETED and queued_for is None and not expired:
        actions.append("train")
    actions.append("delete")
    return actions


def results(status: TaskStatus, stage: str | None, expired: bool) -> dict[str, bool]:
    """Which results can be downloaded now: the COLMAP dataset and the trained model."""
    if expired:
        return {"dataset": False, "model": False}
    dataset = status in _WITH_DATASET or (
        status in {S.FAILED, S.CANCELLED} and stage == Stage.TRAINING.value
    )
    return {"dataset": dataset, "model": status == S.TRAINING_COMPLETED}


async def _current(db: Database, task_id: str) -> str:
    """The status a lost race found (raises TaskNotFoundError when the task is gone)."""
    return (await db.get_task(task_id))["status"]


async def transition(
    db: Database,
    task_id: str,
    to: TaskStatus,
    *,
    expected: Iterable[TaskStatus] | None = None,
    queue: Stage | None = None,
    keep_queue_place: bool = False,
    require_queued: bool | None = None,
    require_unexpired: bool = False,
    **fields: Any,
) -> Row:
    """Move a task to `to` if its current status allows it (and is in `expected`, if given);
    returns the new row. The named operations below are built on this one statement.

    `queue` puts the task on that stage's queue (PENDING always waits for preprocessing);
    `keep_queue_place` keeps its old queue key so an interrupted task runs first again;
    `require_queued` additionally demands that the task is (True) or is not (False) queued;
    `require_unexpired` that its files were not removed by the cleanup.
    Raises InvalidTransitionError, or TaskNotFoundError from the database.
    """
    allowed = predecessors(to)
    if expected is not None:
        allowed &= set(expected)
    if to == S.PENDING:
        queue = Stage.PREPROCESSING
    if queue is not None and to not in {S.PENDING, S.PREPROCESSING_COMPLETED}:
        raise ValueError(f"a {to.value} task cannot wait in a queue")
    stamp = now_iso()
    values: dict[str, Any] = {"updated_at": stamp, "queued_for": queue.value if queue else None}
    if queue is not None and not keep_queue_place:
        values["queue_key"] = NEXT_QUEUE_KEY
    values["finished_at"] = stamp if is_ended(to, values["queued_for"]) else None
    values.update(fields)
    row = await db.guarded_transition(
        task_id,
        sorted(s.value for s in allowed),
        to.value,
        values,
        require_queued=require_queued,
        require_unexpired=require_unexpired,
    )
    if row is None:
        raise InvalidTransitionError(task_id, await _current(db, task_id), to)
    return row


# -- the named operations ----------------------------------------------------------------


async def create(db: Database, row: Mapping[str, Any]) -> Row:
    """Store a new task, born PENDING at the back of the preprocessing queue."""
    stamp = now_iso()
    return await db.insert_task(
        {
            **row,
            "status": S.PENDING.value,
            "queued_for": Stage.PREPROCESSING.value,
            "queue_key": NEXT_QUEUE_KEY,
            "created_at": stamp,
            "updated_at": stamp,
        }
    )


async def claim(db: Database, task_id: str, stage: Stage, progress: Mapping[str, Any]) -> Row:
    """Take a task waiting for `stage` off its queue and mark it running that stage; counts
    the attempt (a new stage starts counting at 1)."""
    return await transition(
        db,
        task_id,
        STAGE_STATUS[stage],
        expected={WAITING_STATUS[stage]},
        require_queued=True,
        require_unexpired=True,
        stage=stage.value,
        started_at=Sql(f"COALESCE(started_at, '{now_iso()}')"),
        attempts=Sql(f"CASE WHEN stage = '{stage.value}' THEN attempts + 1 ELSE 1 END"),
        progress=dict(progress),
        message=f"Starting {stage.value}",
        error_message=None,
        end_reason=None,
        run_ref=None,
    )


async def finish(
    db: Database,
    task_id: str,
    stage: Stage,
    reason: EndReason,
    *,
    queue_training: bool = False,
    **fields: Any,
) -> Row:
    """Record how a run of `stage` ended: succeeded (the next status; after preprocessing,
    on the training queue when `queue_training`), failed or timed out (failed), cancelled,
    or interrupted (re-queued at its old place, see `requeue_interrupted`)."""
    running = STAGE_STATUS[stage]
    ending = {"end_reason": reason.value, "pid": None, "pid_start_time": None, "run_ref": None}
    if reason == EndReason.INTERRUPTED:
        return await requeue_interrupted(db, task_id, running, **{**ending, **fields})
    if reason == EndReason.SUCCEEDED:
        if stage == Stage.TRAINING:
            to = S.TRAINING_COMPLETED
            queue = None
        else:
            to = S.PREPROCESSING_COMPLETED
            queue = Stage.TRAINING if queue_training else None
        return await transition(
            db, task_id, to, expected={running}, queue=queue, **{**ending, **fields}
        )
    to = S.CANCELLED if reason == EndReason.CANCELLED else S.FAILED
    return await transition(db, task_id, to, expected={running}, **{**ending, **fields})


async def requeue_interrupted(
    db: Database, task_id: str, running: TaskStatus, **fields: Any
) -> Row:
    """Put a task whose run was interrupted (restart, shutdown, lost run) back on the queue
    of the stage it was running, at its old place."""
    values = {"end_reason": EndReason.INTERRUPTED.value, "pid": None, "pid_start_time": None}
    values.update(fields)
    if running == S.PREPROCESSING:
        return await transition(
            db, task_id, S.PENDING, expected={running}, keep_queue_place=True, **values
        )
    return await transition(
        db,
        task_id,
        S.PREPROCESSING_COMPLETED,
        expected={running},
        queue=Stage.TRAINING,
        keep_queue_place=True,
        **values,
    )


async def cancel_queued(db: Database, task_id: str, message: str) -> Row:
    """Take a waiting (not running) task off its queue as cancelled."""
    return await transition(
        db,
        task_id,
        S.CANCELLED,
        expected={S.PENDING, S.PREPROCESSING_COMPLETED},
        require_queued=True,
        message=message,
        error_message=message,
        end_reason=EndReason.CANCELLED.value,
    )


async def queue_training(db: Database, task_id: str, params: Mapping[str, Any]) -> Row:
    """Queue a task resting after preprocessing (files still there) for training."""
    return await transition(
        db,
        task_id,
        S.PREPROCESSING_COMPLETED,
        expected={S.PREPROCESSING_COMPLETED},
        require_queued=False,
        require_unexpired=True,
        queue=Stage.TRAINING,
        params=dict(params),
        message="Queued for training",
        error_message=None,
    )


async def unqueue_training(db: Database, task_id: str, message: str) -> Row:
    """Take a task off the training queue without ending it (training is unavailable)."""
    return await transition(
        db,
        task_id,
        S.PREPROCESSING_COMPLETED,
        expected={S.PREPROCESSING_COMPLETED},
        require_queued=True,
        message=message,
    )


async def retry(db: Database, task_id: str, *, from_training: bool) -> Row:
    """Queue a failed or cancelled task (files still there) again: for training when its
    dataset is complete (`from_training`), else for preprocessing."""
    fields: dict[str, Any] = {"error_message": None, "end_reason": None}
    if from_training:
        return await transition(
            db,
            task_id,
            S.PREPROCESSING_COMPLETED,
            expected={S.FAILED, S.CANCELLED},
            queue=Stage.TRAINING,
            require_unexpired=True,
            message="Retry requested; queued for training",
            **fields,
        )
    return await transition(
        db,
        task_id,
        S.PENDING,
        expected={S.FAILED, S.CANCELLED},
        require_unexpired=True,
        message="Retry requested; queued for preprocessing",
        **fields,
    )


async def expire(db: Database, task_id: str, message: str) -> Row:
    """Mark an ended task's files as removed by the cleanup. Never matches a task that runs
    or waits in a queue, or one already expired."""
    row = await db.guarded_transition(
        task_id,
        sorted(s.value for s in ENDED),
        None,
        {"expired_at": now_iso(), "message": message, "progress": None},
        require_queued=False,
        require_unexpired=True,
    )
    if row is None:
        raise InvalidTransitionError(task_id, await _current(db, task_id), "expired")
    return row
