"""What an upload holds, checked by content before a task exists: one video (as always), or a
capture of several sources of one scene (a ZIP of photos, several photos, several videos, or
a mix), laid out in the task folder as `inputs/` for run_pipeline.py (pipeline.sources says
the layout). Any error is an ApiError that names the file; the route then removes the task
folder, so a refused upload leaves nothing behind.

    one video            -> {task}/input.<ext>                (probed in a subprocess)
    a ZIP of photos      -> {task}/inputs/NN_<folder>/NNNN_<name>   (one source per folder)
    several photos       -> {task}/inputs/NN_photos/NNNN_<name>
    several videos       -> {task}/inputs/NN_<name>.<ext>
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline import sources
from training_server_models import (
    HERE,
    ApiError,
    BadRequestError,
    PayloadTooLargeError,
    ServerConfig,
    UnprocessableError,
    UnsupportedMediaError,
)
from training_server_process import run_captured
from training_server_utils import sanitize_filename

INPUTS_DIR = "inputs"  # the capture's folder in the task folder (its `video_filename`)
ERRORS: dict[str, type[ApiError]] = {
    "unsupported": UnsupportedMediaError,
    "too_large": PayloadTooLargeError,
    "unprocessable": UnprocessableError,
}


class UploadedFile(Protocol):
    """A received `file` part (training_server_upload.ReceivedFile)."""

    path: Path
    size: int
    filename: str | None


@dataclass
class Capture:
    """What the new task is made of: its input's name in the task folder, the bytes received,
    the client's name for it and the facts shown as `metadata.video`."""

    video_filename: str
    size: int
    original_filename: str | None
    info: dict[str, Any]


def api_error(exc: sources.SourceError) -> ApiError:
    """The HTTP error for a refused source."""
    return ERRORS.get(exc.kind, UnprocessableError)(exc.message)


async def accept_upload(
    settings: ServerConfig,
    task_dir: Path,
    files: Sequence[UploadedFile],
    check_disk: Callable[[], None],
) -> Capture:
    """Check the received files and lay them out in `task_dir`; a single video exactly as
    before, anything else as a capture of several sources."""
    first = files[0]
    head = await asyncio.to_thread(sources.read_head, first.path)
    if len(files) == 1 and not sources.is_zip(head) and sources.sniff_image(head) is None:
        info = await probe_video(settings, first.path)
        name = "input" + info.pop("extension", ".video")
        await asyncio.to_thread(first.path.rename, task_dir / name)
        return Capture(name, first.size, sanitize_filename(first.filename), info)
    try:
        return await _accept_capture(settings, task_dir, files, check_disk)
    except sources.SourceError as exc:
        raise api_error(exc) from None


def _shown(file: UploadedFile, number: int) -> str:
    return sanitize_filename(file.filename) or f"file {number}"


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


async def _refuse_duplicates(files: Sequence[UploadedFile]) -> None:
    """The same file twice adds nothing to a capture (and two identical videos give COLMAP
    views without any baseline): 400 naming both. Only files of equal size are hashed."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for k, file in enumerate(files):
        by_size[file.size].append(k)
    for group in by_size.values():
        if len(group) < 2:
            continue
        seen: dict[str, int] = {}
        for k in group:
            digest = await asyncio.to_thread(_digest, files[k].path)
            if digest in seen:
                a, b = _shown(files[seen[digest]], seen[digest] + 1), _shown(files[k], k + 1)
                raise BadRequestError(
                    f"The upload holds the same file twice ({a} and {b}): send each file once."
                )
            seen[digest] = k


async def _accept_capture(
    settings: ServerConfig,
    task_dir: Path,
    files: Sequence[UploadedFile],
    check_disk: Callable[[], None],
) -> Capture:
    await _refuse_duplicates(files)
    inputs = task_dir / INPUTS_DIR
    inputs.mkdir()
    number = 1  # the next source's folder or file number
    photo_sets: dict[str, list[sources.ImageInfo]] = {}
    described: list[dict[str, Any]] = []
    loose: list[tuple[UploadedFile, str]] = []
    videos = 0
    for k, file in enumerate(files, 1):
        shown = _shown(file, k)
        head = await asyncio.to_thread(sources.read_head, file.path)
        if sources.is_zip(head):
            sets = await asyncio.to_thread(
                sources.extract_zip,
                file.path,
                inputs,
                display_name=shown,
                max_bytes=settings.max_upload_bytes,
                first_index=number,
                check_disk=check_disk,
            )
            await asyncio.to_thread(file.path.unlink)
            number += len(sets)
            for found in sets:
                label = found.label if found.label not in photo_sets else found.folder.name
                photo_sets[label] = found.images
                described.append(_photo_record(label, found.images, shown))
        elif sources.sniff_image(head) is not None:
            loose.append((file, shown))
        else:
            try:
                info = await probe_video(settings, file.path)
            except UnsupportedMediaError as exc:
                raise UnsupportedMediaError(f"{shown}: {exc}") from None
            ext = info.pop("extension", ".video")
            stem = sources.safe_label(Path(shown).stem)
            target = inputs / f"{number:02d}_{stem}{ext}"
            await asyncio.to_thread(sources.move_into, file.path, target)
            number += 1
            videos += 1
            described.append({"kind": "video", "label": shown, "file": target.name, **info})
    if loose:
        folder = inputs / f"{number:02d}_photos"
        images = await asyncio.to_thread(_place_photos, loose, folder)
        label = "the photos sent" if len(loose) < len(files) else "the photos"
        photo_sets[label] = images
        described.append(_photo_record(label, images, None))
    await asyncio.to_thread(sources.check_capture, photo_sets, videos)
    total_photos = sum(len(images) for images in photo_sets.values())
    durations = [d["duration"] for d in described if d["kind"] == "video" and d.get("duration")]
    names = [_shown(f, k) for k, f in enumerate(files, 1)]
    original = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
    info = {
        "kind": "capture",
        "width": described[0].get("width"),
        "height": described[0].get("height"),
        "duration": round(sum(durations), 3) if durations else None,
        "videos": videos,
        "photos": total_photos,
        "sources": described,
    }
    return Capture(INPUTS_DIR, sum(f.size for f in files), original, info)


def _place_photos(loose: list[tuple[UploadedFile, str]], folder: Path) -> list[sources.ImageInfo]:
    """Move photos sent one by one into one photo set, each checked by content."""
    folder.mkdir()
    images = []
    for j, (file, shown) in enumerate(loose, 1):
        target = folder / f"{j:04d}_{sources.safe_label(shown)}"
        sources.move_into(file.path, target)
        images.append(sources.inspect_image(target, shown))
    return images


def _photo_record(
    label: str, images: list[sources.ImageInfo], archive: str | None
) -> dict[str, Any]:
    first = images[0]
    record: dict[str, Any] = {
        "kind": "photos",
        "label": label,
        "images": len(images),
        "width": first.width,
        "height": first.height,
        "formats": sorted({im.format for im in images}),
        "camera": sources.describe_camera(first),
    }
    if archive is not None:
        record["archive"] = archive
    return record


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
