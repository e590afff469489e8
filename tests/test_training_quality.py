"""Training you can trust, through a real server with the stand-in trainer
(tests/fake_trainer/main.py): what /health says of a broken trainer, the training resolution
of a 4K upload, and the quality figures on held-out frames."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import FAKE_PIPELINE, TERMINAL, upload, wait_status
from synthetic_video import write_video

# A preprocessing command for tests: the stand-in pipeline, then its dataset scaled to the
# video's own size (as run_pipeline.py keeps it), so that a 4K upload gives a 4K dataset.
FULL_SIZE_PIPELINE = """
import struct, subprocess, sys
from pathlib import Path
import cv2

args = sys.argv[1:]
subprocess.run([sys.executable, {fake!r}, *args], check=True)
video = cv2.VideoCapture(args[args.index("--video_path") + 1])
width, height = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
dataset = Path(args[args.index("--output_dir") + 1]) / "images_undistorted"
for image in (dataset / "images").iterdir():
    small = cv2.imread(str(image))
    sx, sy = width / small.shape[1], height / small.shape[0]
    cv2.imwrite(str(image), cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR))
cameras = dataset / "sparse" / "0" / "cameras.bin"
data = bytearray(cameras.read_bytes())
fx, fy, cx, cy = struct.unpack_from("<4d", data, 32)
struct.pack_into("<QQ4d", data, 16, width, height, fx * sx, fy * sy, cx * sx, cy * sy)
cameras.write_bytes(bytes(data))
"""


@pytest.fixture
def video_4k(tmp_path: Path) -> Path:
    """A short 3840x2160 H.264 video."""
    path = tmp_path / "uhd.mp4"
    rng = np.random.default_rng(3)
    base = cv2.resize(rng.integers(0, 255, (54, 96, 3), dtype=np.uint8), (3840, 2160))
    write_video(path, (np.roll(base, 40 * i, axis=1) for i in range(6)), fps=10, crf=35)
    return path


@pytest.fixture
def full_size_pipeline(tmp_path: Path) -> str:
    script = tmp_path / "full_size_pipeline.py"
    script.write_text(FULL_SIZE_PIPELINE.format(fake=str(FAKE_PIPELINE)))
    return json.dumps([sys.executable, str(script)])


def test_a_missing_trainer_module_is_named_in_health_and_upload(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_MISSING_MODULE", "plyfile")
    server = start_server()
    with server.client() as client:
        training = client.get("/health").json()["training"]
        expected = "the trainer's Python cannot import plyfile: install the trainer's requirements"
        assert training == {"available": False, "detail": expected}
        answer = upload(client).json()
        assert answer["training_available"] is False
        assert expected in answer["training_unavailable_reason"]
        assert "Traceback" not in answer["training_unavailable_reason"]


def test_a_4k_upload_trains_at_most_1600_pixels_wide(
    start_server, tmp_path, video_4k, full_size_pipeline
):
    server = start_server(preprocess_command=full_size_pipeline)
    with server.client() as client:
        task_id = upload(client, video_4k, iterations=100).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "training_completed", status
        log = client.get(f"/logs/{task_id}").text
    training = status["metadata"]["training"]
    assert training["source_image_size"] == {"width": 3840, "height": 2160}
    assert training["down_sample_factor"] == 3
    assert training["image_size"] == {"width": 1280, "height": 720}
    assert training["max_image_size"] == 1600
    assert "Training images: 1280x720 px (1/3 of 3840x2160" in log
    dataset = tmp_path / "temp_workspace" / task_id / "images_undistorted"
    images = sorted((dataset / "images_3").iterdir())
    assert len(images) == 12
    assert all(cv2.imread(str(p)).shape[:2] == (720, 1280) for p in images)
    # The trainer was told that factor and read those images (its cameras.json).
    cameras = tmp_path / "temp_workspace" / "checkpoints" / task_id / "cameras.json"
    assert {(c["width"], c["height"]) for c in json.loads(cameras.read_text())} == {(1280, 720)}


def test_max_image_size_per_task_and_nonsense_is_refused(
    start_server, video_4k, full_size_pipeline
):
    server = start_server(preprocess_command=full_size_pipeline, trainer_max_image_size=2000)
    with server.client() as client:
        for bad in (
            {"max_image_size": 0},
            {"max_image_size": "huge"},
            {"max_image_size": 10**6},
            {"max_image_size": 800, "down_sample_factor": 2},
        ):
            response = upload(client, video_4k, **bad)
            assert response.status_code == 422, (bad, response.text)
            assert "max_image_size" in response.json()["detail"]
        task_id = upload(client, video_4k, iterations=100, max_image_size=800).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
    assert status["status"] == "training_completed", status
    training = status["metadata"]["training"]
    assert (training["down_sample_factor"], training["max_image_size"]) == (5, 800)
    assert training["image_size"] == {"width": 768, "height": 432}


def test_quality_on_held_out_frames_is_recorded(start_server):
    server = start_server()
    with server.client() as client:
        task_id = upload(client, iterations=200).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
        log = client.get(f"/logs/{task_id}").text
    assert status["status"] == "training_completed", status
    training = status["metadata"]["training"]
    assert training["hold_out"] is True
    quality = training["quality"]
    # 12 frames, every 8th held out: frames 0 and 8; the stand-in's CSV, read back exactly.
    assert (quality["split"], quality["eval_images"], quality["step"]) == ("held_out", 2, 200)
    assert quality["source"] == "metrics_csv"
    assert 10 < quality["psnr"] < 40 and 0 < quality["ssim"] < 1 and 0 < quality["lpips"] < 1
    assert quality["note"] == "PSNR and SSIM on 2 held-out frames the model never saw"
    assert "--data.parser.split_mode experiment" in log
    assert "Quality at step 200: PSNR" in log


def test_without_hold_out_the_figures_say_they_are_on_training_views(start_server):
    server = start_server(trainer_hold_out="false")
    with server.client() as client:
        task_id = upload(client, iterations=200).json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
    quality = status["metadata"]["training"]["quality"]
    assert (quality["split"], quality["eval_images"]) == ("training_views", 2)
    assert "training views (no frames held out)" in quality["note"]
