"""Retention: the files of tasks that ended more than `cleanup_ttl` seconds ago are removed;
their record stays, marked expired (downloads answer 410). Running and queued tasks are never
touched: the expiry is a guarded update that only matches ended, unqueued tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import training_server_state as state
from training_server_db import Database
from training_server_models import NotFoundError, ServerConfig, TaskStatus

log = logging.getLogger("training_server")
ENDED = [
    TaskStatus.PREPROCESSING_COMPLETED,
    TaskStatus.TRAINING_COMPLETED,
    TaskStatus.FAILED,
    TaskStatus.CANCELLED,
]


async def sweep(
    settings: ServerConfig,
    db: Database,
    remove_files: Callable[[str], None],
    publish: Callable[[str], Awaitable[object]],
) -> list[str]:
    """Expire every task past its time; returns their ids."""
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.cleanup_ttl)
    ended = [s.value for s in ENDED]
    expired = []
    for task_id in await db.expirable(cutoff.isoformat(timespec="milliseconds"), ended):
        marked = await db.update_fields(
            task_id,
            {
                "expired_at": state.now_iso(),
                "message": f"Files removed by the cleanup {settings.cleanup_ttl:g} s "
                "after the task ended",
                "progress": None,
            },
            only_if_status=ended,
        )
        if not marked:
            continue
        await asyncio.to_thread(remove_files, task_id)
        expired.append(task_id)
        with contextlib.suppress(NotFoundError):
            await publish(task_id)
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
