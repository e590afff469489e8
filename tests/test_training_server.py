"""End to end through a real server (uvicorn subprocess on a loopback port) with stand-in stage
commands that are real scripts: tests/stand_ins/fake_pipeline.py for preprocessing and
tests/fake_trainer/main.py for training (the stand-in exists only for tests)."""

from __future__ import annotations

import io
import itertools
import json
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from plyfile import PlyData

from conftest import (
    OFFICE_VIDEO,
    REPO,
    TERMINAL,
    pid_alive,
    recorded_pids,
    upload,
    wait_for,
    wait_status,
)
from pipeline.protocol import STAGES


def test_upload_runs_to_training_completed_with_a_checked_zip(start_server, tmp_path):
    server = start_server()
    with server.client() as client:
        response = upload(client, max_frames=50, min_frames=10, iterations=300)
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["status"] == "pending"
        assert body["message"] == "Video uploaded and pipeline started"
        assert body["auto_training"] is True
        assert response.headers["location"] == f"/status/{body['task_id']}"
        task_id = body["task_id"]

        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "training_completed", status
        assert status["error_message"] is None
        assert status["params"]["max_frames"] == 50
        assert status["params"]["min_frames"] == 10
        assert status["original_filename"] == "tum_office_orbit.mp4"
        assert status["metadata"]["video"]["width"] == 640
        assert status["metadata"]["preprocessing"]["frames_registered"] == 12
        training = status["metadata"]["training"]
        assert training["iterations"] == 300
        assert training["gaussian_count"] == 3000
        assert status["progress"]["stage"] == "training"
        assert status["progress"]["current"] == 300

        # The stored video has a server-made name; the client's name is only metadata.
        task_dir = tmp_path / "temp_workspace" / task_id
        assert "input.mp4" in {p.name for p in task_dir.iterdir()}

        archive = client.get(f"/download/{task_id}")
        assert archive.status_code == 200
        assert archive.headers["content-type"] == "application/zip"
        # Named as the original server named the trained model's ZIP (scripts rely on it).
        assert f'filename="{task_id}_output.zip"' in archive.headers["content-disposition"]
        assert int(archive.headers["content-length"]) == len(archive.content)
        names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
        assert "point_cloud/iteration_300/point_cloud.ply" in names
        assert "cameras.json" in names
        assert not any(name.startswith("checkpoints/") for name in names)

        ply = client.get(f"/download/{task_id}/ply")
        assert ply.status_code == 200
        vertices = PlyData.read(io.BytesIO(ply.content))["vertex"]
        assert vertices.count == 3000
        assert {"x", "f_dc_0", "opacity", "scale_0", "rot_3"} <= set(vertices.data.dtype.names)

        log = client.get(f"/logs/{task_id}", params={"lines": 400}).text
        assert "Stage preprocessing started" in log
        assert "Stage training ended: succeeded" in log


def test_start_training_false_rests_after_preprocessing_and_train_starts_it(start_server):
    server = start_server()
    with server.client() as client:
        task_id = upload(client, start_training="false").json()["task_id"]
        status = wait_status(client, task_id, {"preprocessing_completed", *TERMINAL})
        assert status["status"] == "preprocessing_completed"
        assert status["queued_for"] is None
        assert status["params"]["auto_training"] is False
        # Resting: the dataset can be downloaded.
        archive = client.get(f"/download/{task_id}")
        assert archive.status_code == 200
        names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
        assert "images_undistorted/sparse/0/cameras.bin" in names
        assert "preprocess_summary.json" in names
        assert client.get(f"/download/{task_id}/ply").status_code == 409

        bad = client.post(f"/tasks/{task_id}/train", json={"iterations": 5})
        assert bad.status_code == 422
        assert "iterations" in bad.json()["detail"]
        started = client.post(f"/tasks/{task_id}/train", json={"iterations": 200})
        assert started.status_code == 200, started.text
        again = client.post(f"/tasks/{task_id}/train")
        assert again.status_code == 409
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "training_completed"
        assert status["metadata"]["training"]["iterations"] == 200


@pytest.mark.slow
def test_real_pipeline_reconstructs_the_office_video_into_a_dataset_zip(start_server):
    """The real run_pipeline.py (not the stand-in) as the preprocessing stage: /status shows
    its sub-stages advancing, the task rests in preprocessing_completed with the summary in
    its metadata, and the ZIP holds a dataset pycolmap reads back with all 17 frames."""
    import pycolmap

    server = start_server(
        preprocess_command=json.dumps([sys.executable, str(REPO / "run_pipeline.py")])
    )
    changes: list[dict] = []
    subscribed = threading.Event()

    def follow_events() -> None:
        """Every change the server publishes, from its event stream (polling can miss the
        sub-stages of a fast run; the stream carries each progress write)."""
        with httpx.stream("GET", f"{server.url}/events", timeout=300) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: hello"):
                    subscribed.set()
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: ") :])
                if event.get("type") != "task":
                    continue
                changes.append(event["task"])
                if event["task"]["status"] in {"preprocessing_completed", *TERMINAL}:
                    return

    follower = threading.Thread(target=follow_events, daemon=True)
    follower.start()
    assert subscribed.wait(30)
    with server.client() as client:
        task_id = upload(client, start_training="false").json()["task_id"]
        status = wait_status(client, task_id, {"preprocessing_completed", *TERMINAL}, timeout=240)
        assert status["status"] == "preprocessing_completed", status
        summary = status["metadata"]["preprocessing"]
        assert summary["frames_registered"] == 17
        assert summary["points3D"] >= 500
        assert summary["mean_reprojection_error_px"] < 1.0
        follower.join(30)
        # Progress was visible while it ran: what the stream guarantees is that each write
        # was published, in the pipeline's stage order, and never went backwards.
        mine = [c["progress"] for c in changes if c["task_id"] == task_id and c["progress"]]
        steps = [p["step"] for p in mine if p.get("step")]
        order = list(STAGES)
        assert len(set(steps)) >= 2, steps
        assert [order.index(s) for s in steps] == sorted(order.index(s) for s in steps), steps
        percents = [p["percent"] for p in mine if p.get("percent") is not None]
        assert percents == sorted(percents), percents

        archive = client.get(f"/download/{task_id}")
        assert archive.status_code == 200
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zf:
            names = zf.namelist()
            images = [n for n in names if n.startswith("images_undistorted/images/")]
            assert len(images) == 17
            target = server.root / "unzipped"
            zf.extractall(target)
    model = pycolmap.Reconstruction(str(target / "images_undistorted" / "sparse" / "0"))
    assert model.num_reg_images() == 17
    assert {camera.model.name for camera in model.cameras.values()} <= {"PINHOLE"}


def test_a_failing_stage_reports_its_reason_and_retry_runs_it_again(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "fail")
    server = start_server()
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "failed"
        assert status["end_reason"] == "failed"
        assert status["error_message"].startswith("Only 2 of 40 frames could be placed")
        assert client.get(f"/download/{task_id}").status_code == 409
    server.kill()
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "ok")
    server = start_server()
    with server.client() as client:
        retried = client.post(f"/tasks/{task_id}/retry")
        assert retried.status_code == 200
        assert retried.json()["status"] == "pending"
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "training_completed"
        assert status["error_message"] is None
        assert client.post(f"/tasks/{task_id}/retry").status_code == 409


def test_a_crashing_stage_quotes_its_last_output(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "crash")
    server = start_server()
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "failed"
        assert "exited with code 1" in status["error_message"]
        assert "RuntimeError: simulated crash in mapping" in status["error_message"]


def test_a_stage_past_its_timeout_is_killed_with_its_children(start_server, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "hang")
    server = start_server(preprocess_timeout=2, kill_grace=1)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_for(client, task_id, lambda s: len(recorded_pids(tmp_path)) >= 2, timeout=20)
        status = wait_status(client, task_id, TERMINAL, timeout=30)
        assert status["status"] == "failed"
        assert status["end_reason"] == "timed_out"
        assert status["error_message"] == "Preprocessing timed out after 2 s and was stopped."
    for pid in recorded_pids(tmp_path):
        assert not pid_alive(pid), f"stage process {pid} survived the timeout"


def test_cancel_during_a_stage_kills_its_process_tree(start_server, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "spawn")
    server = start_server(kill_grace=1)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_for(client, task_id, lambda s: len(recorded_pids(tmp_path)) >= 2, timeout=20)
        started = time.monotonic()
        response = client.post(f"/tasks/{task_id}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        assert time.monotonic() - started < 10
        status = client.get(f"/status/{task_id}").json()
        assert status["end_reason"] == "cancelled"
        assert status["error_message"] == "Cancelled by user"
        assert client.post(f"/tasks/{task_id}/cancel").status_code == 409
    for pid in recorded_pids(tmp_path):
        assert not pid_alive(pid)


def test_cancel_a_queued_task(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "3")
    server = start_server()
    with server.client() as client:
        first = upload(client).json()["task_id"]
        second = upload(client).json()["task_id"]
        status = client.get(f"/status/{second}").json()
        assert status["status"] == "pending"
        assert status["queue_position"] in {1, 2}
        assert client.post(f"/tasks/{second}/cancel").json()["status"] == "cancelled"
        assert client.post(f"/tasks/{first}/cancel").json()["status"] == "cancelled"


def test_server_killed_mid_stage_resumes_after_restart(start_server, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "spawn")
    server = start_server()
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_for(client, task_id, lambda s: len(recorded_pids(tmp_path)) >= 2, timeout=20)
    old_pids = recorded_pids(tmp_path)
    server.kill()
    assert all(pid_alive(pid) for pid in old_pids)  # stages live in their own groups

    monkeypatch.setenv("FAKE_PIPELINE_MODE", "ok")
    server = start_server(port=server.port)
    with server.client() as client:
        for pid in old_pids:
            assert not pid_alive(pid), "a stage process from before the restart survived"
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "training_completed"
        log = client.get(f"/logs/{task_id}").text
        assert "Interrupted by server restart" in log


def test_cleanup_removes_old_results_and_keeps_the_record(start_server, tmp_path):
    server = start_server(cleanup_ttl=2, cleanup_interval=1)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_status(client, task_id, TERMINAL)
        status = wait_for(client, task_id, lambda s: s["expired"], timeout=20)
        assert status["status"] == "training_completed"
        assert "removed" in status["message"]
        assert not (tmp_path / "temp_workspace" / task_id).exists()
        assert not (tmp_path / "temp_workspace" / "checkpoints" / task_id).exists()
        assert not (tmp_path / "logs" / task_id).exists()
        assert client.get(f"/download/{task_id}").status_code == 410


def test_five_uploads_run_in_order_and_never_train_two_at_once(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.3")
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.004")
    server = start_server(trainer_iterations=200)
    with server.client() as client:
        results: list[str | None] = [None] * 5

        def send(index: int) -> None:
            with server.client() as own:
                results[index] = upload(own).json()["task_id"]
                time.sleep(0)

        threads = []
        for index in range(5):
            thread = threading.Thread(target=send, args=(index,))
            thread.start()
            threads.append(thread)
            time.sleep(0.3)  # a known upload order
        for thread in threads:
            thread.join()
        ids = [r for r in results if r]
        assert len(ids) == 5
        overlap = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tasks = client.get("/tasks").json()["items"]
            overlap = max(overlap, sum(1 for t in tasks if t["status"] == "training"))
            if all(t["status"] in TERMINAL for t in tasks):
                break
            time.sleep(0.05)
        statuses = {t["task_id"]: t for t in client.get("/tasks").json()["items"]}
        assert all(statuses[i]["status"] == "training_completed" for i in ids)
        assert overlap <= 1
        # The server's own record of each training run: intervals must not overlap, in order.
        spans = []
        for task_id in ids:
            log = client.get(f"/logs/{task_id}").text.splitlines()
            start = next(line[:24] for line in log if "Stage training started" in line)
            end = next(line[:24] for line in log if "Stage training ended" in line)
            spans.append((start, end))
        assert spans == sorted(spans)
        for (_, end), (next_start, _) in itertools.pairwise(spans):
            assert end <= next_start


def test_oversized_upload_is_refused_and_leaves_nothing(start_server, tmp_path):
    server = start_server(max_upload_bytes=100_000)
    with server.client() as client:
        response = upload(client)
        assert response.status_code == 413
        assert "limit" in response.json()["detail"]
        # Without Content-Length (chunked): the limit holds while streaming.
        data = OFFICE_VIDEO.read_bytes()
        boundary = "xyz"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.mp4"\r\n'
                f"Content-Type: video/mp4\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )

        def chunks():
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        response = client.post(
            "/upload",
            content=chunks(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert response.status_code == 413
        assert client.get("/tasks").json()["total"] == 0
    assert list((tmp_path / "temp_workspace").iterdir()) == []


def test_non_video_uploads_are_refused_by_content(start_server, tmp_path):
    server = start_server()
    with server.client() as client:
        html = client.post(
            "/upload",
            files={"file": ("movie.mp4", b"<!DOCTYPE html><html><script>x</script>", "video/mp4")},
        )
        assert html.status_code == 415
        assert "HTML" in html.json()["detail"]
        truncated = client.post(
            "/upload",
            files={"file": ("cut.mp4", OFFICE_VIDEO.read_bytes()[:300_000], "video/mp4")},
        )
        assert truncated.status_code == 415
        assert "damaged or incomplete" in truncated.json()["detail"]
        empty = client.post("/upload", files={"file": ("e.mp4", b"", "video/mp4")})
        assert empty.status_code == 415
        not_multipart = client.post("/upload", content=b"abc")
        assert not_multipart.status_code == 415
        missing = client.post("/upload", files={"other": ("a.txt", b"abc", "text/plain")})
        assert missing.status_code == 400
        assert "file" in missing.json()["detail"]
        assert client.get("/tasks").json()["total"] == 0
    assert list((tmp_path / "temp_workspace").iterdir()) == []


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("../../etc/passwd", "passwd"),
        ("/abs/path/clip.mp4", "clip.mp4"),
        ("nul\x00byte.mp4", "nulbyte.mp4"),
        # A raw CR LF ends the part header: what is left of the name is kept, quotes and all.
        ("crlf\r\nX-Injected: 1.mp4", '"crlf'),
        ("tab\tand\x7fdel.mp4", "tabanddel.mp4"),
        ("x" * 300 + ".mp4", "x" * 196 + ".mp4"),
        ('Büro "Kamera" 東京.mp4', 'Büro "Kamera" 東京.mp4'),
        ("..\\..\\windows\\evil.mp4", "evil.mp4"),
    ],
)
def test_hostile_file_names_are_kept_only_as_sanitized_metadata(
    start_server, tmp_path, name, stored
):
    server = start_server(preprocess_command=json.dumps(["/bin/false"]))
    with server.client() as client:
        response = upload_named(client, name)
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]
        status = client.get(f"/status/{task_id}").json()
        assert status["original_filename"] == stored
        task_dir = tmp_path / "temp_workspace" / task_id
        assert [p.name for p in task_dir.iterdir()] == ["input.mp4"]
        assert not (tmp_path / "etc").exists()


def upload_named(client: httpx.Client, name: str) -> httpx.Response:
    boundary = "boundary42"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{quoted}"\r\nContent-Type: video/mp4\r\n\r\n'
        ).encode()
        + OFFICE_VIDEO.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return client.post(
        "/upload",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )


def test_download_name_is_safe_for_hostile_names(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.2")
    server = start_server()
    with server.client() as client:
        task_id = upload_named(client, 'a"b; Set-Cookie: x=1; Ä.mp4').json()["task_id"]
        wait_status(client, task_id, TERMINAL)
        # The model's ZIP is named by task id (as the original did); the .ply keeps the
        # upload's name.
        response = client.get(f"/download/{task_id}/ply")
        assert response.status_code == 200
        disposition = response.headers["content-disposition"]
        assert "set-cookie" not in {k.lower() for k in response.headers}
        assert disposition == (
            'attachment; filename="a_b_ Set-Cookie_ x_1_ A.ply"; '
            "filename*=UTF-8''a%22b%3B%20Set-Cookie%3A%20x%3D1%3B%20%C3%84.ply"
        )


def test_bad_parameters_and_ids_get_clear_errors(start_server, tmp_path):
    server = start_server()
    with server.client() as client:
        for params in (
            {"max_frames": 0},
            {"max_frames": "many"},
            {"min_frames": 50, "max_frames": 10},
            {"iterations": 10**9},
            {"preset": "ultra"},
            {"down_sample_factor": 3},
            {"start_training": "perhaps"},
        ):
            response = upload(client, **params)
            assert response.status_code == 422, params
            detail = response.json()["detail"]
            assert isinstance(detail, str) and detail
        for path in ("/status/not-a-uuid", "/status/%2e%2e", "/logs/%2e%2e%2fetc", "/download/1"):
            response = client.get(path)
            assert response.status_code in {404, 422}, path
            assert "detail" in response.json()
        unknown = "00000000-0000-4000-8000-000000000000"
        assert client.get(f"/status/{unknown}").status_code == 404
        assert client.post(f"/tasks/{unknown}/cancel").status_code == 404
        assert client.delete(f"/tasks/{unknown}").status_code == 404
        assert client.get("/tasks", params={"status": "bogus"}).status_code == 422
        assert client.get("/tasks", params={"limit": 0}).status_code == 422
    assert list((tmp_path / "temp_workspace").iterdir()) == []


def test_delete_removes_files_and_record(start_server, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "spawn")
    server = start_server(kill_grace=1)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_for(client, task_id, lambda s: len(recorded_pids(tmp_path)) >= 2, timeout=20)
        pids = recorded_pids(tmp_path)
        assert client.delete(f"/tasks/{task_id}").status_code == 200
        assert client.get(f"/status/{task_id}").status_code == 404
        assert not (tmp_path / "temp_workspace" / task_id).exists()
        assert not (tmp_path / "logs" / task_id).exists()
        for pid in pids:
            assert not pid_alive(pid)


def test_task_list_filters_and_pages_newest_first(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "fail")
    server = start_server()
    with server.client() as client:
        ids = [upload(client).json()["task_id"] for _ in range(3)]
        for task_id in ids:
            wait_status(client, task_id, TERMINAL)
        listing = client.get("/tasks").json()
        assert [t["task_id"] for t in listing["items"]] == ids[::-1]
        assert listing["tasks"] == ids[::-1]  # ids, as the original server listed them
        assert listing["total"] == 3
        page = client.get("/tasks", params={"limit": 1, "offset": 1}).json()
        assert [t["task_id"] for t in page["items"]] == [ids[1]]
        assert client.get("/tasks", params={"status": "failed"}).json()["total"] == 3
        assert client.get("/tasks", params={"status": "pending"}).json()["total"] == 0


def test_log_stream_follows_until_the_task_ends(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "2")
    server = start_server()
    with server.client() as client:
        task_id = upload(client, start_training="false").json()["task_id"]
        events = []
        with client.stream("GET", f"/logs/{task_id}/stream", params={"lines": 0}) as stream:
            current = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    current = line[7:]
                elif line.startswith("data: "):
                    events.append((current, line[6:]))
                    if current == "end":
                        break
        logs = [data for kind, data in events if kind == "log"]
        assert any("Stage preprocessing ended" in data for data in logs)
        assert events[-1] == ("end", "preprocessing_completed")


def test_task_events_stream_reports_changes(start_server):
    server = start_server()
    seen: list[dict] = []
    with server.client() as client:
        done = threading.Event()

        def listen() -> None:
            with server.client() as own, own.stream("GET", "/events") as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: ") and '"type": "task"' in line:
                        seen.append(json.loads(line[6:]))
                        if seen[-1]["task"]["status"] == "training_completed":
                            break
            done.set()

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        time.sleep(0.5)
        upload(client)
        assert done.wait(60)
    statuses = [event["task"]["status"] for event in seen]
    assert statuses[0] == "pending"
    assert "preprocessing" in statuses and "training" in statuses
    assert statuses[-1] == "training_completed"


ROUTES = [
    ("GET", "/health"),
    ("GET", "/tasks"),
    ("POST", "/upload"),
    ("GET", "/status/{id}"),
    ("GET", "/tasks/{id}"),
    ("POST", "/tasks/{id}/cancel"),
    ("POST", "/tasks/{id}/retry"),
    ("POST", "/tasks/{id}/train"),
    ("DELETE", "/tasks/{id}"),
    ("GET", "/logs/{id}"),
    ("GET", "/logs/{id}/stream"),
    ("GET", "/events"),
    ("GET", "/download/{id}"),
    ("GET", "/download/{id}/ply"),
]


def test_token_is_required_on_every_api_route(start_server):
    server = start_server(api_token="s3cret-token")
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        with httpx.Client(base_url=server.url, timeout=10) as anonymous:
            for method, path in ROUTES:
                url = path.format(id=task_id)
                for headers in (
                    {},
                    {"Authorization": "Bearer wrong"},
                    {"Authorization": "Basic x"},
                ):
                    response = anonymous.request(method, url, headers=headers)
                    assert response.status_code == 401, (method, url, headers)
                    assert response.json()["detail"].startswith("A valid API token is required")
            # The page stays reachable so it can ask for the token.
            assert anonymous.get("/").status_code in {200, 404}
            # A token in the URL is refused (it would land in access logs and browser history).
            assert anonymous.get("/health", params={"token": "s3cret-token"}).status_code == 401
        assert client.get(f"/status/{task_id}").status_code == 200
        health = client.get("/health").json()
        assert health["auth_required"] is True


def test_no_cors_grant_for_other_origins_by_default(start_server):
    server = start_server()
    with server.client() as client:
        response = client.get("/tasks", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers
        preflight = client.options(
            "/upload",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers


def test_health_reports_queues_disk_and_stage_commands(start_server):
    server = start_server(trainer_path="/nonexistent/checkout")
    with server.client() as client:
        health = client.get("/health").json()
        assert health["version"]
        assert health["preprocessing"]["available"] is True
        assert health["training"]["available"] is False
        assert "does not exist" in health["training"]["detail"]
        assert health["disk_free_bytes"] > 0
        assert health["queued"] == {"preprocessing": 0, "training": 0}
        response = upload(client)
        assert response.json()["training_available"] is False
        task_id = response.json()["task_id"]
        status = wait_status(client, task_id, {"preprocessing_completed", *TERMINAL})
        assert status["status"] == "preprocessing_completed"
        assert "training is not available" in status["message"]
        assert client.post(f"/tasks/{task_id}/train").status_code == 503


def test_sigterm_stops_running_stages_and_records_why(start_server, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "spawn")
    server = start_server(kill_grace=1)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_for(client, task_id, lambda s: len(recorded_pids(tmp_path)) >= 2, timeout=20)
    started = time.monotonic()
    # uvicorn re-raises the signal after its graceful shutdown: the exit status says SIGTERM.
    assert server.terminate(timeout=30) in {0, -15}
    assert time.monotonic() - started < 20
    assert "Application shutdown complete" in server.output()
    for pid in recorded_pids(tmp_path):
        assert not pid_alive(pid)
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "ok")
    server = start_server(port=server.port)
    with server.client() as client:
        log = client.get(f"/logs/{task_id}").text
        assert "Interrupted by server shutdown" in log
        assert wait_status(client, task_id, TERMINAL)["status"] == "training_completed"


def test_index_page_is_served(start_server):
    server = start_server()
    with httpx.Client(base_url=server.url) as client:
        response = client.get("/")
        assert response.status_code == 200
        assert "text/html" in response.headers["content-type"]


def test_help_lists_the_options():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "training_server.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert "--host" in result.stdout and "--port" in result.stdout
