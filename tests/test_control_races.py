"""Control requests that race a stage's start, the cleanup, or each other (issue 11 items 1,
3, 4, 5 and 11), against a real server on loopback with real stand-in processes."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import TERMINAL, upload, wait_for, wait_status
from training_server_process import marked_processes


def eventually(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def live_stages(root: Path) -> list[int]:
    """Stage processes of this test's server: they carry a task marker and run in `root`."""
    pids = []
    for found in marked_processes().values():
        for pid in found:
            try:
                if str(root) in os.readlink(f"/proc/{pid}/cwd"):
                    pids.append(pid)
            except OSError:
                continue
    return pids


def describe(pids: list[int]) -> list[str]:
    """Each pid with its task marker and state, for a failure's message."""
    found = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            marker = [
                item
                for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if item.startswith(b"TRAINING_SERVER_TASK_ID=")
            ]
            found.append(f"{pid} {stat[stat.rfind(')') + 2]} {marker}")
        except OSError as exc:
            found.append(f"{pid} gone ({exc})")
    return found


def test_cancel_or_delete_right_after_upload_never_leaves_a_stage_running(
    start_server, monkeypatch, tmp_path
):
    """A silent stand-in (it never prints, so an untracked one would not die of EPIPE):
    cancel or delete within 0-12 ms of the upload, again and again."""
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "silent")
    server = start_server(preprocess_slots=1)
    rounds = 24
    outcomes: dict[str, int] = {}
    with server.client() as client:
        for index in range(rounds):
            task_id = upload(client, start_training="false").json()["task_id"]
            time.sleep((index % 7) * 0.002)
            if index % 2:
                answer = client.delete(f"/tasks/{task_id}")
                assert answer.status_code == 200, answer.text
                assert client.get(f"/status/{task_id}").status_code == 404
                outcomes["deleted"] = outcomes.get("deleted", 0) + 1
            else:
                answer = client.post(f"/tasks/{task_id}/cancel")
                assert answer.status_code in {200, 409}, answer.text
                task = wait_status(client, task_id, TERMINAL)
                assert task["status"] == "cancelled", task
                assert "Internal error" not in (task["error_message"] or "")
                outcomes["cancelled"] = outcomes.get("cancelled", 0) + 1
            # Never more stage processes than slots, and none once nothing runs.
            live = live_stages(tmp_path)
            assert len(live) <= 1, (index, task_id, describe(live), client.get("/tasks").text)
        assert eventually(lambda: not live_stages(tmp_path), 20), describe(live_stages(tmp_path))
    assert outcomes == {"deleted": rounds // 2, "cancelled": rounds // 2}


def test_a_queued_task_whose_folder_is_gone_fails_once_with_a_reason(start_server, tmp_path):
    server = start_server(preprocess_slots=1)
    with server.client() as client:
        task_id = upload(client, start_training="false").json()["task_id"]
        wait_status(client, task_id, {"preprocessing_completed"})
        shutil.rmtree(tmp_path / "temp_workspace" / task_id)  # an operator's rm
        answer = client.post(f"/tasks/{task_id}/train")
        assert answer.status_code in {200, 503}, answer.text
        if answer.status_code == 200:
            task = wait_status(client, task_id, TERMINAL)
            assert task["status"] == "failed"
            assert "folder is gone" in task["error_message"]
            attempts = task["attempts"]
            time.sleep(3)
            again = client.get(f"/status/{task_id}").json()
            assert (again["status"], again["attempts"]) == ("failed", attempts)  # no loop
        log = (tmp_path / f"server-{server.port}.log").read_text()
        assert log.count("could not record the end") == 0


def test_train_and_retry_refuse_expired_tasks_with_410(start_server):
    server = start_server(cleanup_ttl=0.5, cleanup_interval=0.5)
    with server.client() as client:
        task_id = upload(client, start_training="false").json()["task_id"]
        wait_status(client, task_id, {"preprocessing_completed"})
        wait_for(client, task_id, lambda task: task["expired"], 30)
        answer = client.post(f"/tasks/{task_id}/train")
        assert answer.status_code == 410, answer.text
        assert "removed by the cleanup" in answer.json()["detail"]
        task = client.get(f"/status/{task_id}").json()
        assert task["allowed_actions"] == ["delete"]
        assert task["results"] == {"dataset": False, "model": False}


def test_concurrent_control_calls_get_json_answers_never_500(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "fail")
    server = start_server()
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_status(client, task_id, {"failed"})

        def call(index: int) -> tuple[int, str]:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                if index % 5 == 4:
                    r = c.post(f"/tasks/{task_id}/cancel")
                else:
                    r = c.post(f"/tasks/{task_id}/retry")
                return r.status_code, r.headers.get("content-type", "")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(120)))
    assert all(code in {200, 409} for code, _ in answers), sorted({c for c, _ in answers})
    assert all(kind.startswith("application/json") for _, kind in answers)
    huge = client_get(server.url, "/tasks", {"offset": str(2**63)})
    assert huge.status_code == 422 and "detail" in huge.json()


def client_get(url: str, path: str, params: dict[str, str]) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=10) as client:
        return client.get(path, params=params)


def test_a_new_database_beside_task_folders_refuses_to_start(start_server, tmp_path):
    server = start_server()
    with server.client() as client:
        task_id = upload(client, start_training="false").json()["task_id"]
        wait_status(client, task_id, {"preprocessing_completed"})
    server.terminate()
    (tmp_path / "training_server.db").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"training_server.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(RuntimeError, match="holds 1 task folders"):
        start_server()
    assert (tmp_path / "temp_workspace" / task_id).is_dir()  # nothing deleted
    quarantined = start_server(orphan_folders="quarantine")
    with quarantined.client() as client:
        assert client.get("/health").status_code == 200
    moved = list((tmp_path / "temp_workspace" / "quarantine").glob(f"*/{task_id}"))
    assert len(moved) == 1 and any(moved[0].glob("input.*"))
