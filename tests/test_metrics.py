"""GET /metrics on a real server: Prometheus text that prometheus-client's own parser reads,
behind the API token unless public, with counters that move as a task runs."""

from __future__ import annotations

from typing import Any

import httpx
import test_webhooks
from prometheus_client.parser import text_string_to_metric_families
from test_webhooks import SECRET, Receiver

from conftest import OFFICE_VIDEO, upload, wait_status

wired = test_webhooks.wired  # the fixture that starts a server with /metrics installed

TOKEN = "metrics-test-token"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels), parsed by prometheus-client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_parse_need_the_token_and_move_with_a_task(wired: Any) -> None:
    receiver = Receiver()
    try:
        server = wired(api_token=TOKEN, webhook_urls=[receiver.url], webhook_secret=SECRET)
        with server.client() as client:
            assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
            before = samples(client.get("/metrics").text)
            assert before[("training_server_uploads_total", ())] == 0
            assert before[("training_server_tasks", (("status", "training_completed"),))] == 0
            task_id = upload(client).json()["task_id"]
            wait_status(client, task_id, "training_completed")
            receiver.wait(2)
            answer = client.get("/metrics")
            assert answer.headers["content-type"].startswith("text/plain")
            after = samples(answer.text)
        size = OFFICE_VIDEO.stat().st_size
        assert after[("training_server_uploads_total", ())] == 1
        assert after[("training_server_upload_bytes_total", ())] == size
        assert after[("training_server_tasks", (("status", "training_completed"),))] == 1
        assert after[("training_server_tasks", (("status", "pending"),))] == 0
        for stage in ("preprocessing", "training"):
            labels = (("outcome", "succeeded"), ("stage", stage))
            assert after[("training_server_stage_duration_seconds_count", labels)] == 1
            assert after[("training_server_stage_duration_seconds_sum", labels)] > 0
            assert after[("training_server_queue_length", (("stage", stage),))] == 0
            assert after[("training_server_running_stages", (("stage", stage),))] == 0
        assert after[("training_server_webhook_deliveries", (("state", "delivered"),))] == 2
        assert after[("training_server_webhook_attempts_total", (("state", "delivered"),))] == 2
    finally:
        receiver.close()


def test_failures_by_reason_and_public_metrics(wired: Any) -> None:
    server = wired(api_token=TOKEN, metrics_public="true", extra_env={"FAKE_PIPELINE_MODE": "fail"})
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_status(client, task_id, "failed")

    answer = httpx.get(f"{server.url}/metrics")  # no token: public
    assert answer.status_code == 200
    after = samples(answer.text)
    labels = (("reason", "failed"), ("stage", "preprocessing"))
    assert after[("training_server_task_failures_total", labels)] == 1
    assert after[("training_server_tasks", (("status", "failed"),))] == 1
    assert httpx.get(f"{server.url}/tasks").status_code == 401  # the API still needs it
