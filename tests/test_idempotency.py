"""Idempotency-Key on the submits, against a real server: the same key with the same request
answers the first answer again (one task), with another request 422, while the first runs
409; on tus creation and the control POSTs too; kept across a restart; never without the
token."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from test_tus import TUS

from conftest import OFFICE_VIDEO, STATIC_VIDEO, ServerProcess, wait_status

VIDEO = OFFICE_VIDEO.read_bytes()


@pytest.fixture
def start_tus_server(
    start_server: Callable[..., ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., ServerProcess]:
    """`start_server`, with the app that honours Idempotency-Key and serves /uploads/."""
    return start_server


def multipart(boundary: str, video: bytes = VIDEO, **fields: str) -> tuple[bytes, dict[str, str]]:
    """A multipart body made by hand, with the boundary a client would pick."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="v.mp4"\r\n'
        f"Content-Type: video/mp4\r\n\r\n".encode()
        + video
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def submit(client: httpx.Client, key: str, boundary: str = "aaa", **fields: str) -> httpx.Response:
    body, headers = multipart(boundary, **fields)
    return client.post("/upload", content=body, headers={**headers, "Idempotency-Key": key})


def test_two_identical_submits_make_one_task(start_tus_server, tmp_path):
    server = start_tus_server(api_token="s3cret")
    with server.client() as client:
        first = submit(client, "key-1", start_training="false")
        assert first.status_code == 202, first.text
        # A retry by another client library: another boundary, the same request.
        again = submit(client, "key-1", boundary="other-boundary-123", start_training="false")
        assert again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["location"] == first.headers["location"]
        assert again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        assert client.get("/tasks").json()["total"] == 1

        # The same key with another request: 422, and no task.
        other = submit(client, "key-1", start_training="true")
        assert other.status_code == 422
        assert "different request" in other.json()["detail"]
        body, headers = multipart("aaa", STATIC_VIDEO.read_bytes(), start_training="false")
        other_video = client.post(
            "/upload", content=body, headers={**headers, "Idempotency-Key": "key-1"}
        )
        assert other_video.status_code == 422
        assert client.get("/tasks").json()["total"] == 1

        # Without the token the stored answer is not given.
        anonymous = httpx.post(
            f"{server.url}/upload",
            content=multipart("aaa", start_training="false")[0],
            headers={**multipart("aaa")[1], "Idempotency-Key": "key-1"},
            timeout=30,
        )
        assert anonymous.status_code == 401
        bad = client.post("/upload", content=b"", headers={"Idempotency-Key": "a b"})
        assert bad.status_code == 400

        # A refused request is not remembered: the key may be used again once it is right.
        refused = submit(client, "key-2", max_frames="0")
        assert refused.status_code == 422
        fixed = submit(client, "key-2", start_training="false")
        assert fixed.status_code == 202
        assert fixed.json()["task_id"] != first.json()["task_id"]
        wait_status(client, fixed.json()["task_id"], "preprocessing_completed")
        assert client.get("/tasks").json()["total"] == 2

    # Kept in the database: still answered after a restart.
    server.kill()
    server.start()
    with server.client() as client:
        after = submit(client, "key-1", start_training="false")
        assert after.status_code == 202
        assert after.json()["task_id"] == first.json()["task_id"]
        assert client.get("/tasks").json()["total"] == 2


def test_a_submit_repeated_while_the_first_runs_is_409_and_one_task(start_tus_server):
    server = start_tus_server()
    body, headers = multipart("zzz", start_training="false")
    headers = {**headers, "Idempotency-Key": "slow"}
    answers: list[httpx.Response] = []

    def slowly() -> Iterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]
            time.sleep(0.1)

    def first() -> None:
        with server.client() as client:
            answers.append(client.post("/upload", content=slowly(), headers=headers))

    thread = threading.Thread(target=first)
    thread.start()
    time.sleep(0.3)
    with server.client() as client:
        during = client.post("/upload", content=body, headers=headers)
        thread.join(30)
        assert during.status_code == 409
        assert during.headers["retry-after"]
        assert answers[0].status_code == 202
        after = client.post("/upload", content=body, headers=headers)
        assert after.json()["task_id"] == answers[0].json()["task_id"]
        assert client.get("/tasks").json()["total"] == 1


def test_tus_creation_and_control_posts_honour_the_key(start_tus_server):
    server = start_tus_server()
    with server.client() as client:
        create = {**TUS, "Upload-Length": "1000", "Idempotency-Key": "tus-1"}
        first = client.post("/uploads/", headers=create)
        again = client.post("/uploads/", headers=create)
        assert first.status_code == again.status_code == 201
        assert again.headers["location"] == first.headers["location"]
        folders = list((server.root / "temp_workspace" / "uploads").iterdir())
        assert len(folders) == 1
        longer = client.post("/uploads/", headers={**create, "Upload-Length": "2000"})
        assert longer.status_code == 422

        task_id = submit(client, "u", start_training="false").json()["task_id"]
        wait_status(client, task_id, "preprocessing_completed")
        train = {"Idempotency-Key": "train-1"}
        trained = client.post(f"/tasks/{task_id}/train", json={"iterations": 500}, headers=train)
        assert trained.status_code == 200, trained.text
        replayed = client.post(f"/tasks/{task_id}/train", json={"iterations": 500}, headers=train)
        assert replayed.status_code == 200
        assert replayed.json() == trained.json()
        assert replayed.headers["idempotent-replayed"] == "true"
        changed = client.post(f"/tasks/{task_id}/train", json={"iterations": 900}, headers=train)
        assert changed.status_code == 422
        # Without the key the state machine decides as before.
        wait_status(client, task_id, "training_completed")
        assert client.post(f"/tasks/{task_id}/train", json={"iterations": 500}).status_code == 409
