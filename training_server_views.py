"""What the API shows of a task and who hears when it changes: the conversion of a database
row into the public task object, the cache of serialized statuses that status polling reads,
and the event bus that the page's live stream follows. No status is changed here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import training_server_state as state
from training_server_models import (
    EndReason,
    Progress,
    Stage,
    TaskParams,
    TaskPublic,
    TaskResults,
    TaskStatus,
)


class EventBus:
    """Fan-out of task changes to live subscribers (the page's event stream)."""

    def __init__(self, queue_size: int = 256) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._queue_size = queue_size

    def publish(self, event: dict[str, Any]) -> None:
        """Hand `event` to every subscriber; a slow one loses its oldest events."""
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue that receives every event published while the context is open."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)


class StatusCache:
    """Serialized task statuses, each dropped on every write to its task.

    `generation` counts writes to any task: a body computed from a read that a write overtook
    (the generation moved on meanwhile) is not stored, so the cache never serves a stale one."""

    def __init__(self) -> None:
        self._bodies: dict[str, bytes] = {}
        self.generation = 0

    def get(self, task_id: str) -> bytes | None:
        return self._bodies.get(task_id)

    def put(self, task_id: str, body: bytes, read_at_generation: int) -> None:
        if read_at_generation == self.generation:
            self._bodies[task_id] = body

    def forget(self, task_id: str) -> None:
        """Drop the task's body: it was written (or deleted)."""
        self.generation += 1
        self._bodies.pop(task_id, None)


def _datetime(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def task_public(row: dict[str, Any], position: int | None) -> TaskPublic:
    """The task as the API shows it, from its database row and its place in its queue."""
    status = TaskStatus(row["status"])
    expired = row["expired_at"] is not None
    return TaskPublic(
        task_id=row["id"],
        status=status,
        message=row["message"],
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
        error_message=row["error_message"],
        metadata=row["metadata"],
        progress=Progress.model_validate(row["progress"]) if row["progress"] else None,
        queue_position=position,
        queued_for=Stage(row["queued_for"]) if row["queued_for"] else None,
        params=TaskParams.model_validate(row["params"]),
        original_filename=row["original_filename"],
        video_size=row["video_size"],
        started_at=_datetime(row["started_at"]),
        finished_at=_datetime(row["finished_at"]),
        end_reason=EndReason(row["end_reason"]) if row["end_reason"] else None,
        attempts=row["attempts"],
        expired=expired,
        allowed_actions=state.allowed_actions(status, row["queued_for"], expired),
        results=TaskResults(**state.results(status, row.get("stage"), expired)),
        active=state.is_active(status, row["queued_for"]),
        node=(row.get("run_ref") or {}).get("node") if row.get("run_ref") else None,
    )
