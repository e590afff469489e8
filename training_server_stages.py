"""The two pipeline stages as subprocesses: preprocessing (run_pipeline.py, or any command
with its command line) and training (gaussian-splatting-lightning's `main.py fit`).

Each stage function gets a StageContext, runs its command through
training_server_process.run_process, turns the command's output into progress, and returns a
StageResult that says in words how it ended. Status changes are not made here.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import training_server_trainer as trainer
from training_server_models import CommandHealth, EndReason, ServerConfig, Stage, TaskParams
from training_server_process import (
    TASK_MARKER,
    ProcessOutcome,
    TaskLog,
    run_captured,
    run_process,
)
from training_server_utils import (
    DATASET_DIR,
    SUMMARY_NAME,
    Paths,
    parse_stage_line,
    pipeline_progress,
)

TAIL_IN_ERROR = 20  # output lines quoted in error_message
_STAGE_LINE = re.compile(r"^@(?:progress|error) [^\r\n]*", re.MULTILINE)


@dataclass
class StageResult:
    """How a stage run ended, in words for the user."""

    reason: EndReason
    message: str
    error: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass
class StageContext:
    """What a stage run needs from the server."""

    task_id: str
    row: dict[str, Any]
    params: TaskParams
    settings: ServerConfig
    paths: Paths
    log: TaskLog
    report_progress: Callable[[dict[str, Any]], None]
    record_pid: Callable[[int, int | None], Awaitable[None]]
    checkout: Path | None = None


async def _run(
    ctx: StageContext,
    argv: list[str],
    *,
    cwd: Path,
    timeout_s: float,
    on_text: Callable[[bytes], None],
    env: dict[str, str],
) -> ProcessOutcome:
    ctx.log.event("Running: " + " ".join(argv))

    def on_output(chunk: bytes) -> None:
        ctx.log.feed(chunk)
        on_text(chunk)

    return await run_process(
        argv,
        cwd=cwd,
        timeout_s=timeout_s,
        on_output=on_output,
        on_started=ctx.record_pid,
        env={**env, TASK_MARKER: ctx.task_id},
        kill_grace=ctx.settings.kill_grace,
    )


OFFLINE_MARKERS = (
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "No address associated with hostname",
)
DOWNLOAD_LINE = re.compile(r'Downloading:? "?(https?://[^"\s]+)"? to (\S+)')


def offline_hint(lines: list[str]) -> str | None:
    """A sentence for a stage that failed because it tried to download something offline.

    The trainer's LPIPS metric fetches its backbone's weights (torch.hub) on first use; on a GPU
    box without internet access that ends in a resolver error deep in a traceback."""
    text = "\n".join(lines)
    if not any(marker in text for marker in OFFLINE_MARKERS):
        return None
    wanted = DOWNLOAD_LINE.findall(text)
    if wanted:
        url, path = wanted[-1]
        return (
            f"It tried to download {url} and this machine cannot reach the internet: "
            f"download that file elsewhere and put it at {path}, then retry."
        )
    return (
        "It tried to download a file and this machine cannot reach the internet: run it once "
        "on a machine that can, or copy the files it needs into place, then retry."
    )


def failure(stage: Stage, outcome: ProcessOutcome, log: TaskLog, timeout_s: float) -> StageResult:
    """The result of a run that timed out or exited non-zero, quoting its last output."""
    name = stage.value.capitalize()
    if outcome.timed_out:
        return StageResult(
            EndReason.TIMED_OUT,
            f"{name} timed out",
            f"{name} timed out after {timeout_s:g} s and was stopped.",
        )
    tail = "\n".join(
        line for line in log.tail[-TAIL_IN_ERROR:] if not trainer.is_progress_output(line)
    )
    code = outcome.returncode
    if code is not None and code < 0:
        how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    hint = offline_hint(log.tail)
    headline = f"{name} {how}." + (f" {hint}" if hint else "")
    return StageResult(
        EndReason.FAILED,
        f"{name} failed",
        f"{headline} Last output:\n{tail}" if tail else headline,
    )


# -- preprocessing -----------------------------------------------------------------------


async def check_preprocessing(settings: ServerConfig) -> CommandHealth:
    """Whether the preprocessing command exists and its interpreter has its libraries."""
    command = settings.preprocess_command
    script = next((Path(a) for a in command if a.endswith(".py")), None)
    if script is not None and not script.is_file():
        return CommandHealth(available=False, detail=f"{script} does not exist")
    try:
        outcome, output = await run_captured(
            [command[0], "-c", "import av, cv2, pycolmap"], cwd=Path.cwd(), timeout_s=120
        )
    except OSError as exc:
        return CommandHealth(available=False, detail=f"{command[0]} cannot be started: {exc}")
    if outcome.returncode == 0:
        return CommandHealth(available=True, detail="ready")
    last = (output.strip().splitlines() or ["no answer (timed out)"])[-1]
    return CommandHealth(
        available=False, detail=f"{command[0]} cannot import av, cv2 and pycolmap: {last}"
    )


class PipelineOutput:
    """Reads run_pipeline.py's `@progress` / `@error` lines out of its output stream."""

    def __init__(self, on_progress: Callable[[dict[str, Any]], None]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._on_progress = on_progress
        self.error: str | None = None

    def feed(self, chunk: bytes) -> None:
        """Take raw output; report progress and remember the error message."""
        text = self._pending + self._decoder.decode(chunk)
        cut = max(text.rfind("\n"), text.rfind("\r")) + 1
        complete, self._pending = text[:cut], text[cut:][-65536:]
        if "@" not in complete:
            return
        for match in _STAGE_LINE.finditer(complete):
            parsed = parse_stage_line(match.group(0))
            if parsed is None:
                continue
            kind, data = parsed
            if kind == "progress":
                fields = pipeline_progress(data)
                if fields is not None:
                    self._on_progress(fields)
            elif kind == "error" and isinstance(data.get("message"), str):
                self.error = data["message"]


def clear_outputs(task_dir: Path, keep: str) -> None:
    """Remove everything in a task folder but the uploaded video (a clean rerun)."""
    for entry in task_dir.iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


async def preprocess(ctx: StageContext) -> StageResult:
    """Run the preprocessing command on the task's video; the dataset lands in the task dir."""
    task_dir = ctx.paths.task_dir(ctx.task_id)
    video = task_dir / ctx.row["video_filename"]
    await asyncio.to_thread(clear_outputs, task_dir, video.name)
    argv = [
        *ctx.settings.preprocess_command,
        "--video_path",
        str(video),
        "--output_dir",
        str(task_dir),
        "--max_frames",
        str(ctx.params.max_frames),
        "--min_frames",
        str(ctx.params.min_frames),
        *ctx.settings.preprocess_extra_args,
    ]
    output = PipelineOutput(ctx.report_progress)
    timeout_s = ctx.settings.preprocess_timeout
    outcome = await _run(
        ctx,
        argv,
        cwd=task_dir,
        timeout_s=timeout_s,
        on_text=output.feed,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if outcome.timed_out or outcome.returncode != 0:
        result = failure(Stage.PREPROCESSING, outcome, ctx.log, timeout_s)
        if output.error and not outcome.timed_out:
            result.error = output.error
        return result
    if not (ctx.paths.dataset_dir(ctx.task_id) / "sparse" / "0").is_dir():
        return StageResult(
            EndReason.FAILED,
            "Preprocessing failed",
            f"Preprocessing ended without writing the dataset ({DATASET_DIR}/sparse/0).",
        )
    summary: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((task_dir / SUMMARY_NAME).read_text())
    return StageResult(
        EndReason.SUCCEEDED, "Preprocessing completed", metadata={"preprocessing": summary}
    )


# -- training ----------------------------------------------------------------------------


def _training_fields(update: trainer.TrainingProgress) -> dict[str, Any]:
    return {
        "step": "training",
        "label": "Training",
        "current": update.step,
        "total": update.total,
        "percent": update.percent,
        "rate": update.rate,
        "eta_seconds": update.eta_seconds,
        "loss": update.loss,
        "psnr": update.psnr,
    }


async def train(ctx: StageContext) -> StageResult:
    """Run `main.py fit` on the task's dataset, resuming from a checkpoint when one exists."""
    if ctx.checkout is None:
        return StageResult(
            EndReason.FAILED, "Training failed", "No gaussian-splatting-lightning checkout."
        )
    started = time.monotonic()
    output_dir = ctx.paths.output_dir(ctx.task_id)
    dataset = ctx.paths.dataset_dir(ctx.task_id)
    iterations = ctx.params.iterations
    plan = await asyncio.to_thread(trainer.prepare_output_dir, output_dir, iterations)
    ctx.log.event(plan.message)
    if plan.action != "complete":
        if ctx.params.down_sample_factor > 1:
            await asyncio.to_thread(
                trainer.prepare_downsampled_images, dataset, ctx.params.down_sample_factor
            )
        argv = trainer.build_fit_command(
            python=ctx.settings.trainer_python,
            checkout=ctx.checkout,
            dataset_path=dataset,
            output_root=ctx.paths.output_root(),
            name=ctx.task_id,
            iterations=iterations,
            down_sample_factor=ctx.params.down_sample_factor,
            config=ctx.settings.trainer_config,
            extra_args=ctx.settings.trainer_extra_args,
            resume=plan.resume,
        )
        parser = trainer.TrainingProgressParser(
            total_steps=iterations, initial_step=plan.start_step
        )

        def on_text(chunk: bytes) -> None:
            update = parser.feed(chunk)
            if update is not None:
                ctx.report_progress(_training_fields(update))

        timeout_s = ctx.settings.training_timeout
        outcome = await _run(
            ctx,
            argv,
            cwd=ctx.checkout,
            timeout_s=timeout_s,
            on_text=on_text,
            env=trainer.trainer_environment(),
        )
        if outcome.timed_out or outcome.returncode != 0:
            return failure(Stage.TRAINING, outcome, ctx.log, timeout_s)
    try:
        results: dict[str, Any] = dict(await asyncio.to_thread(trainer.collect_results, output_dir))
    except (OSError, ValueError) as exc:
        return StageResult(
            EndReason.FAILED, "Training failed", f"Training ended without a model: {exc}"
        )
    results["seconds"] = round(time.monotonic() - started, 1)
    return StageResult(EndReason.SUCCEEDED, "Training completed", metadata={"training": results})
