"""Gaussian Splatting training server: upload a video, follow it through preprocessing and
training, download the result. The app factory, the routes and the command-line entry point.

Run: `python training_server.py [--host H] [--port P]`; settings come from TRAINING_SERVER_*
environment variables or a .env file (see README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import training_server_trainer as trainer
from training_server_db import Database
from training_server_deps import Manager, Settings, TaskId, require_token
from training_server_models import (
    HERE,
    TRAINING_PRESETS,
    ActionResponse,
    ApiError,
    Health,
    NotFoundError,
    ServerConfig,
    Stage,
    TaskList,
    TaskParams,
    TaskPublic,
    TaskStatus,
    TrainingOptions,
    UnprocessableError,
    UnsupportedMediaError,
    UploadParams,
    UploadResponse,
)
from training_server_process import run_captured, tail_text
from training_server_results import router as results_router
from training_server_tasks import TaskManager
from training_server_upload import ClientGoneError, receive_upload
from training_server_utils import jsonable_errors, readable_errors, sanitize_filename

VERSION = "0.1.0"
STATIC_DIR = HERE / "static"
log = logging.getLogger("training_server")

# -- dependencies ------------------------------------------------------------------------


# -- error answers -----------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with a JSON body holding a readable `detail`."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        return JSONResponse(
            {"detail": readable_errors(errors), "errors": jsonable_errors(errors)}, 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None)
        )


# -- the app -----------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the database, recover and start the task manager; stop it on the way out."""
    settings: ServerConfig = app.state.settings
    db = await Database.open(settings.db_path)
    manager = TaskManager(settings, db)
    app.state.manager = manager
    try:
        await manager.start()
        if settings.api_token is None and settings.host not in {"127.0.0.1", "localhost", "::1"}:
            log.warning(
                "No TRAINING_SERVER_API_TOKEN is set and the server listens on %s: anyone "
                "who can reach it can upload, download and delete tasks.",
                settings.host,
            )
        yield
    finally:
        await manager.shutdown()
        await db.close()


def create_app(settings: ServerConfig | None = None) -> FastAPI:
    """Build the application for `settings` (read from the environment when omitted)."""
    settings = settings or ServerConfig()
    app = FastAPI(
        title="Gaussian Splatting Training Server",
        version=VERSION,
        lifespan=lifespan,
        description="Upload a video; it becomes a COLMAP dataset and a 3D Gaussian Splatting "
        "model you can download.",
    )
    app.state.settings = settings
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    api = APIRouter(dependencies=[Depends(require_token)])
    _add_task_routes(api)
    app.include_router(api)
    app.include_router(results_router)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return PlainTextResponse("The web page is not installed (static/index.html).", 404)
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # The page's 3D viewers, from `npm ci` (package.json); the page says so when missing.
    vendor = {
        "/vendor/three/build": "three/build",
        "/vendor/three/addons": "three/examples/jsm",
        "/vendor/spark": "@sparkjsdev/spark/dist",
    }
    for url, folder in vendor.items():
        if (HERE / "node_modules" / folder).is_dir():
            app.mount(url, StaticFiles(directory=HERE / "node_modules" / folder), name=url)
    return app


# -- task routes -------------------------------------------------------------------------

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "max_frames": {"type": "integer"},
                        "min_frames": {"type": "integer"},
                        "start_training": {"type": "boolean"},
                        "iterations": {"type": "integer"},
                        "preset": {"type": "string", "enum": list(TRAINING_PRESETS)},
                        "down_sample_factor": {"type": "integer"},
                        "keep_checkpoint": {"type": "boolean"},
                    },
                }
            }
        },
    }
}

UPLOAD_FIELDS = {
    "max_frames",
    "min_frames",
    "auto_training",
    "start_training",
    "iterations",
    "preset",
    "down_sample_factor",
    "keep_checkpoint",
}


def _upload_params(
    settings: ServerConfig, values: dict[str, str], checked: dict[str, Any]
) -> tuple[TaskParams, bool]:
    """Validate the upload's query and form values; returns the task's parameters."""
    data = {k: v for k, v in values.items() if k in UPLOAD_FIELDS}
    if "start_training" in data:
        data.setdefault("auto_training", data.pop("start_training"))
        data.pop("start_training", None)
    try:
        upload = UploadParams.model_validate({**checked, **data})
    except ValidationError as exc:
        errors = list(exc.errors())
        raise UnprocessableError(readable_errors(errors)) from None
    max_frames = upload.max_frames or max(settings.default_max_frames, upload.min_frames or 0)
    min_frames = upload.min_frames or min(settings.default_min_frames, max_frames)
    if min_frames > max_frames:
        raise UnprocessableError("min_frames must not be larger than max_frames")
    iterations = trainer.resolve_iterations(
        upload.iterations, upload.preset, settings.trainer_iterations
    )
    params = TaskParams(
        max_frames=max_frames,
        min_frames=min_frames,
        auto_training=upload.auto_training,
        iterations=iterations,
        down_sample_factor=upload.down_sample_factor,
        keep_checkpoint=upload.keep_checkpoint,
    )
    return params, upload.auto_training


async def probe_video(settings: ServerConfig, path: Path) -> dict[str, Any]:
    """Check by content that `path` is a decodable video (in a subprocess); 415 otherwise."""
    outcome, output = await run_captured(
        [
            sys.executable,
            str(HERE / "video_probe.py"),
            "--timeout",
            str(settings.probe_timeout),
            str(path),
        ],
        cwd=path.parent,
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


def _add_task_routes(api: APIRouter) -> None:
    @api.post(
        "/upload",
        status_code=202,
        response_model=UploadResponse,
        openapi_extra=UPLOAD_BODY,
        responses={413: {}, 415: {}, 422: {}, 507: {}},
    )
    async def upload(
        request: Request,
        settings: Settings,
        manager: Manager,
        max_frames: Annotated[int | None, Query()] = None,
        min_frames: Annotated[int | None, Query()] = None,
        auto_training: Annotated[bool | None, Query()] = None,
        start_training: Annotated[bool | None, Query()] = None,
        iterations: Annotated[int | None, Query()] = None,
        preset: Annotated[str | None, Query()] = None,
        down_sample_factor: Annotated[int | None, Query()] = None,
        keep_checkpoint: Annotated[bool | None, Query()] = None,
    ) -> JSONResponse:
        """Upload a video (multipart field `file`); it is queued for preprocessing and, with
        auto_training (alias start_training, default true), for training after that."""
        query = {
            k: v
            for k, v in {
                "max_frames": max_frames,
                "min_frames": min_frames,
                "auto_training": auto_training if auto_training is not None else start_training,
                "iterations": iterations,
                "preset": preset,
                "down_sample_factor": down_sample_factor,
                "keep_checkpoint": keep_checkpoint,
            }.items()
            if v is not None
        }
        _upload_params(settings, {}, query)  # fail before the body is read
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
            params, auto = _upload_params(settings, received.fields, query)
            info = await probe_video(settings, received.path)
            video_name = "input" + info.pop("extension", ".video")
            received.path.rename(task_dir / video_name)
            task = await manager.create_task(
                task_id,
                params=params,
                video_filename=video_name,
                video_size=received.size,
                original_filename=sanitize_filename(received.filename),
                video_info=info,
            )
        except ClientGoneError:
            await asyncio.to_thread(shutil.rmtree, task_dir, True)
            return JSONResponse({"detail": "The client disconnected during the upload."}, 400)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, task_dir, True)
            raise
        training = manager.training_health
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

    @api.get("/status/{task_id}", response_model=TaskPublic)
    async def status(task_id: TaskId, manager: Manager) -> Response:
        """A task's status, progress, queue position, parameters and results."""
        return Response(await manager.public_json(task_id), media_type="application/json")

    @api.get("/tasks", response_model=TaskList)
    async def tasks(
        manager: Manager,
        status: Annotated[list[TaskStatus] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Response:
        """Tasks, newest first; `status` (repeatable) filters."""
        items, total = await manager.list_public(status or [], limit, offset)
        return _json(TaskList(tasks=items, total=total, limit=limit, offset=offset))

    @api.get("/tasks/{task_id}", response_model=TaskPublic)
    async def task(task_id: TaskId, manager: Manager) -> Response:
        """The same as /status/{task_id}."""
        return Response(await manager.public_json(task_id), media_type="application/json")

    @api.post("/tasks/{task_id}/cancel", response_model=ActionResponse)
    async def cancel(task_id: TaskId, manager: Manager) -> ActionResponse:
        """Stop the running stage (its whole process tree) or take the task off its queue."""
        task = await manager.cancel(task_id)
        return ActionResponse(task_id=task_id, status=task.status, message=task.message or "")

    @api.post("/tasks/{task_id}/retry", response_model=ActionResponse)
    async def retry(task_id: TaskId, manager: Manager) -> ActionResponse:
        """Run a failed or cancelled task again from the stage that did not finish."""
        task = await manager.retry(task_id)
        return ActionResponse(task_id=task_id, status=task.status, message=task.message or "")

    @api.post("/tasks/{task_id}/train", response_model=ActionResponse)
    async def train(
        task_id: TaskId,
        manager: Manager,
        options: Annotated[TrainingOptions | None, Body()] = None,
    ) -> ActionResponse:
        """Queue a task resting in preprocessing_completed for training."""
        task = await manager.train(task_id, options)
        return ActionResponse(task_id=task_id, status=task.status, message=task.message or "")

    @api.delete("/tasks/{task_id}", response_model=ActionResponse)
    async def delete(task_id: TaskId, manager: Manager) -> ActionResponse:
        """Cancel the task if it runs, then remove its files and its record."""
        await manager.delete(task_id)
        return ActionResponse(task_id=task_id, status=None, message="Task deleted")

    @api.get("/logs/{task_id}", response_class=PlainTextResponse)
    async def logs(
        task_id: TaskId,
        manager: Manager,
        lines: Annotated[int | None, Query(ge=1, le=100_000)] = None,
    ) -> PlainTextResponse:
        """The task's log as text: the last `lines` lines, or all of it."""
        await manager.public(task_id)
        path = manager.paths.log_file(task_id)
        if lines is None:
            text = await asyncio.to_thread(_read_all, path, manager.settings.log_max_bytes * 2)
        else:
            text = await asyncio.to_thread(tail_text, path, lines)
        return PlainTextResponse(text)

    @api.get("/logs/{task_id}/stream")
    async def log_stream(
        task_id: TaskId,
        manager: Manager,
        lines: Annotated[int, Query(ge=0, le=10_000)] = 100,
    ) -> EventSourceResponse:
        """Server-Sent Events: the last `lines` log lines, then new ones as they are written,
        until the task stops running or waiting (event `end`)."""
        await manager.public(task_id)
        return EventSourceResponse(_follow_log(manager, task_id, lines), ping=15)

    @api.get("/events")
    async def events(manager: Manager) -> EventSourceResponse:
        """Server-Sent Events: every task change (`task`) and removal (`deleted`)."""
        return EventSourceResponse(_task_events(manager), ping=15)

    @api.get("/health", response_model=Health)
    async def health(
        manager: Manager,
        settings: Settings,
        recheck: Annotated[bool, Query()] = False,
    ) -> Health:
        """Version, queues, running tasks, free disk and whether each stage can run here."""
        if recheck:
            await asyncio.gather(manager.check_preprocessing(), manager.check_training())
        counts = await manager.db.queue_counts()
        disk = await asyncio.to_thread(shutil.disk_usage, manager.paths.temp_dir)
        running = {stage: manager.running_ids(stage) for stage in Stage}
        return Health(
            version=VERSION,
            queued={stage: counts.get(stage.value, 0) for stage in Stage},
            running=running,
            slots={
                Stage.PREPROCESSING: settings.preprocess_slots,
                Stage.TRAINING: settings.training_slots,
            },
            disk_free_bytes=disk.free,
            disk_total_bytes=disk.total,
            preprocessing=manager.preprocess_health,
            training=manager.training_health,
            auth_required=settings.api_token is not None,
        )


def _json(model: BaseModel) -> Response:
    """A model already validated by construction, serialized once (pydantic-core)."""
    return Response(model.model_dump_json(), media_type="application/json")


def _read_all(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


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
                task = await manager.public(task_id)
            except NotFoundError:
                yield {"event": "end", "data": "deleted"}
                return
            if not manager.is_active(task):
                yield {"event": "end", "data": task.status.value}
                return
        await asyncio.sleep(0.25)


async def _task_events(manager: TaskManager) -> AsyncIterator[dict]:
    async with manager.events.subscribe() as queue:
        yield {"event": "hello", "data": json.dumps({"version": VERSION})}
        while True:
            event = await queue.get()
            yield {"event": event["type"], "data": json.dumps(event)}


# -- entry point -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; everything else is a TRAINING_SERVER_* setting."""
    parser = argparse.ArgumentParser(
        description="Gaussian Splatting training server: video upload -> COLMAP dataset -> "
        "3D Gaussian Splatting model. Settings come from TRAINING_SERVER_* environment "
        "variables or a .env file (see README.md).",
    )
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the server."""
    args = parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v}
    settings = ServerConfig(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(5, int(settings.kill_grace) + 5),
    )


if __name__ == "__main__":
    main()
