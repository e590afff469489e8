"""Signed webhooks: each task event that matters (`task.preprocessing_completed`,
`task.succeeded`, `task.failed`, `task.cancelled`) is sent, with the task's public status as
its data, to every URL of TRAINING_SERVER_WEBHOOK_URLS and to the task's own `webhook_url`.

Events come from the event bus (no state code knows about webhooks): a loop turns each
published task whose status became one of those into one delivery row per receiver in SQLite
(`webhook_deliveries`; a unique key stops a republished row from being sent twice), and a
second loop sends the due ones, signed as Standard Webhooks says (`webhook-id`,
`webhook-timestamp`, `webhook-signature`), retried with exponential backoff up to
`webhook_max_attempts`, across restarts (everything it needs is in the table).

No server-side request forgery: a per-task URL must name a host of
TRAINING_SERVER_WEBHOOK_ALLOWED_HOSTS (checked at upload, 422, and again at each send),
redirects are never followed, and at send time the host is resolved and link-local and
cloud-metadata addresses are refused unless the host is on that list.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import aiosqlite
import httpx
from fastapi import FastAPI
from standardwebhooks.webhooks import Webhook

from training_server_models import (
    ServerConfig,
    TaskStatus,
    UnprocessableError,
    WebhookDelivery,
)

if TYPE_CHECKING:
    from training_server_tasks import TaskManager

log = logging.getLogger("training_server.webhooks")
S = TaskStatus
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
EVENTS = {
    S.PREPROCESSING_COMPLETED: "task.preprocessing_completed",  # the dataset is ready
    S.TRAINING_COMPLETED: "task.succeeded",
    S.FAILED: "task.failed",
    S.CANCELLED: "task.cancelled",
}
# Cloud metadata endpoints beside the link-local range (AWS IPv6, Alibaba).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
BATCH = 16  # deliveries sent at once
IDLE_WAKE = 30.0  # seconds the sender sleeps at most when nothing is due
ERROR_CHARS = 300


class WebhookRefused(Exception):
    """A URL that may not be called (its host or its address); never retried."""


# -- URLs and addresses ----------------------------------------------------------------------


def _host_allowed(settings: ServerConfig, host: str) -> bool:
    allowed = {h.strip().lower().strip("[]") for h in settings.webhook_allowed_hosts}
    return host.lower().strip("[]") in allowed


def check_webhook_url(settings: ServerConfig, url: str | None) -> None:
    """A per-task webhook_url must be http(s) with a host of webhook_allowed_hosts;
    UnprocessableError (422) in words otherwise. None passes."""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise UnprocessableError("webhook_url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise UnprocessableError("webhook_url must not hold a user name or password")
    if not _host_allowed(settings, parts.hostname):
        raise UnprocessableError(
            f"webhook_url's host {parts.hostname} is not allowed on this server "
            "(TRAINING_SERVER_WEBHOOK_ALLOWED_HOSTS)"
        )


def shown_url(url: str) -> str:
    """The URL without its query and fragment (which may carry a receiver's secret)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return (
        address in METADATA_ADDRESSES
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
    )


async def check_destination(settings: ServerConfig, url: str, per_task: bool) -> None:
    """Refuse (WebhookRefused) a URL that may not be called now: a per-task one whose host
    left the allow list, or one whose host resolves to a link-local or metadata address
    (unless the host is on the allow list)."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in {"http", "https"} or not host:
        raise WebhookRefused(f"not an http(s) URL: {shown_url(url)}")
    allowed = _host_allowed(settings, host)
    if per_task and not allowed:
        raise WebhookRefused(f"host {host} is not in TRAINING_SERVER_WEBHOOK_ALLOWED_HOSTS")
    if allowed:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(f"cannot resolve {host}: {exc}") from None  # may resolve later
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
        if _forbidden_address(address):
            raise WebhookRefused(f"{host} resolves to {address}, a link-local/metadata address")


def signer(settings: ServerConfig) -> Webhook | None:
    """The Standard Webhooks signer for the configured secret ("whsec_" + base64, or any
    other string used as the key's bytes); None without a secret."""
    if settings.webhook_secret is None:
        return None
    secret = settings.webhook_secret.get_secret_value()
    return Webhook(secret if secret.startswith("whsec_") else secret.encode())


def backoff(settings: ServerConfig, attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones: base * 2^(n-1), capped."""
    return min(settings.webhook_retry_max, settings.webhook_retry_base * 2 ** (attempts - 1))


def _iso(seconds: float | str | None) -> datetime | None:
    """Unix seconds as stored (last_attempt_at's TEXT column keeps them as text) to UTC."""
    return datetime.fromtimestamp(float(seconds), UTC) if seconds is not None else None


def event_for(task: dict[str, Any]) -> tuple[str, str] | None:
    """The webhook event a published task means, with what tells this happening from an
    earlier one of the same event; None when it means none."""
    if task.get("expired"):
        return None  # the cleanup removed its files; nothing happened to the task itself
    try:
        status = S(task["status"])
    except ValueError:
        return None
    event = EVENTS.get(status)
    if event is None:
        return None
    if status == S.PREPROCESSING_COMPLETED:
        # Only the dataset becoming ready: not an interrupted training waiting again, nor a
        # failed training retried, nor a queue change of a resting task.
        if task.get("end_reason") != "succeeded":
            return None
        return event, f"attempt:{task.get('attempts')}"
    return event, f"finished:{task.get('finished_at') or task.get('updated_at')}"


# -- the service -----------------------------------------------------------------------------


class Webhooks:
    """Deliveries in SQLite, the loop that makes them from events and the loop that sends."""

    def __init__(self, settings: ServerConfig, manager: TaskManager) -> None:
        self.settings = settings
        self.manager = manager
        self.signer = signer(settings)
        self._conn: aiosqlite.Connection | None = None
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._last_status: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        """Whether deliveries can be made at all: a secret, and somewhere to send."""
        return self.signer is not None and bool(
            self.settings.webhook_urls or self.settings.webhook_allowed_hosts
        )

    async def start(self) -> None:
        """Open its connection, show deliveries in /status, start its two loops."""
        from training_server_tasks import _watched  # the task manager's watched loops

        if self.signer is None:
            if self.settings.webhook_urls or self.settings.webhook_allowed_hosts:
                log.error("webhooks are configured but TRAINING_SERVER_WEBHOOK_SECRET is not")
            return
        self._conn = await _connect(self.settings.db_path)
        self._client = httpx.AsyncClient(
            timeout=self.settings.webhook_timeout, follow_redirects=False, trust_env=False
        )
        records = self.manager.records
        records.webhook_reader = self.deliveries
        records.webhook_reader_many = self.deliveries_of
        self._loops = [
            asyncio.create_task(
                _watched("webhook-events", self._follow_events), name="webhook-events"
            ),
            asyncio.create_task(
                _watched("webhook-sender", self._send_forever), name="webhook-sender"
            ),
        ]
        self.manager._loops.extend(self._loops)  # shown by /health

    async def stop(self) -> None:
        """Stop the loops and close the client and the connection."""
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        if self._client is not None:
            await self._client.aclose()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # -- reads for /status and /metrics ------------------------------------------------------

    async def deliveries(self, task_id: str) -> list[WebhookDelivery]:
        """The task's deliveries, oldest first (one indexed query)."""
        return (await self.deliveries_of([task_id])).get(task_id, [])

    async def deliveries_of(self, task_ids: list[str]) -> dict[str, list[WebhookDelivery]]:
        """Deliveries of several tasks in one query, by task id."""
        out: dict[str, list[WebhookDelivery]] = {t: [] for t in task_ids}
        if self._conn is None or not task_ids:
            return out
        marks = ", ".join("?" for _ in task_ids)
        rows = await self._conn.execute_fetchall(
            "SELECT * FROM webhook_deliveries WHERE task_id IN (" + marks + ") "  # noqa: S608
            "ORDER BY created_at, rowid",
            task_ids,
        )
        for row in rows:
            out[row["task_id"]].append(
                WebhookDelivery(
                    id=row["id"],
                    event=row["event"],
                    url=shown_url(row["url"]),
                    state=row["state"],
                    attempts=row["attempts"],
                    last_attempt_at=_iso(row["last_attempt_at"]),
                    last_status=row["last_status"],
                    last_error=row["last_error"],
                    next_attempt_at=_iso(row["next_attempt_at"]),
                )
            )
        return out

    async def counts(self) -> dict[str, tuple[int, int]]:
        """Per state: how many deliveries and how many attempts they made."""
        if self._conn is None:
            return {}
        rows = await self._conn.execute_fetchall(
            "SELECT state, COUNT(*), COALESCE(SUM(attempts), 0) FROM webhook_deliveries "
            "GROUP BY state"
        )
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    # -- events to deliveries ----------------------------------------------------------------

    async def _follow_events(self) -> None:
        async with self.manager.events.subscribe() as queue:
            while True:
                message = await queue.get()
                if message.get("type") == "deleted":
                    await self._forget_task(message["task_id"])
                elif message.get("type") == "task":
                    await self._on_task(message["task"])

    async def _on_task(self, task: dict[str, Any]) -> None:
        task_id = task["task_id"]
        previous = self._last_status.get(task_id)
        self._last_status[task_id] = task["status"]
        if previous == task["status"]:
            return  # progress, or a queue change: nothing happened that a receiver wants
        found = event_for(task)
        if found is None:
            return
        event, occurrence = found
        urls = [(url, False) for url in self.settings.webhook_urls]
        own = (task.get("params") or {}).get("webhook_url")
        if own:
            urls.append((own, True))
        if urls:
            await self._enqueue(task, event, occurrence, urls)

    async def _enqueue(
        self, task: dict[str, Any], event: str, occurrence: str, urls: list[tuple[str, bool]]
    ) -> None:
        """One pending delivery per receiver (a repeat of the same occurrence is ignored)."""
        assert self._conn is not None
        now = time.time()
        stamp = datetime.now(UTC).isoformat()
        added = 0
        for url, per_task in urls:
            payload = json.dumps(
                {"type": event, "timestamp": stamp, "data": task}, separators=(",", ":")
            )
            cursor = await self._conn.execute(
                "INSERT OR IGNORE INTO webhook_deliveries (id, task_id, event, occurrence, url, "
                "per_task, payload, created_at, state, attempts, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                [
                    "msg_" + secrets.token_urlsafe(18),
                    task["task_id"],
                    event,
                    occurrence,
                    url,
                    int(per_task),
                    payload,
                    stamp,
                    PENDING,
                    now,
                ],
            )
            added += cursor.rowcount
        await self._conn.commit()
        if added:
            self._changed(task["task_id"])
            self._wake.set()

    async def _forget_task(self, task_id: str) -> None:
        """A deleted task: its finished deliveries go; pending ones are still sent."""
        assert self._conn is not None
        self._last_status.pop(task_id, None)
        await self._conn.execute(
            "DELETE FROM webhook_deliveries WHERE task_id = ? AND state != ?", [task_id, PENDING]
        )
        await self._conn.commit()

    def _changed(self, task_id: str) -> None:
        """The task's cached status holds its deliveries: drop it (a later read refills)."""
        self.manager.records._cache.forget(task_id)

    # -- sending -----------------------------------------------------------------------------

    async def _send_forever(self) -> None:
        assert self._conn is not None
        while True:
            self._wake.clear()
            now = time.time()
            due = await self._conn.execute_fetchall(
                "SELECT * FROM webhook_deliveries WHERE state = ? AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at LIMIT ?",
                [PENDING, now, BATCH],
            )
            if due:
                await asyncio.gather(*(self._attempt(dict(row)) for row in due))
                continue
            rows = await self._conn.execute_fetchall(
                "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE state = ?", [PENDING]
            )
            soonest = rows[0][0] if rows and rows[0][0] is not None else None
            pause = IDLE_WAKE if soonest is None else max(0.0, min(IDLE_WAKE, soonest - now))
            with contextlib.suppress(TimeoutError):  # not wait_for: it can lose a cancel (3.11)
                async with asyncio.timeout(pause):
                    await self._wake.wait()

    async def _attempt(self, row: dict[str, Any]) -> None:
        """Send one delivery once and record how it went (and when the next attempt is)."""
        assert self._conn is not None and self._client is not None and self.signer is not None
        attempts = row["attempts"] + 1
        status: int | None = None
        error: str | None = None
        refused = False
        try:
            await check_destination(self.settings, row["url"], bool(row["per_task"]))
            stamp = datetime.now(UTC)
            headers = {
                "content-type": "application/json",
                "user-agent": "gs-training-server-webhooks",
                "webhook-id": row["id"],
                "webhook-timestamp": str(int(stamp.timestamp())),
                "webhook-signature": self.signer.sign(row["id"], stamp, row["payload"]),
            }
            response = await self._client.post(
                row["url"], content=row["payload"].encode(), headers=headers
            )
            status = response.status_code
            if not 200 <= status < 300:
                error = f"the receiver answered {status}"
                if response.is_redirect:
                    error += " (a redirect: not followed)"
        except WebhookRefused as exc:
            error, refused = f"refused: {exc}", True
        except (httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        now = time.time()
        if error is None:
            state, next_at = DELIVERED, None
        elif refused or attempts >= self.settings.webhook_max_attempts:
            state, next_at = FAILED, None
            if not refused:
                error = f"gave up after {attempts} attempts; last: {error}"
            log.warning("webhook %s to %s failed: %s", row["id"], shown_url(row["url"]), error)
        else:
            state, next_at = PENDING, now + backoff(self.settings, attempts)
        await self._conn.execute(
            "UPDATE webhook_deliveries SET state = ?, attempts = ?, next_attempt_at = ?, "
            "last_attempt_at = ?, last_status = ?, last_error = ? WHERE id = ?",
            [state, attempts, next_at, now, status, (error or "")[:ERROR_CHARS] or None, row["id"]],
        )
        await self._conn.commit()
        self._changed(row["task_id"])


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, timeout=30)
    conn.row_factory = sqlite3.Row
    await conn.execute("PRAGMA busy_timeout = 30000")
    return conn


# -- the app ---------------------------------------------------------------------------------


def install(app: FastAPI) -> FastAPI:
    """Run the webhook service beside the task manager for the app's lifetime (idempotent);
    returns the app."""
    if getattr(app.state, "webhooks_installed", False):
        return app
    app.state.webhooks_installed = True
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            service = Webhooks(app.state.settings, app.state.manager)
            await service.start()
            app.state.webhooks = service
            try:
                yield
            finally:
                await service.stop()

    app.router.lifespan_context = lifespan
    return app


WebhookReader = Callable[[str], Awaitable[list[WebhookDelivery]]]
