"""Reading tasks and telling who listens: the public view of a task read once from SQLite,
the cache of serialized statuses that polling reads, and `publish`, which every caller of a
state operation hands the row the operation returned (so nobody reads a task again after
changing it). No status is changed here: that is training_server_state's job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from training_server_db import Database, TaskNotFoundError
from training_server_models import NotFoundError, TaskPublic, TaskStatus, WebhookDelivery
from training_server_views import EventBus, StatusCache, task_public

Row = dict[str, Any]


class Records:
    """The read side of the task store plus the publishing of every change."""

    def __init__(self, db: Database, events: EventBus) -> None:
        self.db = db
        self.events = events
        self._cache = StatusCache()
        # Publishing waits for a view (a query when the task waits in a queue): without this,
        # a later write's event could go out first and the earlier, stale one after it (the
        # stream said pending after preprocessing). Callers publish in the step their write
        # returns in, and the lock queues them in that order (asyncio.Lock is FIFO).
        self._publishing = asyncio.Lock()

    async def row(self, task_id: str) -> Row:
        """The task's row; NotFoundError (404) when absent."""
        try:
            return await self.db.get_task(task_id)
        except TaskNotFoundError:
            raise NotFoundError(f"No task with id {task_id}.") from None

    # Set by the webhook service when webhooks are on: the task's deliveries (one indexed
    # query) for the `webhooks` field; without it no query is made and the field is None.
    webhook_reader: Callable[[str], Awaitable[list[WebhookDelivery]]] | None = None
    webhook_reader_many: (
        Callable[[list[str]], Awaitable[dict[str, list[WebhookDelivery]]]] | None
    ) = None

    async def view(self, row: Row) -> TaskPublic:
        """The public task for a row in hand (one more query only when it waits in a queue,
        for its place, and one when webhooks are on, for its deliveries)."""
        position = await self.db.queue_position(row["id"]) if row["queued_for"] else None
        task = task_public(row, position)
        if self.webhook_reader is not None:
            task.webhooks = await self.webhook_reader(row["id"])
        return task

    async def public(self, task_id: str) -> TaskPublic:
        """The task as the API shows it; NotFoundError when absent."""
        return await self.view(await self.row(task_id))

    async def public_json(self, task_id: str) -> bytes:
        """`public(task_id)` as JSON, from the cache that every publish refills."""
        cached = self._cache.get(task_id)
        if cached is not None:
            return cached
        generation = self._cache.generation
        task = await self.public(task_id)
        body = task.model_dump_json().encode()
        if task.queued_for is None:  # a queued task's place changes when others move
            self._cache.put(task_id, body, generation)
        return body

    async def list_public(
        self, statuses: list[TaskStatus], limit: int, offset: int
    ) -> tuple[list[TaskPublic], int]:
        """A page of tasks, newest first, and the total that match."""
        rows, total = await self.db.list_tasks([s.value for s in statuses], limit, offset)
        positions = await self.db.queue_positions() if any(r["queued_for"] for r in rows) else {}
        tasks = [task_public(r, positions.get(r["id"])) for r in rows]
        if self.webhook_reader_many is not None and tasks:
            deliveries = await self.webhook_reader_many([t.task_id for t in tasks])
            for task in tasks:
                task.webhooks = deliveries.get(task.task_id, [])
        return tasks, total

    async def publish(self, row: Row) -> TaskPublic:
        """Tell the cache and the event stream about a row a write just returned, in the
        order of the writes."""
        async with self._publishing:
            task = await self.view(row)
            self._cache.forget(row["id"])
            if task.queued_for is None:
                self._cache.put(row["id"], task.model_dump_json().encode(), self._cache.generation)
            self.events.publish({"type": "task", "task": task.model_dump(mode="json")})
        return task

    def removed(self, task_id: str) -> None:
        """Tell the cache and the event stream that a task was deleted."""
        self._cache.forget(task_id)
        self.events.publish({"type": "deleted", "task_id": task_id})
