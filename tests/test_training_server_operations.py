"""The named state operations on a real SQLite file: each one's guard, the row it returns,
two racing callers (exactly one wins, the other gets a clear error), the expiry race, and how
many reads one stage run costs through the task manager."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

import training_server_state as state
from conftest import FAKE_PIPELINE, FAKE_TRAINER_DIR
from training_server_cleanup import sweep
from training_server_db import Database, TaskNotFoundError
from training_server_models import EndReason, ServerConfig, Stage, TaskParams, TaskStatus
from training_server_tasks import TaskManager

S = TaskStatus
PROGRESS = {"stage": "preprocessing", "percent": 0.0}


@pytest.fixture
async def db(tmp_path: Path):
    database = await Database.open(tmp_path / "t.db")
    yield database
    await database.close()


async def new_task(db: Database, task_id: str = "t") -> dict:
    return await state.create(
        db,
        {
            "id": task_id,
            "video_filename": "input.mp4",
            "video_size": 1,
            "params": {"auto_training": False},
        },
    )


async def preprocessed(db: Database, task_id: str = "t") -> dict:
    await new_task(db, task_id)
    await state.claim(db, task_id, Stage.PREPROCESSING, PROGRESS)
    return await state.finish(db, task_id, Stage.PREPROCESSING, EndReason.SUCCEEDED)


async def test_create_and_claim_return_the_rows_they_wrote(db: Database) -> None:
    created = await new_task(db)
    assert (created["status"], created["queued_for"]) == ("pending", "preprocessing")
    reads = db.reads
    claimed = await state.claim(db, "t", Stage.PREPROCESSING, PROGRESS)
    assert db.reads == reads  # the claim read nothing
    assert claimed["status"] == "preprocessing"
    assert claimed["queued_for"] is None
    assert (claimed["stage"], claimed["attempts"]) == ("preprocessing", 1)
    assert claimed["started_at"] is not None
    assert claimed["progress"] == PROGRESS


async def test_a_claim_counts_attempts_per_stage(db: Database) -> None:
    await new_task(db)
    await state.claim(db, "t", Stage.PREPROCESSING, PROGRESS)
    await state.finish(db, "t", Stage.PREPROCESSING, EndReason.INTERRUPTED, message="restart")
    again = await state.claim(db, "t", Stage.PREPROCESSING, PROGRESS)
    assert again["attempts"] == 2
    done = await state.finish(
        db, "t", Stage.PREPROCESSING, EndReason.SUCCEEDED, queue_training=True
    )
    assert (done["status"], done["queued_for"]) == ("preprocessing_completed", "training")
    training = await state.claim(db, "t", Stage.TRAINING, {"stage": "training"})
    assert (training["stage"], training["attempts"]) == ("training", 1)


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (EndReason.FAILED, "failed"),
        (EndReason.TIMED_OUT, "failed"),
        (EndReason.CANCELLED, "cancelled"),
        (EndReason.INTERRUPTED, "pending"),
    ],
)
async def test_finish_records_each_ending(db: Database, reason: EndReason, status: str) -> None:
    await new_task(db)
    await state.claim(db, "t", Stage.PREPROCESSING, PROGRESS)
    ended = await state.finish(db, "t", Stage.PREPROCESSING, reason, message="why")
    assert ended["status"] == status
    assert ended["end_reason"] == reason.value
    assert ended["message"] == "why"
    assert ended["run_ref"] is None
    with pytest.raises(state.InvalidTransitionError):  # a second ending of the same run
        await state.finish(db, "t", Stage.PREPROCESSING, EndReason.SUCCEEDED)


async def test_cancel_queued_only_matches_a_waiting_task(db: Database) -> None:
    await preprocessed(db)
    with pytest.raises(state.InvalidTransitionError, match="preprocessing_completed"):
        await state.cancel_queued(db, "t", "no")
    queued = await state.queue_training(db, "t", {"auto_training": False, "iterations": 5})
    assert queued["queued_for"] == "training"
    assert queued["params"]["iterations"] == 5
    cancelled = await state.cancel_queued(db, "t", "Cancelled by user")
    assert (cancelled["status"], cancelled["queued_for"]) == ("cancelled", None)


async def test_queue_and_unqueue_training(db: Database) -> None:
    await preprocessed(db)
    await state.queue_training(db, "t", {})
    with pytest.raises(state.InvalidTransitionError):  # already waiting
        await state.queue_training(db, "t", {})
    rested = await state.unqueue_training(db, "t", "training is not available")
    assert (rested["status"], rested["queued_for"]) == ("preprocessing_completed", None)
    assert rested["finished_at"] is not None


async def test_retry_goes_back_to_the_stage_that_did_not_finish(db: Database) -> None:
    await preprocessed(db, "a")
    await state.queue_training(db, "a", {})
    await state.claim(db, "a", Stage.TRAINING, {"stage": "training"})
    await state.finish(db, "a", Stage.TRAINING, EndReason.FAILED, error_message="boom")
    again = await state.retry(db, "a", from_training=True)
    assert (again["status"], again["queued_for"]) == ("preprocessing_completed", "training")
    assert again["error_message"] is None
    await new_task(db, "b")
    await state.claim(db, "b", Stage.PREPROCESSING, PROGRESS)
    await state.finish(db, "b", Stage.PREPROCESSING, EndReason.CANCELLED)
    again = await state.retry(db, "b", from_training=False)
    assert (again["status"], again["queued_for"]) == ("pending", "preprocessing")
    with pytest.raises(state.InvalidTransitionError):  # only failed or cancelled tasks
        await state.retry(db, "b", from_training=False)


async def test_expire_never_matches_a_queued_running_or_expired_task(db: Database) -> None:
    await new_task(db, "queued")
    with pytest.raises(state.InvalidTransitionError):
        await state.expire(db, "queued", "removed")
    await state.claim(db, "queued", Stage.PREPROCESSING, PROGRESS)
    with pytest.raises(state.InvalidTransitionError):  # running
        await state.expire(db, "queued", "removed")
    await preprocessed(db, "rest")
    await state.queue_training(db, "rest", {})
    with pytest.raises(state.InvalidTransitionError):  # waits for training
        await state.expire(db, "rest", "removed")
    await state.unqueue_training(db, "rest", "no GPU")
    expired = await state.expire(db, "rest", "removed")
    assert expired["expired_at"] is not None
    assert expired["status"] == "preprocessing_completed"
    with pytest.raises(state.InvalidTransitionError):
        await state.expire(db, "rest", "removed")
    with pytest.raises(state.InvalidTransitionError):  # train and retry refuse expired tasks
        await state.queue_training(db, "rest", {})
    with pytest.raises(TaskNotFoundError):
        await state.expire(db, "missing", "removed")


async def test_two_racing_callers_exactly_one_wins(db: Database) -> None:
    await preprocessed(db)

    async def attempt(operation) -> str:
        try:
            await operation
        except state.InvalidTransitionError as exc:
            return f"lost: {exc}"
        return "won"

    results = await asyncio.gather(
        attempt(state.queue_training(db, "t", {})),
        attempt(state.queue_training(db, "t", {})),
        attempt(state.expire(db, "t", "removed")),
    )
    assert results.count("won") == 1, results
    assert all("it cannot become" in r for r in results if r != "won")


async def test_the_sweep_leaves_a_task_queued_for_training_between_its_query_and_update(
    tmp_path: Path, db: Database
) -> None:
    """The cleanup selects expirable tasks, then expires them one by one: a task queued for
    training in between must keep its files (the sweep once deleted them)."""
    await preprocessed(db)
    settings = ServerConfig(
        temp_dir=tmp_path / "tw", logs_dir=tmp_path / "logs", db_path=tmp_path / "t.db"
    )
    removed: list[str] = []
    original = db.expirable

    async def expirable_then_train(before: str, statuses: list[str]) -> list[str]:
        found = await original("9999", statuses)  # everything that ended is past its time
        await state.queue_training(db, "t", {})  # a POST /train lands here
        return found

    db.expirable = expirable_then_train  # type: ignore[method-assign]
    published: list[dict] = []

    async def publish(row: dict) -> None:
        published.append(row)

    assert await sweep(settings, db, removed.append, publish) == []
    assert removed == [] and published == []
    row = await db.get_task("t")
    assert (row["queued_for"], row["expired_at"]) == ("training", None)


def stand_in_settings(tmp_path: Path) -> ServerConfig:
    """A server's settings in `tmp_path` with the stand-in pipeline and trainer."""
    return ServerConfig(
        temp_dir=tmp_path / "tw",
        logs_dir=tmp_path / "logs",
        db_path=tmp_path / "t.db",
        preprocess_command=[sys.executable, str(FAKE_PIPELINE)],
        trainer_path=FAKE_TRAINER_DIR,
        trainer_require_cuda=False,
        kill_grace=2,
    )


async def test_one_stage_run_reads_no_task_row(tmp_path: Path) -> None:
    """Through the task manager: a preprocessing run from its claim to its recorded end
    reads the task's row not once (the claim's and each write's RETURNING row are used)."""
    settings = stand_in_settings(tmp_path)
    db = await Database.open(settings.db_path)
    manager = TaskManager(settings, db)
    row_reads = 0
    get_task = db.get_task

    async def counted_get_task(task_id: str) -> dict:
        nonlocal row_reads
        row_reads += 1
        return await get_task(task_id)

    await manager.start()
    try:
        task_id = "6a0f8a52-0a53-4b7e-9a8e-6c1f7f3c2e10"
        (manager.paths.task_dir(task_id)).mkdir(parents=True)
        manager.paths.task_dir(task_id).joinpath("input.mp4").write_bytes(b"not read")
        params = TaskParams(max_frames=20, min_frames=5, auto_training=False, iterations=100)
        db.get_task = counted_get_task  # type: ignore[method-assign]
        async with manager.events.subscribe() as events:
            await manager.control.create(
                task_id,
                params=params,
                video_filename="input.mp4",
                video_size=8,
                original_filename="clip.mp4",
                video_info={"width": 64, "height": 48},
            )
            seen = []
            while not seen or seen[-1] not in {"preprocessing_completed", "failed"}:
                event = await asyncio.wait_for(events.get(), 60)
                if event["type"] == "task":
                    seen.append(event["task"]["status"])
        assert seen[0] == "pending" and "preprocessing" in seen
        assert seen[-1] == "preprocessing_completed", json.dumps(seen)
        assert row_reads == 0
    finally:
        await manager.shutdown()
        await db.close()


@pytest.mark.parametrize("how", ["cancel", "shutdown"])
async def test_a_stop_before_the_run_first_steps_is_still_recorded(
    tmp_path: Path, db: Database, how: str
) -> None:
    """A cancel that reaches the runner after the claim started the run's asyncio task but
    before that task first ran (the fresh-clone suite hit it once): asyncio would throw the
    cancel in before the run's own bookkeeping, leaving the task 'preprocessing' and its slot
    taken for ever. It ends cancelled (or re-queued at shutdown) and frees the slot."""
    settings = stand_in_settings(tmp_path)
    manager = TaskManager(settings, db)
    await new_task(db, "t")
    manager.paths.task_dir("t").mkdir(parents=True)
    row = await state.claim(db, "t", Stage.PREPROCESSING, PROGRESS)
    manager.runner.start(row, Stage.PREPROCESSING)
    # No await between the start and the stop: the run's task has not taken a step yet.
    if how == "cancel":
        assert await manager.runner.stop("t", EndReason.CANCELLED, "Cancelled by user")
        expected = "cancelled"
    else:
        await manager.runner.shutdown()
        expected = "pending"
    after = await db.get_task("t")
    assert after["status"] == expected, after
    assert not manager.runner.is_running("t")
    assert manager.runner.busy(Stage.PREPROCESSING) == 0


async def test_events_go_out_in_the_order_of_the_writes(db: Database) -> None:
    """A queued task's view needs a query, a running one's none: published in write order
    (pending, then the claim), the events must not come out the other way round (a page
    following the stream would show the task waiting again after it started)."""
    from training_server_records import Records
    from training_server_views import EventBus

    events = EventBus()
    records = Records(db, events)
    params = TaskParams(max_frames=20, min_frames=5, auto_training=False, iterations=100)
    pending = await state.create(
        db,
        {"id": "t", "video_filename": "input.mp4", "video_size": 1, "params": params.model_dump()},
    )
    running = await state.claim(db, "t", Stage.PREPROCESSING, PROGRESS)
    async with events.subscribe() as queue:
        first = asyncio.create_task(records.publish(pending))
        second = asyncio.create_task(records.publish(running))
        await asyncio.gather(first, second)
        seen = [(await queue.get())["task"]["status"] for _ in range(2)]
    assert seen == ["pending", "preprocessing"]
