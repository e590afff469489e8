"""SPZ exports of a training: the finished model as `model.spz` beside its final .ply, and
previews while the trainer runs, each `.ply` snapshot it saves turned into `preview.spz`.

Both are written in the task's output folder (temp_workspace/checkpoints/{id}) by
training_server_spz (atomically: a `.partial` file, then a rename). When the dataset's
`preprocess_summary.json` carries `scene.matrix` (the similarity from the COLMAP world to the
upright, centred scene frame, +Y up) it is applied so the exports stand upright; otherwise
the SPZ default (COLMAP's RDF frame turned to SPZ's RUB) is used.

Routes (own `router`, token-checked like the result routes):

* `GET|HEAD /download/{id}/spz`: the finished model's SPZ (409 before training_completed,
  410 after the cleanup or when the file is gone, 404 when no SPZ was made).
* `GET|HEAD /tasks/{id}/preview.spz`: the newest preview (ETag, `X-Preview-Step`,
  `X-Preview-Total`; 304 on a matching If-None-Match), or the final model's SPZ once the task
  is training_completed; 404 with a `detail` before the first snapshot.
* `GET /tasks/{id}/preview`: what `preview.spz` holds now, as JSON (same 404/410).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.responses import Response

import training_server_spz as spz
import training_server_trainer_output as trainer_output
from training_server_models import (
    ConflictError,
    ErrorBody,
    GoneError,
    NotFoundError,
    TaskPublic,
    TaskStatus,
)
from training_server_process import TaskLog
from training_server_utils import SUMMARY_NAME, content_disposition, download_name

if TYPE_CHECKING:
    from training_server_tasks import TaskManager

log = logging.getLogger("training_server")

MODEL_SPZ = trainer_output.MODEL_SPZ  # beside the final .ply's folder, in the result ZIP
PREVIEW_SPZ = "preview.spz"
PREVIEW_INFO = "preview.json"  # the step the preview shows, written after preview.spz
PREVIEW_POLL_SECONDS = 2.0
# Previews carry the colours without view-dependent shading: about a third of the bytes
# of a degree-3 file, and they are fetched again at every snapshot.
PREVIEW_SH_DEGREE = 0
_ITERATION = re.compile(r"^iteration_(\d+)$")


# -- the upright frame ---------------------------------------------------------------------


def scene_transform(task_dir: Path) -> tuple[np.ndarray | None, str | None]:
    """The `scene.matrix` of the task's preprocess summary as a 4x4 array, or None; the
    second value says why a matrix that is there cannot be used."""
    try:
        summary = json.loads((task_dir / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None, None
    scene = summary.get("scene") if isinstance(summary, dict) else None
    if not isinstance(scene, dict) or scene.get("matrix") is None:
        return None, None
    try:
        matrix = np.array(scene["matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        return None, "scene.matrix is not a 4x4 list of numbers"
    try:
        spz.split_similarity(matrix)
    except spz.SpzError as exc:
        return None, f"scene.matrix cannot be used: {exc}"
    return matrix, None


# -- the finished model --------------------------------------------------------------------


def export_model(
    output_dir: Path,
    ply_relative: str,
    *,
    sh_degree: int | None,
    transform: np.ndarray | None,
) -> dict[str, Any]:
    """Write `model.spz` from the final .ply; the fields `metadata.training` records. Raises
    OSError or SpzError (a ValueError) when the conversion fails; no SPZ is left then."""
    target = output_dir / MODEL_SPZ
    try:
        result = spz.ply_to_spz(
            output_dir / ply_relative, target, sh_degree=sh_degree, transform=transform
        )
    except BaseException:
        remove_files(output_dir, MODEL_SPZ)
        raise
    return {
        "spz_path": MODEL_SPZ,
        "spz_bytes": result.bytes,
        "spz_ratio": round(result.bytes / max(result.ply_bytes, 1), 4),
        "spz_sh_degree": result.sh_degree,
        "upright": transform is not None,
    }


async def export_final(
    output_dir: Path,
    task_dir: Path,
    ply_relative: str,
    sh_degree: int | None,
    task_log: TaskLog,
) -> dict[str, Any]:
    """`export_model` in a worker thread, logged; a failure is recorded as `spz_error`
    (the training still succeeds) and no model.spz is left behind."""
    transform, problem = await asyncio.to_thread(scene_transform, task_dir)
    if problem:
        task_log.event(f"The SPZ uses the default frame, not the scene's upright one: {problem}")
    started = time.monotonic()
    try:
        fields = await asyncio.to_thread(
            export_model, output_dir, ply_relative, sh_degree=sh_degree, transform=transform
        )
    except (OSError, ValueError) as exc:
        task_log.event(f"SPZ export failed (the .ply is unaffected): {exc}")
        log.warning("SPZ export of %s failed: %s", output_dir / ply_relative, exc)
        return {"spz_path": None, "spz_error": str(exc), "upright": False}
    task_log.event(
        f"Wrote {MODEL_SPZ}: {fields['spz_bytes']} bytes ({fields['spz_ratio']:.3f} of the "
        f".ply), SH degree {fields['spz_sh_degree']}, "
        f"{'upright scene frame' if fields['upright'] else 'default frame'}, "
        f"in {time.monotonic() - started:.1f} s"
    )
    # The preview route serves model.spz from now on.
    await asyncio.to_thread(remove_files, output_dir, PREVIEW_SPZ, PREVIEW_INFO)
    return fields


def remove_files(output_dir: Path, *names: str) -> None:
    """Remove these files (and their `.partial`) from the output folder, if there."""
    for name in names:
        for path in (output_dir / name, output_dir / (name + ".partial")):
            with contextlib.suppress(OSError):
                if path.is_symlink() or path.is_file():
                    path.unlink()


# -- previews while training runs ------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A `.ply` the trainer saved: its step and what identifies this version of the file."""

    step: int
    path: Path
    signature: tuple[int, int]  # (mtime_ns, size)


def newest_snapshot(output_dir: Path, below: int | None) -> Snapshot | None:
    """The complete `point_cloud/iteration_N/point_cloud.ply` with the highest N (below
    `below` when given); symbolic links and cut-off files are passed over."""
    folder = output_dir / "point_cloud"
    if folder.is_symlink() or not folder.is_dir():
        return None
    found = sorted(
        ((int(m[1]), d) for d in folder.iterdir() if (m := _ITERATION.match(d.name))),
        reverse=True,
    )
    for step, directory in found:
        if below is not None and step >= below:
            continue
        ply = directory / "point_cloud.ply"
        try:
            if directory.is_symlink() or ply.is_symlink() or not ply.is_file():
                continue
            trainer_output.read_ply_header(ply)  # ValueError while it is still being written
            stat = ply.stat()
        except (OSError, ValueError):
            continue
        return Snapshot(step, ply, (stat.st_mtime_ns, stat.st_size))
    return None


def write_preview(
    output_dir: Path, snapshot: Snapshot, total: int | None, transform: np.ndarray | None
) -> dict[str, Any]:
    """Convert `snapshot` to preview.spz, then write preview.json; returns what it says."""
    result = spz.ply_to_spz(
        snapshot.path,
        output_dir / PREVIEW_SPZ,
        sh_degree=PREVIEW_SH_DEGREE,
        transform=transform,
    )
    info = {
        "step": snapshot.step,
        "total": total,
        "bytes": result.bytes,
        "count": result.count,
        "sh_degree": result.sh_degree,
        "upright": transform is not None,
        "updated_at": datetime.now(UTC).isoformat(),
    }
    partial = output_dir / (PREVIEW_INFO + ".partial")
    partial.write_text(json.dumps(info))
    partial.replace(output_dir / PREVIEW_INFO)
    return info


class PreviewWatcher:
    """Polls the output folder while the trainer runs and turns each new snapshot into
    preview.spz. `stop()` waits for a conversion under way, so none lands after it."""

    def __init__(
        self,
        output_dir: Path,
        task_dir: Path,
        total: int | None,
        task_log: TaskLog,
        *,
        interval: float = PREVIEW_POLL_SECONDS,
        on_preview: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._output_dir = output_dir
        self._task_dir = task_dir
        self._total = total
        self._log = task_log
        self._interval = interval
        self._on_preview = on_preview
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._done: tuple[int, int] | None = None  # signature of the last file tried
        self._step: int | None = None  # of the preview written last
        self.previews = 0

    def start(self) -> None:
        """Begin polling (from inside the event loop)."""
        self._task = asyncio.create_task(self._loop(), name=f"preview:{self._output_dir.name}")

    async def stop(self) -> None:
        """Stop polling; returns once no conversion runs any more."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)

    async def _loop(self) -> None:
        transform, _ = await asyncio.to_thread(scene_transform, self._task_dir)
        with contextlib.suppress(Exception):
            info = json.loads((self._output_dir / PREVIEW_INFO).read_text())
            self._step = int(info["step"])  # a resumed run: don't redo the same snapshot
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):  # not wait_for: it can lose a cancel (3.11)
                async with asyncio.timeout(self._interval):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            await self._poll(transform)

    async def _poll(self, transform: np.ndarray | None) -> None:
        snapshot = await asyncio.to_thread(newest_snapshot, self._output_dir, self._total)
        if snapshot is None or snapshot.signature == self._done:
            return
        if self._step is not None and snapshot.step <= self._step:
            return
        self._done = snapshot.signature
        try:
            info = await asyncio.to_thread(
                write_preview, self._output_dir, snapshot, self._total, transform
            )
        except (OSError, ValueError) as exc:  # pruned or rewritten meanwhile: the next one
            log.info("no preview from %s: %s", snapshot.path, exc)
            return
        self._step = snapshot.step
        self.previews += 1
        self._log.event(f"Preview of step {snapshot.step}: {PREVIEW_SPZ}, {info['bytes']} bytes")
        if self._on_preview is not None:
            self._on_preview(info)


# -- routes ---------------------------------------------------------------------------------


async def _require_token(request: Request) -> None:
    """training_server_deps.require_token, imported when called: the stage functions import
    this module, and training_server_deps imports the task manager that runs them."""
    from training_server_deps import require_token

    await require_token(request)


router = APIRouter(dependencies=[Depends(_require_token)])
NO_CACHE = "private, no-cache"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 410, 422)
}


class PreviewInfo(BaseModel):
    """What `/tasks/{id}/preview.spz` serves now."""

    task_id: str
    step: int | None = None
    total: int | None = None
    bytes: int | None = None
    count: int | None = None
    sh_degree: int | None = None
    upright: bool | None = None
    updated_at: str | None = None
    final: bool  # the finished model rather than a snapshot
    url: str
    etag: str


def _manager(request: Request) -> TaskManager:
    return request.app.state.manager


def _file(output_dir: Path, name: str) -> Path | None:
    """`output_dir/name` when it is a plain file inside the folder (no symbolic links)."""
    path = output_dir / name
    with contextlib.suppress(OSError):
        if (
            not output_dir.is_symlink()
            and not path.is_symlink()
            and path.is_file()
            and path.resolve().is_relative_to(output_dir.resolve())
        ):
            return path
    return None


async def _task(manager: TaskManager, task_id: str) -> TaskPublic:
    task = await manager.records.public(task_id)
    if task.expired:
        raise GoneError("The task's files were removed by the cleanup.")
    return task


@router.api_route(
    "/download/{task_id}/spz",
    methods=["GET", "HEAD"],
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
async def download_spz(task_id: uuid.UUID, request: Request) -> FileResponse:
    """The trained model as SPZ (version 3), for web viewers; named like the .ply."""
    manager, key = _manager(request), str(task_id)
    task = await _task(manager, key)
    if task.status != TaskStatus.TRAINING_COMPLETED:
        raise ConflictError(
            f"No model yet: the task is {task.status.value}; an .spz exists once it is "
            "training_completed."
        )
    training = (task.metadata or {}).get("training") or {}
    if not training.get("spz_path"):
        why = training.get("spz_error")
        raise NotFoundError(
            f"This model has no SPZ: the conversion failed ({why}); the .ply is at "
            f"/download/{key}/ply."
            if why
            else f"This model has no SPZ (trained before SPZ export); the .ply is at "
            f"/download/{key}/ply."
        )
    path = _file(manager.paths.output_dir(key), training["spz_path"])
    if path is None:
        raise GoneError("The model's SPZ file is missing.")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": content_disposition(
                download_name(task.original_filename, key, ".spz")
            )
        },
    )


@dataclass(frozen=True)
class _Preview:
    path: Path
    info: dict[str, Any]
    final: bool


def _no_preview(task: TaskPublic) -> NotFoundError:
    if task.status == TaskStatus.TRAINING:
        return NotFoundError(
            "No preview yet: one appears when the trainer saves its first snapshot."
        )
    return NotFoundError(
        f"No preview: the task is {task.status.value} and no training snapshot was saved."
    )


async def _preview(manager: TaskManager, task_id: str) -> _Preview:
    """The final model's SPZ for a completed training, else the newest preview."""
    task = await _task(manager, task_id)
    output_dir = manager.paths.output_dir(task_id)
    training = (task.metadata or {}).get("training") or {}
    if task.status == TaskStatus.TRAINING_COMPLETED and training.get("spz_path"):
        path = _file(output_dir, training["spz_path"])
        if path is not None:
            info = {
                "step": training.get("iterations"),
                "total": training.get("iterations"),
                "bytes": path.stat().st_size,
                "count": training.get("gaussian_count"),
                "sh_degree": training.get("spz_sh_degree"),
                "upright": training.get("upright"),
                "updated_at": task.finished_at.isoformat() if task.finished_at else None,
            }
            return _Preview(path, info, final=True)
    path = _file(output_dir, PREVIEW_SPZ)
    info_path = _file(output_dir, PREVIEW_INFO)
    if path is None or info_path is None:
        raise _no_preview(task)
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        raise _no_preview(task) from None
    return _Preview(path, info, final=False)


def _headers(found: _Preview, stat: os.stat_result) -> dict[str, str]:
    step = found.info.get("step")
    total = found.info.get("total")
    headers = {
        "ETag": f'"{step}-{stat.st_mtime_ns:x}-{stat.st_size:x}"',
        "Cache-Control": NO_CACHE,
        "X-Preview-Final": "true" if found.final else "false",
    }
    if isinstance(step, int):
        headers["X-Preview-Step"] = str(step)
    if isinstance(total, int):
        headers["X-Preview-Total"] = str(total)
    return headers


@router.api_route(
    "/tasks/{task_id}/preview.spz",
    methods=["GET", "HEAD"],
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {}, **ERRORS},
)
async def preview_spz(task_id: uuid.UUID, request: Request) -> Response:
    """The newest training preview as SPZ (a snapshot's Gaussians, SH degree 0), or the
    final model once training_completed. `X-Preview-Step`/`X-Preview-Total` say which step;
    the ETag changes with each new preview (send If-None-Match to get a 304 instead)."""
    found = await _preview(_manager(request), str(task_id))
    wanted = {t.strip() for t in request.headers.get("if-none-match", "").split(",")}
    try:
        return await asyncio.to_thread(_answer, found, wanted)
    except FileNotFoundError:
        raise NotFoundError("No preview: it was removed while it was read.") from None


def _answer(found: _Preview, wanted: set[str]) -> Response:
    """A preview is renamed over whenever the trainer saves a snapshot: its length, ETag and
    bytes come from one open file (a stat of the path, then an open of the path, could
    announce one preview's length and send the next one's bytes); read only when it is sent.
    The finished model, written once, is streamed from its file."""
    with found.path.open("rb") as f:
        stat = os.fstat(f.fileno())
        headers = _headers(found, stat)
        if headers["ETag"] in wanted:
            return Response(status_code=304, headers=headers)
        if found.final:
            return FileResponse(
                found.path, media_type="application/octet-stream", headers=headers, stat_result=stat
            )
        return Response(f.read(), media_type="application/octet-stream", headers=headers)


@router.get("/tasks/{task_id}/preview", response_model=PreviewInfo, responses=ERRORS)
async def preview_info(task_id: uuid.UUID, request: Request) -> Response:
    """What `/tasks/{id}/preview.spz` serves now: `step`, `total`, `bytes`, `count`,
    `sh_degree`, `upright`, `updated_at`, `final` (the finished model) and its `url`."""
    found = await _preview(_manager(request), str(task_id))
    body = {
        "task_id": str(task_id),
        **{k: found.info.get(k) for k in ("step", "total", "bytes", "count", "sh_degree")},
        "upright": found.info.get("upright"),
        "updated_at": found.info.get("updated_at"),
        "final": found.final,
        "url": f"/tasks/{task_id}/preview.spz",
        "etag": _headers(found, found.path.stat())["ETag"],
    }
    return Response(
        json.dumps(body), media_type="application/json", headers={"Cache-Control": NO_CACHE}
    )
