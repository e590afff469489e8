"""The Ray executor against a real Ray cluster on loopback (no GPUs needed: the nodes say they
have one each): trainings spread over the nodes, cancel, a restarted server reattaching, a
lost node, the cluster away and back, and storage that is not shared."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ServerProcess,
    settings_env,
    upload,
    wait_for,
    wait_status,
)

ray = pytest.importorskip("ray")
from ray.job_submission import JobSubmissionClient  # noqa: E402

from tests.ray_local import Cluster, ray_nodes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARKER = "TRAINING_SERVER_TASK_ID"
pytestmark = pytest.mark.timeout(300)


def marked(task_id: str) -> list[int]:
    needle = f"{MARKER}={task_id}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                stat = Path(entry.path, "stat").read_text()
                if stat[stat.rfind(")") + 2] != "Z":
                    found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start_head(gpus=0)
        c.add_worker()
        c.add_worker()
        c.wait_nodes(3)
        yield c
    finally:
        c.stop()


def ray_server(
    root: Path, cluster: Cluster, step_seconds: float, **overrides: Any
) -> ServerProcess:
    env = settings_env(
        root,
        executor="ray",
        ray_address=cluster.address,
        ray_preprocess_cpus=1,
        ray_training_cpus=0,
        ray_pass_env=["FAKE_TRAINER_STEP_SECONDS", "FAKE_PIPELINE_SECONDS"],
        trainer_checkpoint_every=100,
        **overrides,
    )
    env["FAKE_TRAINER_STEP_SECONDS"] = str(step_seconds)
    env["FAKE_PIPELINE_SECONDS"] = "0.3"
    return ServerProcess(root, env).start(timeout=60)


def step(status: dict[str, Any]) -> int:
    """The training step a status shows (0 before one)."""
    progress = status["progress"] or {}
    return progress.get("current") or 0 if progress.get("step") == "training" else 0


def wait_ready(client: Any, timeout: float = 120) -> dict[str, Any]:
    """/health once the storage probe passed and the cluster answers."""
    deadline = time.monotonic() + timeout
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        health = client.get("/health").json()
        if (
            health["cluster"]
            and health["cluster"]["reachable"]
            and not health["cluster"]["problem"]
        ):
            return health
        time.sleep(0.3)
    raise AssertionError(f"the cluster never became ready: {health}")


def test_two_trainings_spread_over_the_nodes_and_a_third_waits(
    cluster: Cluster, tmp_path: Path
) -> None:
    server = ray_server(tmp_path, cluster, step_seconds=0.03)
    try:
        with server.client() as client:
            health = wait_ready(client)
            assert health["cluster"]["ray_version"] == "2.60.0"
            assert len(health["cluster"]["nodes"]) == 3
            assert health["cluster"]["gpus_total"] == 2
            ids = [upload(client, max_frames=20).json()["task_id"] for _ in range(3)]
            both = {}
            waiting = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (len(both) == 2 and waiting):
                for task_id in ids:
                    status = client.get(f"/status/{task_id}").json()
                    if status["status"] == "training" and status["node"]:
                        both[task_id] = status["node"]
                    elif status["queued_for"] == "training" and "free GPU" in (
                        status["message"] or ""
                    ):
                        waiting = status["message"]
                running = [
                    t for t in ids if client.get(f"/status/{t}").json()["status"] == "training"
                ]
                assert len(running) <= 2, "more trainings than GPUs in the cluster"
                time.sleep(0.2)
            assert len(both) == 2 and len(set(both.values())) == 2, both
            assert waiting == "waiting for a free GPU in the cluster (0 of 2 free)"
            for task_id in ids:
                done = wait_status(client, task_id, {"training_completed", "failed"}, 180)
                assert done["status"] == "training_completed", done["error_message"]
    finally:
        server.kill()


def page_shows_cluster_and_node(server: ServerProcess, task_id: str, node: str) -> None:
    """The page's header shows the cluster, and the task's row the node it trains on."""
    from playwright.sync_api import expect, sync_playwright

    from tests.test_web_page import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(server.url + "/")
            # Ray's figures are its autoscaler's snapshot (written every 5 s) and the page asks
            # every 5 s: a training placed a moment ago shows within about 10 s (a fresh-clone
            # run read "2 of 2 free" for the 5 s an expect waits by default).
            expect(page.locator("#cluster")).to_have_text(
                re.compile(r"^Ray cluster · 3 nodes · [01] of 2 GPUs free$"), timeout=20_000
            )
            host = node.split(" (")[0]
            expect(page.locator(f'.task-row[data-id="{task_id}"]')).to_contain_text(f"on {host}")
        finally:
            browser.close()


def test_cancel_stops_the_job_and_leaves_no_process(cluster: Cluster, tmp_path: Path) -> None:
    server = ray_server(tmp_path, cluster, step_seconds=0.1)
    try:
        with server.client() as client:
            wait_ready(client)
            task_id = upload(client, max_frames=20).json()["task_id"]
            running = wait_for(
                client, task_id, lambda s: s["status"] == "training" and s["node"], 90
            )
            page_shows_cluster_and_node(server, task_id, running["node"])
            wait_for(client, task_id, lambda s: step(s) > 20, 60)
            assert marked(task_id), "the training process should run on this machine"
            assert client.post(f"/tasks/{task_id}/cancel").status_code == 200
            status = wait_status(client, task_id, {"cancelled"}, 60)
            assert status["end_reason"] == "cancelled"
            jobs = JobSubmissionClient(cluster.address)
            assert str(jobs.get_job_status(f"ts-{task_id}-training-1")).endswith("STOPPED")
            deadline = time.monotonic() + 15
            while marked(task_id) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marked(task_id) == []
    finally:
        server.kill()


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_restarted_server_reattaches_without_starting_over(
    cluster: Cluster, tmp_path: Path, how: str
) -> None:
    server = ray_server(tmp_path, cluster, step_seconds=0.04)
    with server.client() as client:
        wait_ready(client)
        task_id = upload(client, max_frames=20).json()["task_id"]
        wait_for(client, task_id, lambda s: step(s) > 60, 120)
    if how == "sigkill":
        server.kill()
    else:
        server.terminate()  # a graceful stop: the job is detached, not stopped
    assert marked(task_id), "the training must survive the API server"
    time.sleep(1.0)
    server = ray_server(tmp_path, cluster, step_seconds=0.04)
    try:
        with server.client() as client:
            done = wait_status(client, task_id, {"training_completed", "failed"}, 120)
            assert done["status"] == "training_completed", done["error_message"]
            assert done["attempts"] == 1
            assert done["metadata"]["training"]["resumed_from_step"] is None
            log = client.get(f"/logs/{task_id}").text
            assert "reattached after a server restart" in log
            if how == "sigterm":  # it recorded how much of the job's log it had written
                assert log.count("output path:") == 1, "the job's log was written twice"
            jobs = JobSubmissionClient(cluster.address)
            ours = [
                j
                for j in jobs.list_jobs()
                if (j.submission_id or "").startswith(f"ts-{task_id}-training")
            ]
            assert [j.submission_id for j in ours] == [f"ts-{task_id}-training-1"]
    finally:
        server.kill()


def test_lost_node_requeues_and_resumes_from_checkpoint(cluster: Cluster, tmp_path: Path) -> None:
    server = ray_server(tmp_path, cluster, step_seconds=0.04)
    try:
        with server.client() as client:
            wait_ready(client)
            task_id = upload(client, max_frames=20).json()["task_id"]
            status = wait_for(client, task_id, lambda s: step(s) > 130, 120)
            node_ip = status["node"].split("(")[-1].split(",")[0]
            info = JobSubmissionClient(cluster.address).get_job_info(f"ts-{task_id}-training-1")
            victim = next(
                n
                for n in ray_nodes(cluster.address)
                if n["raylet"]["nodeId"] == info.driver_node_id
            )
            assert not victim["raylet"]["isHeadNode"] and node_ip
            node = cluster.node_pids[int(victim["raylet"]["dashboardAgentListenPort"])]
            assert node, "the worker's processes"
            # The machine dies: its Ray processes and everything the training ran.
            for pid in node + marked(task_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            done = wait_status(client, task_id, {"training_completed", "failed"}, 180)
            assert done["status"] == "training_completed", done["error_message"]
            assert done["attempts"] == 2
            assert done["metadata"]["training"]["resumed_from_step"] >= 100
            assert "was lost" in client.get(f"/logs/{task_id}").text
    finally:
        server.kill()
        cluster.add_worker()  # the next test has two GPU nodes again
        cluster.wait_nodes(3)


def test_cluster_away_tasks_wait_and_continue(cluster: Cluster, tmp_path: Path) -> None:
    server = ray_server(tmp_path, cluster, step_seconds=0.01)
    try:
        with server.client() as client:
            wait_ready(client)
            cluster.stop()
            deadline = time.monotonic() + 30
            while client.get("/health").json()["cluster"]["reachable"]:
                assert time.monotonic() < deadline
                time.sleep(0.3)
            health = client.get("/health").json()
            assert health["status"] == "degraded"
            assert any("unreachable" in p for p in health["problems"])
            task_id = upload(client, max_frames=20).json()["task_id"]
            status = wait_for(client, task_id, lambda s: "Ray cluster" in (s["message"] or ""), 30)
            assert status["status"] == "pending"
            time.sleep(3)
            assert client.get(f"/status/{task_id}").json()["status"] == "pending"
            cluster.start_head(gpus=0)
            cluster.add_worker()
            cluster.add_worker()
            done = wait_status(client, task_id, {"training_completed", "failed"}, 180)
            assert done["status"] == "training_completed", done["error_message"]
    finally:
        server.kill()


def test_storage_not_shared_is_refused(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root to give a node its own temp dir")
    temp = tmp_path / "temp_workspace"
    isolated = Cluster(unshare_over=temp)
    try:
        isolated.start_head(gpus=1)
        server = ray_server(tmp_path, isolated, step_seconds=0.01)
        try:
            with server.client() as client:
                deadline = time.monotonic() + 60
                problem = None
                while time.monotonic() < deadline and not problem:
                    cluster_health = client.get("/health").json()["cluster"]
                    if "not shared" in (cluster_health["problem"] or ""):
                        problem = cluster_health["problem"]
                    time.sleep(0.3)
                assert problem and str(temp) in problem
                task_id = upload(client, max_frames=20).json()["task_id"]
                status = wait_for(client, task_id, lambda s: "not shared" in (s["message"] or ""))
                assert status["status"] == "pending"
        finally:
            server.kill()
    finally:
        isolated.stop()
