"""What the API shows of a task: the row conversion, the status cache, the event bus."""

from __future__ import annotations

import asyncio

from training_server_models import Stage, TaskStatus
from training_server_views import EventBus, StatusCache, task_public


def test_a_row_becomes_the_public_task() -> None:
    row = {
        "id": "8b3ec1c9-79a7-468b-958b-4dc3f23b1a0c",
        "status": "training",
        "message": "Training 10/100",
        "created_at": "2026-01-01T00:00:00.000+00:00",
        "updated_at": "2026-01-01T00:00:05.000+00:00",
        "error_message": None,
        "metadata": {"video": {"width": 640}},
        "progress": {"stage": "training", "current": 10, "total": 100},
        "queued_for": None,
        "params": {"max_frames": 40, "min_frames": 20, "auto_training": True, "iterations": 7000},
        "original_filename": "clip.mp4",
        "video_size": 123,
        "started_at": "2026-01-01T00:00:01.000+00:00",
        "finished_at": None,
        "end_reason": None,
        "attempts": 1,
        "expired_at": None,
    }
    task = task_public(row, None)
    assert task.status == TaskStatus.TRAINING
    assert task.progress is not None and task.progress.stage == Stage.TRAINING
    assert task.progress.current == 10
    assert task.params.max_frames == 40
    assert task.finished_at is None and task.started_at is not None
    assert task.expired is False
    expired = task_public({**row, "expired_at": "2026-01-02T00:00:00+00:00"}, 3)
    assert expired.expired is True and expired.queue_position == 3


def test_the_cache_never_keeps_a_body_that_a_write_overtook() -> None:
    cache = StatusCache()
    read_at = cache.generation
    cache.forget("b")  # a write to any task lands while the body of "a" is being built
    cache.put("a", b"old", read_at)
    assert cache.get("a") is None
    cache.put("a", b"new", cache.generation)
    assert cache.get("a") == b"new"
    cache.forget("a")
    assert cache.get("a") is None


async def test_a_slow_subscriber_loses_its_oldest_events_only() -> None:
    bus = EventBus(queue_size=3)
    async with bus.subscribe() as slow, bus.subscribe() as other:
        for n in range(5):
            bus.publish({"n": n})
        assert [slow.get_nowait()["n"] for _ in range(3)] == [2, 3, 4]
        assert other.qsize() == 3
    bus.publish({"n": 5})  # nobody listens any more: nothing is kept
    await asyncio.sleep(0)
    assert slow.empty()
