"""The task state machine: the one table of allowed transitions and the only code that writes
a task's status.

Every change is one guarded UPDATE (`... WHERE id = ? AND status IN (allowed predecessors)`);
a caller that lost a race gets `InvalidTransitionError`, never a silently skipped state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from training_server_db import NEXT_QUEUE_KEY, Database
from training_server_models import Stage, TaskStatus

S = TaskStatus

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
STAGE_STATUS: dict[Stage, TaskStatus] = {
    Stage.PREPROCESSING: S.PREPROCESSING,
    Stage.TRAINING: S.TRAINING,
}


class InvalidTransitionError(Exception):
    """The task is not in a status from which the requested one can be reached."""

    def __init__(self, task_id: str, current: str, wanted: TaskStatus) -> None:
        super().__init__(f"task {task_id} is {current}; it cannot become {wanted.value}")
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


async def create(db: Database, row: Mapping[str, Any]) -> None:
    """Store a new task, born PENDING at the back of the preprocessing queue."""
    stamp = now_iso()
    await db.insert_task(
        {
            **row,
            "status": S.PENDING.value,
            "queued_for": Stage.PREPROCESSING.value,
            "queue_key": NEXT_QUEUE_KEY,
            "created_at": stamp,
            "updated_at": stamp,
        }
    )


async def transition(
    db: Database,
    task_id: str,
    to: TaskStatus,
    *,
    expected: Iterable[TaskStatus] | None = None,
    queue: Stage | None = None,
    keep_queue_place: bool = False,
    require_queued: bool | None = None,
    **fields: Any,
) -> None:
    """Move a task to `to` if its current status allows it (and is in `expected`, if given).

    `queue` puts the task on that stage's queue (PENDING always waits for preprocessing);
    `keep_queue_place` keeps its old queue key so an interrupted task runs first again;
    `require_queued` additionally demands that the task is (True) or is not (False) queued.
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
    changed = await db.guarded_transition(
        task_id,
        sorted(s.value for s in allowed),
        to.value,
        values,
        require_queued=require_queued,
    )
    if not changed:
        current = await db.get_task(task_id)
        raise InvalidTransitionError(task_id, current["status"], to)
