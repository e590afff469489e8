"""Signed webhooks against a real receiver on loopback: signatures verified with the
Standard Webhooks library, retries with growing delays that survive a server restart and stop
at the bound (saying so in /status), and per-task URLs only for allowed hosts (422)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from conftest import ServerProcess, settings_env, upload, wait_for, wait_status

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[Any]:
    """`wired(extra_env=None, **settings)` starts a real server (training_server.py, with the
    webhook service and /metrics) on tmp_path; all are killed."""
    servers: list[ServerProcess] = []

    def start(extra_env: dict[str, str] | None = None, **settings: Any) -> ServerProcess:
        server = ServerProcess(
            tmp_path, {**settings_env(tmp_path, **settings), **(extra_env or {})}
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


class Receiver:
    """A webhook receiver on a loopback port: records every request (arrival time, headers,
    body) and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[float, dict[str, str], bytes, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append((time.monotonic(), dict(self.headers), body, self.path))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= count, f"{len(self.requests)} requests, wanted {count}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def verified(request: tuple[float, dict[str, str], bytes, str]) -> dict[str, Any]:
    """The payload, after its signature checks out (raises otherwise)."""
    _, headers, body, _ = request
    return Webhook(SECRET).verify(body, headers)


def test_events_are_signed_delivered_and_shown_in_status(wired: Any, receiver: Receiver) -> None:
    server = wired(
        webhook_urls=[f"{receiver.url}/all"],
        webhook_secret=SECRET,
        webhook_allowed_hosts=["127.0.0.1"],
    )
    with server.client() as client:
        answer = upload(client, webhook_url=f"{receiver.url}/own?key=s3cret")
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        wait_status(client, task_id, "training_completed")
        receiver.wait(4)
        time.sleep(0.5)  # nothing more is coming
        assert len(receiver.requests) == 4
        seen = {}
        for request in receiver.requests:
            payload = verified(request)
            assert payload["data"]["task_id"] == task_id
            seen[(request[3], payload["type"])] = payload["data"]["status"]
        assert seen == {
            ("/all", "task.preprocessing_completed"): "preprocessing_completed",
            ("/own?key=s3cret", "task.preprocessing_completed"): "preprocessing_completed",
            ("/all", "task.succeeded"): "training_completed",
            ("/own?key=s3cret", "task.succeeded"): "training_completed",
        }
        # A forged signature does not verify.
        forged = dict(receiver.requests[0][1], **{"webhook-signature": "v1,AAAA"})
        with pytest.raises(Exception, match="signature"):
            Webhook(SECRET).verify(receiver.requests[0][2], forged)
        status = wait_for(
            client,
            task_id,
            lambda s: (
                len(s["webhooks"] or []) == 4
                and all(d["state"] == "delivered" for d in s["webhooks"])
            ),
            timeout=20,
        )
        for delivery in status["webhooks"]:
            assert delivery["attempts"] == 1
            assert delivery["last_status"] == 200
            assert delivery["next_attempt_at"] is None
            assert "s3cret" not in delivery["url"]  # a receiver's secret stays out of /status
        listed = client.get("/tasks").json()["items"][0]
        assert len(listed["webhooks"]) == 4


def test_webhook_url_to_a_host_not_allowed_is_refused(wired: Any, receiver: Receiver) -> None:
    server = wired(webhook_secret=SECRET, webhook_allowed_hosts=["127.0.0.1"])
    with server.client() as client:
        for url in (
            "http://169.254.169.254/latest/meta-data",
            "http://example.com/hook",
            "file:///etc/passwd",
        ):
            answer = upload(client, webhook_url=url)
            assert answer.status_code == 422, (url, answer.text)
            assert "webhook_url" in answer.json()["detail"]
        assert client.get("/tasks").json()["total"] == 0


def test_retries_grow_survive_a_restart_and_give_up_at_the_bound(
    wired: Any, receiver: Receiver
) -> None:
    receiver.status = 503
    settings = {
        "webhook_urls": [f"{receiver.url}/hook"],
        "webhook_secret": SECRET,
        "webhook_retry_base": 0.5,
        "webhook_max_attempts": 5,
    }
    server = wired(**settings)
    with server.client() as client:
        task_id = upload(client, auto_training="false").json()["task_id"]
        wait_status(client, task_id, "preprocessing_completed")
        receiver.wait(2)
        status = wait_for(
            client, task_id, lambda s: (s["webhooks"] or [{}])[0].get("attempts") == 2
        )
    delivery = status["webhooks"][0]
    assert delivery["state"] == "pending"
    assert delivery["last_status"] == 503
    assert "503" in delivery["last_error"]
    gap = receiver.requests[1][0] - receiver.requests[0][0]
    assert gap >= 0.45  # the first retry waited its backoff (0.5 s)
    # The next attempt is due base * 2^(attempts-1) after the last: 1 s after the second.
    last = delivery["last_attempt_at"]
    due = delivery["next_attempt_at"]
    from datetime import datetime

    waited = (datetime.fromisoformat(due) - datetime.fromisoformat(last)).total_seconds()
    assert waited == pytest.approx(1.0, abs=0.01)
    ids = {r[1]["webhook-id"] for r in receiver.requests}
    assert len(ids) == 1  # every attempt is the same message
    for request in receiver.requests:
        verified(request)

    server.kill()
    receiver.close()  # the receiver is down from now on
    server = wired(**settings)
    seen_waits: dict[int, float] = {}
    with server.client() as client:

        def record(s: dict[str, Any]) -> bool:
            d = s["webhooks"][0]
            if d["next_attempt_at"]:
                w = datetime.fromisoformat(d["next_attempt_at"])
                seen_waits[d["attempts"]] = (
                    w - datetime.fromisoformat(d["last_attempt_at"])
                ).total_seconds()
            return d["state"] == "failed"

        status = wait_for(client, task_id, record, timeout=60)
    delivery = status["webhooks"][0]
    assert delivery["attempts"] == 5  # counted on across the restart, and no further
    assert delivery["next_attempt_at"] is None
    assert "gave up after 5 attempts" in delivery["last_error"]
    assert "Connect" in delivery["last_error"]
    assert delivery["last_status"] is None
    assert len(receiver.requests) == 2
    # Each wait twice the one before (those the polling saw).
    for attempts, waited in seen_waits.items():
        assert waited == pytest.approx(0.5 * 2 ** (attempts - 1), abs=0.01)
    assert seen_waits, "no pending retry seen after the restart"
    time.sleep(1.5)
    with server.client() as client:
        assert client.get(f"/status/{task_id}").json()["webhooks"][0]["attempts"] == 5


def test_failed_events_and_a_repeat_after_retry(wired: Any, receiver: Receiver) -> None:
    server = wired(
        webhook_urls=[receiver.url],
        webhook_secret="a plain secret",
        extra_env={"FAKE_PIPELINE_MODE": "fail"},
    )
    with server.client() as client:
        failed = upload(client).json()["task_id"]
        wait_status(client, failed, "failed")
        receiver.wait(1)
        _, headers, body, _ = receiver.requests[0]
        payload = Webhook(b"a plain secret").verify(body, headers)
        assert payload["type"] == "task.failed"
        assert payload["data"]["task_id"] == failed
        assert payload["data"]["end_reason"] == "failed"
        # A retried task that fails again is a new event.
        assert client.post(f"/tasks/{failed}/retry").status_code == 200
        receiver.wait(2)
        assert json.loads(receiver.requests[1][2])["type"] == "task.failed"
        assert receiver.requests[1][1]["webhook-id"] != headers["webhook-id"]
