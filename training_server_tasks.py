"""The home of running work: `TaskManager` puts the pieces together and owns their life
cycle — recovery at start-up, the named background loops (watched: one that dies is logged and
restarted), and shutdown.

The pieces, each in its own module: records (reads, the public view, publishing changes),
state (the transition table and the named operations), scheduler (queues, slots, claims),
runner (one stage run to its recorded end), executor (where commands run), control (create,
cancel, retry, train, delete), health (whether each stage can run), cleanup (retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import training_server_cleanup as cleanup
import training_server_state as state
from training_server_control import Control, remove_files
from training_server_db import Database, TaskNotFoundError
from training_server_executor import Executor, LocalExecutor
from training_server_health import StageHealth
from training_server_models import ServerConfig, Stage, TaskStatus
from training_server_process import TaskLog, kill_pids, marked_processes
from training_server_ray import RayExecutor  # imports Ray itself only when used
from training_server_records import Records
from training_server_runner import Runner
from training_server_scheduler import Scheduler
from training_server_utils import Paths, is_task_id
from training_server_views import EventBus

log = logging.getLogger("training_server")
S = TaskStatus
LOOP_RESTART_MAX = 30.0  # longest pause before a background loop that died is restarted
QUARANTINE = "quarantine"


class WorkspaceError(RuntimeError):
    """The workspace and the database disagree in a way an operator must settle."""


class TaskManager:
    """Owns the task pieces and their life cycle."""

    def __init__(
        self,
        settings: ServerConfig,
        db: Database,
        events: EventBus | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.events = events or EventBus()
        self.paths = Paths(settings.temp_dir.resolve(), settings.logs_dir.resolve())
        self.records = Records(db, self.events)
        self.health = StageHealth(settings)
        self.executor = executor or make_executor(settings, self.paths.temp_dir)
        self.runner = Runner(
            settings,
            self.paths,
            db,
            self.records,
            self.executor,
            self.health,
            on_slot_free=lambda: self.scheduler.wake(),
        )
        self.scheduler = Scheduler(settings, db, self.records, self.runner, self.health)
        self.control = Control(
            db,
            self.records,
            self.runner,
            self.scheduler,
            self.health,
            self.paths,
            settings.log_max_bytes,
        )
        self._loops: list[asyncio.Task[None]] = []

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Recover from an earlier run, check the stage commands, start the loops."""
        self.paths.temp_dir.mkdir(parents=True, exist_ok=True)
        self.paths.logs_dir.mkdir(parents=True, exist_ok=True)
        ray = self._ray()
        if ray is not None and ray.settings_problem:
            log.error("the Ray executor cannot work: %s", ray.settings_problem)
        await self._recover()
        await self.health.check_all()
        self.scheduler.accepting = True
        self._loops = [
            asyncio.create_task(
                _watched("scheduler", self.scheduler.run_forever), name="scheduler"
            ),
            *(
                [asyncio.create_task(_watched("cluster", self._watch_cluster), name="cluster")]
                if ray is not None
                else []
            ),
            asyncio.create_task(
                _watched(
                    "cleanup",
                    lambda: cleanup.run_forever(
                        self.settings.cleanup_interval, self.cleanup_expired
                    ),
                ),
                name="cleanup",
            ),
        ]
        self.scheduler.wake()

    async def shutdown(self) -> None:
        """Stop taking work; end running stages (terminate, grace, kill) and record why."""
        self.scheduler.accepting = False
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await self.runner.shutdown()

    def _ray(self) -> RayExecutor | None:
        return self.executor if isinstance(self.executor, RayExecutor) else None

    async def _watch_cluster(self) -> None:
        """Check the shared storage with a probe job until it passes (at start-up, and again
        whenever the cluster was away), and wake the scheduler when the cluster comes back."""
        ray = self._ray()
        assert ray is not None
        was_reachable = None
        while True:
            view = await ray.cluster(max_age=0)
            if view.reachable and (ray.storage_problem is not None or not was_reachable):
                problem = await ray.check_storage()
                if problem:
                    log.error("Ray executor: %s", problem)
                else:
                    log.info("Ray cluster at %s: the shared storage checked out", ray.address)
                self.scheduler.wake()
            elif not view.reachable and was_reachable is not False:
                log.error("Ray executor: %s; tasks wait for it", view.problem)
            was_reachable = view.reachable
            await asyncio.sleep(2.0)

    def loops_alive(self) -> dict[str, bool]:
        """Whether each named background loop runs."""
        return {loop.get_name(): not loop.done() for loop in self._loops}

    async def cleanup_expired(self) -> list[str]:
        """Remove the files of tasks that ended more than cleanup_ttl ago; keep their record."""
        return await cleanup.sweep(
            self.settings,
            self.db,
            lambda task_id: remove_files(self.paths, task_id),
            self.records.publish,
        )

    # -- recovery ------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Re-queue tasks a dead server left running (ending what survived of them), end
        stray stage processes of this workspace, and settle folders without a record."""
        known = await self.db.all_ids()
        folders = self._task_folders()
        orphans = [f for f in folders if f.name not in known]
        if self.db.created and orphans:
            await self._settle_new_database(orphans)
        for row in await self.db.tasks_in([s.value for s in state.RUNNING]):
            ref = row["run_ref"] or {"pid": row["pid"], "start_time": row["pid_start_time"]}
            if await self._reattach(row, ref):
                continue
            killed = await self.executor.clear_leftovers(row["id"], ref)
            if killed:
                log.warning("killed %d leftover processes of task %s", killed, row["id"])
            message = "Interrupted by server restart; queued to run again"
            with contextlib.suppress(state.InvalidTransitionError, TaskNotFoundError):
                await state.requeue_interrupted(
                    self.db, row["id"], S(row["status"]), message=message, run_ref=None
                )
            stage = row["stage"] or Stage.PREPROCESSING.value
            self._append_log(row["id"], f"{message} (stage {stage})")
        # Stage processes of this workspace's tasks that no record runs (e.g. started while
        # a cancel landed, before their pid was recorded): nothing runs yet, so all go.
        ours = known | {f.name for f in folders}
        if self._ray() is not None:
            ours = set()  # marked processes here are Ray jobs of a node on this machine
        strays = {task: pids for task, pids in marked_processes().items() if task in ours}
        if strays:
            killed = await asyncio.to_thread(kill_pids, [p for ps in strays.values() for p in ps])
            log.warning("killed %d stray stage processes of %d tasks", killed, len(strays))
        if not self.db.created:
            for folder in orphans:
                self._settle_orphan(folder)

    async def _reattach(self, row: dict, ref: dict) -> bool:
        """Follow a training that kept running on the cluster while the server was down (its
        ending, even one reached meanwhile, is recorded as usual); False when it cannot be."""
        if row["status"] != S.TRAINING.value:
            return False  # a preprocessing run is cheap: it is stopped and runs again
        handle = await self.executor.reattach(ref)
        if handle is None:
            return False
        self._append_log(row["id"], f"Server restarted; following its training job {ref}")
        self.runner.start(row, Stage.TRAINING, attached=handle)
        return True

    def _task_folders(self) -> list[Path]:
        if not self.paths.temp_dir.is_dir():
            return []
        return [
            entry
            for entry in self.paths.temp_dir.iterdir()
            if entry.is_dir() and not entry.is_symlink() and is_task_id(entry.name)
        ]

    async def _settle_new_database(self, orphans: list[Path]) -> None:
        """A database created at this start beside existing task folders: the wrong working
        directory or a lost file, most likely. Refuse unless told what to do with them."""
        action = self.settings.orphan_folders
        where = self.paths.temp_dir
        if action == "refuse":
            raise WorkspaceError(
                f"The database {self.settings.db_path} is new, but {where} holds "
                f"{len(orphans)} task folders from an earlier database. Point "
                "TRAINING_SERVER_DB_PATH at that database (relative paths are resolved "
                f"against {self.settings.base_dir}), or start with "
                "TRAINING_SERVER_ORPHAN_FOLDERS=quarantine to move them aside "
                "(or =discard to delete them)."
            )
        for folder in orphans:
            if action == "discard":
                shutil.rmtree(folder, ignore_errors=True)
            else:
                self._quarantine(folder)
        log.warning(
            "%s %d task folders that the new database does not know (%s)",
            "deleted" if action == "discard" else "moved aside",
            len(orphans),
            where if action == "discard" else where / QUARANTINE,
        )

    def _settle_orphan(self, folder: Path) -> None:
        """A folder without a record beside a known database: an upload that never became a
        task is removed; one holding a complete video is moved aside, never deleted."""
        videos = [p for p in folder.iterdir() if p.name.startswith("input.")]
        if not videos:
            log.info("removing unfinished upload %s", folder.name)
            shutil.rmtree(folder, ignore_errors=True)
            return
        target = self._quarantine(folder)
        log.warning("task folder %s has a video but no record: moved to %s", folder.name, target)

    def _quarantine(self, folder: Path) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        target = self.paths.temp_dir / QUARANTINE / stamp / folder.name
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(target)
        return target

    def _append_log(self, task_id: str, text: str) -> None:
        with TaskLog(self.paths.log_file(task_id), self.settings.log_max_bytes) as task_log:
            task_log.event(text)


def make_executor(settings: ServerConfig, temp_dir: Path) -> Executor:
    """The executor the settings name."""
    if settings.executor == "ray":
        return RayExecutor(settings, temp_dir)
    slots = {
        Stage.PREPROCESSING: settings.preprocess_slots,
        Stage.TRAINING: settings.training_slots,
    }
    return LocalExecutor(settings.kill_grace, slots)


async def _watched(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run a background loop for good: when it dies it is logged and started again, after a
    pause that grows while it keeps dying (never a silent dead loop)."""
    pause = 1.0
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the %s loop died; restarting it in %.0f s", name, pause)
        else:
            log.error("the %s loop returned; restarting it in %.0f s", name, pause)
        if asyncio.get_running_loop().time() - started > 60:
            pause = 1.0
        await asyncio.sleep(pause)
        pause = min(LOOP_RESTART_MAX, pause * 2)
