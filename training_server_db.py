"""SQLite persistence: schema, migrations and the queries the server runs.

One aiosqlite connection writes (so writes never contend), a second one reads; WAL mode lets
reads run beside the writer. `status` and the queue columns are written only by
`guarded_transition`, which the named operations of training_server_state.py call with the
allowed predecessors; every write returns the row it produced (`RETURNING *`), so callers never
read a task again after changing it. `reads` counts the queries run on the reader connection.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

# Ordered migrations; PRAGMA user_version holds how many have run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        message TEXT,
        error_message TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        original_filename TEXT,
        video_filename TEXT NOT NULL,
        video_size INTEGER NOT NULL,
        params TEXT NOT NULL,
        progress TEXT,
        metadata TEXT,
        queued_for TEXT,
        queue_key INTEGER,
        stage TEXT,
        end_reason TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        pid INTEGER,
        pid_start_time INTEGER,
        expired_at TEXT
    );
    CREATE INDEX tasks_by_status ON tasks (status);
    CREATE INDEX tasks_queue ON tasks (queued_for, queue_key) WHERE queued_for IS NOT NULL;
    """,
    # Where the running stage lives, as its executor describes it (JSON): a local process
    # group, or a job on a cluster, so a restarted server can find it again.
    """
    ALTER TABLE tasks ADD COLUMN run_ref TEXT;
    """,
    # Idempotency-Key answers (training_server_idempotency): the request's fingerprint and
    # the first answer, replayed for the same key and request until created_at + TTL.
    """
    CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        status INTEGER NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
    """,
    # Webhook deliveries (training_server_webhooks): one row per event and receiver, its
    # attempts and when the next is due, so retries survive restarts. `occurrence` tells
    # one happening of an event from a repeat of the same task's (a retried task fails
    # again); the unique key keeps a republished row from being sent twice.
    """
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        event TEXT NOT NULL,
        occurrence TEXT NOT NULL,
        url TEXT NOT NULL,
        per_task INTEGER NOT NULL DEFAULT 0,
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_attempt_at TEXT,
        last_status INTEGER,
        last_error TEXT,
        UNIQUE (task_id, event, occurrence, url)
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
        WHERE state = 'pending';
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
JSON_COLUMNS = frozenset({"params", "progress", "metadata", "run_ref"})
# Columns any code may write through update_fields; status and the queue are not among them.
WRITABLE_COLUMNS = frozenset(
    {
        "message",
        "error_message",
        "updated_at",
        "started_at",
        "finished_at",
        "params",
        "progress",
        "metadata",
        "stage",
        "end_reason",
        "attempts",
        "pid",
        "pid_start_time",
        "run_ref",
        "expired_at",
    }
)
# Written only together with a status change, by the named state operations.
QUEUE_COLUMNS = frozenset({"queued_for", "queue_key"})


class TaskNotFoundError(LookupError):
    """No task with that id."""


class _NextQueueKey:
    """Marker: set queue_key to one more than the largest in use, inside the same UPDATE."""

    def __repr__(self) -> str:
        return "NEXT_QUEUE_KEY"


NEXT_QUEUE_KEY = _NextQueueKey()


class Sql(str):
    """A column value that is a fixed SQL expression of this module's callers (never user
    text), e.g. `attempts + 1`; every other value is bound as a parameter."""


_NEXT_QUEUE_KEY_SQL = "(SELECT COALESCE(MAX(queue_key), 0) + 1 FROM tasks)"


def _encode(column: str, value: Any) -> Any:
    if column in JSON_COLUMNS and value is not None:
        return json.dumps(value, separators=(",", ":"))
    return value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for column in JSON_COLUMNS:
        if out.get(column) is not None:
            out[column] = json.loads(out[column])
    return out


def _assignments(
    fields: Mapping[str, Any], writable: frozenset[str] = WRITABLE_COLUMNS
) -> tuple[str, list[Any]]:
    unknown = set(fields) - writable
    if unknown:
        raise ValueError(f"not writable here: {sorted(unknown)}")
    parts: list[str] = []
    values: list[Any] = []
    for column, value in fields.items():
        if value is NEXT_QUEUE_KEY:
            parts.append(f"{column} = {_NEXT_QUEUE_KEY_SQL}")
        elif isinstance(value, Sql):
            parts.append(f"{column} = {value}")
        else:
            parts.append(f"{column} = ?")
            values.append(_encode(column, value))
    return ", ".join(parts), values


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, timeout=30)
    conn.row_factory = sqlite3.Row
    await conn.execute("PRAGMA busy_timeout = 30000")
    await conn.execute("PRAGMA foreign_keys = ON")
    return conn


async def migrate(conn: aiosqlite.Connection) -> int:
    """Run the migrations this file has and the database lacks; return the new version."""
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {version} is newer than this server ({SCHEMA_VERSION})"
        )
    for index in range(version, SCHEMA_VERSION):
        # executescript commits first; the version bump rides in the same script.
        await conn.executescript(
            f"BEGIN;\n{MIGRATIONS[index]}\nPRAGMA user_version = {index + 1};\nCOMMIT;"
        )
    return SCHEMA_VERSION


class DatabaseDamagedError(RuntimeError):
    """The database file fails SQLite's integrity check; the message says what to do."""


def _quick_check(path: Path) -> list[str]:
    conn = sqlite3.connect(path, timeout=30)
    try:
        rows = conn.execute("PRAGMA quick_check(20)").fetchall()
    finally:
        conn.close()
    return [str(row[0]) for row in rows if row and row[0] != "ok"]


async def check_integrity(path: Path) -> None:
    """Run `PRAGMA quick_check` on an existing database file (in a worker thread); raise
    DatabaseDamagedError naming the file and what to do when it finds damage."""
    if not path.exists() or path.stat().st_size == 0:  # noqa: ASYNC240 (start-up)
        return
    try:
        problems = await asyncio.to_thread(_quick_check, path)
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems:
        found = "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
        raise DatabaseDamagedError(
            f"The task database {path} is damaged (PRAGMA quick_check: {found}). Stop here "
            f"and keep a copy of the file; then restore it from a backup, or recover what it "
            f"holds with `sqlite3 {path} .recover | sqlite3 {path}.recovered` and move that "
            f"in its place, or move it away to start with an empty database (the task "
            f"folders are kept; TRAINING_SERVER_ORPHAN_FOLDERS says what becomes of them)."
        )


class Database:
    """The task store: one writer connection and one reader connection to one SQLite file."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader
        self.reads = 0  # queries run on the reader connection (tests count them)
        self.created = False  # the file was missing or empty when it was opened
        # A write is a statement plus its commit; no other statement may run in between.
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (creating and migrating when needed) the database at `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists() or path.stat().st_size == 0  # noqa: ASYNC240 (start-up)
        writer = await _connect(path)
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            await writer.execute("PRAGMA synchronous = NORMAL")
            await migrate(writer)
            reader = await _connect(path)
        except BaseException:
            await writer.close()
            raise
        db = cls(writer, reader)
        db.created = created
        return db

    async def close(self) -> None:
        """Close both connections."""
        await self._reader.close()
        await self._writer.close()

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """All rows of a query on the reader connection, in one round trip."""
        self.reads += 1
        return list(await self._reader.execute_fetchall(sql, params))

    async def _read_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self._read(sql, params)
        return rows[0] if rows else None

    async def _write(self, sql: str, params: Sequence[Any]) -> int:
        async with self._write_lock:
            cursor = await self._writer.execute(sql, params)
            await self._writer.commit()
            return cursor.rowcount

    async def _write_returning(self, sql: str, params: Sequence[Any]) -> dict[str, Any] | None:
        """Run one `... RETURNING *` statement; the row it wrote, or None if it matched none."""
        async with self._write_lock:
            rows = list(await self._writer.execute_fetchall(sql + " RETURNING *", params))
            await self._writer.commit()
        return _decode(rows[0]) if rows else None

    # -- writes --------------------------------------------------------------------------

    async def insert_task(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Insert a new task row (status included: a task is born in its first status);
        returns the stored row."""
        columns = list(row)
        slots = [_NEXT_QUEUE_KEY_SQL if row[c] is NEXT_QUEUE_KEY else "?" for c in columns]
        values = [_encode(c, row[c]) for c in columns if row[c] is not NEXT_QUEUE_KEY]
        sql = f"INSERT INTO tasks ({', '.join(columns)}) VALUES ({', '.join(slots)})"
        stored = await self._write_returning(sql, values)
        assert stored is not None
        return stored

    async def guarded_transition(
        self,
        task_id: str,
        allowed_from: Iterable[str],
        to_status: str | None,
        fields: Mapping[str, Any],
        *,
        require_queued: bool | None = None,
        require_unexpired: bool = False,
    ) -> dict[str, Any] | None:
        """Set `status = to_status` (None: keep it) and `fields` only if the current status
        is allowed (with `require_queued`: only if the task is / is not waiting in a queue;
        with `require_unexpired`: only if its files were not removed by the cleanup).

        Returns the changed row, or None when the guard matched nothing.
        """
        allowed = list(allowed_from)
        if not allowed:
            return None
        assignments, values = _assignments(fields, WRITABLE_COLUMNS | QUEUE_COLUMNS)
        sets = [assignments] if assignments else []
        if to_status is not None:
            sets.insert(0, "status = ?")
            values = [to_status, *values]
        if not sets:
            raise ValueError("a guarded update must change something")
        sql = (
            f"UPDATE tasks SET {', '.join(sets)} "
            f"WHERE id = ? AND status IN ({', '.join('?' for _ in allowed)})"
        )
        if require_queued is not None:
            sql += f" AND queued_for IS {'NOT ' if require_queued else ''}NULL"
        if require_unexpired:
            sql += " AND expired_at IS NULL"
        return await self._write_returning(sql, [*values, task_id, *allowed])

    async def update_fields(
        self, task_id: str, fields: Mapping[str, Any], *, only_if_status: Iterable[str] = ()
    ) -> dict[str, Any] | None:
        """Write non-status, non-queue columns (with `only_if_status`: only while in one of
        those); returns the changed row, or None when nothing matched."""
        assignments, values = _assignments(fields)
        if not assignments:
            raise ValueError("nothing to write")
        sql = f"UPDATE tasks SET {assignments} WHERE id = ?"
        params = [*values, task_id]
        statuses = list(only_if_status)
        if statuses:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            params += statuses
        return await self._write_returning(sql, params)

    async def delete_task(self, task_id: str) -> bool:
        """Remove a task's row; returns whether it existed."""
        return await self._write("DELETE FROM tasks WHERE id = ?", [task_id]) == 1

    # -- reads ---------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """The task's row as a dict (JSON columns decoded); TaskNotFoundError if absent."""
        row = await self._read_one("SELECT * FROM tasks WHERE id = ?", [task_id])
        if row is None:
            raise TaskNotFoundError(task_id)
        return _decode(row)

    async def list_tasks(
        self, statuses: Sequence[str], limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of tasks, newest first, and how many match in all."""
        where = ""
        params: list[Any] = []
        if statuses:
            where = f"WHERE status IN ({', '.join('?' for _ in statuses)})"
            params = list(statuses)
        total_row = await self._read_one(f"SELECT COUNT(*) FROM tasks {where}", params)
        rows = await self._read(
            f"SELECT * FROM tasks {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return [_decode(r) for r in rows], int(total_row[0]) if total_row else 0

    async def queued(self, stage: str, limit: int = -1) -> list[str]:
        """Ids waiting for `stage`, in queue order."""
        return [
            r[0]
            for r in await self._read(
                "SELECT id FROM tasks WHERE queued_for = ? ORDER BY queue_key, seq LIMIT ?",
                [stage, limit],
            )
        ]

    async def queue_counts(self) -> dict[str, int]:
        """How many tasks wait for each stage."""
        return {
            r[0]: int(r[1])
            for r in await self._read(
                "SELECT queued_for, COUNT(*) FROM tasks WHERE queued_for IS NOT NULL "
                "GROUP BY queued_for"
            )
        }

    async def queue_position(self, task_id: str) -> int | None:
        """1-based place of the task in its stage's queue, or None when not queued."""
        row = await self._read_one(
            "SELECT COUNT(*) FROM tasks AS other, tasks AS me WHERE me.id = ? "
            "AND me.queued_for IS NOT NULL AND other.queued_for = me.queued_for "
            "AND (other.queue_key < me.queue_key "
            "OR (other.queue_key = me.queue_key AND other.seq <= me.seq))",
            [task_id],
        )
        count = int(row[0]) if row else 0
        return count or None

    async def queue_positions(self) -> dict[str, int]:
        """1-based queue place of every waiting task, in one query."""
        return {
            r[0]: int(r[1])
            for r in await self._read(
                "SELECT id, ROW_NUMBER() OVER (PARTITION BY queued_for ORDER BY queue_key, seq) "
                "FROM tasks WHERE queued_for IS NOT NULL"
            )
        }

    async def tasks_in(self, statuses: Sequence[str]) -> list[dict[str, Any]]:
        """Every task in one of `statuses`, oldest first."""
        return [
            _decode(r)
            for r in await self._read(
                f"SELECT * FROM tasks WHERE status IN ({', '.join('?' for _ in statuses)}) "
                "ORDER BY seq",
                list(statuses),
            )
        ]

    async def all_ids(self) -> set[str]:
        """Every task id in the store."""
        return {r[0] for r in await self._read("SELECT id FROM tasks")}

    async def expirable(self, finished_before: str, statuses: Sequence[str]) -> list[str]:
        """Ended, unexpired, unqueued tasks whose end is older than `finished_before`."""
        return [
            r[0]
            for r in await self._read(
                "SELECT id FROM tasks WHERE expired_at IS NULL AND queued_for IS NULL "
                "AND finished_at IS NOT NULL AND finished_at < ? "
                f"AND status IN ({', '.join('?' for _ in statuses)}) ORDER BY seq",
                [finished_before, *statuses],
            )
        ]

    async def integrity_check(self) -> str:
        """SQLite's own verdict on the file ('ok' when sound)."""
        row = await self._read_one("PRAGMA integrity_check")
        return str(row[0]) if row else "no answer"
