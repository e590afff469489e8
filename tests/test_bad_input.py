"""Hostile and malformed input against a real server: each gets a clear error and leaves
nothing behind (no task row, no folder, nothing served from outside a task's folders)."""

from __future__ import annotations

import io
import os
import socket
import time
import zipfile

import httpx
import pytest

from conftest import OFFICE_VIDEO, TERMINAL, ServerProcess, settings_env, upload, wait_status

BOUNDARY = "formboundary"


def multipart(parts: list[tuple[str, str]], file_bytes: bytes | None = None) -> bytes:
    body = b""
    for name, value in parts:
        body += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    if file_bytes is not None:
        body += (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="v.mp4"\r\n'
                "Content-Type: video/mp4\r\n\r\n"
            ).encode()
            + file_bytes
            + b"\r\n"
        )
    return body + f"--{BOUNDARY}--\r\n".encode()


def post_multipart(client: httpx.Client, body: bytes, **kwargs) -> httpx.Response:
    return client.post(
        "/upload",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        **kwargs,
    )


def nothing_left(client: httpx.Client, root) -> None:
    assert client.get("/tasks").json()["total"] == 0
    deadline = time.monotonic() + 10
    while list((root / "temp_workspace").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((root / "temp_workspace").iterdir()) == []


def test_a_chunked_upload_without_content_length_is_accepted(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.2")
    server = start_server()
    body = multipart([("start_training", "false"), ("max_frames", "40")], OFFICE_VIDEO.read_bytes())

    def chunks():
        for start in range(0, len(body), 10_000):
            yield body[start : start + 10_000]

    with server.client() as client:
        response = post_multipart(client, chunks())
        assert response.status_code == 202, response.text
        status = wait_status(client, response.json()["task_id"], {"preprocessing_completed"})
        assert status["params"]["max_frames"] == 40
        assert status["video_size"] == OFFICE_VIDEO.stat().st_size


def test_a_client_that_disconnects_mid_upload_leaves_nothing(start_server, tmp_path):
    server = start_server()
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="v.mp4"\r\n\r\n'
    ).encode()
    request = (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {200 * 1024 * 1024}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request + head + os.urandom(5 * 1024 * 1024))
        time.sleep(0.5)
    with server.client() as client:
        nothing_left(client, tmp_path)
        assert client.get("/health").status_code == 200
        # The server still takes uploads.
        assert upload(client).status_code == 202


def test_multipart_abuse_is_refused(start_server, tmp_path):
    server = start_server()
    video = OFFICE_VIDEO.read_bytes()
    with server.client() as client:
        many_fields = post_multipart(client, multipart([(f"f{i}", "1") for i in range(200)], video))
        assert many_fields.status_code == 400
        assert "Too many form" in many_fields.json()["detail"]

        long_field = post_multipart(client, multipart([("max_frames", "9" * 100_000)], video))
        assert long_field.status_code == 400
        assert "too long" in long_field.json()["detail"]

        huge_header = (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{"a" * 20_000}.mp4"\r\n\r\n'
            ).encode()
            + video
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        response = post_multipart(client, huge_header)
        assert response.status_code == 400

        many_headers = (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="v.mp4"\r\n'
                + "".join(f"X-H{i}: v\r\n" for i in range(50))
                + "\r\n"
            ).encode()
            + video
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        assert post_multipart(client, many_headers).status_code == 400

        # Several videos of one scene are welcome (tests/test_photo_upload.py); the same
        # file twice is not.
        two_files = multipart([], video)[: -len(f"--{BOUNDARY}--\r\n")] + multipart([], video)
        response = post_multipart(client, two_files)
        assert response.status_code == 400
        assert "same file twice" in response.json()["detail"]

        unterminated = multipart([], video)[:-20]
        response = post_multipart(client, unterminated)
        assert response.status_code == 400
        assert "ended before" in response.json()["detail"]

        garbage = post_multipart(client, b"\x00\xff" * 1000)
        assert garbage.status_code == 400

        bad_form_value = post_multipart(client, multipart([("min_frames", "-3")], video))
        assert bad_form_value.status_code == 422
        assert "min_frames" in bad_form_value.json()["detail"]
        nothing_left(client, tmp_path)


def test_script_and_text_named_mp4_are_refused(start_server, tmp_path):
    server = start_server()
    with server.client() as client:
        for content in (
            b"#!/bin/sh\necho pwned\n",
            b"<?php system($_GET['c']); ?>",
            b"\x00" * 4096,
        ):
            response = client.post("/upload", files={"file": ("clip.mp4", content, "video/mp4")})
            assert response.status_code == 415
            assert response.json()["detail"].startswith("The file is not a video")
        nothing_left(client, tmp_path)


def test_symlinks_in_result_folders_are_never_followed(start_server, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.2")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    secret_dir = tmp_path / "secret_dir"
    secret_dir.mkdir()
    (secret_dir / "config.yaml").write_text("TOPSECRET")
    server = start_server()
    with server.client() as client:
        model_task = upload(client).json()["task_id"]
        dataset_task = upload(client, start_training="false").json()["task_id"]
        assert wait_status(client, model_task, TERMINAL)["status"] == "training_completed"
        wait_status(client, dataset_task, {"preprocessing_completed"})

        out = tmp_path / "temp_workspace" / "checkpoints" / model_task
        (out / "cameras.json").unlink()
        os.symlink(secret, out / "cameras.json")
        os.symlink(secret_dir, out / "lightning_logs" / "version_7")
        dataset = tmp_path / "temp_workspace" / dataset_task / "images_undistorted"
        os.symlink(secret, dataset / "images" / "zz_link.jpg")
        os.symlink(secret_dir, dataset / "linked_dir")

        for task_id, forbidden in (
            (model_task, {"cameras.json", "lightning_logs/version_7/config.yaml"}),
            (dataset_task, {"images_undistorted/images/zz_link.jpg"}),
        ):
            response = client.get(f"/download/{task_id}")
            assert response.status_code == 200
            archive = zipfile.ZipFile(io.BytesIO(response.content))
            names = set(archive.namelist())
            assert not names & forbidden
            assert not any("linked_dir" in name for name in names)
            for name in names:
                assert b"TOPSECRET" not in archive.read(name), name

        ply = out / "point_cloud" / "iteration_300" / "point_cloud.ply"
        ply.unlink()
        os.symlink(secret, ply)
        assert client.get(f"/download/{model_task}/ply").status_code == 410


def test_downloads_answer_head_ignore_bad_ranges_and_strip_bidi_names(start_server, tmp_path):
    """Issue 11, item 13: HEAD on downloads, an invalid Range ignored (RFC 9110 14.2), the
    Allow header of a 405 names every method of the path, and bidi controls leave names."""
    server = start_server()
    with server.client() as client:
        with OFFICE_VIDEO.open("rb") as f:
            name = "evil\u202egpj\u2066.mp4"
            response = client.post("/upload", files={"file": (name, f, "video/mp4")})
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]
        assert wait_status(client, task_id, TERMINAL)["status"] == "training_completed"

        whole = client.get(f"/download/{task_id}/ply")
        assert whole.status_code == 200
        disposition = whole.headers["content-disposition"]
        assert "%E2%80%AE" not in disposition and "%E2%81%A6" not in disposition
        assert "evilgpj.ply" in disposition

        for url in (f"/download/{task_id}", f"/download/{task_id}/ply"):
            get = client.get(url)
            head = client.head(url)
            assert head.status_code == 200, (url, head.status_code)
            assert head.content == b""
            assert head.headers["content-length"] == get.headers["content-length"]
            assert head.headers["content-disposition"] == get.headers["content-disposition"]

        for bad in ("bytes=abc", "pages=0-10", "bytes=10-5", "bytes="):
            ignored = client.get(f"/download/{task_id}/ply", headers={"Range": bad})
            assert ignored.status_code == 200, (bad, ignored.status_code)
            assert ignored.content == whole.content
        part = client.get(f"/download/{task_id}/ply", headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and part.content == whole.content[:10]
        beyond = client.get(f"/download/{task_id}/ply", headers={"Range": "bytes=999999999-"})
        assert beyond.status_code == 416

        refused = client.put(f"/tasks/{task_id}")
        assert refused.status_code == 405
        allowed = {m.strip() for m in refused.headers["allow"].split(",")}
        assert {"GET", "HEAD", "DELETE"} <= allowed, allowed


def test_a_damaged_database_is_refused_at_start_up_with_what_to_do(start_server, tmp_path):
    """Issue 11, item 12: one damaged page used to start a server whose /health said ok."""
    server = start_server()
    with server.client() as client:
        assert upload(client).status_code == 202
    server.terminate()  # WAL checkpointed into the main file
    db_path = tmp_path / "training_server.db"
    page = 4096
    with db_path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        assert size >= 3 * page
        f.seek(size - page)  # the last page: rows or an index, not the schema
        f.write(bytes(range(256)) * (page // 256))
    again = ServerProcess(tmp_path, settings_env(tmp_path))
    with pytest.raises(RuntimeError) as failed:
        again.start(timeout=60)
    output = str(failed.value)
    assert str(db_path) in output
    assert "quick_check" in output
    assert ".recover" in output
    assert again.proc is not None and again.proc.wait(10) != 0
