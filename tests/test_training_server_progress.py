"""Throttled progress writes against a real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from training_server_db import Database
from training_server_models import Stage
from training_server_progress import ProgressWriter

TASK = "8b3ec1c9-79a7-468b-958b-4dc3f23b1a0c"


async def open_with_task(tmp_path: Path, status: str) -> Database:
    db = await Database.open(tmp_path / "t.db")
    await db.insert_task(
        {
            "id": TASK,
            "status": status,
            "created_at": "2026-01-01T00:00:00.000+00:00",
            "updated_at": "2026-01-01T00:00:00.000+00:00",
            "video_filename": "input.mp4",
            "video_size": 1,
            "params": {},
        }
    )
    return db


def recorder(published: list[str]) -> Callable[[dict], Awaitable[None]]:
    """A publish callback that records which tasks it was told about."""

    async def publish(row: dict) -> None:
        published.append(row["id"])

    return publish


async def test_a_burst_of_reports_is_one_write_and_the_last_report_lands(tmp_path: Path) -> None:
    db = await open_with_task(tmp_path, "preprocessing")
    published: list[str] = []
    writer = ProgressWriter(db, recorder(published))
    try:
        for n in range(500):
            fields = {"step": "features", "label": "Features", "current": n, "total": 500}
            writer.report(TASK, Stage.PREPROCESSING, fields)
        await asyncio.sleep(0.1)
        row = await db.get_task(TASK)
        assert published == [TASK]  # one write for the whole burst, with its newest report
        assert row["progress"]["current"] == 499
        assert row["message"] == "Features 499/500"
        writer.report(TASK, Stage.PREPROCESSING, {"step": "features", "current": 500})
        await asyncio.sleep(0.1)
        assert (await db.get_task(TASK))["progress"]["current"] == 499  # within the second
        await writer.flush(TASK)  # the stage ended: its last report lands
        assert (await db.get_task(TASK))["progress"]["current"] == 500
        assert published == [TASK, TASK]
        await writer.flush(TASK)  # nothing new: no write
        assert published == [TASK, TASK]
    finally:
        await db.close()


async def test_no_progress_is_written_once_the_task_has_ended(tmp_path: Path) -> None:
    db = await open_with_task(tmp_path, "failed")
    published: list[str] = []
    writer = ProgressWriter(db, recorder(published))
    try:
        writer.report(TASK, Stage.TRAINING, {"label": "Training", "current": 5, "total": 10})
        await writer.flush(TASK)
        row = await db.get_task(TASK)
        assert row["progress"] is None
        assert published == []
    finally:
        await db.close()
