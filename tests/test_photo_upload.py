"""Photos and several videos through a real server: POST /upload takes a ZIP of photos,
several photos, or several videos of one scene in one request; every bad set is refused with
its status and a `detail` that names the problem, and leaves nothing behind (no task, no
folder). The slow tests run the real run_pipeline.py on a photo ZIP made from the office
sample and on two rendered orbits at two heights."""

from __future__ import annotations

import io
import json
import stat
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_photo_sources import jpeg, make_zip, office_photos, png_header

from conftest import OFFICE_VIDEO, REPO, STATIC_VIDEO, TERMINAL, wait_status
from synthetic_video import orbit_poses, render_video

REAL_PIPELINE = json.dumps([sys.executable, str(REPO / "run_pipeline.py")])


def post_files(
    client: httpx.Client, files: list[tuple[str, bytes]], **params: str
) -> httpx.Response:
    parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/upload", files=parts, params=params or None)


def nothing_left(client: httpx.Client, root: Path) -> None:
    assert client.get("/tasks").json()["total"] == 0
    workspace = root / "temp_workspace"
    deadline = time.monotonic() + 10
    while list(workspace.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(workspace.iterdir()) == []
    assert not list((root / "logs").glob("*/training_server.log"))


def photo_zip(count: int = 17, folder: str = "desk/", **exif: object) -> bytes:
    return make_zip(
        [(f"{folder}{k:02d}.jpg", jpeg(im, **exif)) for k, im in enumerate(office_photos(count))]
    )  # type: ignore[arg-type]


def test_bad_photo_sets_are_refused_with_a_reason_and_leave_nothing(start_server, tmp_path):
    server = start_server()
    photos = [jpeg(im) for im in office_photos(12)]
    link = zipfile.ZipInfo("desk/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    mixed = make_zip(
        [
            (f"{k}.jpg", jpeg(im, model="One" if k < 8 else "Two"))
            for k, im in enumerate(office_photos(12))
        ]
    )
    bomb = make_zip([("desk/bomb.jpg", b"\xff\xd8\xff" + bytes(64 * 2**20))])
    cases = [
        (
            [("p.zip", make_zip([("desk/a.jpg", photos[0]), ("desk/notes.txt", b"hi")]))],
            415,
            "desk/notes.txt",
        ),
        ([("p.zip", photo_zip(4))], 422, "at least 10"),
        ([("p.zip", mixed)], 422, "2 different cameras"),
        (
            [("p.zip", make_zip([("a.jpg", photos[0]), ("../../evil.jpg", photos[1])]))],
            415,
            "unsafe path",
        ),
        (
            [("p.zip", make_zip([("a.jpg", photos[0]), (link, b"/etc/passwd")]))],
            415,
            "symbolic link",
        ),
        ([("p.zip", bomb)], 413, "ZIP bomb"),
        ([("p.zip", make_zip([]))], 422, "holds no photos"),
        ([("p.zip", b"PK\x03\x04" + b"\x00" * 100)], 415, "not a ZIP archive"),
        (
            [(f"{k}.jpg", p) for k, p in enumerate(photos[:11])]
            + [("huge.png", png_header(20000, 20000))],
            413,
            "huge.png",
        ),
        ([(f"{k}.jpg", p) for k, p in enumerate(photos[:3])], 422, "at least 10"),
        (
            [(f"{k}.jpg", p) for k, p in enumerate(photos)] + [("notes.txt", b"hello")],
            415,
            "notes.txt",
        ),
        (
            [("a.mp4", OFFICE_VIDEO.read_bytes()), ("b.mp4", OFFICE_VIDEO.read_bytes())],
            400,
            "same file twice",
        ),
        ([("a.mp4", OFFICE_VIDEO.read_bytes()), ("empty.mp4", b"")], 415, "empty.mp4 is empty"),
    ]
    with server.client() as client:
        for files, status, words in cases:
            response = post_files(client, files, start_training="false")
            assert response.status_code == status, (words, response.text)
            assert words in response.json()["detail"], response.json()
            nothing_left(client, tmp_path)
    assert not (tmp_path / "evil.jpg").exists()
    assert not (tmp_path / "temp_workspace" / "evil.jpg").exists()


def test_a_photo_zip_several_photos_and_several_videos_become_one_task_each(start_server, tmp_path):
    server = start_server()
    with server.client() as client:
        # A ZIP of photos in two folders: two sources, one camera each.
        two_folders = make_zip(
            [(f"low/{k}.jpg", jpeg(im)) for k, im in enumerate(office_photos(9))]
            + [(f"high/{k}.jpg", jpeg(im, model="Other")) for k, im in enumerate(office_photos(6))]
        )
        answer = post_files(client, [("scene.zip", two_folders)], start_training="false")
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        status = wait_status(client, task_id, {"preprocessing_completed", *TERMINAL})
        assert status["status"] == "preprocessing_completed", status
        assert status["original_filename"] == "scene.zip"
        video = status["metadata"]["video"]
        assert [(s["kind"], s["label"], s["images"]) for s in video["sources"]] == [
            ("photos", "low", 9),
            ("photos", "high", 6),
        ]
        assert video["photos"] == 15 and video["videos"] == 0
        inputs = tmp_path / "temp_workspace" / task_id / "inputs"
        assert sorted(p.name for p in inputs.iterdir()) == ["01_low", "02_high"]
        assert len(list((inputs / "01_low").iterdir())) == 9
        assert not (tmp_path / "temp_workspace" / task_id / "upload.part").exists()
        # The summary (from the stand-in, as the real pipeline writes it) says what came from
        # each source.
        pre = status["metadata"]["preprocessing"]["sources"]
        assert [(s["kind"], s["images"]) for s in pre] == [("photos", 9), ("photos", 6)]

        # Several photos in one request: one source.
        photos = [(f"IMG_{k:04d}.JPG", jpeg(im)) for k, im in enumerate(office_photos(12))]
        answer = post_files(client, photos, start_training="false")
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        status = wait_status(client, task_id, {"preprocessing_completed", *TERMINAL})
        assert status["status"] == "preprocessing_completed", status
        assert status["original_filename"] == "IMG_0000.JPG and 11 more"
        folder = tmp_path / "temp_workspace" / task_id / "inputs" / "01_photos"
        assert sorted(p.name for p in folder.iterdir())[0] == "0001_IMG_0000.JPG"
        assert status["metadata"]["video"]["sources"][0]["images"] == 12

        # Several videos: a source each, in the order sent.
        answer = post_files(
            client,
            [("low orbit.mp4", OFFICE_VIDEO.read_bytes()), ("high.mp4", STATIC_VIDEO.read_bytes())],
            start_training="false",
        )
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        status = wait_status(client, task_id, {"preprocessing_completed", *TERMINAL})
        assert status["status"] == "preprocessing_completed", status
        inputs = tmp_path / "temp_workspace" / task_id / "inputs"
        assert sorted(p.name for p in inputs.iterdir()) == ["01_low_orbit.mp4", "02_high.mp4"]
        sources = status["metadata"]["video"]["sources"]
        assert [(s["kind"], s["label"], s["width"]) for s in sources] == [
            ("video", "low orbit.mp4", 640),
            ("video", "high.mp4", 1280),
        ]
        pre = status["metadata"]["preprocessing"]["sources"]
        assert [(s["kind"], s["label"]) for s in pre] == [
            ("video", "low_orbit.mp4"),
            ("video", "high.mp4"),
        ]
        assert status["video_size"] == OFFICE_VIDEO.stat().st_size + STATIC_VIDEO.stat().st_size
        # A retry runs from the same inputs (the folder is the task's input, as a video is).
        assert client.post(f"/tasks/{task_id}/retry").status_code == 409  # it succeeded
        # iPhone photos (HEIC) are read too.
        heic = []
        for k, image in enumerate(office_photos(10)):
            out = io.BytesIO()
            image.save(out, "HEIF", quality=80)
            heic.append((f"IMG_{k:04d}.HEIC", out.getvalue()))
        answer = post_files(client, [("iphone.zip", make_zip(heic))], start_training="false")
        assert answer.status_code == 202, answer.text
        found = client.get(f"/status/{answer.json()['task_id']}").json()["metadata"]["video"]
        assert found["sources"][0]["formats"] == ["HEIF"]
        assert found["sources"][0]["images"] == 10

        # A video and a ZIP of photos together: a source each.
        answer = post_files(
            client,
            [("walk.mp4", OFFICE_VIDEO.read_bytes()), ("close-ups.zip", photo_zip(3, "near/"))],
            start_training="false",
        )
        assert answer.status_code == 202, answer.text  # 3 photos are enough beside a video
        mixed = client.get(f"/status/{answer.json()['task_id']}").json()["metadata"]["video"]
        assert [(s["kind"], s["label"]) for s in mixed["sources"]] == [
            ("video", "walk.mp4"),
            ("photos", "near"),
        ]
        assert (mixed["videos"], mixed["photos"]) == (1, 3)
        # Deleting the task removes its inputs with it.
        assert client.delete(f"/tasks/{task_id}").status_code == 200

        # One video is laid out exactly as before.
        answer = post_files(client, [("v.mp4", OFFICE_VIDEO.read_bytes())], start_training="false")
        task_id = answer.json()["task_id"]
        assert (tmp_path / "temp_workspace" / task_id / "input.mp4").is_file()
        assert not (tmp_path / "temp_workspace" / task_id / "inputs").exists()


@pytest.mark.slow
def test_real_pipeline_reconstructs_a_photo_zip_with_exif_orientation(start_server):
    """17 frames of the office sample as photos, every other one stored sideways with its
    EXIF orientation saying so: all upright before features, all registered."""
    server = start_server(preprocess_command=REAL_PIPELINE)
    entries = []
    for k, image in enumerate(office_photos(17)):
        if k % 2:  # stored turned 90 degrees, EXIF orientation 6: "turn clockwise to show"
            entries.append(
                (
                    f"desk/{k:02d}.jpg",
                    jpeg(image.transpose(Image.Transpose.ROTATE_90), orientation=6),
                )
            )
        else:
            entries.append((f"desk/{k:02d}.jpg", jpeg(image)))
    started = time.monotonic()
    with server.client() as client:
        answer = post_files(client, [("desk.zip", make_zip(entries))], start_training="false")
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        status = wait_status(client, task_id, {"preprocessing_completed", *TERMINAL}, timeout=400)
        elapsed = time.monotonic() - started
        assert status["status"] == "preprocessing_completed", status
        summary = status["metadata"]["preprocessing"]
        print(
            f"photo ZIP of 17: {elapsed:.1f} s to preprocessing_completed, "
            f"{summary['frames_registered']} registered, {summary['points3D']} points, "
            f"{summary['mean_reprojection_error_px']} px"
        )
        assert summary["frames_registered"] == 17
        assert summary["mean_reprojection_error_px"] < 1.0
        assert summary["sources"] == [
            {
                "label": "desk",
                "kind": "photos",
                "file": "01_desk",
                "images": 17,
                "frames_kept": 17,
                "width": 640,
                "height": 480,
                "frames_registered": 17,
            }
        ]
        frames = client.get(f"/tasks/{task_id}/frames").json()
        assert frames["count"] == 17
        assert frames["frames"][0]["name"] == "s01_photo_0001.jpg"


@pytest.mark.slow
def test_real_pipeline_joins_two_orbits_at_two_heights_into_one_model(start_server, tmp_path):
    """Two videos of one scene (rendered orbits, low and high): frames selected in each, both
    reconstructed into one model with a camera each."""
    videos = []
    for k, height in enumerate((1.1, 2.0), 1):
        path = tmp_path / f"orbit_{k}.mp4"
        poses = orbit_poses(24, height=height, turns=0.5, seed=k)
        render_video(path, poses, width=480, height=270, fps=6, seed=0)
        videos.append((path.name, path.read_bytes()))
    server = start_server(preprocess_command=REAL_PIPELINE)
    started = time.monotonic()
    with server.client() as client:
        answer = post_files(client, videos, start_training="false", max_frames="40")
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        status = wait_status(client, task_id, {"preprocessing_completed", *TERMINAL}, timeout=500)
        elapsed = time.monotonic() - started
        assert status["status"] == "preprocessing_completed", status
        summary = status["metadata"]["preprocessing"]
        print(
            f"two orbits: {elapsed:.1f} s to preprocessing_completed, "
            f"{summary['frames_registered']} of {summary['frames_kept']} registered, "
            f"{summary['mean_reprojection_error_px']} px, {summary['image_pairs_matched']} pairs"
        )
        sources = summary["sources"]
        assert [(s["kind"], s["label"]) for s in sources] == [
            ("video", "orbit_1.mp4"),
            ("video", "orbit_2.mp4"),
        ]
        assert all(s["frames_registered"] >= 0.9 * s["frames_kept"] > 0 for s in sources)
        assert summary["frames_kept"] <= 40
        assert summary["models_found"] >= 1
        assert len(summary["cameras"]) == 2
        assert summary["mean_reprojection_error_px"] < 1.0


def test_zip_upload_openapi_says_files_may_repeat(start_server):
    server = start_server()
    with server.client() as client:
        spec = client.get("/openapi.json").json()
    body = spec["paths"]["/upload"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "ZIP of photos" in body["schema"]["properties"]["file"]["description"]


def test_a_failed_capture_is_retried_from_the_same_inputs(start_server, monkeypatch, tmp_path):
    """The inputs folder is the task's input, as the video is: a retry's clean rerun keeps it
    and runs the pipeline on it again."""
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "fail")
    server = start_server()
    with server.client() as client:
        answer = post_files(client, [("desk.zip", photo_zip(12))], start_training="false")
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        assert wait_status(client, task_id, TERMINAL)["status"] == "failed"
        assert client.post(f"/tasks/{task_id}/retry").status_code == 200
        status = wait_for_attempt(client, task_id, 2)
        assert status["status"] == "failed"
        photos = tmp_path / "temp_workspace" / task_id / "inputs" / "01_desk"
        assert len(list(photos.iterdir())) == 12
        log = client.get(f"/logs/{task_id}").text
        assert log.count(f"--video_path {tmp_path / 'temp_workspace' / task_id / 'inputs'} ") == 2


def wait_for_attempt(client: httpx.Client, task_id: str, attempt: int) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.get(f"/status/{task_id}").json()
        if status["attempts"] >= attempt and status["status"] in TERMINAL:
            return status
        time.sleep(0.1)
    raise AssertionError(f"attempt {attempt} did not end: {status}")
