"""The two pipeline stages as subprocesses: preprocessing (run_pipeline.py, or any command
with its command line) and training (gaussian-splatting-lightning's `main.py fit`).

Each stage function gets a StageContext, runs its command through the task's executor
(training_server_executor), turns the command's output into progress, and returns a
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

import training_server_exports as exports
import training_server_trainer as trainer
import training_server_trainer_output as trainer_output
import training_server_trainer_progress as trainer_progress
from training_server_executor import Executor, RunHandle, StageCommand, follow_handle, run_command
from training_server_models import CommandHealth, EndReason, ServerConfig, Stage, TaskParams
from training_server_process import ProcessOutcome, TaskLog, run_captured
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
    record_ref: Callable[[dict[str, Any]], Awaitable[None]]
    record_metadata: Callable[[dict[str, Any]], None]  # merged into the task's metadata
    executor: Executor
    stage: Stage
    attempt: int
    checkout: Path | None = None
    # A run that outlived a server restart (a Ray job): followed instead of starting one.
    attached: RunHandle | None = None


async def _run(
    ctx: StageContext,
    argv: list[str],
    *,
    cwd: Path,
    timeout_s: float,
    on_text: Callable[[bytes], None],
    env: dict[str, str],
) -> ProcessOutcome:
    def on_output(chunk: bytes) -> None:
        ctx.log.feed(chunk)
        on_text(chunk)

    if ctx.attached is not None:
        handle, ctx.attached = ctx.attached, None
        ctx.log.event(f"Following the run that kept going: {handle.ref}; its output so far follows")
        return await follow_handle(
            handle, timeout_s, on_output, ctx.settings.kill_grace, on_ref_change=ctx.record_ref
        )
    ctx.log.event("Running: " + " ".join(argv))

    command = StageCommand(
        task_id=ctx.task_id,
        stage=ctx.stage,
        attempt=ctx.attempt,
        argv=argv,
        cwd=cwd,
        env=env,
        timeout_s=timeout_s,
    )
    return await run_command(
        ctx.executor,
        command,
        on_output=on_output,
        on_started=ctx.record_ref,
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
        line for line in log.tail[-TAIL_IN_ERROR:] if not trainer_progress.is_progress_output(line)
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


def trainer_setup(settings: ServerConfig, checkout: Path | None) -> trainer.TrainerSetup:
    """The trainer as the server's settings run it (what a dry run checks)."""
    return trainer.TrainerSetup(
        python=settings.trainer_python,
        checkout=checkout,
        require_cuda=settings.trainer_require_cuda,
        timeout_s=settings.trainer_check_timeout,
        config=settings.trainer_config,
        extra_args=tuple(settings.trainer_extra_args),
        iterations=settings.trainer_iterations,
        checkpoint_every=settings.trainer_checkpoint_every,
        hold_out=settings.trainer_hold_out,
        eval_step=settings.trainer_eval_step,
    )


async def check_training(settings: ServerConfig, checkout: Path | None) -> CommandHealth:
    """Whether the trainer can run here: the CUDA probe, then a dry run of its command line."""
    setup = trainer_setup(settings, checkout)
    ok, detail = await trainer.check_training_available(
        setup.python, setup.checkout, setup.require_cuda, setup.timeout_s, setup=setup
    )
    return CommandHealth(available=ok, detail=detail)


def _training_fields(update: trainer_progress.TrainingProgress, label: str) -> dict[str, Any]:
    return {
        "step": "training",
        "label": label,
        "current": update.step,
        "total": update.total,
        "percent": update.percent,
        "rate": update.rate,
        "eta_seconds": update.eta_seconds,
        "loss": update.loss,
        "psnr": update.psnr,
    }


@dataclass(frozen=True)
class Resolution:
    """The training images' size and how it was chosen."""

    factor: int
    source_size: tuple[int, int] | None  # the dataset's images
    size: tuple[int, int] | None  # what the trainer trains on
    max_image_size: int | None  # the limit the factor was chosen for (None: factor given)

    def describe(self) -> str:
        """One sentence for the task log."""
        if self.size is None or self.source_size is None:
            return f"Training at 1/{self.factor} of the images' size (their size is unknown)"
        size = f"{self.size[0]}x{self.size[1]} px"
        source = f"{self.source_size[0]}x{self.source_size[1]}"
        why = (
            f"longest side at most {self.max_image_size} px"
            if self.max_image_size is not None
            else "down_sample_factor asked for"
        )
        return f"Training images: {size} (1/{self.factor} of {source}; {why})"

    def as_metadata(self) -> dict[str, Any]:
        """What `metadata.training` records about the resolution."""
        return {
            "down_sample_factor": self.factor,
            "max_image_size": self.max_image_size,
            "image_size": {"width": self.size[0], "height": self.size[1]} if self.size else None,
            "source_image_size": (
                {"width": self.source_size[0], "height": self.source_size[1]}
                if self.source_size
                else None
            ),
        }


def choose_resolution(params: TaskParams, settings: ServerConfig, dataset: Path) -> Resolution:
    """The task's down-sample factor: the one it asked for, else the smallest that brings the
    longest side to its (or the server's) max_image_size."""
    try:
        source: tuple[int, int] | None = trainer_output.dataset_image_size(dataset)
    except ValueError:
        source = None
    if params.down_sample_factor is not None:
        factor, limit = params.down_sample_factor, None
    else:
        limit = params.max_image_size or settings.trainer_max_image_size
        factor = trainer_output.choose_down_sample_factor(source, limit) if source else 1
    size = trainer_output.down_sampled_size(source, factor) if source else None
    return Resolution(factor, source, size, limit)


class _SnapshotWatch:
    """Prunes old snapshots each time the trainer says it saved a checkpoint."""

    MARK = b"Checkpoint saved to"

    def __init__(self, output_dir: Path) -> None:
        self._output_dir = output_dir
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        window = self._tail + chunk
        self._tail = window[-len(self.MARK) :]
        if self.MARK in window:
            with contextlib.suppress(OSError):
                trainer_output.prune_snapshots(self._output_dir)


async def train(ctx: StageContext) -> StageResult:
    """Run `main.py fit` on the task's dataset, resuming from the newest checkpoint when one
    exists; the result records the model, the training resolution and the quality figures."""
    if ctx.checkout is None:
        return StageResult(
            EndReason.FAILED, "Training failed", "No gaussian-splatting-lightning checkout."
        )
    settings = ctx.settings
    ok, detail = await trainer.check_if_stale(
        trainer_setup(settings, ctx.checkout), settings.trainer_recheck_after
    )
    if not ok:
        return StageResult(
            EndReason.FAILED, "Training not available", f"Training is not available: {detail}"
        )
    started = time.monotonic()
    output_dir = ctx.paths.output_dir(ctx.task_id)
    dataset = ctx.paths.dataset_dir(ctx.task_id)
    iterations = ctx.params.iterations
    hold_out = ctx.params.hold_out if ctx.params.hold_out is not None else settings.trainer_hold_out
    if ctx.attached is not None:  # the trainer runs on in this folder: leave it as it is
        plan = trainer_output.ResumePlan("fresh", "Reattached to the training that kept running")
    else:
        plan = await asyncio.to_thread(trainer_output.prepare_output_dir, output_dir, iterations)
    ctx.log.event(plan.message)
    resolution = await asyncio.to_thread(choose_resolution, ctx.params, settings, dataset)
    label = "Training"
    if plan.resume:
        label = f"Training (resumed from step {plan.start_step} of {iterations})"
    parser = trainer_progress.TrainingProgressParser(
        total_steps=iterations, initial_step=plan.start_step
    )
    if plan.action != "complete":
        ctx.log.event(resolution.describe())
        if resolution.factor > 1:
            await asyncio.to_thread(
                trainer_output.prepare_downsampled_images, dataset, resolution.factor
            )
        argv = trainer.build_fit_command(
            python=settings.trainer_python,
            checkout=ctx.checkout,
            dataset_path=dataset,
            output_root=ctx.paths.output_root(),
            name=ctx.task_id,
            iterations=iterations,
            down_sample_factor=resolution.factor,
            config=settings.trainer_config,
            extra_args=settings.trainer_extra_args,
            resume=plan.resume,
            checkpoint_every=settings.trainer_checkpoint_every,
            hold_out=hold_out,
            eval_step=settings.trainer_eval_step,
        )
        if plan.resume:
            ctx.report_progress(
                {"step": "training", "label": label, "current": plan.start_step,
                 "total": iterations, "percent": round(100 * plan.start_step / iterations, 2)}
            )  # fmt: skip
        snapshots = _SnapshotWatch(output_dir)
        await asyncio.to_thread(exports.remove_files, output_dir, exports.MODEL_SPZ)  # stale

        def on_text(chunk: bytes) -> None:
            snapshots.feed(chunk)
            update = parser.feed(chunk)
            if update is not None:
                ctx.report_progress(_training_fields(update, label))

        timeout_s = settings.training_timeout
        previews = exports.PreviewWatcher(
            output_dir,
            ctx.paths.task_dir(ctx.task_id),
            iterations,
            ctx.log,
            on_preview=lambda info: ctx.record_metadata({"training_preview": info}),
        )
        previews.start()
        try:
            outcome = await _run(
                ctx,
                argv,
                cwd=ctx.checkout,
                timeout_s=timeout_s,
                on_text=on_text,
                env=trainer.trainer_environment(),
            )
        finally:
            await previews.stop()
        await asyncio.to_thread(trainer_output.prune_snapshots, output_dir, iterations)
        if outcome.timed_out or outcome.returncode != 0:
            return failure(Stage.TRAINING, outcome, ctx.log, timeout_s)
    try:
        results: dict[str, Any] = dict(
            await asyncio.to_thread(trainer_output.collect_results, output_dir)
        )
    except (OSError, ValueError) as exc:
        return StageResult(
            EndReason.FAILED, "Training failed", f"Training ended without a model: {exc}"
        )
    results["seconds"] = round(time.monotonic() - started, 1)
    results.update(resolution.as_metadata())
    results["hold_out"] = hold_out
    results["resumed_from_step"] = plan.start_step if plan.resume else None
    quality = await asyncio.to_thread(
        trainer.training_quality, output_dir, iterations, parser, hold_out
    )
    results["quality"] = quality
    if quality is not None:
        ctx.log.event(
            f"Quality at step {quality['step']}: PSNR {quality['psnr']}, SSIM "
            f"{quality['ssim']}, LPIPS {quality['lpips']} ({quality['note']})"
        )
    results["other_files"] = [f for f in results["other_files"] if f != exports.MODEL_SPZ]
    results.update(
        await exports.export_final(
            output_dir,
            ctx.paths.task_dir(ctx.task_id),
            results["ply_path"],
            ctx.params.spz_sh_degree,
            ctx.log,
        )
    )
    message = "Training completed"
    if plan.resume:
        message += f" (resumed from step {plan.start_step} of {iterations})"
    return StageResult(EndReason.SUCCEEDED, message, metadata={"training": results})
