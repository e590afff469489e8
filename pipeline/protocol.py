"""The contract between run_pipeline.py and the server (docs/stage-protocol.md).

Where the dataset and its summary are written, the preprocessing stages in order (one label
each, shown to the user), and the structured stdout lines: a writer for the pipeline and a
parser for the server. Standard library only, so the server can import it cheaply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TextIO

SUMMARY_NAME = "preprocess_summary.json"
DATASET_DIR = "images_undistorted"
PROGRESS_TAG = "@progress"
ERROR_TAG = "@error"


@dataclass(frozen=True)
class Stage:
    """One preprocessing stage: its human-readable label and its share of the whole run's
    progress (rough wall-time shares measured on 100-frame videos)."""

    label: str
    share: float


# The preprocessing stages, in the order they run.
STAGES: dict[str, Stage] = {
    "decode": Stage("Decoding video", 0.04),
    "select": Stage("Selecting frames", 0.01),
    "features": Stage("Feature extraction", 0.30),
    "matching": Stage("Feature matching", 0.25),
    "mapping": Stage("Camera tracking", 0.35),
    "undistort": Stage("Undistorting images", 0.05),
}


def progress_line(stage: str, current: int, total: int | None) -> str:
    """The `@progress {...}` line (without newline) for `current` of `total` in `stage`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage: {stage!r}")
    payload = {"stage": stage, "label": STAGES[stage].label, "current": current, "total": total}
    return f"{PROGRESS_TAG} {json.dumps(payload)}"


def error_line(code: str, message: str) -> str:
    """The `@error {...}` line (without newline) carrying the one message a user should read."""
    return f"{ERROR_TAG} {json.dumps({'code': code, 'message': message})}"


def write_line(stream: TextIO, line: str) -> None:
    """Write one protocol line and flush it at once, so the server sees it while we run."""
    stream.write(f"{line}\n")
    stream.flush()


def parse_stage_line(line: str) -> tuple[str, dict[str, Any]] | None:
    """A structured `@progress {...}` / `@error {...}` line of the stage protocol as
    ("progress" | "error", payload), or None for any other line."""
    if not line.startswith("@"):
        return None
    tag, _, payload = line.partition(" ")
    if tag not in {PROGRESS_TAG, ERROR_TAG}:
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return tag[1:], data


def pipeline_progress(data: dict[str, Any]) -> dict[str, Any] | None:
    """The fields of a preprocessing Progress (step, label, current, total, percent of the
    whole run) for a `@progress` payload; None for an unknown stage."""
    step = data.get("stage")
    if step not in STAGES:
        return None
    current = data.get("current")
    total = data.get("total")
    current = current if isinstance(current, int) and current >= 0 else None
    total = total if isinstance(total, int) and total > 0 else None
    fraction = min(1.0, current / total) if current is not None and total else 0.0
    done_before = 0.0
    for name, stage in STAGES.items():
        if name == step:
            break
        done_before += stage.share
    label = data.get("label") if isinstance(data.get("label"), str) else None
    return {
        "step": step,
        "label": label or STAGES[step].label,
        "current": current,
        "total": total,
        "percent": round(100 * (done_before + STAGES[step].share * fraction), 1),
    }
