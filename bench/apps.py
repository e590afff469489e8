"""Throwaway apps the benchmarks compare the server with, run under the same uvicorn settings
as `training_server.main` (uvloop + httptools from uvicorn[standard], log level info, so the
access log is on as in the server):

    python bench/apps.py original-upload --dir D --port P
        POST /upload the way the original project did it: FastAPI's `UploadFile` (Starlette
        spools the part to a temporary file), `await file.read()` of the whole video into
        memory, then one write into D/{task_id}/{filename}.
    python bench/apps.py upload-floor --dir D --port P [--discard]
        POST /upload that streams the raw request body into D/body.bin (or discards it):
        what uvicorn can receive at all, with no multipart parsing and no content check.
    python bench/apps.py minimal-status --body FILE --port P [--sync-deps] [--db DB]
        GET /status/{task_id} answering the JSON in FILE: the framework's own limit for the
        server's status route (no database, no validation, no auth). With --sync-deps the
        route also takes two plain `def` dependencies (FastAPI runs them in its thread pool,
        as the server's `get_manager` and `task_id_path`); with --db it also reads the task's
        row from the SQLite file DB through aiosqlite as the server's `Database.get_task`
        does (execute, fetchone, close: three round trips to the connection's thread).
    python bench/apps.py zip-download --files LIST --port P [--batch BYTES]
        GET /download/{anything} streaming a stored ZIP (zipstream-ng, sized) of the files in
        LIST (JSON [[path, name in the archive], ...]) as the server does, but handing
        StreamingResponse chunks of at least BATCH bytes (one thread-pool hop each).
"""

from __future__ import annotations

import argparse
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import aiosqlite
import uvicorn
from fastapi import Depends, FastAPI, File, Request, UploadFile
from fastapi.responses import StreamingResponse
from zipstream import ZipStream


def original_upload_app(folder: Path) -> FastAPI:
    """The original's upload route: the whole file in memory, then written."""
    app = FastAPI()

    @app.post("/upload")
    async def upload(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008
        task_id = str(uuid.uuid4())
        task_dir = folder / task_id
        task_dir.mkdir(parents=True)
        content = await file.read()
        with (task_dir / Path(file.filename or "video.mp4").name).open("wb") as out:
            out.write(content)
        return {
            "task_id": task_id,
            "message": "Video uploaded and pipeline started",
            "status": "pending",
            "auto_training": True,
        }

    return app


def upload_floor_app(folder: Path, discard: bool) -> FastAPI:
    """POST /upload streaming the raw body to one file (or nowhere)."""
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, Any]:
        size = 0
        if discard:
            async for chunk in request.stream():
                size += len(chunk)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / "body.bin").open("wb") as out:
                async for chunk in request.stream():
                    out.write(chunk)
                    size += len(chunk)
        return {"task_id": "floor", "bytes": size}

    return app


def _state(request: Request) -> Any:
    return request.app.state


def _task_id(task_id: str) -> str:
    return str(uuid.UUID(task_id))


def minimal_status_app(body: dict[str, Any], sync_deps: bool, db: Path | None) -> FastAPI:
    """GET /status/{task_id} answering a fixed JSON body, with optional server-like work."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if db is None:
            yield
            return
        async with aiosqlite.connect(db) as connection:
            app.state.db = connection
            yield

    app = FastAPI(lifespan=lifespan)

    async def read_row(task_id: str) -> None:
        if db is not None:
            async with app.state.db.execute(
                "SELECT * FROM tasks WHERE id = ?", [task_id]
            ) as cursor:
                await cursor.fetchone()

    if sync_deps:

        @app.get("/status/{task_id}")
        async def status_deps(
            state: Annotated[Any, Depends(_state)], task_id: Annotated[str, Depends(_task_id)]
        ) -> dict[str, Any]:
            await read_row(task_id)
            return body

    else:

        @app.get("/status/{task_id}")
        async def status(task_id: str) -> dict[str, Any]:
            await read_row(task_id)
            return body

    return app


def zip_download_app(files: list[tuple[str, str]], batch: int) -> FastAPI:
    """GET /download/{task_id}: the stored ZIP of `files`, in chunks of at least `batch`."""
    app = FastAPI()

    def batched(archive: ZipStream) -> Iterator[bytes]:
        pending: list[bytes] = []
        size = 0
        for chunk in archive:
            pending.append(chunk)
            size += len(chunk)
            if size >= batch:
                yield b"".join(pending)
                pending, size = [], 0
        if pending:
            yield b"".join(pending)

    @app.get("/download/{task_id}")
    async def download(task_id: str) -> StreamingResponse:
        archive = ZipStream(sized=True)
        for path, name in files:
            archive.add_path(path, name, recurse=False)
        return StreamingResponse(
            batched(archive),
            media_type="application/zip",
            headers={"Content-Length": str(len(archive))},
        )

    return app


def main() -> None:
    """Command line: pick the app, serve it on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "app", choices=["original-upload", "upload-floor", "minimal-status", "zip-download"]
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, default=Path("uploads"))
    parser.add_argument("--discard", action="store_true")
    parser.add_argument("--body", type=Path)
    parser.add_argument("--sync-deps", action="store_true")
    parser.add_argument("--db", type=Path)
    parser.add_argument("--files", type=Path)
    parser.add_argument("--batch", type=int, default=1024 * 1024)
    args = parser.parse_args()
    if args.app == "original-upload":
        app = original_upload_app(args.dir)
    elif args.app == "upload-floor":
        app = upload_floor_app(args.dir, args.discard)
    elif args.app == "minimal-status":
        app = minimal_status_app(json.loads(args.body.read_text()), args.sync_deps, args.db)
    else:
        app = zip_download_app(json.loads(args.files.read_text()), args.batch)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, log_level="info", timeout_graceful_shutdown=15
    )


if __name__ == "__main__":
    main()
