"""Uploads: receive a multipart body straight into the task folder (parsed as it streams
with python-multipart's streaming parser, written once, never held in memory, bounded in size,
field count and header size, checked against the free disk while it arrives; one `file` part
or several, each to its own file), read the upload's parameters from query and form alike
(declared once, by `UploadParams`), and check by content that a file is a video (photos and
ZIPs: training_server_sources).
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import aiofiles
from aiofiles.threadpool.binary import AsyncBufferedIOBase
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from training_server_limits import DiskReservations, Reservation
from training_server_models import (
    BadRequestError,
    InsufficientStorageError,
    PayloadTooLargeError,
    UnsupportedMediaError,
)
from training_server_sources import probe_video
from training_server_upload_params import UPLOAD_FIELDS, upload_openapi, upload_params
from training_server_utils import human_bytes, sanitize_filename

# The parameters and the video probe moved to their own modules; kept importable from here.
__all__ = ["UPLOAD_FIELDS", "probe_video", "upload_openapi", "upload_params"]

FILE_FIELD = "file"
MAX_FIELDS = 16
MAX_FILES = 1000  # `file` parts of one upload (several videos or photos of one scene)
MAX_FIELD_BYTES = 1024
MAX_HEADERS_PER_PART = 8
MAX_HEADER_BYTES = 2048
WRITE_BUFFER = 1024 * 1024
DISK_CHECK_EVERY = 64 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small fields around the file


class ClientGoneError(Exception):
    """The client disconnected before the upload was complete."""


@dataclass
class ReceivedFile:
    """One `file` part on disk and its client-side name."""

    path: Path
    size: int = 0
    filename: str | None = None


@dataclass
class ReceivedUpload:
    """What arrived: the first file's bytes on disk and its client-side name, the size of all
    files, every file (`files`, in the order sent), and the form fields."""

    path: Path
    size: int = 0
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    files: list[ReceivedFile] = field(default_factory=list)


def _disposition(value: bytes) -> tuple[str | None, str | None]:
    kind, options = parse_options_header(value)
    if kind != b"form-data":
        return None, None
    name = options.get(b"name")
    filename = options.get(b"filename")
    return (
        name.decode("utf-8", "replace") if name is not None else None,
        filename.decode("utf-8", "replace") if filename is not None else None,
    )


def check_free_disk(folder: Path, needed: int, floor: int, reserved: int = 0) -> None:
    """Raise InsufficientStorageError when writing `needed` bytes would leave under `floor`,
    counting the `reserved` bytes that other uploads in flight have declared as taken."""
    free = shutil.disk_usage(folder).free
    if free - reserved - needed < floor:
        others = (
            f", {human_bytes(reserved)} of it promised to uploads in progress" if reserved else ""
        )
        raise InsufficientStorageError(
            f"Not enough free disk space: {human_bytes(free)} free{others}, the upload needs "
            f"{human_bytes(needed)} plus {human_bytes(floor)} kept free."
        )


class _PartCollector:
    """python-multipart callbacks that sort parts into the file and small fields."""

    def __init__(self) -> None:
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.name: str | None = None
        self.is_file = False
        self.file_seen = False
        self.file_done = False
        self.filenames: list[str | None] = []  # one per `file` part, in order
        self.value = bytearray()
        self.fields: dict[str, str] = {}
        # The files' data not written yet: (file number, view into the received chunk).
        self.file_chunks: list[tuple[int, memoryview | bytes]] = []
        self.file_pending = 0
        self.parts = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FIELDS + MAX_FILES:
            raise BadRequestError(
                f"Too many form parts: at most {MAX_FIELDS} fields and {MAX_FILES} files."
            )
        self.headers = {}
        self.name = None
        self.is_file = False
        self.value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]
        if len(self.header_value) > MAX_HEADER_BYTES:
            raise BadRequestError("A part header of the upload is too long.")

    def on_header_end(self) -> None:
        self.headers[bytes(self.header_field).strip().lower()] = bytes(self.header_value).strip()
        self.header_field = bytearray()
        self.header_value = bytearray()

    def on_headers_finished(self) -> None:
        name, filename = _disposition(self.headers.get(b"content-disposition", b""))
        if name is None:
            raise BadRequestError("Every form part needs a Content-Disposition with a name.")
        self.name = name
        if name == FILE_FIELD:
            self.file_seen = True
            self.file_done = False
            self.is_file = True
            self.filenames.append(filename)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.is_file:
            # The request's chunks are immutable bytes: keep views into them, not copies.
            index = len(self.filenames) - 1
            if isinstance(data, bytes):
                self.file_chunks.append((index, memoryview(data)[start:end]))
            else:
                self.file_chunks.append((index, bytes(data[start:end])))
            self.file_pending += end - start
        else:
            self.value += data[start:end]
            if len(self.value) > MAX_FIELD_BYTES:
                raise BadRequestError(f"Form field {self.name!r} is too long.")

    def on_part_end(self) -> None:
        if self.is_file:
            self.file_done = True
        elif self.name is not None:
            if len(self.fields) >= MAX_FIELDS:
                raise BadRequestError(f"Too many form fields: at most {MAX_FIELDS}.")
            self.fields[self.name] = self.value.decode("utf-8", "replace")


async def receive_upload(
    request: Request, target: Path, *, max_bytes: int, min_free_bytes: int
) -> ReceivedUpload:
    """Stream the request's multipart body; the first `file` part goes to `target`, any
    further ones beside it (`upload-1.part`, ...).

    Raises an ApiError subclass (400, 413, 415, 507) or ClientGoneError; the caller removes
    `target` on any error.
    """
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaError(
            "Send the video as multipart/form-data in a field named 'file', "
            "for example: curl -F file=@video.mp4 http://HOST:PORT/upload"
        )
    too_large = PayloadTooLargeError(
        f"The upload is larger than the limit of {human_bytes(max_bytes)}."
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequestError("Content-Length is not a number.") from None
        if length > max_bytes + MULTIPART_OVERHEAD:
            raise too_large
    else:
        length = 0
    # Uploads in flight have promised their declared sizes: count them as taken (no await
    # between the check and the reservation, so two uploads cannot both take the last space).
    reservations: DiskReservations = (
        getattr(request.app.state, "disk_reservations", None) or DiskReservations()
    )
    check_free_disk(target.parent, length, min_free_bytes, reservations.others())
    reservation = reservations.reserve(length)
    try:
        return await _receive_upload(
            request,
            target,
            parser_boundary=boundary,
            max_bytes=max_bytes,
            min_free_bytes=min_free_bytes,
            reservation=reservation,
            too_large=too_large,
        )
    finally:
        reservation.release()


async def _receive_upload(
    request: Request,
    target: Path,
    *,
    parser_boundary: bytes,
    max_bytes: int,
    min_free_bytes: int,
    reservation: Reservation,
    too_large: PayloadTooLargeError,
) -> ReceivedUpload:
    """The body of receive_upload, with the upload's disk reservation held."""
    boundary = parser_boundary
    reservations = reservation.owner

    collector = _PartCollector()
    try:
        parser = MultipartParser(
            boundary,
            collector.callbacks(),  # type: ignore[arg-type]
            max_header_count=MAX_HEADERS_PER_PART,
            max_header_size=MAX_HEADER_BYTES,
        )
    except ValueError as exc:
        raise BadRequestError(f"Bad multipart boundary: {exc}") from None
    result = ReceivedUpload(path=target)

    async def _receive_into(out: _Files) -> None:
        received = 0
        next_disk_check = DISK_CHECK_EVERY
        try:
            async for chunk in request.stream():
                received += len(chunk)
                reservation.received(len(chunk))
                if received > max_bytes + MULTIPART_OVERHEAD:
                    raise too_large
                try:
                    parser.write(chunk)
                except MultipartParseError as exc:
                    raise BadRequestError(f"The multipart body is malformed: {exc}") from None
                if result.size + collector.file_pending > max_bytes:
                    raise too_large
                if collector.file_pending >= WRITE_BUFFER or (
                    collector.file_done and collector.file_pending
                ):
                    result.size += await _flush(out, collector)
                    if result.size >= next_disk_check:
                        next_disk_check += DISK_CHECK_EVERY
                        others = reservations.others(reservation) if reservations else 0
                        check_free_disk(
                            target.parent, reservation.remaining, min_free_bytes, others
                        )
        except ClientDisconnect:
            raise ClientGoneError from None
        if collector.file_pending:
            result.size += await _flush(out, collector)

    files = _Files(target)
    try:
        try:
            await _receive_into(files)
        finally:
            await files.close()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorageError(
                "The disk filled up while receiving the upload."
            ) from None
        raise
    if parser.state != MultipartState.END:
        raise BadRequestError("The upload ended before the multipart body was complete.")
    if not collector.file_seen:
        raise BadRequestError("No video in the upload: send it in a form field named 'file'.")
    result.files = [
        ReceivedFile(files.path(k), files.sizes.get(k, 0), name)
        for k, name in enumerate(collector.filenames)
    ]
    for received in result.files:
        if received.size == 0:
            raise UnsupportedMediaError(
                "The uploaded file is empty."
                if len(result.files) == 1
                else f"The uploaded file {sanitize_filename(received.filename)} is empty."
            )
    result.filename = collector.filenames[0]
    result.fields = collector.fields
    return result


class _Files:
    """The upload's files on disk, opened one after the other as their parts arrive."""

    def __init__(self, first: Path) -> None:
        self.first = first
        self.sizes: dict[int, int] = {}
        self.index = -1
        self.out: AsyncBufferedIOBase | None = None

    def path(self, index: int) -> Path:
        return self.first if index == 0 else self.first.with_name(f"upload-{index}.part")

    async def write(self, index: int, chunks: list[memoryview | bytes]) -> None:
        if index != self.index:
            await self.close()
            self.out = await aiofiles.open(self.path(index), "wb")
            self.index = index
        assert self.out is not None
        await self.out.writelines(chunks)
        self.sizes[index] = self.sizes.get(index, 0) + sum(len(c) for c in chunks)

    async def close(self) -> None:
        if self.out is not None:
            await self.out.close()
            self.out = None


async def _flush(out: _Files, collector: _PartCollector) -> int:
    """Write the files' pending chunks (a worker-thread hop per file); returns the bytes."""
    chunks, size = collector.file_chunks, collector.file_pending
    collector.file_chunks, collector.file_pending = [], 0
    run: list[memoryview | bytes] = []
    for k, (index, chunk) in enumerate(chunks):
        run.append(chunk)
        if k + 1 == len(chunks) or chunks[k + 1][0] != index:
            await out.write(index, run)
            run = []
    return size
