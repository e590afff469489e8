"""Resumable uploads with the tus 1.0 protocol (core, creation, termination, expiration), at
/uploads/. A dropped connection resumes where the server's copy stopped: the client asks with
HEAD and sends the rest with PATCH.

Each upload lives in its own folder, `temp_workspace/uploads/{upload_id}/`, never in a task
folder: `data` (the bytes received so far; its size is the upload's offset) and `info.json`
(the declared length, the metadata, when it expires). When the last byte arrives the upload
passes the same checks as POST /upload (its parameters from the tus metadata by
`upload_params`, the content probe) and `data` is moved into a new task folder as
`input.<ext>`; only then does the task exist. A finished upload keeps its `info.json` (with
the task's id) until it expires, so a client whose last answer was lost learns the task by
HEAD. An upload that sends nothing for `resumable_upload_expiry` seconds is removed by the
`tus-expiry` loop, folder and all.

Limits are those of POST /upload: the declared length at most `max_upload_bytes` (413), the
free disk with the bytes every unfinished upload still expects counted as taken (507; each
holds a DiskReservation from creation until it ends), PATCHes at once at most
`max_concurrent_uploads` (503), and the API token (the router is included behind it).

Why not tuspyserver (4.4.3): its router stores files in its own layout and finishes uploads in
a callback after answering, so the content probe's 415, the parameters' 422 and the task id
could not be the answer to the last PATCH; it has no notion of our disk reservations or
free-disk floor, answers errors in its own shape rather than `{"detail"}`, and expires uploads
only when asked to. The protocol's core is small; it is implemented here.

Routes (behind the token):

    OPTIONS /uploads/              the server's tus version, extensions and max size
    POST    /uploads/              create: Upload-Length, Upload-Metadata -> 201 Location
    HEAD    /uploads/{id}          Upload-Offset, Upload-Length (and Upload-Task-Id once done)
    PATCH   /uploads/{id}          append at Upload-Offset; the last one creates the task
    DELETE  /uploads/{id}          termination: the upload and its bytes are removed
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import json
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Annotated, Any

import aiofiles
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from training_server_deps import Manager, Settings, require_token
from training_server_limits import RETRY_AFTER_S, DiskReservations, Reservation
from training_server_models import (
    ApiError,
    BadRequestError,
    ConflictError,
    ErrorBody,
    InsufficientStorageError,
    NotFoundError,
    PayloadTooLargeError,
    ServerConfig,
    ServiceUnavailableError,
    UnsupportedMediaError,
)
from training_server_upload import (
    DISK_CHECK_EVERY,
    UPLOAD_FIELDS,
    check_free_disk,
    probe_video,
    upload_params,
)
from training_server_utils import human_bytes, sanitize_filename

log = logging.getLogger("training_server")

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,termination,expiration"
OFFSET_TYPE = "application/offset+octet-stream"
UPLOADS_DIR = "uploads"
INFO_FILE = "info.json"
DATA_FILE = "data"
MAX_METADATA_BYTES = 4096
LOCK_WAIT_S = 10.0  # how long a request waits for another one on the same upload
SWEEP_MAX_INTERVAL = 600.0


class PreconditionFailedError(ApiError):
    """The client speaks another tus version (412)."""

    status_code = 412


class LockedError(ApiError):
    """Another request is writing to this upload (423)."""

    status_code = 423


@dataclass
class UploadInfo:
    """What info.json holds about one upload."""

    id: str
    length: int
    metadata: str  # the Upload-Metadata header as the client sent it
    fields: dict[str, str]  # the upload's parameters (query, then tus metadata)
    filename: str | None
    created: float
    expires: float
    task_id: str | None = None

    def expires_header(self) -> str:
        return formatdate(self.expires, usegmt=True)


def parse_metadata(header: str) -> dict[str, str]:
    """Upload-Metadata: comma-separated `key base64value` pairs (the value may be absent);
    400 when it is malformed, too long or names a key twice."""
    if len(header) > MAX_METADATA_BYTES:
        raise BadRequestError(f"Upload-Metadata is longer than {MAX_METADATA_BYTES} bytes.")
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, value = pair.partition(" ")
        if not key or " " in value.strip() or key in out:
            raise BadRequestError(f"Upload-Metadata is malformed at {pair[:40]!r}.")
        try:
            out[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequestError(f"Upload-Metadata value of {key!r} is not base64.") from None
    return out


def _int_header(request: Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise BadRequestError(f"{name} must be a non-negative integer.")
    return int(value)


def _tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, **extra}


def _check_version(request: Request) -> None:
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise PreconditionFailedError(
            f"Send Tus-Resumable: {TUS_VERSION} (the tus version this server speaks).",
            headers={"Tus-Version": TUS_VERSION},
        )


@dataclass
class TusStore:
    """The unfinished and recently finished uploads under `root`, their locks and disk
    reservations."""

    settings: ServerConfig
    root: Path
    reservations: DiskReservations
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # Set to ask the request that holds an upload's lock to stop: a client that resumes
    # takes over from one whose connection died without a word (half-open, as on a phone
    # that lost its network), which would otherwise hold the lock until the idle timeout.
    stop_requests: dict[str, asyncio.Event] = field(default_factory=dict)
    held: dict[str, Reservation] = field(default_factory=dict)
    writing: int = 0

    def folder(self, upload_id: str) -> Path:
        return self.root / upload_id

    # -- info.json ------------------------------------------------------------------------

    def _read(self, upload_id: str) -> UploadInfo | None:
        try:
            raw = json.loads((self.folder(upload_id) / INFO_FILE).read_text())
            return UploadInfo(**raw)
        except (OSError, ValueError, TypeError):
            return None

    def _write(self, info: UploadInfo) -> None:
        folder = self.folder(info.id)
        temp = folder / (INFO_FILE + ".tmp")
        temp.write_text(json.dumps(asdict(info)))
        temp.replace(folder / INFO_FILE)  # atomic: a crash leaves the old or the new

    def offset(self, info: UploadInfo) -> int:
        if info.task_id is not None:
            return info.length
        try:
            return (self.folder(info.id) / DATA_FILE).stat().st_size
        except FileNotFoundError:
            return 0

    async def get(self, upload_id: str) -> UploadInfo:
        """The upload's info; 404 when unknown or expired (an expired one is removed now)."""
        info = await asyncio.to_thread(self._read, upload_id)
        if info is None:
            raise NotFoundError(f"No upload with id {upload_id} (finished long ago or expired).")
        if info.expires <= time.time():
            await self.remove(upload_id)
            raise NotFoundError(f"The upload {upload_id} expired and was removed.")
        return info

    async def save(self, info: UploadInfo) -> None:
        await asyncio.to_thread(self._write, info)

    # -- life cycle -----------------------------------------------------------------------

    async def create(self, length: int, metadata: str, fields: dict[str, str]) -> UploadInfo:
        """A new upload's folder with an empty `data` and its info; the free disk is checked
        and `length` bytes reserved in the same step (no await in between)."""
        # The parent (temp_dir) is on the same disk; the uploads folder is made with the first
        # upload, so a server that never took one leaves the workspace as it found it.
        check_free_disk(
            self.root.parent, length, self.settings.min_free_bytes, self.reservations.others()
        )
        upload_id = uuid.uuid4().hex
        self.held[upload_id] = self.reservations.reserve(length)
        now = time.time()
        info = UploadInfo(
            id=upload_id,
            length=length,
            metadata=metadata,
            fields=fields,
            filename=sanitize_filename(fields.get("filename")),
            created=now,
            expires=now + self.settings.resumable_upload_expiry,
        )

        def make() -> None:
            folder = self.folder(upload_id)
            folder.mkdir(parents=True)
            (folder / DATA_FILE).touch()
            self._write(info)

        try:
            await asyncio.to_thread(make)
        except BaseException:
            await self.remove(upload_id)
            raise
        return info

    async def remove(self, upload_id: str) -> None:
        """The upload's folder and reservation, gone."""
        reservation = self.held.pop(upload_id, None)
        if reservation is not None:
            reservation.release()
        self.locks.pop(upload_id, None)
        self.stop_requests.pop(upload_id, None)
        await asyncio.to_thread(shutil.rmtree, self.folder(upload_id), True)

    def release(self, upload_id: str) -> None:
        reservation = self.held.pop(upload_id, None)
        if reservation is not None:
            reservation.release()

    @asynccontextmanager
    async def locked(self, upload_id: str) -> AsyncIterator[asyncio.Event]:
        """Hold the upload's lock (one writer at a time), asking its holder to let go first;
        423 after LOCK_WAIT_S. Yields the event that asks this holder to stop."""
        lock = self.locks.setdefault(upload_id, asyncio.Lock())
        if lock.locked() and upload_id in self.stop_requests:
            self.stop_requests[upload_id].set()
        try:
            await asyncio.wait_for(lock.acquire(), LOCK_WAIT_S)
        except TimeoutError:
            raise LockedError(
                "Another request is sending this upload; try again in a moment."
            ) from None
        event = self.stop_requests[upload_id] = asyncio.Event()
        try:
            yield event
        finally:
            if self.stop_requests.get(upload_id) is event:
                del self.stop_requests[upload_id]
            lock.release()

    def restore(self) -> None:
        """At start-up: reserve what each unfinished upload on disk still expects."""
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            info = self._read(folder.name)
            if info is None or info.task_id is not None or folder.name in self.held:
                continue
            reservation = self.reservations.reserve(info.length)
            reservation.received(self.offset(info))
            self.held[info.id] = reservation

    async def sweep(self) -> list[str]:
        """Remove uploads past their expiry (and folders without a readable info.json older
        than the expiry: a creation cut short); returns the removed ids."""
        if not self.root.is_dir():
            return []
        now = time.time()
        removed = []
        for folder in await asyncio.to_thread(lambda: list(self.root.iterdir())):
            lock = self.locks.get(folder.name)
            if lock is not None and lock.locked():
                continue  # being written: not abandoned
            info = await asyncio.to_thread(self._read, folder.name)
            if info is None:
                try:
                    stale = folder.stat().st_mtime + self.settings.resumable_upload_expiry < now
                except FileNotFoundError:
                    continue
                if not stale:
                    continue
            elif info.expires > now:
                continue
            await self.remove(folder.name)
            removed.append(folder.name)
        if removed:
            log.info("removed %d expired resumable uploads: %s", len(removed), removed)
        return removed

    async def run_forever(self) -> None:
        """The `tus-expiry` loop: sweep, sleep, again."""
        interval = min(SWEEP_MAX_INTERVAL, max(0.2, self.settings.resumable_upload_expiry / 10))
        while True:
            try:
                await self.sweep()
            except Exception:  # a bad folder must not end the loop
                log.exception("the resumable-upload expiry sweep failed")
            await asyncio.sleep(interval)


async def get_store(request: Request) -> TusStore:
    """The app's TusStore (made by `install`'s lifespan)."""
    return request.app.state.tus


Store = Annotated[TusStore, Depends(get_store)]
router = APIRouter(tags=["resumable uploads"])


def _upload_id(upload_id: uuid.UUID) -> str:
    return upload_id.hex


UploadId = Annotated[str, Depends(_upload_id)]
# tus answers carry their news in headers; errors are JSON {"detail"} like the rest of the API.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody}
    for code in (400, 401, 404, 409, 410, 412, 413, 415, 422, 423, 503, 507)
}


def _no_body(code: int, what: str) -> dict[int | str, dict[str, Any]]:
    return {code: {"description": what, "content": {}}, **ERRORS}


@router.options("/uploads", include_in_schema=False)
@router.options("/uploads/", status_code=204, responses=_no_body(204, "Tus-Version etc."))
@router.options("/uploads/{upload_id}", include_in_schema=False)
async def options(settings: Settings) -> Response:
    """The tus version, extensions and largest upload this server accepts."""
    return Response(
        status_code=204,
        headers=_tus_headers(
            **{
                "Tus-Version": TUS_VERSION,
                "Tus-Extension": TUS_EXTENSIONS,
                "Tus-Max-Size": str(settings.max_upload_bytes),
            }
        ),
    )


@router.post("/uploads", include_in_schema=False, status_code=201)
@router.post(
    "/uploads/", status_code=201, responses=_no_body(201, "Location: /uploads/{upload_id}")
)
async def create(request: Request, settings: Settings, store: Store) -> Response:
    """Create a resumable upload: `Upload-Length` (bytes), `Upload-Metadata` (tus pairs:
    `filename` and the parameters of POST /upload, e.g. `max_frames`, `preset`); query
    fields are taken too, metadata wins. Answers 201 with its `Location`."""
    _check_version(request)
    if request.headers.get("upload-defer-length") is not None:
        raise BadRequestError("Upload-Defer-Length is not supported: send Upload-Length.")
    length = _int_header(request, "upload-length")
    if length is None:
        raise BadRequestError("Send the video's size in bytes as Upload-Length.")
    if length == 0:
        raise UnsupportedMediaError("The uploaded file is empty.")
    if length > settings.max_upload_bytes:
        raise PayloadTooLargeError(
            f"The upload is larger than the limit of {human_bytes(settings.max_upload_bytes)}."
        )
    header = request.headers.get("upload-metadata", "")
    metadata = parse_metadata(header)
    fields = {k: v for k, v in request.query_params.items() if k in UPLOAD_FIELDS}
    fields.update({k: v for k, v in metadata.items() if k in UPLOAD_FIELDS or k == "filename"})
    upload_params(settings, {}, fields)  # 422 now, not after the last byte
    info = await store.create(length, header, fields)
    return Response(
        status_code=201,
        headers=_tus_headers(
            **{"Location": f"/uploads/{info.id}", "Upload-Expires": info.expires_header()}
        ),
    )


def _state_headers(store: TusStore, info: UploadInfo) -> dict[str, str]:
    headers = _tus_headers(
        **{
            "Upload-Offset": str(store.offset(info)),
            "Upload-Length": str(info.length),
            "Upload-Expires": info.expires_header(),
            "Cache-Control": "no-store",
        }
    )
    if info.task_id is not None:
        headers["Upload-Task-Id"] = info.task_id
    return headers


@router.head("/uploads/{upload_id}", responses=_no_body(200, "Upload-Offset, Upload-Length"))
async def head(upload_id: UploadId, request: Request, store: Store) -> Response:
    """Where the upload stands: `Upload-Offset` (bytes the server has), `Upload-Length`,
    and `Upload-Task-Id` once it is complete and its task made."""
    _check_version(request)
    info = await store.get(upload_id)
    async with store.locked(upload_id):  # a PATCH that is ending: report what it wrote
        info = await store.get(upload_id)
        headers = _state_headers(store, info)
    if info.metadata:
        headers["Upload-Metadata"] = info.metadata
    return Response(status_code=200, headers=headers)


@router.patch(
    "/uploads/{upload_id}",
    status_code=204,
    responses=_no_body(204, "Upload-Offset; Upload-Task-Id once complete"),
)
async def patch(
    upload_id: UploadId, request: Request, settings: Settings, manager: Manager, store: Store
) -> Response:
    """Append the body (`Content-Type: application/offset+octet-stream`) at `Upload-Offset`,
    which must be the server's offset (409 otherwise, with the right one). The last bytes make
    the task: the answer then carries `Upload-Task-Id` and `Location: /status/{id}`, or the
    check's error (415, 422, 507), after which the upload is gone."""
    _check_version(request)
    if request.headers.get("content-type", "").split(";")[0].strip() != OFFSET_TYPE:
        raise UnsupportedMediaError(f"Send the bytes with Content-Type: {OFFSET_TYPE}.")
    offset = _int_header(request, "upload-offset")
    if offset is None:
        raise BadRequestError("Send Upload-Offset: where these bytes start.")
    declared = _int_header(request, "content-length")
    await store.get(upload_id)
    lock = store.locks.get(upload_id)
    taking_over = lock is not None and lock.locked()  # it replaces the request that holds it
    if store.writing >= settings.max_concurrent_uploads and not taking_over:
        raise ServiceUnavailableError(
            f"The server is receiving {store.writing} resumable uploads, its limit "
            f"(TRAINING_SERVER_MAX_CONCURRENT_UPLOADS); try again in a moment.",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    store.writing += 1
    try:
        async with store.locked(upload_id) as release:
            info = await store.get(upload_id)
            current = store.offset(info)
            if offset != current:
                raise ConflictError(
                    f"Upload-Offset is {offset} but the server has {current} bytes; "
                    "ask with HEAD and send from there.",
                    headers=_tus_headers(**{"Upload-Offset": str(current)}),
                )
            if info.task_id is None:
                if declared is not None and offset + declared > info.length:
                    raise PayloadTooLargeError(
                        f"These bytes would go past Upload-Length ({info.length})."
                    )
                gone = await _append(request, store, info, offset, release)
                info.expires = time.time() + settings.resumable_upload_expiry
                if gone:
                    await store.save(info)
                    return Response(status_code=204)  # nobody listens; the bytes are kept
                if store.offset(info) == info.length:
                    await _finish(settings, manager, store, info)
                else:
                    await store.save(info)
            headers = _state_headers(store, info)
    finally:
        store.writing -= 1
    if info.task_id is not None:
        headers["Location"] = f"/status/{info.task_id}"
    return Response(status_code=204, headers=headers)


async def _chunks(request: Request, release: asyncio.Event) -> AsyncIterator[bytes]:
    """The request's body; ends early (ClientDisconnect) when `release` is set, even while
    the client sends nothing."""
    stream = request.stream().__aiter__()
    stop = asyncio.ensure_future(release.wait())
    try:
        while True:
            step = asyncio.ensure_future(anext(stream))
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                log.info("PATCH %s: another request took over the upload", request.url.path)
                raise ClientDisconnect
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        stop.cancel()


async def _append(
    request: Request, store: TusStore, info: UploadInfo, offset: int, release: asyncio.Event
) -> bool:
    """Write the request's body at the end of `data`; True when the client went away or
    another request took over (what arrived is kept). 413 for bytes past the declared
    length, 507 when the disk is short."""
    path = store.folder(info.id) / DATA_FILE
    reservation = store.held.get(info.id)
    written = offset
    next_check = offset + DISK_CHECK_EVERY
    try:
        async with aiofiles.open(path, "ab") as out:
            try:
                async for chunk in _chunks(request, release):
                    if written + len(chunk) > info.length:
                        raise PayloadTooLargeError(
                            f"The bytes go past Upload-Length ({info.length})."
                        )
                    await out.write(chunk)
                    written += len(chunk)
                    if reservation is not None:
                        reservation.received(len(chunk))
                    if written >= next_check:
                        next_check += DISK_CHECK_EVERY
                        mine = reservation.remaining if reservation else 0
                        check_free_disk(
                            store.root,
                            mine,
                            store.settings.min_free_bytes,
                            store.reservations.others(reservation),
                        )
            except ClientDisconnect:
                return True
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorageError(
                "The disk filled up while receiving the upload."
            ) from None
        raise
    return False


async def _finish(settings: ServerConfig, manager: Any, store: TusStore, info: UploadInfo) -> None:
    """The complete upload passes POST /upload's checks and becomes a task; on any error the
    upload and the task folder are removed and the error is the answer."""
    data = store.folder(info.id) / DATA_FILE
    task_id = str(uuid.uuid4())
    task_dir = manager.paths.task_dir(task_id)
    try:
        params, _ = upload_params(settings, {}, info.fields)
        video = await probe_video(settings, data)
        video_name = "input" + video.pop("extension", ".video")
        await asyncio.to_thread(task_dir.mkdir, parents=True)
        await asyncio.to_thread(data.rename, task_dir / video_name)
        await manager.control.create(
            task_id,
            params=params,
            video_filename=video_name,
            video_size=info.length,
            original_filename=info.filename,
            video_info=video,
        )
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, task_dir, True)
        await store.remove(info.id)
        raise
    store.release(info.id)
    info.task_id = task_id
    await store.save(info)  # kept until it expires: HEAD tells a client that lost the answer


@router.delete("/uploads/{upload_id}", status_code=204, responses=_no_body(204, "removed"))
async def terminate(upload_id: UploadId, request: Request, store: Store) -> Response:
    """Termination: the unfinished upload and its bytes are removed (a finished upload's task
    is not touched: DELETE /tasks/{id} removes that)."""
    _check_version(request)
    await store.get(upload_id)
    async with store.locked(upload_id):
        await store.remove(upload_id)
    return Response(status_code=204, headers=_tus_headers())


# -- wiring ----------------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Serve /uploads/ behind the API token and run the store and its `tus-expiry` loop in
    the app's lifespan (after the task manager has started, before it stops)."""
    api = APIRouter(dependencies=[Depends(require_token)])
    api.include_router(router)
    app.include_router(api)
    outer: Callable[[FastAPI], Any] = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
        async with outer(app_) as state:
            store = TusStore(
                settings=app_.state.settings,
                root=app_.state.manager.paths.temp_dir / UPLOADS_DIR,
                reservations=app_.state.disk_reservations,
            )
            await asyncio.to_thread(store.restore)
            app_.state.tus = store
            loop = asyncio.create_task(store.run_forever(), name="tus-expiry")
            try:
                yield state
            finally:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop

    app.router.lifespan_context = lifespan
