"""Persisting what a running stage reports about its advance: at most one write per task per
second (a stage may report hundreds of times a second), and the latest report always lands
when the stage ends. Progress is written only while the task is in a running status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import training_server_state as state
from training_server_db import Database
from training_server_models import Progress, Stage

WRITE_INTERVAL = 1.0  # seconds between persisted progress updates of one task


@dataclass
class _Slot:
    last_write: float = 0.0
    pending: Progress | None = None


class ProgressWriter:
    """Throttled progress writes; `publish(row)` tells listeners after each write (with the
    row the write returned: no read)."""

    def __init__(
        self, db: Database, publish: Callable[[dict[str, Any]], Awaitable[object]]
    ) -> None:
        self._db = db
        self._publish = publish
        self._slots: dict[str, _Slot] = {}
        self._background: set[asyncio.Task[None]] = set()

    def report(self, task_id: str, stage: Stage, fields: dict[str, Any]) -> None:
        """Take a report; write it now if the task's last write is a second old."""
        slot = self._slots.setdefault(task_id, _Slot())
        slot.pending = Progress(stage=stage, updated_at=datetime.now(UTC), **fields)
        now = time.monotonic()
        if now - slot.last_write >= WRITE_INTERVAL:
            slot.last_write = now
            write = asyncio.get_running_loop().create_task(self.flush(task_id))
            self._background.add(write)
            write.add_done_callback(self._background.discard)

    async def flush(self, task_id: str) -> None:
        """Write the task's latest unwritten report, if any."""
        slot = self._slots.get(task_id)
        if slot is None or slot.pending is None:
            return
        progress, slot.pending = slot.pending, None
        label = progress.label or progress.stage.value
        if progress.current is not None and progress.total:
            message = f"{label} {progress.current}/{progress.total}"
        else:
            message = label
        row = await self._db.update_fields(
            task_id,
            {
                "progress": progress.model_dump(mode="json"),
                "message": message,
                "updated_at": state.now_iso(),
            },
            only_if_status=[s.value for s in state.RUNNING],
        )
        if row is not None:
            await self._publish(row)

    def forget(self, task_id: str) -> None:
        """Drop the task's throttle state (its stage ended)."""
        self._slots.pop(task_id, None)
