"""The training stage end to end through a real server, with the stand-in trainer
(tests/fake_trainer/main.py: the real command line and output format, no GPU, tests only)."""

from __future__ import annotations

import io
import re
import time
import zipfile

from conftest import TERMINAL, pid_alive, upload, wait_for, wait_status


def test_training_progress_moves_with_a_sane_eta(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.01")
    server = start_server(trainer_iterations=600)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        samples = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = client.get(f"/status/{task_id}").json()
            progress = status["progress"] or {}
            if status["status"] == "training" and progress.get("current"):
                samples.append(progress)
            if status["status"] in TERMINAL:
                break
            time.sleep(0.2)
        assert status["status"] == "training_completed"
        assert len(samples) >= 3, samples
        steps = [s["current"] for s in samples]
        assert steps == sorted(steps) and steps[-1] > steps[0]
        for sample in samples:
            assert sample["stage"] == "training"
            assert sample["total"] == 600
            assert 0 <= sample["percent"] <= 100
            assert sample["rate"] and sample["rate"] > 0
            # The stand-in runs about 100 steps a second: the ETA must be of that order.
            remaining = (600 - sample["current"]) / sample["rate"]
            assert abs(sample["eta_seconds"] - remaining) < 2
            assert sample["eta_seconds"] < 60
        assert any(s["loss"] is not None for s in samples)
        assert "Training" in status["message"] or status["message"] == "Training completed"


def test_keep_checkpoint_puts_the_checkpoint_in_the_zip(start_server):
    server = start_server()
    with server.client() as client:
        task_id = upload(client, keep_checkpoint="true", iterations=200).json()["task_id"]
        assert wait_status(client, task_id, TERMINAL)["status"] == "training_completed"
        names = zipfile.ZipFile(io.BytesIO(client.get(f"/download/{task_id}").content)).namelist()
        assert any(n.startswith("checkpoints/") and n.endswith(".ckpt") for n in names)
        assert "point_cloud/iteration_200/point_cloud.ply" in names


def test_down_sampling_prepares_the_smaller_images(start_server, tmp_path):
    server = start_server()
    with server.client() as client:
        task_id = upload(client, down_sample_factor=2, iterations=100).json()["task_id"]
        assert wait_status(client, task_id, TERMINAL)["status"] == "training_completed"
    images_2 = tmp_path / "temp_workspace" / task_id / "images_undistorted" / "images_2"
    assert len(list(images_2.glob("*.jpg"))) == 12


def test_a_restart_mid_training_resumes_from_the_last_checkpoint(
    start_server, monkeypatch, tmp_path
):
    """SIGKILL the server at ~60 % of a run that snapshots every 200 steps: after the restart
    the run goes on from the newest checkpoint (never below it) and completes."""
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.01")
    settings = {"trainer_iterations": 1000, "trainer_checkpoint_every": 200}
    server = start_server(**settings)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_for(
            client,
            task_id,
            lambda s: s["status"] == "training" and (s["progress"]["current"] or 0) >= 620,
            interval=0.05,
        )
    output = tmp_path / "temp_workspace" / "checkpoints" / task_id
    server.kill()
    at_kill = sorted(p.name for p in (output / "checkpoints").glob("*.ckpt"))
    assert 1 <= len(at_kill) <= 2, at_kill  # older snapshots are removed as new ones land
    server = start_server(port=server.port, **settings)
    samples = []
    with server.client() as client:
        status = wait_for(
            client,
            task_id,
            lambda s: samples.append(s) or s["status"] in TERMINAL,
            interval=0.05,
        )
        assert status["status"] == "training_completed", status
        log = client.get(f"/logs/{task_id}").text
    resumed = re.search(r"Training resumed from step (\d+) of 1000", log)
    assert resumed, log
    start = int(resumed[1])
    assert start >= 600 and start % 200 == 0  # the snapshot before the kill (or a later one)
    assert "Interrupted by server restart" in log
    assert [line for line in log.splitlines() if "Running:" in line][-1].endswith(
        "--ckpt_path last"
    )
    training = [s for s in samples if s["status"] == "training" and s["progress"]]
    assert training, samples
    steps = [s["progress"]["current"] for s in training if s["progress"]["current"] is not None]
    assert steps and min(steps) >= start and steps == sorted(steps)
    assert any(f"resumed from step {start} of 1000" in s["message"] for s in training)
    assert status["message"] == f"Training completed (resumed from step {start} of 1000)"
    meta = status["metadata"]["training"]
    assert (meta["iterations"], meta["resumed_from_step"]) == (1000, start)
    # Disk stays bounded: only the final checkpoint and .ply are left.
    assert sorted(p.name for p in (output / "checkpoints").glob("*.ckpt")) == [
        meta["checkpoints"][0].split("/")[-1]
    ]
    assert meta["checkpoints"][0].endswith("-step=1000.ckpt")
    assert [p.name for p in (output / "point_cloud").iterdir()] == ["iteration_1000"]


def test_a_trainer_crash_fails_with_its_last_lines(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_MODE", "crash")
    server = start_server()
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "failed"
        assert status["end_reason"] == "failed"
        error = status["error_message"]
        assert error.startswith("Training exited with code 1. Last output:")
        assert "OutOfMemoryError" in error
        assert 'File "' in error  # the traceback's frames, not only its last line
        # A failed training keeps its dataset: a retry trains again, no new preprocessing.
        retried = client.post(f"/tasks/{task_id}/retry").json()
        assert retried["status"] == "preprocessing_completed"


def test_a_trainer_without_internet_access_says_which_file_to_fetch(start_server, monkeypatch):
    """Seen on the offline GPU check: the real trainer downloads its LPIPS backbone's weights on
    first use. The error names the file and where it goes, not only a resolver traceback."""
    monkeypatch.setenv("FAKE_TRAINER_MODE", "offline")
    server = start_server()
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "failed"
        error = status["error_message"]
        headline = error.split(" Last output:")[0]
        assert "cannot reach the internet" in headline
        assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in headline
        assert "/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth" in headline
        assert "Temporary failure in name resolution" in error


def test_a_training_past_its_timeout_is_killed_with_its_children(
    start_server, monkeypatch, tmp_path
):
    monkeypatch.setenv("FAKE_TRAINER_MODE", "hang")
    monkeypatch.setenv("FAKE_TRAINER_HANG_AT", "20")
    server = start_server(training_timeout=4, kill_grace=1)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "failed"
        assert status["end_reason"] == "timed_out"
        assert status["error_message"] == "Training timed out after 4 s and was stopped."
    child_pid = tmp_path / "temp_workspace" / "checkpoints" / task_id / "fake_trainer_child.pid"
    assert not pid_alive(int(child_pid.read_text()))
