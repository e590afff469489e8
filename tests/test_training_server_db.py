"""The SQLite store against real database files in temp dirs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from training_server_db import MIGRATIONS, NEXT_QUEUE_KEY, SCHEMA_VERSION, Database, migrate


def schema(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return sorted(
            conn.execute("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        )


def row(task_id: str, **extra: object) -> dict[str, object]:
    return {
        "id": task_id,
        "status": "pending",
        "created_at": "2026-01-01T00:00:00.000+00:00",
        "updated_at": "2026-01-01T00:00:00.000+00:00",
        "video_filename": "input.mp4",
        "video_size": 1,
        "params": {"max_frames": 10},
        **extra,
    }


async def test_fresh_schema_equals_a_step_by_step_migrated_one(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.db"
    db = await Database.open(fresh)
    await db.close()

    stepwise = tmp_path / "stepwise.db"
    for upto in range(1, SCHEMA_VERSION + 1):
        async with aiosqlite.connect(stepwise) as conn:
            async with conn.execute("PRAGMA user_version") as cur:
                version = (await cur.fetchone())[0]
            for index in range(version, upto):
                await conn.executescript(
                    f"BEGIN;\n{MIGRATIONS[index]}\nPRAGMA user_version = {index + 1};\nCOMMIT;"
                )
    async with aiosqlite.connect(stepwise) as conn:
        assert await migrate(conn) == SCHEMA_VERSION
    assert schema(fresh) == schema(stepwise)
    with sqlite3.connect(fresh) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        await Database.open(path)


async def test_guarded_transition_changes_only_from_allowed_statuses(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "t.db")
    try:
        await db.insert_task(row("a"))
        assert not await db.guarded_transition("a", ["preprocessing"], "failed", {})
        assert await db.guarded_transition("a", ["pending"], "preprocessing", {"message": "go"})
        task = await db.get_task("a")
        assert (task["status"], task["message"]) == ("preprocessing", "go")
        assert task["params"] == {"max_frames": 10}
        with pytest.raises(ValueError, match="not writable"):
            await db.update_fields("a", {"status": "failed"})
    finally:
        await db.close()


async def test_queue_keys_keep_fifo_order_and_positions(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "t.db")
    try:
        for name in "abc":
            await db.insert_task(row(name, queued_for="preprocessing", queue_key=NEXT_QUEUE_KEY))
        assert await db.queued("preprocessing") == ["a", "b", "c"]
        assert [await db.queue_position(n) for n in "abc"] == [1, 2, 3]
        # Re-queue "a" at the back (queue columns change only with a guarded status write).
        await db.guarded_transition("a", ["pending"], "pending", {"queue_key": NEXT_QUEUE_KEY})
        assert await db.queued("preprocessing") == ["b", "c", "a"]
        assert await db.queue_counts() == {"preprocessing": 3}
        await db.guarded_transition("b", ["pending"], "pending", {"queued_for": None})
        assert await db.queue_position("b") is None
        assert await db.queue_position("c") == 1
    finally:
        await db.close()


async def test_list_tasks_pages_newest_first(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "t.db")
    try:
        for index in range(5):
            await db.insert_task(row(f"t{index}", status="failed" if index % 2 else "pending"))
        rows, total = await db.list_tasks([], 2, 1)
        assert [r["id"] for r in rows] == ["t3", "t2"]
        assert total == 5
        rows, total = await db.list_tasks(["failed"], 10, 0)
        assert [r["id"] for r in rows] == ["t3", "t1"]
        assert total == 2
        assert await db.integrity_check() == "ok"
    finally:
        await db.close()
