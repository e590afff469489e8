"""The task API: upload, status, the task list, control (cancel, retry, train, delete), logs,
live event streams and health. A module-level router with one short handler per route; the
work is done by the task manager's pieces (records, control, health).

Route table (all behind the API token when one is set):

    POST   /upload                   a video, a ZIP of photos, several files -> a new task (202)
    GET    /status/{id}              the task (the seed's status fields first)
    GET    /tasks                    a page of tasks: ids in `tasks`, objects in `items`
    GET    /tasks/{id}               the same as /status/{id}
    POST   /tasks/{id}/cancel|retry|train
    DELETE /tasks/{id}               (and the seed's DELETE /task/{id})
    GET    /logs/{id}                the log as text (?lines=N: its end)
    GET    /logs/{id}/stream         the log, live (Server-Sent Events)
    GET    /events                   every task change, live (Server-Sent Events)
    GET    /health                   queues, slots, disk, whether each stage can run
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from training_server_deps import Manager, Settings, TaskId
from training_server_health import cluster_health, storage_problem
from training_server_models import (
    VERSION,
    ActionResponse,
    ErrorBody,
    Health,
    NotFoundError,
    Stage,
    TaskList,
    TaskPublic,
    TaskStatus,
    TrainingOptions,
    UploadResponse,
)
from training_server_process import tail_text
from training_server_sources import accept_upload
from training_server_tasks import TaskManager
from training_server_upload import (
    ClientGoneError,
    check_free_disk,
    receive_upload,
    upload_openapi,
    upload_params,
)

LOG_CHUNK = 64 * 1024
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 410, 422, 503)
}
ERROR_REF = "#/components/schemas/ErrorBody"
EVENT_STREAM = {"content": {"text/event-stream": {"schema": {"type": "string"}}}}

router = APIRouter()


def _json(model: BaseModel, status_code: int = 200) -> Response:
    """A model already validated by construction, serialized once (pydantic-core)."""
    return Response(model.model_dump_json(), status_code, media_type="application/json")


def _action(task: TaskPublic) -> ActionResponse:
    return ActionResponse(task_id=task.task_id, status=task.status, message=task.message or "")


@router.post(
    "/upload",
    status_code=202,
    response_model=UploadResponse,
    openapi_extra=upload_openapi(),
    responses={**ERRORS, **{code: {"model": ErrorBody} for code in (400, 413, 415, 507)}},
)
async def upload(request: Request, settings: Settings, manager: Manager) -> JSONResponse:
    """Upload a video (multipart field `file`, parameters as query or form fields); or a ZIP
    of photos, or several photos or videos of one scene (the field repeated). It is queued
    for preprocessing and, with auto_training (alias start_training, default true), for
    training after that."""
    query = dict(request.query_params)
    upload_params(settings, query, {})  # fail before the body is read
    task_id = str(uuid.uuid4())
    task_dir = manager.paths.task_dir(task_id)
    task_dir.mkdir(parents=True)
    try:
        received = await receive_upload(
            request,
            task_dir / "upload.part",
            max_bytes=settings.max_upload_bytes,
            min_free_bytes=settings.min_free_bytes,
        )
        params, auto = upload_params(settings, query, received.fields)
        capture = await accept_upload(
            settings,
            task_dir,
            received.files,
            lambda: check_free_disk(task_dir, 0, settings.min_free_bytes),
        )
        task = await manager.control.create(
            task_id,
            params=params,
            video_filename=capture.video_filename,
            video_size=capture.size,
            original_filename=capture.original_filename,
            video_info=capture.info,
        )
    except ClientGoneError:
        await asyncio.to_thread(shutil.rmtree, task_dir, True)
        return JSONResponse({"detail": "The client disconnected during the upload."}, 400)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, task_dir, True)
        raise
    training = manager.health.training
    body = UploadResponse(
        task_id=task_id,
        message="Video uploaded and pipeline started",
        status=task.status,
        auto_training=auto,
        training_available=training.available,
        training_unavailable_reason=None if training.available else training.detail,
        status_url=f"/status/{task_id}",
    )
    return JSONResponse(
        body.model_dump(mode="json"), 202, headers={"Location": f"/status/{task_id}"}
    )


@router.api_route(
    "/status/{task_id}", methods=["GET", "HEAD"], response_model=TaskPublic, responses=ERRORS
)
async def status(task_id: TaskId, manager: Manager) -> Response:
    """A task's status, progress, queue position, parameters, results and allowed actions."""
    return Response(await manager.records.public_json(task_id), media_type="application/json")


@router.get("/tasks", response_model=TaskList, responses=ERRORS)
async def tasks(
    manager: Manager,
    status: Annotated[list[TaskStatus] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> Response:
    """Tasks, newest first; `status` (repeatable) filters. `tasks` lists their ids (as the
    original server did), `items` the task objects."""
    items, total = await manager.records.list_public(status or [], limit, offset)
    return _json(
        TaskList(
            tasks=[t.task_id for t in items], items=items, total=total, limit=limit, offset=offset
        )
    )


@router.api_route(
    "/tasks/{task_id}", methods=["GET", "HEAD"], response_model=TaskPublic, responses=ERRORS
)
async def task(task_id: TaskId, manager: Manager) -> Response:
    """The same as /status/{task_id}."""
    return Response(await manager.records.public_json(task_id), media_type="application/json")


@router.post("/tasks/{task_id}/cancel", response_model=ActionResponse, responses=ERRORS)
async def cancel(task_id: TaskId, manager: Manager) -> ActionResponse:
    """Stop the running stage (its whole process tree) or take the task off its queue."""
    return _action(await manager.control.cancel(task_id))


@router.post("/tasks/{task_id}/retry", response_model=ActionResponse, responses=ERRORS)
async def retry(task_id: TaskId, manager: Manager) -> ActionResponse:
    """Run a failed or cancelled task again from the stage that did not finish."""
    return _action(await manager.control.retry(task_id))


@router.post("/tasks/{task_id}/train", response_model=ActionResponse, responses=ERRORS)
async def train(
    task_id: TaskId,
    manager: Manager,
    options: Annotated[TrainingOptions | None, Body()] = None,
) -> ActionResponse:
    """Queue a task resting in preprocessing_completed for training."""
    return _action(await manager.control.train(task_id, options))


@router.delete("/tasks/{task_id}", response_model=ActionResponse, responses=ERRORS)
@router.delete("/task/{task_id}", response_model=ActionResponse, include_in_schema=False)
async def delete(task_id: TaskId, manager: Manager) -> ActionResponse:
    """Cancel the task if it runs, then remove its files and its record. `/task/{id}` is
    the original server's path for the same."""
    await manager.control.delete(task_id)
    return ActionResponse(task_id=task_id, status=None, message="Task deleted")


@router.get(
    "/logs/{task_id}",
    response_class=PlainTextResponse,
    responses={
        code: {"content": {"application/json": {"schema": {"$ref": ERROR_REF}}}} for code in ERRORS
    },
)
async def logs(
    task_id: TaskId,
    manager: Manager,
    lines: Annotated[int | None, Query(ge=1, le=100_000)] = None,
) -> Response:
    """The task's log as text: the last `lines` lines, or all of it (streamed)."""
    await manager.records.row(task_id)
    path = manager.paths.log_file(task_id)
    if lines is not None:
        return PlainTextResponse(await asyncio.to_thread(tail_text, path, lines))
    return StreamingResponse(
        _read_chunks(path, manager.settings.log_max_bytes * 2),
        media_type="text/plain; charset=utf-8",
    )


def _read_chunks(path: Path, limit: int) -> Iterator[bytes]:
    """The file's bytes as they are now, in chunks (never the whole log in memory)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        remaining = min(limit, path.stat().st_size)
        while remaining > 0 and (chunk := f.read(min(LOG_CHUNK, remaining))):
            remaining -= len(chunk)
            yield chunk


@router.get("/logs/{task_id}/stream", responses={200: EVENT_STREAM, **ERRORS})
async def log_stream(
    task_id: TaskId,
    manager: Manager,
    lines: Annotated[int, Query(ge=0, le=10_000)] = 100,
) -> EventSourceResponse:
    """Server-Sent Events: the last `lines` log lines, then new ones as they are written,
    until the task stops running or waiting (event `end`)."""
    await manager.records.row(task_id)
    return EventSourceResponse(_follow_log(manager, task_id, lines), ping=15)


@router.get("/events", responses={200: EVENT_STREAM, **ERRORS})
async def events(manager: Manager) -> EventSourceResponse:
    """Server-Sent Events: every task change (`task`) and removal (`deleted`)."""
    return EventSourceResponse(_task_events(manager), ping=15)


@router.get("/health", response_model=Health, responses=ERRORS)
async def health(
    manager: Manager,
    settings: Settings,
    recheck: Annotated[bool, Query()] = False,
) -> Health:
    """Version, queues, running tasks, free disk and whether each stage can run here."""
    if recheck:
        await manager.health.check_all()
    counts = await manager.db.queue_counts()
    disk = await asyncio.to_thread(shutil.disk_usage, manager.paths.temp_dir)
    problems = []
    storage = await asyncio.to_thread(
        storage_problem, manager.paths.temp_dir, settings.min_free_bytes
    )
    if storage:
        problems.append(storage)
    loops = manager.loops_alive()
    problems += [f"the {name} loop is not running" for name, alive in loops.items() if not alive]
    cluster = await cluster_health(manager.executor)
    if cluster is not None and cluster["problem"]:
        problems.append(cluster["problem"])
    return Health(
        status="degraded" if problems else "ok",
        problems=problems,
        loops=loops,
        version=VERSION,
        queued={stage: counts.get(stage.value, 0) for stage in Stage},
        running={stage: manager.runner.running_ids(stage) for stage in Stage},
        slots=manager.scheduler.slots(),
        disk_free_bytes=disk.free,
        disk_total_bytes=disk.total,
        preprocessing=manager.health.preprocessing,
        training=manager.health.training,
        auth_required=settings.api_token is not None,
        cluster=cluster,
    )


async def _follow_log(manager: TaskManager, task_id: str, lines: int) -> AsyncIterator[dict]:
    path = manager.paths.log_file(task_id)
    if lines:
        for line in (await asyncio.to_thread(tail_text, path, lines)).splitlines():
            yield {"event": "log", "data": line}
    offset = path.stat().st_size if path.exists() else 0
    pending = b""
    idle_checks = 0
    while True:
        size = path.stat().st_size if path.exists() else 0
        if size < offset:  # rotated or removed: start from its beginning
            offset, pending = 0, b""
        if size > offset:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(min(size - offset, 4 * 1024 * 1024))
            offset += len(data)
            *complete, pending = (pending + data).split(b"\n")
            for line in complete:
                yield {"event": "log", "data": line.decode("utf-8", "replace")}
            continue
        idle_checks += 1
        if idle_checks % 4 == 0:
            try:
                current = await manager.records.public(task_id)
            except NotFoundError:
                yield {"event": "end", "data": "deleted"}
                return
            if not current.active:
                yield {"event": "end", "data": current.status.value}
                return
        await asyncio.sleep(0.25)


async def _task_events(manager: TaskManager) -> AsyncIterator[dict]:
    async with manager.events.subscribe() as queue:
        yield {"event": "hello", "data": json.dumps({"version": VERSION})}
        while True:
            event = await queue.get()
            yield {"event": event["type"], "data": json.dumps(event)}
