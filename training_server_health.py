"""Whether each stage can run here, and the server's health answer: the preprocessing
command and the trainer are checked at start-up, on demand (`/health?recheck=true`) and, for
training, again before a training starts when the last check is old; the temp folder is
checked for room and for being writable."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import training_server_stages as stages
import training_server_trainer as trainer
from training_server_install import install_problem
from training_server_models import CommandHealth, ServerConfig


class StageHealth:
    """The latest verdict on each stage's command."""

    def __init__(self, settings: ServerConfig) -> None:
        self.settings = settings
        self.checkout = trainer.find_trainer_checkout(settings.trainer_path, Path.cwd())
        self.preprocessing = CommandHealth(available=False, detail="not checked yet")
        self.training = CommandHealth(available=False, detail="not checked yet")
        self._training_checked = 0.0

    async def check_all(self) -> None:
        """Check both stages (in parallel)."""
        await asyncio.gather(self.check_preprocessing(), self.check_training())

    async def check_preprocessing(self) -> CommandHealth:
        """Whether the preprocessing command and its libraries are usable."""
        self.preprocessing = await stages.check_preprocessing(self.settings)
        return self.preprocessing

    async def check_training(self) -> CommandHealth:
        """Whether the trainer can run here: checkout present, torch with CUDA, and a dry run
        of the exact command a training runs; a failed trainer install says which step."""
        self.checkout = trainer.find_trainer_checkout(self.settings.trainer_path, Path.cwd())
        verdict = await stages.check_training(self.settings, self.checkout)
        if not verdict.available:
            problem = install_problem(self.settings.trainer_install_dir)
            if problem is not None:
                verdict = CommandHealth(available=False, detail=f"{verdict.detail}; {problem}")
        self.training = verdict
        self._training_checked = time.monotonic()
        return self.training

    async def training_ready(self) -> CommandHealth:
        """The training verdict, checked again first when unavailable or old."""
        stale = time.monotonic() - self._training_checked > self.settings.trainer_recheck_after
        if not self.training.available or stale:
            await self.check_training()
        return self.training


def storage_problem(folder: Path, min_free_bytes: int) -> str | None:
    """A sentence when the folder tasks are written to cannot take new work, else None."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError as exc:
        return f"the temp folder {folder} cannot be read: {exc.strerror or exc}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the temp folder {folder} is not writable by the server"
    if usage.free <= min_free_bytes:
        return (
            f"the temp folder {folder} is full ({usage.free} bytes free, "
            f"{min_free_bytes} needed): uploads are refused until space is freed"
        )
    return None


async def cluster_health(executor: object) -> dict[str, Any] | None:
    """The cluster the stages run on (nodes, GPUs total and free, Ray's version, and what
    keeps it from taking work), or None when they run on this machine."""
    describe = getattr(executor, "health", None)
    if describe is None:
        return None
    return await describe()
