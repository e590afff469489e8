"""Limits on what a client may hold: uploads at once, the time a request body may stay silent,
the disk that uploads in flight have declared, and the size and time of a request's headers.

- `UploadLimits` (ASGI middleware): at most `max_concurrent_uploads` POST /upload at once
  (503 with Retry-After beyond, before a byte of the body is read); a request body that sends
  nothing for `upload_idle_timeout` seconds is cut: the app sees a disconnect (so the upload
  route removes its folder) and the client, if it still listens, gets 408.
- `DiskReservations`: the bytes that uploads in flight still expect to write, which the
  free-disk check counts as taken.
- `GuardedH11Protocol` (uvicorn protocol): uvicorn's h11 protocol with the request line and
  headers bounded in bytes (h11's max incomplete event size, given by uvicorn's settings) and
  in time (`header_timeout`, from the first byte of a request, or the connection's start, to
  the end of its headers); httptools has no such bounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

log = logging.getLogger("training_server")

UPLOAD_PATH = "/upload"
RETRY_AFTER_S = 10


# -- disk reserved by uploads in flight ----------------------------------------------------


@dataclass(eq=False)
class Reservation:
    """One upload's declared size, less what it has received so far."""

    remaining: int
    owner: DiskReservations | None = field(default=None, repr=False)

    def received(self, count: int) -> None:
        self.remaining = max(0, self.remaining - count)

    def release(self) -> None:
        if self.owner is not None:
            self.owner.active.discard(self)
            self.owner = None


@dataclass
class DiskReservations:
    """The uploads in flight, each with the bytes it still expects to write."""

    active: set[Reservation] = field(default_factory=set)

    def others(self, mine: Reservation | None = None) -> int:
        """Bytes reserved by every upload but `mine`."""
        return sum(r.remaining for r in self.active if r is not mine)

    def reserve(self, size: int) -> Reservation:
        reservation = Reservation(size, self)
        self.active.add(reservation)
        return reservation


# -- uploads at once, and silent request bodies ---------------------------------------------


def _json_response(status: int, detail: str, headers: dict[str, str]) -> list[Message]:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


class UploadLimits:
    """ASGI middleware: caps uploads at once and cuts request bodies that go silent."""

    def __init__(self, app: ASGIApp, *, max_uploads: int, idle_timeout: float) -> None:
        self.app = app
        self.max_uploads = max_uploads
        self.idle_timeout = idle_timeout
        self.uploads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH
        if is_upload and self.uploads >= self.max_uploads:
            for message in _json_response(
                503,
                f"The server is receiving {self.uploads} uploads, its limit "
                f"(TRAINING_SERVER_MAX_CONCURRENT_UPLOADS); try again in a moment.",
                {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"},
            ):
                await send(message)
            return
        if is_upload:
            self.uploads += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            if is_upload:
                self.uploads -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_done = False
        timed_out = False
        answered = False

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out
            if timed_out:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout)
            except TimeoutError:
                timed_out = True
                log.warning(
                    "%s %s sent nothing for %g s (TRAINING_SERVER_UPLOAD_IDLE_TIMEOUT): dropped",
                    scope["method"],
                    scope["path"],
                    self.idle_timeout,
                )
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if answered:
                return
            if timed_out and message["type"] == "http.response.start":
                answered = True
                for ours in _json_response(
                    408,
                    f"The request body sent nothing for {self.idle_timeout:g} s; send it again.",
                    {"Connection": "close"},
                ):
                    await send(ours)
                return
            await send(message)

        await self.app(scope, timed_receive, guarded_send)


# -- the header phase ------------------------------------------------------------------------

REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: 30\r\n\r\nThe request headers were late.\n"
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's line and headers."""

    header_timeout: float = 15.0

    def __init__(self, config: Config, server_state: ServerState, *args: Any, **kw: Any) -> None:
        super().__init__(config, server_state, *args, **kw)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()  # a request's headers have begun and are not complete
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE:
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def guarded_h11(header_timeout: float) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http=` setting, with this header deadline."""
    return type("GuardedH11", (GuardedH11Protocol,), {"header_timeout": header_timeout})
