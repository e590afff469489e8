"""Retention: the files of tasks that ended more than `cleanup_ttl` seconds ago are removed;
their record stays, marked expired (downloads answer 410). Running and queued tasks are never
touched: the expiry is a guarded update that only matches ended, unqueued tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import training_server_state as state
from training_server_db import Database, TaskNotFoundError
from training_server_models import ServerConfig

log = logging.getLogger("training_server")


async def sweep(
    settings: ServerConfig,
    db: Database,
    remove_files: Callable[[str], None],
    publish: Callable[[dict[str, Any]], Awaitable[object]],
) -> list[str]:
    """Expire every task past its time; returns their ids. The expiry is the guarded state
    operation `expire`: a task queued (e.g. for training) since the query is not touched."""
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.cleanup_ttl)
    ended = [s.value for s in state.ENDED]
    message = f"Files removed by the cleanup {settings.cleanup_ttl:g} s after the task ended"
    expired = []
    for task_id in await db.expirable(cutoff.isoformat(timespec="milliseconds"), ended):
        try:
            row = await state.expire(db, task_id, message)
        except (state.InvalidTransitionError, TaskNotFoundError):
            continue  # queued, running or deleted since the query
        await asyncio.to_thread(remove_files, task_id)
        expired.append(task_id)
        await publish(row)
    if expired:
        log.info("cleanup removed the files of %d tasks", len(expired))
    return expired


async def run_forever(interval: float, sweep_once: Callable[[], Awaitable[object]]) -> None:
    """Sweep every `interval` seconds; a failed sweep is logged and the next one still runs."""
    while True:
        try:
            await sweep_once()
        except Exception:
            log.exception("cleanup sweep failed")
        await asyncio.sleep(interval)
