"""The state machine: its table, guarded transitions and races, on a real SQLite file."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

import training_server_state as state
from training_server_db import Database, TaskNotFoundError
from training_server_models import Stage, TaskStatus

S = TaskStatus


@pytest.fixture
async def db(tmp_path: Path):
    database = await Database.open(tmp_path / "t.db")
    yield database
    await database.close()


async def new_task(db: Database, task_id: str = "t") -> str:
    await state.create(
        db, {"id": task_id, "video_filename": "v.mp4", "video_size": 1, "params": {}}
    )
    return task_id


def test_the_seed_flow_is_allowed_and_ends_are_final() -> None:
    flow = [S.PENDING, S.PREPROCESSING, S.PREPROCESSING_COMPLETED, S.TRAINING]
    for current, following in itertools.pairwise(flow):
        assert following in state.TRANSITIONS[current]
    assert S.TRAINING_COMPLETED in state.TRANSITIONS[S.TRAINING]
    assert S.FAILED in state.TRANSITIONS[S.PREPROCESSING]
    assert S.FAILED in state.TRANSITIONS[S.TRAINING]
    assert state.TRANSITIONS[S.TRAINING_COMPLETED] == frozenset()
    assert set(state.TRANSITIONS) == set(S)


async def test_a_new_task_waits_for_preprocessing(db: Database) -> None:
    await new_task(db)
    task = await db.get_task("t")
    assert task["status"] == "pending"
    assert task["queued_for"] == "preprocessing"
    assert task["finished_at"] is None


async def test_skipping_a_state_is_refused(db: Database) -> None:
    await new_task(db)
    with pytest.raises(state.InvalidTransitionError, match="pending; it cannot become training"):
        await state.transition(db, "t", S.TRAINING)
    with pytest.raises(TaskNotFoundError):
        await state.transition(db, "missing", S.PREPROCESSING)


async def test_ending_states_stamp_finished_at_and_leave_the_queue(db: Database) -> None:
    await new_task(db)
    await state.transition(db, "t", S.PREPROCESSING)
    await state.transition(db, "t", S.PREPROCESSING_COMPLETED, queue=Stage.TRAINING)
    task = await db.get_task("t")
    assert (task["queued_for"], task["finished_at"]) == ("training", None)
    await state.transition(db, "t", S.TRAINING)
    await state.transition(db, "t", S.FAILED, error_message="boom")
    task = await db.get_task("t")
    assert task["queued_for"] is None
    assert task["finished_at"] is not None
    assert task["error_message"] == "boom"


async def test_two_racing_writers_cannot_both_win(db: Database) -> None:
    await new_task(db)

    async def attempt(to: TaskStatus) -> bool:
        try:
            await state.transition(db, "t", to, expected={S.PENDING})
        except state.InvalidTransitionError:
            return False
        return True

    results = await asyncio.gather(
        *(attempt(S.PREPROCESSING) for _ in range(10)), attempt(S.CANCELLED)
    )
    assert sum(results) == 1


async def test_require_queued_guards_queue_changes(db: Database) -> None:
    await new_task(db)
    await state.transition(db, "t", S.PREPROCESSING)
    await state.transition(db, "t", S.PREPROCESSING_COMPLETED)
    with pytest.raises(state.InvalidTransitionError):
        await state.transition(db, "t", S.CANCELLED, require_queued=True)
    await state.transition(
        db, "t", S.PREPROCESSING_COMPLETED, queue=Stage.TRAINING, require_queued=False
    )
    with pytest.raises(state.InvalidTransitionError):  # already queued
        await state.transition(
            db, "t", S.PREPROCESSING_COMPLETED, queue=Stage.TRAINING, require_queued=False
        )


async def test_interrupted_tasks_keep_their_queue_place(db: Database) -> None:
    for name in "ab":
        await new_task(db, name)
    await state.transition(db, "a", S.PREPROCESSING)
    await state.transition(db, "a", S.PENDING, keep_queue_place=True)
    assert await db.queued("preprocessing") == ["a", "b"]
    await state.transition(db, "a", S.PREPROCESSING)
    await state.transition(db, "a", S.CANCELLED)
    await state.transition(db, "a", S.PENDING)  # a retry goes to the back
    assert await db.queued("preprocessing") == ["b", "a"]
