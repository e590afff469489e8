"""Result routes: the trained model or the COLMAP dataset as a streamed ZIP, the .ply alone
for viewers, and cheap previews of the dataset for the web page (the kept frames, their
thumbnails and the sparse point cloud with the camera poses). Nothing outside a task's folders
is ever served (symlinks are skipped)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.responses import MalformedRangeHeader, Response, StreamingResponse
from zipstream import ZipStream

import training_server_preview as preview
import training_server_trainer_output as trainer_output
from training_server_deps import Manager, TaskId, require_token
from training_server_models import (
    ApiError,
    ConflictError,
    ErrorBody,
    GoneError,
    NotFoundError,
    TaskPublic,
    TaskStatus,
)
from training_server_utils import (
    DATASET_DIR,
    SUMMARY_NAME,
    content_disposition,
    download_name,
    safe_files,
)

router = APIRouter(dependencies=[Depends(require_token)])
# Every error answer is JSON {"detail": ...} (training_server.py's handlers).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 410, 422)
}
SPARSE_SCHEMA = {
    "type": "object",
    "description": "points (total, count, positions, colors), cameras (name, center, "
    "direction, up), view, scene (the upright frame, or null)",
    "properties": {
        "points": {"type": "object"},
        "cameras": {"type": "array", "items": {"type": "object"}},
        "scene": {"type": ["object", "null"]},
    },
}


def _zip_response(files: list[tuple[Path, str]], filename: str, *, head: bool = False) -> Response:
    archive = ZipStream(sized=True)
    for path, arcname in files:
        archive.add_path(str(path), arcname, recurse=False)
    headers = {
        "Content-Disposition": content_disposition(filename),
        "Content-Length": str(len(archive)),
    }
    if head:  # the headers a GET would have, without building the archive
        return Response(media_type="application/zip", headers=headers)
    return StreamingResponse(_iterate(archive), media_type="application/zip", headers=headers)


class WholeFileOnBadRange(FileResponse):
    """A FileResponse that serves the whole file when the Range header is invalid, as RFC
    9110 (14.2) asks, instead of answering 400; an unsatisfiable range still gets 416."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []


def _iterate(archive: ZipStream, batch: int = 1024 * 1024) -> Iterator[bytes]:
    """The archive in pieces of about `batch` bytes: Starlette runs each step of a plain
    iterator in a worker thread, so zipstream's 64 KiB pieces would cost a thread round trip
    each (joining them made a 2 GiB download 2.5 times faster in bench/download.py)."""
    pieces: list[bytes] = []
    size = 0
    for piece in archive:
        pieces.append(piece)
        size += len(piece)
        if size >= batch:
            yield b"".join(pieces)
            pieces, size = [], 0
    if pieces:
        yield b"".join(pieces)


@router.api_route(
    "/download/{task_id}",
    methods=["GET", "HEAD"],
    responses={200: {"content": {"application/zip": {}}}, **ERRORS},
)
async def download(request: Request, task_id: TaskId, manager: Manager) -> Response:
    """A ZIP of the result: the trained model once training_completed (named
    `{id}_output.zip`, as the original server named it), else the COLMAP dataset whenever the
    task has one (`results.dataset`: after preprocessing, during and after training)."""
    task = await manager.records.public(task_id)
    if task.expired:
        raise GoneError("The task's files were removed by the cleanup.")
    if task.results.model:
        output_dir = manager.paths.output_dir(task_id)
        files = await asyncio.to_thread(
            trainer_output.result_files, output_dir, task.params.keep_checkpoint
        )
        filename = f"{task_id}_output.zip"
    elif task.results.dataset:
        task_dir = manager.paths.task_dir(task_id)
        files = await asyncio.to_thread(safe_files, task_dir / DATASET_DIR, DATASET_DIR)
        summary = task_dir / SUMMARY_NAME
        if summary.is_file() and not summary.is_symlink():
            files.append((summary, SUMMARY_NAME))
        filename = download_name(task.original_filename, task_id, "_dataset.zip")
    else:
        raise ConflictError(
            f"Nothing to download yet: the task is {task.status.value}. A ZIP is ready once "
            "it is preprocessing_completed (the dataset) or training_completed (the model)."
        )
    if not files:
        raise GoneError("The task's result files are missing.")
    return _zip_response(files, filename, head=request.method == "HEAD")


@router.api_route(
    "/download/{task_id}/ply",
    methods=["GET", "HEAD"],
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
async def download_ply(task_id: TaskId, manager: Manager) -> FileResponse:
    """The trained model's final .ply alone, for splat viewers."""
    task = await manager.records.public(task_id)
    if task.expired:
        raise GoneError("The task's files were removed by the cleanup.")
    if task.status != TaskStatus.TRAINING_COMPLETED:
        raise ConflictError(
            f"No model yet: the task is {task.status.value}; a .ply exists once it is "
            "training_completed."
        )
    output_dir = manager.paths.output_dir(task_id)
    relative = ((task.metadata or {}).get("training") or {}).get("ply_path")
    path = (output_dir / relative) if relative else None
    if path is None or not _inside(path, output_dir) or not path.is_file():
        raise GoneError("The model file is missing.")
    return WholeFileOnBadRange(
        path,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": content_disposition(
                download_name(task.original_filename, task_id, ".ply")
            )
        },
    )


def _inside(path: Path, root: Path) -> bool:
    """Whether `path` resolves inside `root` (symlinks followed) and is no symlink itself."""
    with contextlib.suppress(OSError):
        return not path.is_symlink() and path.resolve().is_relative_to(root.resolve())
    return False


# -- dataset previews for the web page -----------------------------------------------------

# While these run, the dataset is missing or being rewritten.
NO_DATASET_YET = {TaskStatus.PENDING, TaskStatus.PREPROCESSING}
IMMUTABLE = "private, max-age=31536000, immutable"


class FrameInfo(BaseModel):
    """One kept frame of a task's dataset and where to fetch it."""

    name: str
    size_bytes: int
    url: str  # the frame itself
    thumbnail_url: str  # a JPEG at most 256 pixels on its long side


class FrameList(BaseModel):
    """GET /tasks/{task_id}/frames."""

    task_id: str
    count: int
    frames: list[FrameInfo]


class PreviewUnreadableError(ApiError):
    """The task's dataset exists but cannot be read (500)."""

    status_code = 500


async def _dataset_task(manager: Manager, task_id: str) -> TaskPublic:
    """The task, when its dataset can be previewed: 410 after the cleanup, 409 while the
    dataset is not written yet."""
    task = await manager.records.public(task_id)
    if task.expired:
        raise GoneError("The task's files were removed by the cleanup.")
    if task.status in NO_DATASET_YET:
        raise ConflictError(
            f"No dataset yet: the task is {task.status.value}. Frames and the point cloud "
            "can be seen once preprocessing has completed."
        )
    return task


def _not_modified(request: Request, etag: str) -> bool:
    return etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}


@router.get("/tasks/{task_id}/frames", response_model=FrameList, responses=ERRORS)
async def frames(task_id: TaskId, manager: Manager) -> FrameList:
    """The frames kept for the dataset (`images_undistorted/images`), sorted by name, with
    URLs of each frame and of its thumbnail (the URLs change when the frame does)."""
    await _dataset_task(manager, task_id)
    found = await asyncio.to_thread(preview.list_frames, manager.paths.dataset_dir(task_id))
    if not found:
        raise ConflictError("This task has no frames: preprocessing did not write a dataset.")
    base = f"/tasks/{task_id}/frames"
    items = []
    for frame in found:
        url = f"{base}/{quote(frame.name)}?v={frame.mtime_ns:x}"
        items.append(
            FrameInfo(
                name=frame.name,
                size_bytes=frame.size,
                url=url,
                thumbnail_url=f"{url}&size=256",
            )
        )
    return FrameList(task_id=task_id, count=len(items), frames=items)


@router.get(
    "/tasks/{task_id}/frames/{name}",
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **ERRORS},
)
async def frame(
    task_id: TaskId,
    name: str,
    manager: Manager,
    request: Request,
    size: Annotated[int | None, Query(ge=preview.THUMBNAIL_MIN, le=preview.THUMBNAIL_MAX)] = None,
    v: Annotated[str | None, Query(max_length=32, pattern="^[0-9a-f]+$")] = None,
) -> Response:
    """A kept frame, or with `size` a JPEG thumbnail whose long side is at most `size` pixels
    (64 to 1024, rounded up to a multiple of 64; made once and cached). `v` is the version
    the frame listing puts in its URLs, so they can be cached for good."""
    await _dataset_task(manager, task_id)
    dataset = manager.paths.dataset_dir(task_id)
    found = await asyncio.to_thread(preview.find_frame, dataset, name)
    if found is None:
        raise NotFoundError("No such frame in this task's dataset.")
    side = preview.thumbnail_size(size) if size is not None else None
    etag = f'"{found.mtime_ns:x}-{found.size:x}-{side or 0}"'
    headers = {"Cache-Control": IMMUTABLE if v else "private, no-cache", "ETag": etag}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    try:
        if side is None:
            data = await asyncio.to_thread(preview.frame_bytes, dataset, found)
            media = "image/png" if found.name.lower().endswith(".png") else "image/jpeg"
        else:
            cache = manager.paths.task_dir(task_id) / preview.THUMBNAIL_DIR
            data = await asyncio.to_thread(preview.thumbnail, dataset, cache, found, side)
            media = "image/jpeg"
    except preview.PreviewCorruptError as exc:
        raise PreviewUnreadableError(str(exc)) from None
    except preview.PreviewError as exc:
        raise NotFoundError(str(exc)) from None
    return Response(data, media_type=media, headers=headers)


@router.get(
    "/tasks/{task_id}/sparse",
    responses={200: {"content": {"application/json": {"schema": SPARSE_SCHEMA}}}, **ERRORS},
)
async def sparse(task_id: TaskId, manager: Manager, request: Request) -> Response:
    """The sparse model for the page's 3D view, as compact JSON: `points` (`total` in the
    model, `count` sent, at most 50,000, flat `positions` [x, y, z, ...] and `colors`
    [r, g, b, ...]), `cameras` (per registered image: `name`, `center` = -Rᵀt, `direction`,
    `up`, `width`, `height`, `fx`, `fy`), and a suggested view (`center`, `radius`, `up`).
    Built once per model version and cached in the task folder."""
    await _dataset_task(manager, task_id)
    dataset = manager.paths.dataset_dir(task_id)
    cache = manager.paths.task_dir(task_id) / preview.PREVIEW_DIR
    try:
        body, signature = await asyncio.to_thread(preview.sparse_preview, dataset, cache)
    except preview.PreviewCorruptError as exc:
        raise PreviewUnreadableError(str(exc)) from None
    except preview.PreviewError as exc:
        raise ConflictError(f"No point cloud for this task: {exc}") from None
    etag = f'"{signature}"'
    headers = {"Cache-Control": "private, no-cache", "ETag": etag}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)
