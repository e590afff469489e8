"""Small pure helpers: file names, headers, paths; the stage protocol's names re-exported."""

from __future__ import annotations

import os
import re
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

# The stage protocol's contract lives with the pipeline; re-exported for the server modules.
from pipeline.protocol import (  # noqa: F401
    DATASET_DIR,
    STAGES,
    SUMMARY_NAME,
    parse_stage_line,
    pipeline_progress,
)

MAX_NAME_BYTES = 200
LOG_NAME = "training_server.log"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Bidirectional marks, embeddings, overrides and isolates: they make a shown name lie
# ("evil\u202egpj.exe" shows as "evilexe.jpg").
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def sanitize_filename(name: str | None) -> str | None:
    """A client's file name made safe to store and show: no path, no control characters,
    at most MAX_NAME_BYTES of UTF-8. None when nothing usable is left."""
    if not name:
        return None
    name = unicodedata.normalize("NFC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _BIDI.sub("", _CONTROL.sub("", name)).strip().strip(".")
    if not name:
        return None
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        ext = ext if dot and len(ext.encode()) <= 16 else ""
        room = MAX_NAME_BYTES - len(ext.encode()) - (1 if ext else 0)
        stem = (stem if dot else name).encode("utf-8")[:room].decode("utf-8", "ignore")
        name = f"{stem}.{ext}" if ext else stem
    return name


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """A Content-Disposition header value safe for any file name (RFC 6266 / RFC 5987)."""
    fallback = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode()
    fallback = re.sub(r"[^A-Za-z0-9._ -]", "_", fallback).strip() or "download"
    encoded = quote(filename, safe="")
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def download_name(original: str | None, task_id: str, suffix: str) -> str:
    """The name a downloaded result gets: the upload's stem (sanitized) or the task id."""
    stem = task_id
    if original:
        base = original.rsplit(".", 1)[0] if "." in original else original
        base = sanitize_filename(base)
        if base:
            stem = base
    return f"{stem}{suffix}"


def parse_bool(value: str) -> bool:
    """A form or query boolean, as HTML forms and curl users write them."""
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def human_bytes(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def safe_files(root: Path, prefix: str) -> list[tuple[Path, str]]:
    """Regular files below `root` as (path, archive name under `prefix`), sorted; symbolic
    links are skipped (never followed), so nothing outside `root` can be reached."""
    if root.is_symlink() or not root.is_dir():
        return []
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            found.append((path, f"{prefix}/{path.relative_to(root).as_posix()}"))
    return found


@dataclass(frozen=True)
class Paths:
    """Where a task's files live (the spec's layout)."""

    temp_dir: Path
    logs_dir: Path

    def task_dir(self, task_id: str) -> Path:
        """temp_workspace/{task_id}: the video, frames and the COLMAP dataset."""
        return self.temp_dir / task_id

    def dataset_dir(self, task_id: str) -> Path:
        """The undistorted COLMAP dataset the trainer reads."""
        return self.task_dir(task_id) / DATASET_DIR

    def output_root(self) -> Path:
        """temp_workspace/checkpoints: the trainer's --output."""
        return self.temp_dir / "checkpoints"

    def output_dir(self, task_id: str) -> Path:
        """temp_workspace/checkpoints/{task_id}: one training run's results."""
        return self.output_root() / task_id

    def log_file(self, task_id: str) -> Path:
        """logs/{task_id}/training_server.log."""
        return self.logs_dir / task_id / LOG_NAME


def readable_errors(errors: list[Any]) -> str:
    parts = []
    for error in errors:
        location = ".".join(str(p) for p in error.get("loc", ()) if p not in {"body", "query"})
        message = error.get("msg", "invalid")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts) or "Invalid request"


def jsonable_errors(errors: list[Any]) -> list[dict[str, Any]]:
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")}
        for e in errors
    ]


def is_task_id(name: str) -> bool:
    """Whether `name` is a canonical UUID, the only form task ids take."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False
