"""Uploads: receive a multipart body straight into the task folder (parsed as it streams
with python-multipart's streaming parser, written once, never held in memory, bounded in size,
field count and header size, checked against the free disk while it arrives), read the upload's
parameters from query and form alike (declared once, by `UploadParams`), and check by content
that the file is a video.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
from aiofiles.threadpool.binary import AsyncBufferedIOBase
from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

import training_server_trainer as trainer
from training_server_limits import DiskReservations, Reservation
from training_server_models import (
    HERE,
    BadRequestError,
    InsufficientStorageError,
    PayloadTooLargeError,
    ServerConfig,
    TaskParams,
    UnprocessableError,
    UnsupportedMediaError,
    UploadParams,
)
from training_server_process import run_captured
from training_server_utils import human_bytes, readable_errors
from training_server_webhooks import check_webhook_url

FILE_FIELD = "file"
MAX_FIELDS = 16
MAX_FIELD_BYTES = 1024
MAX_HEADERS_PER_PART = 8
MAX_HEADER_BYTES = 2048
WRITE_BUFFER = 1024 * 1024
DISK_CHECK_EVERY = 64 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small fields around the file


class ClientGoneError(Exception):
    """The client disconnected before the upload was complete."""


@dataclass
class ReceivedUpload:
    """What arrived: the file's bytes on disk, its client-side name, and the form fields."""

    path: Path
    size: int = 0
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


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
        self.filename: str | None = None
        self.value = bytearray()
        self.fields: dict[str, str] = {}
        # The file's data not written yet: views into the received chunks (no copy).
        self.file_chunks: list[memoryview | bytes] = []
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
        if self.parts > MAX_FIELDS + 1:
            raise BadRequestError(f"Too many form parts: at most {MAX_FIELDS} fields and a file.")
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
            if self.file_seen:
                raise BadRequestError("Send one video per upload.")
            self.file_seen = True
            self.is_file = True
            self.filename = filename

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.is_file:
            # The request's chunks are immutable bytes: keep views into them, not copies.
            if isinstance(data, bytes):
                self.file_chunks.append(memoryview(data)[start:end])
            else:
                self.file_chunks.append(bytes(data[start:end]))
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
    """Stream the request's multipart body; the `file` part goes to `target`.

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

    async def _receive_into(out: AsyncBufferedIOBase) -> None:
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

    try:
        async with aiofiles.open(target, "wb") as out:
            await _receive_into(out)
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
    if result.size == 0:
        raise UnsupportedMediaError("The uploaded file is empty.")
    result.filename = collector.filename
    result.fields = collector.fields
    return result


async def _flush(out: AsyncBufferedIOBase, collector: _PartCollector) -> int:
    """Write the file's pending chunks (one worker-thread hop); returns the bytes written."""
    chunks, size = collector.file_chunks, collector.file_pending
    collector.file_chunks, collector.file_pending = [], 0
    await out.writelines(chunks)
    return size


# -- the upload's parameters and the content probe ------------------------------------------

# Accepted under the seed's name as well: start_training means auto_training.
SEED_ALIASES = {"start_training": "auto_training"}
UPLOAD_FIELDS = frozenset(UploadParams.model_fields) | frozenset(SEED_ALIASES)


def upload_params(
    settings: ServerConfig, query: Mapping[str, str], form: Mapping[str, str]
) -> tuple[TaskParams, bool]:
    """The task's parameters from the upload's query and form fields (form wins; unknown
    names are ignored), validated once by `UploadParams`; 422 in words otherwise."""
    data: dict[str, str] = {}
    for source in (query, form):
        for name, value in source.items():
            if name in UPLOAD_FIELDS:
                key = SEED_ALIASES.get(name, name)
                if key != name and key in source:
                    continue  # the new name given beside the old one wins
                data[key] = value
    try:
        upload = UploadParams.model_validate(data)
    except ValidationError as exc:
        raise UnprocessableError(readable_errors(list(exc.errors()))) from None
    check_webhook_url(settings, upload.webhook_url)
    max_frames = upload.max_frames or max(settings.default_max_frames, upload.min_frames or 0)
    min_frames = upload.min_frames or min(settings.default_min_frames, max_frames)
    if min_frames > max_frames:
        raise UnprocessableError("min_frames must not be larger than max_frames")
    iterations = trainer.resolve_iterations(
        upload.iterations, upload.preset, settings.trainer_iterations
    )
    passed = {
        name: value
        for name, value in upload.model_dump().items()
        if name in TaskParams.model_fields and name not in _RESOLVED
    }
    params = TaskParams(
        **passed,
        max_frames=max_frames,
        min_frames=min_frames,
        auto_training=upload.auto_training,
        iterations=iterations,
    )
    return params, upload.auto_training


_RESOLVED = frozenset({"max_frames", "min_frames", "auto_training", "iterations"})


def upload_openapi() -> dict[str, Any]:
    """The OpenAPI description of POST /upload's body and query, from `UploadParams`."""
    fields = UploadParams.model_json_schema().get("properties", {})
    fields = {**fields, "start_training": {"type": "boolean", "description": "= auto_training"}}
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in fields.items()
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    }
                }
            },
        },
    }


async def probe_video(settings: ServerConfig, path: Path) -> dict[str, Any]:
    """Check by content that `path` is a decodable video (in a subprocess); 415 otherwise."""
    outcome, output = await run_captured(
        [
            sys.executable,
            "-m",
            "pipeline.probe",
            "--timeout",
            str(settings.probe_timeout),
            str(path),  # absolute: the task folders are under the resolved temp_dir
        ],
        cwd=HERE,  # where the pipeline package is
        timeout_s=settings.probe_timeout,
    )
    lines = output.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if outcome.timed_out:
        raise UnsupportedMediaError("Checking the video took too long; is it a valid video?")
    if outcome.returncode == 0 and "width" in answer:
        return answer
    reason = answer.get("error") or "The file could not be read as a video."
    raise UnsupportedMediaError(reason)
