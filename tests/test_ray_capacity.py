"""How many stages the Ray executor lets start, from a cluster view whose usage figures lag the
server's own jobs (no cluster needed: the view is the one the dashboard would give)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from training_server_models import ServerConfig, Stage
from training_server_ray import USAGE_LAG, ClusterView, NodeInfo, RayExecutor, RayHandle


def node(name: str, gpus_free: float) -> NodeInfo:
    return NodeInfo(
        node_id=name * 8,
        ip="127.0.0.1",
        hostname=name,
        alive=True,
        is_head=False,
        gpus_total=1.0,
        gpus_free=gpus_free,
        cpus_total=1.0,
        cpus_free=1.0,
    )


def executor(tmp_path: Path, *nodes: NodeInfo, read_at: float) -> RayExecutor:
    settings = ServerConfig(base_dir=tmp_path, executor="ray", ray_address="http://127.0.0.1:1")
    ex = RayExecutor(settings, tmp_path)
    ex.settings_problem = None
    ex.storage_problem = None
    view = ClusterView(
        reachable=True,
        ray_version="2.60.0",
        nodes=list(nodes),
        read_at=read_at,
        figures_at=read_at,  # the autoscaler's snapshot: as old as the read here
    )

    async def cluster(max_age: float = 1.0) -> ClusterView:
        return view  # what the dashboard answered at `read_at`

    ex.cluster = cluster  # type: ignore[method-assign]
    return ex


def training_running(
    ex: RayExecutor, task: str, placed_at: float | None, node_id: str | None = None
) -> RayHandle:
    ref = {"executor": "ray", "submission_id": f"ts-{task}-training-1", "node": None}
    if node_id:
        ref["node_id"] = node_id
    handle = ex._handle(ref, Stage.TRAINING)
    handle.placed = placed_at is not None
    handle.placed_at = placed_at
    return handle


def capacity(ex: RayExecutor, running: int) -> tuple[int, str | None]:
    got = asyncio.run(ex.capacity(Stage.TRAINING, running))
    return got.limit, got.waiting


def test_a_job_just_placed_still_holds_its_gpu_when_the_figures_do_not_show_it(
    tmp_path: Path,
) -> None:
    now = time.monotonic()
    # Both GPUs reported free, but one of ours was placed a moment before that read.
    ex = executor(tmp_path, node("a", 1.0), node("b", 1.0), read_at=now)
    training_running(ex, "t1", placed_at=now - 0.2)
    assert capacity(ex, running=1) == (2, None)  # one more: the other GPU
    training_running(ex, "t2", placed_at=None)  # submitted, not placed yet
    limit, waiting = capacity(ex, running=2)
    assert limit == 2
    assert waiting == "waiting for a free GPU in the cluster (0 of 2 free)"


def test_once_the_figures_show_a_job_it_is_not_counted_twice(tmp_path: Path) -> None:
    now = time.monotonic()
    placed = now - USAGE_LAG - 0.5
    ex = executor(tmp_path, node("a", 0.0), node("b", 1.0), read_at=now)
    training_running(ex, "t1", placed_at=placed)
    assert capacity(ex, running=1) == (2, None)


def test_a_run_claimed_but_not_submitted_yet_counts(tmp_path: Path) -> None:
    now = time.monotonic()
    ex = executor(tmp_path, node("a", 1.0), node("b", 1.0), read_at=now)
    # One run claimed by the scheduler, its job not submitted yet (no handle).
    assert capacity(ex, running=1) == (2, None)
    limit, waiting = capacity(ex, running=2)
    assert limit == 2
    assert waiting == "waiting for a free GPU in the cluster (0 of 2 free)"


@pytest.mark.parametrize("free", [0.0, 1.0])
def test_a_view_read_before_the_placement_counts_the_job(tmp_path: Path, free: float) -> None:
    now = time.monotonic()
    ex = executor(tmp_path, node("a", free), read_at=now)
    training_running(ex, "t1", placed_at=now + 0.1)  # placed after the read
    limit, waiting = capacity(ex, running=1)
    assert limit == 1
    assert waiting == "waiting for a free GPU in the cluster (0 of 1 free)"


def test_a_job_that_ended_after_the_snapshot_frees_its_gpu_at_once(tmp_path: Path) -> None:
    now = time.monotonic()
    # The snapshot (up to 5 s old) still shows node a's GPU taken by our job, which ended since.
    ex = executor(tmp_path, node("a", 0.0), node("b", 0.0), read_at=now)
    done = training_running(ex, "t1", placed_at=now - 20, node_id="a" * 8)
    training_running(ex, "t2", placed_at=now - 20, node_id="b" * 8)
    assert capacity(ex, running=2) == (2, "waiting for a free GPU in the cluster (0 of 2 free)")
    done._returncode = 0
    done.ended_at = now + 0.5
    asyncio.run(done.close())
    assert capacity(ex, running=1) == (2, None)  # node a again; b still runs t2
    # A job that ended before the snapshot was taken is not added back (the figures know).
    ex2 = executor(tmp_path, node("a", 1.0), read_at=now)
    old = training_running(ex2, "t3", placed_at=now - 20, node_id="a" * 8)
    old._returncode = 0
    old.ended_at = now - 1
    asyncio.run(old.close())
    assert capacity(ex2, running=0) == (1, None)


def test_the_snapshot_time_comes_from_the_autoscaler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ServerConfig(base_dir=tmp_path, executor="ray", ray_address="http://127.0.0.1:1")
    ex = RayExecutor(settings, tmp_path)
    status = {"data": {"clusterStatus": {"time": time.time() - 3.0, "loadMetricsReport": {}}}}
    answers = {
        "/api/version": {"ray_version": "2.60.0"},
        "/nodes?view=summary": {"data": {"summary": []}},
        "/api/cluster_status": status,
    }
    monkeypatch.setattr(ex, "_get_json", lambda path: answers[path])
    view = asyncio.run(ex.cluster(max_age=0))
    assert view.reachable
    assert 2.5 < view.read_at - view.figures_at < 3.5
    del status["data"]["clusterStatus"]["time"]  # no time: taken to be one period old
    view = asyncio.run(ex.cluster(max_age=0))
    assert view.read_at - view.figures_at == pytest.approx(5.0)


def test_health_counts_what_our_runs_took_and_gave_back_since_the_snapshot(
    tmp_path: Path,
) -> None:
    now = time.monotonic()
    # The snapshot: a's GPU free, b's taken by our t1 (placed long ago, ended since).
    ex = executor(tmp_path, node("a", 1.0), node("b", 0.0), read_at=now)
    ended = training_running(ex, "t1", placed_at=now - 20, node_id="b" * 8)
    training_running(ex, "t2", placed_at=now - 0.2, node_id="a" * 8)  # not in the figures yet
    training_running(ex, "t3", placed_at=None)  # submitted, not placed: no node holds it yet
    health = asyncio.run(ex.health())
    assert [n["gpus_free"] for n in health["nodes"]] == [0.0, 0.0]
    assert (health["gpus_free"], health["gpus_total"]) == (0.0, 2.0)
    ended._returncode = 0
    ended.ended_at = now + 0.5
    asyncio.run(ended.close())
    health = asyncio.run(ex.health())
    assert [n["gpus_free"] for n in health["nodes"]] == [0.0, 1.0]
    assert health["gpus_free"] == 1.0
    # Once the figures show t2, it is not taken off twice.
    later = executor(tmp_path, node("a", 0.0), read_at=now + USAGE_LAG + 1)
    training_running(later, "t2", placed_at=now - 0.2, node_id="a" * 8)
    assert asyncio.run(later.health())["gpus_free"] == 0.0
