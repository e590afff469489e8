"""The dataset previews the web page uses: GET /tasks/{id}/frames, /frames/{name} (and its
thumbnails) and /sparse, through a real server with the stand-in pipeline (12 frames of
160x120, 147 points on a 7x7x3 grid, 12 cameras on a circle of radius 4 around the y axis)."""

from __future__ import annotations

import http.client
import json
import math
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import cv2
import httpx
import numpy as np
import pytest

import training_server_preview as preview
from conftest import ServerProcess, settings_env, upload, wait_status

FRAMES = [f"frame_{i:05d}.jpg" for i in range(12)]


TOKEN = "s3cret"


@pytest.fixture(scope="module")
def dataset_task(tmp_path_factory):
    """One server (with an API token) for the module, and a task resting in
    preprocessing_completed (no training). Tests that change its files put them back."""
    root = tmp_path_factory.mktemp("preview")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAKE_PIPELINE_SECONDS", "1.5")
        server = ServerProcess(root, settings_env(root, api_token=TOKEN)).start()
    try:
        with server.client() as client:
            task_id = upload(client, start_training="false").json()["task_id"]
            wait_status(client, task_id, "preprocessing_completed", timeout=60)
            yield SimpleNamespace(
                server=server,
                client=client,
                task_id=task_id,
                task_dir=root / "temp_workspace" / task_id,
            )
    finally:
        server.kill()


def raw_get(server, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    """GET a path exactly as written (no client-side normalisation of `..` or escapes)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        if token:
            connection.putheader("Authorization", f"Bearer {token}")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not an image"
    return image


def test_frames_are_listed_sorted_with_working_urls(dataset_task):
    t = dataset_task
    client, task_id, task_dir = t.client, t.task_id, t.task_dir
    answer = client.get(f"/tasks/{task_id}/frames")
    assert answer.status_code == 200
    body = answer.json()
    assert body["task_id"] == task_id
    assert body["count"] == 12
    assert [f["name"] for f in body["frames"]] == FRAMES
    first = body["frames"][0]
    on_disk = (task_dir / "images_undistorted" / "images" / FRAMES[0]).read_bytes()
    assert first["size_bytes"] == len(on_disk)

    full = client.get(first["url"])
    assert full.status_code == 200
    assert full.headers["content-type"] == "image/jpeg"
    assert full.content == on_disk
    # Versioned URLs from the listing can be cached for good; the bare URL must revalidate.
    assert "immutable" in full.headers["cache-control"]
    assert client.get(f"/tasks/{task_id}/frames/{FRAMES[0]}").headers["cache-control"] == (
        "private, no-cache"
    )

    thumb = client.get(first["thumbnail_url"])
    assert thumb.status_code == 200
    assert decode(thumb.content).shape[:2] == (120, 160)  # smaller than 256: never enlarged


def test_thumbnails_have_the_asked_long_side_and_are_cached(dataset_task):
    t = dataset_task
    client, task_id, task_dir = t.client, t.task_id, t.task_dir
    url = f"/tasks/{task_id}/frames/{FRAMES[3]}"
    small = client.get(url, params={"size": 64})
    assert small.status_code == 200
    assert small.headers["content-type"] == "image/jpeg"
    assert decode(small.content).shape[:2] == (48, 64)
    cached = task_dir / "thumbnails" / "64" / f"{FRAMES[3]}.jpg"
    assert cached.read_bytes() == small.content

    # Sizes round up to a multiple of 64 (a small cache): 100 -> 128.
    assert decode(client.get(url, params={"size": 100}).content).shape[:2] == (96, 128)

    # A second request is answered from the cache (marked here to tell), and an ETag saves
    # the transfer.
    cached.write_bytes(small.content + b"cached")
    again = client.get(url, params={"size": 64})
    assert again.content == small.content + b"cached"
    etag = again.headers["etag"]
    not_modified = client.get(url, params={"size": 64}, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""

    for size in (10, 63, 1025, "big"):
        refused = client.get(url, params={"size": size})
        assert refused.status_code == 422, size
        assert "size" in refused.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "..%2F..%2Ftraining_server.db",
        "%2e%2e",
        "..",
        ".hidden.jpg",
        "frame_00000.jpg%00.png",
        "%00",
        "frame_00000.JPG.txt",
        "input.mp4",
        "nothere.jpg",
        "frame_00000.jpg%2F..",
    ],
)
def test_bad_frame_names_are_refused(dataset_task, path):
    t = dataset_task
    server, task_id = t.server, t.task_id
    status, body = raw_get(server, f"/tasks/{task_id}/frames/{path}")
    assert status == 404, (path, body)
    assert "detail" in json.loads(body)


def test_symlinks_are_never_followed(dataset_task, tmp_path):
    t = dataset_task
    client, task_id, task_dir = t.client, t.task_id, t.task_dir
    images = task_dir / "images_undistorted" / "images"
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((images / FRAMES[0]).read_bytes())
    link = images / "zz_link.jpg"
    link.symlink_to(secret)
    outside = tmp_path / "outside"
    outside.mkdir()
    thumbnails = task_dir / "thumbnails"
    moved = task_dir / "thumbnails_moved"
    if thumbnails.exists():
        thumbnails.rename(moved)
    thumbnails.symlink_to(outside, target_is_directory=True)
    images_moved = task_dir / "images_moved"
    try:
        listing = client.get(f"/tasks/{task_id}/frames").json()
        assert "zz_link.jpg" not in [f["name"] for f in listing["frames"]]
        assert client.get(f"/tasks/{task_id}/frames/zz_link.jpg").status_code == 404
        assert client.get(f"/tasks/{task_id}/frames/zz_link.jpg?size=64").status_code == 404

        # A thumbnail folder that is a link elsewhere is not written through.
        answer = client.get(f"/tasks/{task_id}/frames/{FRAMES[1]}", params={"size": 192})
        assert answer.status_code == 200
        assert list(outside.rglob("*")) == []

        # An images folder that is itself a link is not listed at all.
        images.rename(images_moved)
        images.symlink_to(images_moved, target_is_directory=True)
        assert client.get(f"/tasks/{task_id}/frames").status_code == 409
        assert client.get(f"/tasks/{task_id}/frames/{FRAMES[2]}").status_code == 404
    finally:
        if images.is_symlink():
            images.unlink()
            images_moved.rename(images)
        link.unlink()
        thumbnails.unlink()
        if moved.exists():
            moved.rename(thumbnails)


def test_sparse_payload_matches_the_stand_in_model(dataset_task):
    t = dataset_task
    client, task_id, task_dir = t.client, t.task_id, t.task_dir
    answer = client.get(f"/tasks/{task_id}/sparse")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()

    points = body["points"]
    assert points["total"] == points["count"] == 147
    xyz = np.array(points["positions"]).reshape(-1, 3)
    grid = {
        (round(x * 0.2, 6), round(y * 0.2, 6), round(z * 0.2, 6))
        for x in range(-3, 4)
        for y in range(-3, 4)
        for z in range(-1, 2)
    }
    assert {tuple(round(float(v), 6) for v in p) for p in xyz} == grid
    assert np.array(points["colors"]).reshape(-1, 3).tolist() == [[200, 120, 40]] * 147

    cameras = body["cameras"]
    assert [c["name"] for c in cameras] == FRAMES
    for index, camera in enumerate(cameras):
        centre = np.array(camera["center"])
        assert np.linalg.norm(centre) == pytest.approx(4.0, abs=1e-4)
        assert centre[1] == pytest.approx(0.0, abs=1e-4)
        # Camera i sits at angle 2*pi*i/12 on the circle and looks at the origin.
        angle = 2 * math.pi * index / 12
        assert centre[0] == pytest.approx(-4 * math.sin(angle), abs=1e-3)
        assert centre[2] == pytest.approx(-4 * math.cos(angle), abs=1e-3)
        direction = np.array(camera["direction"])
        assert direction @ (-centre / 4) == pytest.approx(1.0, abs=1e-4)
        assert camera["up"] == pytest.approx([0.0, -1.0, 0.0], abs=1e-4)
        assert (camera["width"], camera["height"]) == (160, 120)
        assert camera["fx"] == camera["fy"] == pytest.approx(144.0)
    assert body["center"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert body["up"] == pytest.approx([0.0, -1.0, 0.0], abs=1e-4)
    assert 0.5 < body["radius"] < 1.0
    # The stand-in's summary predates the upright frame: the server computes it. The cameras
    # circle the origin at distance 4 in the x-z plane, with COLMAP's -y up.
    scene = body["scene"]
    assert scene["source"] == "computed"
    assert scene["frame"] == "+Y up, centred, first camera looking along -Z"
    assert scene["up"] == pytest.approx([0.0, -1.0, 0.0], abs=1e-6)
    assert scene["centre"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert scene["scale"] == pytest.approx(0.25, rel=1e-6)
    matrix = np.array(scene["matrix"])
    first = np.array([*cameras[0]["center"], 1.0])
    assert (matrix @ first)[:3] == pytest.approx([0.0, 0.0, 1.0], abs=1e-3)  # behind the origin
    view = matrix[:3, :3] @ np.array(cameras[0]["direction"])
    assert view / np.linalg.norm(view) == pytest.approx([0.0, 0.0, -1.0], abs=1e-3)

    # Built once, then served from the cache; the ETag saves the transfer.
    cached = list((task_dir / "preview").glob("sparse-*.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_bytes()) == body
    etag = answer.headers["etag"]
    again = client.get(f"/tasks/{task_id}/sparse", headers={"If-None-Match": etag})
    assert again.status_code == 304


def test_previews_wait_for_the_dataset(dataset_task):
    t = dataset_task
    server, client, task_id = t.server, t.client, t.task_id
    task_id = upload(client, start_training="false").json()["task_id"]
    for path in ("frames", "sparse", f"frames/{FRAMES[0]}"):
        answer = client.get(f"/tasks/{task_id}/{path}")
        assert answer.status_code == 409, path
        assert "preprocessing has completed" in answer.json()["detail"]
    missing = "00000000-0000-4000-8000-000000000000"
    assert client.get(f"/tasks/{missing}/frames").status_code == 404
    assert client.get(f"/tasks/{missing}/sparse").status_code == 404
    assert client.get("/tasks/not-a-uuid/sparse").status_code == 422

    # A task whose dataset is gone (as after a failed run) says so.
    wait_status(client, task_id, "preprocessing_completed", timeout=60)
    shutil.rmtree(server.root / "temp_workspace" / task_id / "images_undistorted")
    frames = client.get(f"/tasks/{task_id}/frames")
    assert frames.status_code == 409
    assert "no frames" in frames.json()["detail"]
    sparse = client.get(f"/tasks/{task_id}/sparse")
    assert sparse.status_code == 409
    assert "sparse/0" in sparse.json()["detail"]


def test_previews_need_the_token(dataset_task):
    t = dataset_task
    server, task_id = t.server, t.task_id
    status, _ = raw_get(server, f"/tasks/{task_id}/frames", token=None)
    assert status == 401
    status, _ = raw_get(server, f"/tasks/{task_id}/sparse", token=None)
    assert status == 401
    status, _ = raw_get(server, f"/tasks/{task_id}/frames/{FRAMES[0]}?size=64", token=None)
    assert status == 401
    # A token in the URL is refused; the page's session cookie (POST /login) is accepted.
    path = f"/tasks/{task_id}/frames/{FRAMES[0]}?size=64&token={TOKEN}"
    status, _ = raw_get(server, path, token=None)
    assert status == 401
    with httpx.Client(base_url=server.url, timeout=10) as session:
        assert session.post("/login", json={"token": TOKEN}).status_code == 204
        answer = session.get(f"/tasks/{task_id}/frames/{FRAMES[0]}?size=64")
        assert answer.status_code == 200
        assert decode(answer.content).shape[:2] == (48, 64)


# -- the COLMAP reader on its own ----------------------------------------------------------


def write_model(sparse: Path, points: np.ndarray, tracks: list[int]) -> None:
    """A COLMAP binary model: one SIMPLE_RADIAL camera, two images, `points` with tracks."""
    sparse.mkdir(parents=True)
    with (sparse / "cameras.bin").open("wb") as f:
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<iiQQ", 7, 2, 640, 480))
        f.write(struct.pack("<4d", 500.0, 320.0, 240.0, 0.01))
    with (sparse / "images.bin").open("wb") as f:
        f.write(struct.pack("<Q", 2))
        for image_id, name, tx in ((2, b"b.jpg", 1.0), (1, b"a.jpg", 0.0)):
            f.write(struct.pack("<i4d3di", image_id, 1.0, 0.0, 0.0, 0.0, tx, 0.0, 0.0, 7))
            f.write(name + b"\0")
            f.write(struct.pack("<Q", 2))
            f.write(struct.pack("<ddq", 1.0, 2.0, -1) * 2)
    with (sparse / "points3D.bin").open("wb") as f:
        f.write(struct.pack("<Q", len(points)))
        for index, ((x, y, z), length) in enumerate(zip(points, tracks, strict=True)):
            f.write(struct.pack("<Q3d3Bd", index + 1, x, y, z, 10, 20, 30, 0.5))
            f.write(struct.pack("<Q", length))
            f.write(struct.pack("<ii", 1, 0) * length)


def test_large_models_are_subsampled_evenly(tmp_path):
    rng = np.random.default_rng(1)
    count = 60_000
    points = rng.uniform(-5, 5, (count, 3))
    write_model(tmp_path / "sparse", points, [int(t) for t in rng.integers(0, 6, count)])
    body = preview.build_sparse(tmp_path / "sparse", max_points=50_000)
    assert body["points"]["total"] == count
    assert body["points"]["count"] == 50_000
    sent = np.array(body["points"]["positions"]).reshape(-1, 3)
    assert len(sent) == 50_000
    # Every point sent is one of the model's (to the rounding), spread over the whole cloud.
    # The sample keeps the model's order: walk both lists together.
    index = 0
    for point in sent:
        while np.abs(points[index] - point).max() > 1e-4:
            index += 1
        index += 1
    assert sent.min(axis=0) == pytest.approx([-5, -5, -5], abs=0.05)
    assert sent.max(axis=0) == pytest.approx([5, 5, 5], abs=0.05)
    # Cameras come sorted by name; the SIMPLE_RADIAL camera has one focal length.
    assert [c["name"] for c in body["cameras"]] == ["a.jpg", "b.jpg"]
    assert body["cameras"][1]["center"] == pytest.approx([-1.0, 0.0, 0.0])
    assert body["cameras"][0]["fx"] == body["cameras"][0]["fy"] == 500.0


def test_truncated_model_is_reported(tmp_path):
    write_model(tmp_path / "sparse", np.zeros((3, 3)), [1, 2, 3])
    data = (tmp_path / "sparse" / "points3D.bin").read_bytes()
    (tmp_path / "sparse" / "points3D.bin").write_bytes(data[:-10])
    with pytest.raises(preview.PreviewCorruptError, match="cannot be read"):
        preview.build_sparse(tmp_path / "sparse")


def test_sparse_scene_comes_from_the_summary_beside_the_dataset(tmp_path):
    """A summary that carries the upright frame wins over computing one; a new summary
    changes the cached preview's signature."""
    dataset = tmp_path / "task" / "images_undistorted"
    write_model(dataset / "sparse" / "0", np.zeros((3, 3)), [1, 2, 3])
    cache = tmp_path / "task" / "preview"
    body, first_signature = preview.sparse_preview(dataset, cache)
    computed = json.loads(body)["scene"]
    assert computed["source"] == "computed"

    stored = {
        "up": [0.0, 0.0, 1.0],
        "centre": [1.0, 2.0, 3.0],
        "radius": 2.0,
        "scale": 0.5,
        "matrix": [[0.5, 0, 0, -0.5], [0, 0, 0.5, -1.5], [0, -0.5, 0, 1.0], [0, 0, 0, 1]],
        "frame": "+Y up, centred, first camera looking along -Z",
        "method": "camera rights",
    }
    summary = tmp_path / "task" / "preprocess_summary.json"
    summary.write_text(json.dumps({"summary_version": 1, "scene": stored}))
    body, signature = preview.sparse_preview(dataset, cache)
    assert signature != first_signature
    assert json.loads(body)["scene"] == {**stored, "source": "summary"}
    assert len(list(cache.glob("sparse-*.json"))) == 1

    # A summary without a usable scene (an older run, or a damaged one) is ignored.
    summary.write_text(json.dumps({"summary_version": 1, "scene": {"up": "north"}}))
    assert json.loads(preview.sparse_preview(dataset, cache)[0])["scene"] == computed
