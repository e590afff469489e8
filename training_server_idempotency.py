"""Idempotent submits: an `Idempotency-Key` header on POST /upload, POST /uploads/ (tus
creation) and POST /tasks/{id}/cancel|retry|train makes a repeated request safe.

- The first request with a key runs; when it succeeds (2xx) its status, headers and body are
  stored in SQLite (table `idempotency_keys`) with a fingerprint of the request.
- The same key with the same request (same fingerprint) gets the stored answer again, with
  `Idempotent-Replayed: true`, and nothing runs: no second task.
- The same key with a different request is 422; while the first is still running, 409.
- Keys are kept `idempotency_ttl` seconds (24 h by default); errors are not stored, so a
  request that failed may be sent again with its key.

The fingerprint never needs the whole body in memory, nor a hash of a whole video: it is the
method, path, sorted query, the media type, the tus creation headers (Upload-Length,
Upload-Metadata), and the body's digest computed while it streams: for multipart bodies the
parts in order with their names, file names and sizes, small fields' values, and a file's
first and last 64 KiB (the boundary, which every client picks anew, is left out; a different
video differs in size, header or index); other bodies (the control POSTs' JSON) are hashed
whole. A repeated request's body is read (and dropped) to compute its fingerprint.

The replay checks the API token first (a stored answer is never given without it).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from training_server_deps import require_token
from training_server_models import ApiError

HEADER = "idempotency-key"
PATHS = re.compile(r"^/uploads?/?$|^/tasks/[^/]+/(cancel|retry|train)$")
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")
EDGE = 64 * 1024  # bytes of a file's start and end in the fingerprint
MAX_STORED_BODY = 64 * 1024
SKIPPED_HEADERS = frozenset({b"content-length", b"date", b"server", b"set-cookie"})
FINGERPRINT_HEADERS = (b"upload-length", b"upload-metadata", b"upload-defer-length")


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> list[Message]:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


class _MultipartDigest:
    """The parts of a multipart body, digested as they stream (boundary left out)."""

    def __init__(self, boundary: bytes, digest: Any) -> None:
        self.digest = digest
        self.header = bytearray()
        self.size = 0
        self.head = bytearray()
        self.tail = bytearray()
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header,
                "on_header_value": self._header,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },  # type: ignore[arg-type]
        )

    def _begin(self) -> None:
        self.header = bytearray()
        self.size = 0
        self.head = bytearray()
        self.tail = bytearray()

    def _header(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]
        del self.header[4096:]

    def _data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        self.size += len(piece)
        if len(self.head) < EDGE:
            self.head += piece[: EDGE - len(self.head)]
        self.tail += piece
        del self.tail[:-EDGE]

    def _end(self) -> None:
        self.digest.update(b"part\0%b\0%d\0" % (bytes(self.header), self.size))
        self.digest.update(bytes(self.head))
        self.digest.update(bytes(self.tail))

    def write(self, chunk: bytes) -> None:
        self.parser.write(chunk)


@dataclass
class Fingerprint:
    """A request's fingerprint, fed with its body as it streams."""

    scope: Scope
    digest: Any = field(default_factory=hashlib.sha256)
    multipart: _MultipartDigest | None = None
    malformed: bool = False

    def __post_init__(self) -> None:
        headers = dict(self.scope["headers"])
        query = sorted(
            tuple(p.split(b"=", 1)) for p in self.scope.get("query_string", b"").split(b"&") if p
        )
        kind, options = parse_options_header(headers.get(b"content-type", b""))
        self.digest.update(
            json.dumps(
                [
                    self.scope["method"],
                    self.scope["path"].rstrip("/"),
                    [[x.decode("latin-1") for x in pair] for pair in query],
                    kind.decode("latin-1"),
                    [headers.get(h, b"").decode("latin-1") for h in FINGERPRINT_HEADERS],
                ]
            ).encode()
        )
        boundary = options.get(b"boundary")
        if kind == b"multipart/form-data" and boundary:
            try:
                self.multipart = _MultipartDigest(boundary, self.digest)
            except ValueError:
                self.malformed = True

    def feed(self, chunk: bytes) -> None:
        if self.multipart is not None and not self.malformed:
            try:
                self.multipart.write(chunk)
                return
            except MultipartParseError:
                self.malformed = True  # the route answers 400; hash the rest as it is
        self.digest.update(chunk)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


@dataclass
class Stored:
    """A stored first answer."""

    fingerprint: str
    status: int
    headers: list[list[str]]
    body: bytes


async def _lookup(db: Any, key: str, since: float) -> Stored | None:
    row = await db._read_one(
        "SELECT fingerprint, status, headers, body FROM idempotency_keys "
        "WHERE key = ? AND created_at >= ?",
        (key, since),
    )
    if row is None:
        return None
    return Stored(row["fingerprint"], row["status"], json.loads(row["headers"]), row["body"])


async def _store(db: Any, key: str, stored: Stored, now: float, ttl: float) -> None:
    await db._write("DELETE FROM idempotency_keys WHERE created_at < ?", (now - ttl,))
    await db._write(
        "INSERT OR REPLACE INTO idempotency_keys "
        "(key, fingerprint, status, headers, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (key, stored.fingerprint, stored.status, json.dumps(stored.headers), stored.body, now),
    )


class Idempotency:
    """ASGI middleware: replays the first answer to a repeated Idempotency-Key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not PATHS.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        raw_key = dict(scope["headers"]).get(HEADER.encode())
        if raw_key is None:
            await self.app(scope, receive, send)
            return
        key = raw_key.decode("latin-1").strip()
        if not KEY_PATTERN.match(key):
            for message in _answer(
                400, "Idempotency-Key must be 1 to 255 visible ASCII characters."
            ):
                await send(message)
            return
        try:
            await require_token(Request(scope))
        except ApiError:
            await self.app(scope, receive, send)  # the route answers 401/403 itself
            return
        app = scope["app"]
        db = app.state.manager.db
        ttl = app.state.settings.idempotency_ttl
        fingerprint = Fingerprint(scope)
        stored = await _lookup(db, key, time.time() - ttl)
        if stored is not None:
            await self._replay(stored, fingerprint, key, receive, send)
            return
        if key in self.in_flight:
            for message in _answer(
                409,
                "A request with this Idempotency-Key is still being handled; "
                "send it again when that one has been answered.",
                {"Retry-After": "5"},
            ):
                await send(message)
            return
        self.in_flight.add(key)
        try:
            await self._first(scope, receive, send, fingerprint, key, db, ttl)
        finally:
            self.in_flight.discard(key)

    async def _replay(
        self, stored: Stored, fingerprint: Fingerprint, key: str, receive: Receive, send: Send
    ) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            fingerprint.feed(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if fingerprint.hexdigest() != stored.fingerprint:
            for message in _answer(
                422,
                f"Idempotency-Key {key!r} was used before with a different request; "
                "use a new key for a new request.",
            ):
                await send(message)
            return
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored.headers]
        headers += [
            (b"content-length", str(len(stored.body)).encode()),
            (b"idempotent-replayed", b"true"),
        ]
        await send({"type": "http.response.start", "status": stored.status, "headers": headers})
        await send({"type": "http.response.body", "body": stored.body, "more_body": False})

    async def _first(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        fingerprint: Fingerprint,
        key: str,
        db: Any,
        ttl: float,
    ) -> None:
        body_done = False
        disconnected = False
        status = 0
        headers: list[list[str]] = []
        body = bytearray()
        storable = True

        async def tee_receive() -> Message:
            nonlocal body_done, disconnected
            message = await receive()
            if message["type"] == "http.request":
                fingerprint.feed(message.get("body", b""))
                body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def capture_send(message: Message) -> None:
            nonlocal status, headers, storable
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    [k.decode("latin-1"), v.decode("latin-1")]
                    for k, v in message.get("headers", [])
                    if k.lower() not in SKIPPED_HEADERS
                ]
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if len(body) > MAX_STORED_BODY:
                    storable = False
                    del body[:]
                if not message.get("more_body", False) and 200 <= status < 300 and storable:
                    # Stored before the client has the answer: a retry sent the moment it
                    # arrives is a replay, not a 409.
                    while not body_done and not disconnected:  # a route that left its body
                        await tee_receive()
                    if body_done:
                        stored = Stored(fingerprint.hexdigest(), status, headers, bytes(body))
                        await _store(db, key, stored, time.time(), ttl)
            await send(message)

        await self.app(scope, tee_receive, capture_send)


def install(app: FastAPI) -> None:
    """Honour Idempotency-Key on the submit routes (outermost middleware)."""
    app.add_middleware(Idempotency)
    app.state.idempotency = True
