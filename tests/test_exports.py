"""SPZ exports through a real server with the stand-in trainer: the finished model as
model.spz (metadata, its own download route, the result ZIP), the upright scene frame from
the preprocess summary, a failed conversion that leaves the training succeeded, and the
previews made from the trainer's snapshots while it runs."""

from __future__ import annotations

import io
import itertools
import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

import training_server_spz as spz
import training_server_trainer_output as trainer_output
from conftest import TERMINAL, upload, wait_status


def _output(root: Path, task_id: str) -> Path:
    return root / "temp_workspace" / "checkpoints" / task_id


def test_a_finished_training_has_an_spz_in_metadata_download_and_zip(start_server, tmp_path):
    server = start_server()
    with server.client() as client:
        task_id = upload(client, iterations=200).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "training_completed", status
        meta = status["metadata"]["training"]
        assert meta["spz_path"] == "model.spz"
        assert meta["upright"] is False  # the stand-in pipeline writes no scene matrix
        assert meta["spz_sh_degree"] == 3
        assert 0 < meta["spz_ratio"] < 1
        assert "model.spz" not in meta["other_files"]

        answer = client.get(f"/download/{task_id}/spz")
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/octet-stream"
        assert ".spz" in answer.headers["content-disposition"]
        data = answer.content
        assert len(data) == meta["spz_bytes"]
        ply = _output(tmp_path, task_id) / meta["ply_path"]
        assert meta["spz_ratio"] == round(len(data) / ply.stat().st_size, 4)
        header, gaussians = spz.decode_spz(data)
        vertices = trainer_output.read_ply_header(ply).vertex_count
        assert header.version == 3
        assert header.count == vertices == meta["gaussian_count"] == gaussians.count
        assert header.sh_degree == 3

        head = client.head(f"/download/{task_id}/spz")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(data)

        archive = zipfile.ZipFile(io.BytesIO(client.get(f"/download/{task_id}").content))
        assert "model.spz" in archive.namelist()
        assert archive.read("model.spz") == data

        # Once training_completed the preview URL serves the finished model.
        final = client.get(f"/tasks/{task_id}/preview.spz")
        assert final.status_code == 200 and final.content == data
        assert final.headers["x-preview-final"] == "true"
        assert final.headers["x-preview-step"] == final.headers["x-preview-total"] == "200"
        assert not (_output(tmp_path, task_id) / "preview.spz").exists()


def test_the_spz_routes_answer_in_words_before_a_model(start_server):
    server = start_server()
    with server.client() as client:
        task_id = upload(client, auto_training="false").json()["task_id"]
        wait_status(client, task_id, "preprocessing_completed")
        early = client.get(f"/download/{task_id}/spz")
        assert early.status_code == 409 and "training_completed" in early.json()["detail"]
        none = client.get(f"/tasks/{task_id}/preview.spz")
        assert none.status_code == 404 and "preview" in none.json()["detail"]
        missing = client.get("/tasks/00000000-0000-4000-8000-000000000000/preview.spz")
        assert missing.status_code == 404


def test_the_scene_matrix_stands_the_spz_upright(start_server, tmp_path):
    """With `scene.matrix` in the preprocess summary, the SPZ holds the .ply's Gaussians
    moved by that similarity (and the lower SH degree the task asked for)."""
    server = start_server()
    angle = np.radians(30)
    matrix = np.array(
        [
            [2 * np.cos(angle), 0, 2 * np.sin(angle), 0.5],
            [0, 2, 0, -1.0],
            [-2 * np.sin(angle), 0, 2 * np.cos(angle), 0.25],
            [0, 0, 0, 1],
        ]
    )
    with server.client() as client:
        task_id = upload(client, auto_training="false", iterations=100).json()["task_id"]
        wait_status(client, task_id, "preprocessing_completed")
        summary_path = tmp_path / "temp_workspace" / task_id / "preprocess_summary.json"
        summary = json.loads(summary_path.read_text())
        summary["scene"] = {"matrix": matrix.tolist()}
        summary_path.write_text(json.dumps(summary))
        answer = client.post(f"/tasks/{task_id}/train", json={"spz_sh_degree": 1})
        assert answer.status_code == 200, answer.text
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "training_completed", status
        meta = status["metadata"]["training"]
        assert meta["upright"] is True and meta["spz_sh_degree"] == 1
        header, got = spz.decode_spz(client.get(f"/download/{task_id}/spz").content)
    assert header.sh_degree == 1
    source = spz.read_ply(_output(tmp_path, task_id) / meta["ply_path"])
    expected = source.positions @ matrix[:3, :3].T + matrix[:3, 3]
    step = 1.0 / (1 << header.fractional_bits)
    assert np.abs(got.positions - expected).max() <= step
    assert np.allclose(got.scales, source.scales + np.log(2), atol=0.1)  # log scales, 1/16


def test_a_failed_conversion_leaves_the_training_succeeded(start_server, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.01")
    server = start_server(trainer_iterations=400)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_status(client, task_id, "training")
        output = _output(tmp_path, task_id)
        deadline = time.monotonic() + 30
        while not output.is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        (output / "model.spz").mkdir()  # the SPZ cannot be written: its name is taken
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "training_completed", status
        meta = status["metadata"]["training"]
        assert meta["spz_path"] is None and meta["spz_error"]
        answer = client.get(f"/download/{task_id}/spz")
        assert answer.status_code == 404 and "conversion failed" in answer.json()["detail"]
        names = zipfile.ZipFile(io.BytesIO(client.get(f"/download/{task_id}").content)).namelist()
        assert meta["ply_path"] in names and "model.spz" not in names
        assert "SPZ export failed" in client.get(f"/logs/{task_id}").text


def test_previews_appear_while_training_runs(start_server, monkeypatch, tmp_path):
    """A run that snapshots every 200 of 1000 steps: 404 with a detail before the first
    snapshot, then a valid SPZ of an earlier step, its ETag changing as snapshots land."""
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.015")
    server = start_server(trainer_iterations=1000, trainer_checkpoint_every=200)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        before = client.get(f"/tasks/{task_id}/preview.spz")
        assert before.status_code == 404, before.text
        assert "No preview" in before.json()["detail"]
        previews: dict[str, dict] = {}  # etag -> what it showed
        deadline = time.monotonic() + 120
        status = client.get(f"/status/{task_id}").json()
        while time.monotonic() < deadline and status["status"] not in TERMINAL:
            answer = client.get(f"/tasks/{task_id}/preview.spz")
            status = client.get(f"/status/{task_id}").json()
            if answer.status_code == 404:
                assert "detail" in answer.json()
            elif answer.headers["x-preview-final"] == "false":
                assert answer.status_code == 200
                etag = answer.headers["etag"]
                if etag not in previews:
                    header = spz.read_header(answer.content)
                    previews[etag] = {
                        "step": int(answer.headers["x-preview-step"]),
                        "total": int(answer.headers["x-preview-total"]),
                        "version": header.version,
                        "count": spz.decode_spz(answer.content)[0].count,
                        "sh_degree": header.sh_degree,
                    }
                    again = client.get(
                        f"/tasks/{task_id}/preview.spz", headers={"If-None-Match": etag}
                    )
                    assert again.status_code in {200, 304}  # 200: a newer one landed
                    if again.status_code == 304:
                        assert again.content == b""
                    head = client.head(f"/tasks/{task_id}/preview.spz")
                    assert head.status_code == 200 and head.content == b""
                    assert "x-preview-step" in head.headers
                    info = client.get(f"/tasks/{task_id}/preview").json()
                    assert info["url"] == f"/tasks/{task_id}/preview.spz"
                    assert info["final"] is False and info["total"] == 1000
            time.sleep(0.3)
        assert status["status"] == "training_completed", status
    assert previews, "no preview was served while training ran"
    for shown in previews.values():
        assert shown["step"] < shown["total"] == 1000
        assert shown["step"] % 200 == 0
        assert shown["version"] == 3 and shown["sh_degree"] == 0
        assert shown["count"] == status["metadata"]["training"]["gaussian_count"]
    steps = [shown["step"] for shown in previews.values()]
    assert steps == sorted(steps)
    log = (tmp_path / "logs" / task_id / "training_server.log").read_text()
    assert "Preview of step" in log


def test_a_preview_replaced_while_it_is_served_arrives_whole(start_server, monkeypatch, tmp_path):
    """The trainer's snapshots rename a new preview.spz over the old one at any moment: each
    answer's length, ETag and bytes are of one and the same file (a stat of the path followed
    by an open of the path announced one file's length and sent the next one's bytes)."""
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.02")
    server = start_server(trainer_iterations=2000, trainer_checkpoint_every=100)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        target = _output(tmp_path, task_id) / "preview.spz"
        deadline = time.monotonic() + 60
        while client.get(f"/tasks/{task_id}/preview.spz").status_code != 200:
            assert time.monotonic() < deadline, "no preview appeared"
            time.sleep(0.1)
        small, large = target.read_bytes()[:1000], target.read_bytes() * 3
        stop = threading.Event()

        def replace_again_and_again() -> None:
            for k in itertools.count():
                if stop.is_set():
                    return
                partial = target.with_name(f"race-{k % 2}.partial")
                partial.write_bytes(small if k % 2 else large)
                partial.replace(target)

        writer = threading.Thread(target=replace_again_and_again)
        writer.start()
        try:
            sizes = set()
            for _ in range(150):
                answer = client.get(f"/tasks/{task_id}/preview.spz")
                assert answer.status_code == 200
                body = answer.content
                assert len(body) == int(answer.headers["content-length"])
                assert answer.headers["etag"].strip('"').split("-")[-1] == f"{len(body):x}"
                sizes.add(len(body))
        finally:
            stop.set()
            writer.join()
        assert {len(small), len(large)} <= sizes  # both files were served, each whole
