"""The original ("seed") server's clients keep working (issue 17).

A real server on a loopback port, with the stand-in pipeline and trainer, driven exactly as
the original's web page (CHZarles/3dsServer `static/index.html`) and a typical polling script
drive it: upload with the page's form fields (and with query parameters, where the original
actually read them), list task ids from `GET /tasks`, poll `GET /status/{id}` until the task
is done, read `GET /logs/{id}?lines=N`, download `GET /download/{id}`, and delete through the
page's `DELETE /task/{id}`. Every answer is checked against the original's shapes, field by
field; what we only add beside them is checked not to disturb them.

The original's contract, as its code has it:

- `POST /upload` (multipart `file`; `max_frames`, `min_frames`, `start_training` as query
  parameters) answers `{"task_id", "message": "Video uploaded and pipeline started",
  "status": "pending", "auto_training": bool}`; the page sends the three as form fields.
- `GET /tasks` answers `{"tasks": [task id, ...]}`.
- `GET /status/{id}` answers `task_id`, `status`, `message` (str), `created_at`, `updated_at`
  (`datetime.isoformat()` strings), `error_message` (str or null), `metadata` (object or null);
  404 `{"detail": ...}` for an unknown task.
- `GET /logs/{id}?lines=N` answers the log's last N lines as `text/plain`; 404 when unknown.
- `GET /download/{id}` answers `application/zip` named `{id}_output.zip` holding the training
  output folder's files (paths relative to it) once `training_completed`; a 4xx with `detail`
  before that.
- The page's Delete button sends `DELETE /task/{id}` and treats any 2xx as done.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    OFFICE_VIDEO,
    TERMINAL,
    ServerProcess,
    _kill_leftover_stages,
    settings_env,
)

# The original's TaskStatus values a client can see, in the order a task goes through them;
# `cancelled` is our addition (SPEC section 3 allows it). The original's enum also had
# `deleted`, which its code never set.
SEED_FLOW = [
    "pending",
    "preprocessing",
    "preprocessing_completed",
    "training",
    "training_completed",
]
SEED_STATUSES = {*SEED_FLOW, "failed"}
WIRE_STATUSES = {*SEED_STATUSES, "cancelled"}
SEED_STATUS_FIELDS = [
    "task_id",
    "status",
    "message",
    "created_at",
    "updated_at",
    "error_message",
    "metadata",
]
SEED_UPLOAD_FIELDS = {"task_id", "message", "status", "auto_training"}
# What `datetime.isoformat()` writes, the only form `datetime.fromisoformat()` reads before
# Python 3.11 (the original's clients, like its own cleanup loop, parse timestamps with it).
ISOFORMAT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6})?([+-]\d\d:\d\d)?$")
ITERATIONS = 300  # settings_env's trainer_iterations
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"


# -- fixtures: one server for the module, tasks made the way the original's clients make them


@contextlib.contextmanager
def running_server(root: Path, **extra_env: str) -> Iterator[ServerProcess]:
    root.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(root, {**settings_env(root), **extra_env})
    try:
        yield server.start()
    finally:
        server.kill()
        _kill_leftover_stages(root)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("seed-compat")) as started:
        yield started


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    # No token, no extra headers: the original had no authentication.
    with httpx.Client(base_url=server.url, timeout=30) as seed_client:
        yield seed_client


def page_upload(
    client: httpx.Client,
    max_frames: str = "100",
    min_frames: str = "30",
    start_training: str = "true",
) -> httpx.Response:
    """What the original page's form sends: a FormData with `file` and three text fields."""
    with OFFICE_VIDEO.open("rb") as f:
        return client.post(
            "/upload",
            files={"file": (OFFICE_VIDEO.name, f, "video/mp4")},
            data={
                "max_frames": max_frames,
                "min_frames": min_frames,
                "start_training": start_training,
            },
        )


def query_upload(client: httpx.Client, **params: Any) -> httpx.Response:
    """What a script written against the original's signature sends: the file, and the
    parameters in the query string (where the original read them)."""
    with OFFICE_VIDEO.open("rb") as f:
        return client.post(
            "/upload", files={"file": (OFFICE_VIDEO.name, f, "video/mp4")}, params=params
        )


def poll_until_done(
    client: httpx.Client, task_id: str, done: set[str], timeout: float = 120
) -> tuple[dict[str, Any], list[str]]:
    """A polling script's loop: GET /status/{id} until the status is in `done`. Returns the
    last status object and the statuses seen, in order, without repeats."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/status/{task_id}")
        assert response.status_code == 200, response.text
        info = response.json()
        if not seen or seen[-1] != info["status"]:
            seen.append(info["status"])
        if info["status"] in done:
            return info, seen
        time.sleep(0.1)
    raise AssertionError(f"{task_id} not done in {timeout} s; statuses seen: {seen}")


@pytest.fixture(scope="module")
def completed(server: ServerProcess) -> dict[str, Any]:
    """A task uploaded through the page's form, polled until training_completed."""
    with httpx.Client(base_url=server.url, timeout=30) as seed_client:
        response = page_upload(seed_client)
        assert response.status_code // 100 == 2, response.text
        task_id = response.json()["task_id"]
        info, seen = poll_until_done(seed_client, task_id, TERMINAL)
    assert info["status"] == "training_completed", info
    return {"upload": response, "status": info, "seen": seen}


def assert_seed_status(info: dict[str, Any], task_id: str) -> None:
    """The original's status object, field by field (additions after them are fine)."""
    assert list(info)[: len(SEED_STATUS_FIELDS)] == SEED_STATUS_FIELDS
    assert info["task_id"] == task_id
    assert info["status"] in WIRE_STATUSES
    assert isinstance(info["message"], str)
    assert info["message"]
    for key in ("created_at", "updated_at"):
        assert isinstance(info[key], str)
        datetime.fromisoformat(info[key])
    assert datetime.fromisoformat(info["updated_at"]) >= datetime.fromisoformat(info["created_at"])
    assert info["error_message"] is None or isinstance(info["error_message"], str)
    assert info["metadata"] is None or isinstance(info["metadata"], dict)


def assert_seed_error(response: httpx.Response, status_code: int | None = None) -> None:
    """An error the original's clients read: a 4xx JSON body with a readable `detail`."""
    if status_code is None:
        assert 400 <= response.status_code < 500, response.text
    else:
        assert response.status_code == status_code, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail


def listed_ids(client: httpx.Client, **params: Any) -> list[str]:
    response = client.get("/tasks", params=params or None)
    assert response.status_code == 200, response.text
    ids = response.json()["tasks"]
    assert isinstance(ids, list)
    assert all(isinstance(task_id, str) for task_id in ids), f"not a list of ids: {ids!r:.300}"
    return ids


# -- upload -------------------------------------------------------------------------------


def test_upload_with_the_pages_form_fields_answers_the_original_shape(completed):
    response = completed["upload"]
    # The page's api() only asks res.ok and reads JSON by the content type.
    assert response.is_success
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= SEED_UPLOAD_FIELDS
    assert str(uuid.UUID(body["task_id"])) == body["task_id"]
    assert body["message"] == "Video uploaded and pipeline started"
    assert body["status"] == "pending"
    assert body["auto_training"] is True
    # The form's frame counts were used (the original itself ignored form fields).
    params = completed["status"]["params"]
    assert (params["max_frames"], params["min_frames"]) == (100, 30)


def test_upload_reads_the_original_parameters_from_the_query(client):
    response = query_upload(client, max_frames=50, min_frames=10, start_training="false")
    assert response.is_success, response.text
    body = response.json()
    assert body["status"] == "pending"
    assert body["auto_training"] is False
    info, seen = poll_until_done(client, body["task_id"], {"preprocessing_completed", "failed"})
    assert info["status"] == "preprocessing_completed"
    assert "training" not in seen
    assert (info["params"]["max_frames"], info["params"]["min_frames"]) == (50, 10)
    assert_seed_status(info, body["task_id"])


def test_page_form_with_auto_training_unchecked_stops_after_preprocessing(client):
    response = page_upload(client, start_training="false")
    assert response.is_success, response.text
    assert response.json()["auto_training"] is False
    task_id = response.json()["task_id"]
    info, _ = poll_until_done(client, task_id, {"preprocessing_completed", "failed"})
    assert info["status"] == "preprocessing_completed"
    time.sleep(1)  # it rests there: no training starts behind the client's back
    assert client.get(f"/status/{task_id}").json()["status"] == "preprocessing_completed"


def test_upload_errors_are_4xx_with_a_detail(client, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n")
    with text.open("rb") as f:
        refused = client.post("/upload", files={"file": (text.name, f, "text/plain")})
    assert_seed_error(refused)  # the original: 400 "Unsupported video format"
    assert_seed_error(client.post("/upload", data={"max_frames": "100"}))  # no file


# -- list, then poll each id ----------------------------------------------------------------


def test_tasks_lists_ids_a_script_can_poll(client, completed):
    task_id = completed["status"]["task_id"]
    ids = listed_ids(client)
    assert task_id in ids
    assert len(ids) == len(set(ids))
    # `for id in r.json()["tasks"]: get(f"/status/{id}")`
    for listed in ids:
        response = client.get(f"/status/{listed}")
        assert response.status_code == 200, response.text
        assert_seed_status(response.json(), listed)


def test_tasks_keeps_ids_beside_the_task_objects_and_paging(client, completed):
    page_upload(client, start_training="false").raise_for_status()
    body = client.get("/tasks").json()
    ids, items = body["tasks"], body["items"]
    assert [item["task_id"] for item in items] == ids
    assert body["total"] == len(ids) >= 2
    assert isinstance(body["limit"], int)
    assert body["limit"] >= len(ids)
    assert body["offset"] == 0
    for item in items:
        assert_seed_status(item, item["task_id"])
    # Paging and filters choose the ids the same way they choose the objects.
    page = client.get("/tasks", params={"limit": 1, "offset": 1}).json()
    assert page["tasks"] == ids[1:2]
    assert [item["task_id"] for item in page["items"]] == ids[1:2]
    assert (page["total"], page["limit"], page["offset"]) == (len(ids), 1, 1)
    done = listed_ids(client, status="training_completed")
    assert completed["status"]["task_id"] in done
    assert set(done) <= set(ids)


# -- status -------------------------------------------------------------------------------


def test_status_polled_to_the_end_has_the_original_fields(completed):
    info = completed["status"]
    assert_seed_status(info, info["task_id"])
    assert info["status"] == "training_completed"
    assert info["error_message"] is None
    assert isinstance(info["metadata"], dict)
    # Every status a poller saw is one of the original's, in the original's order.
    seen = completed["seen"]
    assert set(seen) <= SEED_STATUSES
    assert seen == sorted(seen, key=SEED_FLOW.index)
    assert seen[-1] == "training_completed"


def test_timestamps_are_what_datetime_isoformat_writes(completed):
    """`datetime.fromisoformat()` before Python 3.11 reads only what `isoformat()` writes
    (no trailing `Z`); the original wrote naive `isoformat()` strings and its own clients,
    like its cleanup loop, parse them with it."""
    info = completed["status"]
    for key in ("created_at", "updated_at"):
        stamp = info[key]
        assert ISOFORMAT.match(stamp), f"{key} {stamp!r} is not in datetime.isoformat() form"


def test_status_of_a_running_task_has_the_original_fields(client):
    task_id = page_upload(client).json()["task_id"]
    info = client.get(f"/status/{task_id}").json()
    assert info["status"] in {"pending", "preprocessing"}
    assert_seed_status(info, task_id)
    assert info["error_message"] is None
    poll_until_done(client, task_id, TERMINAL)


def test_a_failed_task_says_why_in_error_message(tmp_path):
    with (
        running_server(tmp_path / "failing", FAKE_PIPELINE_MODE="fail") as failing,
        httpx.Client(base_url=failing.url, timeout=30) as client,
    ):
        task_id = page_upload(client).json()["task_id"]
        info, seen = poll_until_done(client, task_id, TERMINAL)
        assert info["status"] == "failed"
        assert "training" not in seen
        assert_seed_status(info, task_id)
        assert isinstance(info["error_message"], str)
        assert info["error_message"]
        assert_seed_error(client.get(f"/download/{task_id}"))  # nothing to download
        log = client.get(f"/logs/{task_id}", params={"lines": 100})
        assert log.status_code == 200
        assert log.text.strip()


def test_status_of_an_unknown_task_is_404_with_a_detail(client):
    assert_seed_error(client.get(f"/status/{UNKNOWN_ID}"), 404)


# -- logs ---------------------------------------------------------------------------------


def test_logs_answer_the_last_lines_as_plain_text(client, completed):
    task_id = completed["status"]["task_id"]
    # The page asks for 200 lines and reads the body as text by its content type.
    response = client.get(f"/logs/{task_id}?lines=200")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    full = response.text.splitlines()
    assert 0 < len(full) <= 200
    tail = client.get(f"/logs/{task_id}", params={"lines": 3})
    assert tail.headers["content-type"].startswith("text/plain")
    assert tail.text.splitlines() == full[-3:]


def test_logs_of_an_unknown_task_are_404_with_a_detail(client):
    assert_seed_error(client.get(f"/logs/{UNKNOWN_ID}?lines=200"), 404)


# -- download -----------------------------------------------------------------------------


def test_download_after_training_is_a_zip_named_like_the_originals(client, completed):
    task_id = completed["status"]["task_id"]
    response = client.get(f"/download/{task_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert re.search(r'filename="([^"]*)"', disposition)[1] == f"{task_id}_output.zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    # The original zipped the training output folder itself: paths relative to it.
    names = archive.namelist()
    ply = f"point_cloud/iteration_{ITERATIONS}/point_cloud.ply"
    assert ply in names
    assert archive.read(ply).startswith(b"ply\n")
    assert not any(name.startswith(("/", "..", task_id)) for name in names)


def test_download_before_training_completed_is_refused_with_a_detail(client):
    task_id = page_upload(client).json()["task_id"]
    assert_seed_error(client.get(f"/download/{task_id}"))  # the original: 400
    poll_until_done(client, task_id, TERMINAL)


def test_download_of_an_unknown_task_is_refused_with_a_detail(client):
    assert_seed_error(client.get(f"/download/{UNKNOWN_ID}"))  # the original: 400


# -- delete through the page's path ---------------------------------------------------------


def test_delete_through_the_pages_path_removes_the_task(client):
    task_id = page_upload(client, start_training="false").json()["task_id"]
    poll_until_done(client, task_id, {"preprocessing_completed", "failed"})
    assert task_id in listed_ids(client)
    response = client.delete(f"/task/{task_id}")
    assert response.is_success, response.text
    assert task_id not in listed_ids(client)
    assert_seed_error(client.get(f"/status/{task_id}"), 404)
    assert_seed_error(client.get(f"/logs/{task_id}?lines=200"), 404)
    assert_seed_error(client.delete(f"/task/{task_id}"), 404)


def test_delete_through_the_pages_path_stops_a_running_task(client):
    task_id = page_upload(client).json()["task_id"]
    response = client.delete(f"/task/{task_id}")
    assert response.is_success, response.text
    assert_seed_error(client.get(f"/status/{task_id}"), 404)
    assert task_id not in listed_ids(client)


# -- the page itself and the API docs it links to -------------------------------------------


def test_page_and_api_docs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
