"""Resumable uploads (tus 1.0 at /uploads/) against a real server: a 200 MB upload whose
client is killed at about 60 % is resumed by a new client process and stored byte-identical;
an abandoned upload expires and leaves no folder; the protocol's refusals; the limits and the
token of POST /upload."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_reliability import padded_video
from test_web_page import browser, open_page  # noqa: F401 (fixtures for the page test)

import conftest
from conftest import ServerProcess, wait_status

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_TYPE = "application/offset+octet-stream"


# A tus client, run as its own process: creates the upload (or resumes the one named in
# STATE with HEAD), then sends the rest in one PATCH, writing the bytes sent to PROGRESS;
# with STALL it stops sending (and waits, connected) once that many bytes are out.
CLIENT = r"""
import base64, json, os, sys, time
import httpx

url, path, state, progress = sys.argv[1:5]
stall = int(sys.argv[5]) if len(sys.argv) > 5 else -1
headers = {"Tus-Resumable": "1.0.0"}
if os.environ.get("TUS_TOKEN"):
    headers["Authorization"] = "Bearer " + os.environ["TUS_TOKEN"]
size = os.path.getsize(path)
meta = {"filename": os.path.basename(path), "start_training": "false", "max_frames": "30"}
with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
    if os.path.exists(state):
        location = open(state).read().strip()
        answer = client.head(location)
        if answer.status_code != 200:
            print(json.dumps({"head": answer.status_code}), flush=True)
            sys.exit(2)
        offset = int(answer.headers["Upload-Offset"])
    else:
        pairs = ",".join(
            k + " " + base64.b64encode(v.encode()).decode() for k, v in meta.items()
        )
        answer = client.post(
            "/uploads/", headers={"Upload-Length": str(size), "Upload-Metadata": pairs}
        )
        if answer.status_code != 201:
            print(json.dumps({"create": answer.status_code, "body": answer.text}), flush=True)
            sys.exit(2)
        location = answer.headers["Location"]
        with open(state, "w") as f:
            f.write(location)
        offset = 0
    print(json.dumps({"resumed_from": offset}), flush=True)

    def body():
        sent = offset
        with open(path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(1 << 20):
                if 0 <= stall <= sent:
                    time.sleep(3600)
                yield chunk
                sent += len(chunk)
                with open(progress, "w") as p:
                    p.write(str(sent))

    answer = client.patch(
        location,
        content=body(),
        headers={
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(size - offset),
        },
    )
    print(json.dumps({"status": answer.status_code, "headers": dict(answer.headers),
                      "body": answer.text}), flush=True)
"""


@pytest.fixture
def start_tus_server(
    start_server: Callable[..., ServerProcess],
) -> Iterator[Callable[..., ServerProcess]]:
    """`start_server` (the app serves /uploads/ and honours Idempotency-Key)."""
    yield start_server


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def run_client(
    server: ServerProcess, video: Path, work: Path, stall: int = -1
) -> subprocess.Popen[str]:
    args = [str(work / "state"), str(work / "progress")] + ([str(stall)] if stall >= 0 else [])
    env = {**os.environ, "TUS_TOKEN": server.env.get("TRAINING_SERVER_API_TOKEN", "")}
    client_script = work / "tus_client.py"
    client_script.write_text(CLIENT)
    return subprocess.Popen(
        [sys.executable, str(client_script), server.url, str(video), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def sent(work: Path) -> int:
    try:
        return int((work / "progress").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not reached in {timeout} s")


def uploads_dir(server: ServerProcess) -> Path:
    return server.root / "temp_workspace" / "uploads"


def uploads_left(server: ServerProcess) -> list[Path]:
    """What is in the uploads folder (made with the first upload; absent before)."""
    folder = uploads_dir(server)
    return list(folder.iterdir()) if folder.is_dir() else []


def test_a_200_mb_upload_cut_at_60_percent_resumes_byte_identical(start_tus_server, tmp_path):
    video = padded_video(tmp_path / "big.mp4", 200 * 1024 * 1024)
    size = video.stat().st_size
    server = start_tus_server(api_token="s3cret", max_upload_bytes=300 * 1024 * 1024)
    work = tmp_path / "client"
    work.mkdir()
    first = run_client(server, video, work, stall=int(size * 0.6))
    try:
        wait_until(lambda: sent(work) >= size * 0.6, 60, "the first client sending 60 %")
        upload_id = (work / "state").read_text().rsplit("/", 1)[-1]
        data = uploads_dir(server) / upload_id / "data"
        wait_until(lambda: data.stat().st_size >= size * 0.5, 30, "the server writing")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        first.stdout.close()
    assert not any(p.is_dir() for p in (server.root / "temp_workspace").iterdir() if "-" in p.name)

    second = run_client(server, video, work)
    out, _ = second.communicate(timeout=120)
    lines = [json.loads(line) for line in out.splitlines()]
    resumed_from = lines[0]["resumed_from"]
    assert size * 0.5 <= resumed_from <= size * 0.6 + (1 << 20), lines
    final = lines[-1]
    assert final["status"] == 204, final
    task_id = final["headers"]["upload-task-id"]
    assert final["headers"]["location"] == f"/status/{task_id}"
    assert int(final["headers"]["upload-offset"]) == size

    with server.client() as client:
        status = wait_status(client, task_id, "preprocessing_completed", timeout=120)
        assert status["video_size"] == size
        assert status["original_filename"] == "big.mp4"
        assert status["params"]["max_frames"] == 30
        # A client that lost the last answer learns the task by HEAD.
        head = client.head(f"/uploads/{upload_id}", headers=TUS)
        assert head.status_code == 200
        assert head.headers["upload-task-id"] == task_id
        assert head.headers["upload-offset"] == str(size)
    stored = server.root / "temp_workspace" / task_id / "input.mp4"
    assert sha256(stored) == sha256(video)
    assert not (uploads_dir(server) / upload_id / "data").exists()


def test_an_abandoned_upload_expires_and_leaves_nothing(start_tus_server, tmp_path):
    server = start_tus_server(resumable_upload_expiry=1.5)
    video = padded_video(tmp_path / "abandoned.mp4", 8 * 1024 * 1024)
    size = video.stat().st_size
    work = tmp_path / "client"
    work.mkdir()
    client_proc = run_client(server, video, work, stall=size // 2)
    try:
        wait_until(lambda: sent(work) >= size // 2, 30, "half of the video sent")
        upload_id = (work / "state").read_text().rsplit("/", 1)[-1]
        folder = uploads_dir(server) / upload_id
        assert folder.is_dir()
    finally:
        client_proc.send_signal(signal.SIGKILL)
        client_proc.wait(10)
        client_proc.stdout.close()
    with server.client() as client:
        wait_until(lambda: not folder.exists(), 15, "the abandoned upload removed")
        assert client.head(f"/uploads/{upload_id}", headers=TUS).status_code == 404
        answer = client.patch(
            f"/uploads/{upload_id}",
            content=b"x",
            headers={
                **TUS,
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
            },
        )
        assert answer.status_code == 404
        assert "detail" in answer.json()
        assert client.get("/tasks").json()["total"] == 0
    assert uploads_left(server) == []
    assert [p.name for p in (server.root / "temp_workspace").iterdir()] == ["uploads"]


def test_a_resuming_client_takes_over_from_a_silent_connection(start_tus_server, tmp_path):
    """The first client's connection stays open but sends nothing (a phone that lost its
    network: no FIN, no RST); a new client resumes at once instead of waiting for it."""
    server = start_tus_server(max_concurrent_uploads=1)  # the resume replaces, not adds
    video = padded_video(tmp_path / "silent.mp4", 8 * 1024 * 1024)
    size = video.stat().st_size
    work = tmp_path / "client"
    work.mkdir()
    silent = run_client(server, video, work, stall=size // 2)
    try:
        wait_until(lambda: sent(work) >= size // 2, 30, "half of the video sent")
        upload_id = (work / "state").read_text().rsplit("/", 1)[-1]
        data = uploads_dir(server) / upload_id / "data"
        wait_until(lambda: data.stat().st_size >= size // 3, 30, "the server writing")
        started = time.monotonic()
        second = run_client(server, video, work)
        out, _ = second.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        silent.send_signal(signal.SIGKILL)
        silent.wait(10)
        silent.stdout.close()
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["resumed_from"] >= size // 3
    assert lines[-1]["status"] == 204, lines
    assert took < 8, f"the resume waited {took:.1f} s for the silent connection"
    task_id = lines[-1]["headers"]["upload-task-id"]
    assert sha256(server.root / "temp_workspace" / task_id / "input.mp4") == sha256(video)
    assert "another request took over" in server.output()


def test_an_upload_resumes_across_a_server_restart(start_tus_server, tmp_path):
    """The server is killed while the client is cut off at half; the restarted server still
    knows the upload (its state is on disk), reserves its disk again, and the client goes on."""
    server = start_tus_server(max_concurrent_uploads=1)
    video = padded_video(tmp_path / "restart.mp4", 8 * 1024 * 1024)
    size = video.stat().st_size
    work = tmp_path / "client"
    work.mkdir()
    first = run_client(server, video, work, stall=size // 2)
    try:
        wait_until(lambda: sent(work) >= size // 2, 30, "half of the video sent")
        upload_id = (work / "state").read_text().rsplit("/", 1)[-1]
        data = uploads_dir(server) / upload_id / "data"
        wait_until(lambda: data.stat().st_size >= size // 3, 30, "the server writing")
        # One resumable upload at a time here: a second PATCH meanwhile is 503.
        with server.client() as client:
            other = client.post("/uploads/", headers={**TUS, "Upload-Length": "10"})
            busy = client.patch(
                other.headers["location"],
                content=b"0123456789",
                headers={**TUS, "Upload-Offset": "0", "Content-Type": OFFSET_TYPE},
            )
            assert busy.status_code == 503
            assert busy.headers["retry-after"]
            client.delete(other.headers["location"], headers=TUS)
        server.kill()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        first.stdout.close()
    server.start()
    second = run_client(server, video, work)
    out, _ = second.communicate(timeout=60)
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["resumed_from"] >= size // 3
    assert lines[-1]["status"] == 204, lines
    task_id = lines[-1]["headers"]["upload-task-id"]
    assert sha256(server.root / "temp_workspace" / task_id / "input.mp4") == sha256(video)


def test_the_protocol_refuses_what_it_must(start_tus_server, tmp_path):
    server = start_tus_server(api_token="s3cret", max_upload_bytes=1_000_000)
    with server.client() as client:
        options = client.options("/uploads/")
        assert options.status_code == 204
        assert options.headers["tus-version"] == "1.0.0"
        assert "termination" in options.headers["tus-extension"]
        assert options.headers["tus-max-size"] == "1000000"
        # The token, as for every API route.
        plain = httpx.post(
            f"{server.url}/uploads/", headers={**TUS, "Upload-Length": "10"}, timeout=10
        )
        assert plain.status_code == 401
        assert client.post("/uploads/", headers={"Upload-Length": "10"}).status_code == 412
        assert client.post("/uploads/", headers=TUS).status_code == 400
        assert client.post("/uploads/", headers={**TUS, "Upload-Length": "x"}).status_code == 400
        big = client.post("/uploads/", headers={**TUS, "Upload-Length": "1000001"})
        assert big.status_code == 413
        assert "limit" in big.json()["detail"]
        bad_params = client.post(
            "/uploads/",
            headers={**TUS, "Upload-Length": "100", "Upload-Metadata": metadata(max_frames="0")},
        )
        assert bad_params.status_code == 422
        assert "max_frames" in bad_params.json()["detail"]
        bad_meta = client.post(
            "/uploads/", headers={**TUS, "Upload-Length": "100", "Upload-Metadata": "a b c"}
        )
        assert bad_meta.status_code == 400
        assert uploads_left(server) == []

        # Not a video: the last PATCH answers 415 and the upload is gone.
        junk = os.urandom(5000)
        made = client.post(
            "/uploads/",
            headers={
                **TUS,
                "Upload-Length": str(len(junk)),
                "Upload-Metadata": metadata(filename="a.mp4"),
            },
        )
        assert made.status_code == 201
        location = made.headers["location"]
        assert "upload-expires" in made.headers
        patch = {**TUS, "Content-Type": OFFSET_TYPE}
        wrong_type = client.patch(location, content=junk, headers={**TUS, "Upload-Offset": "0"})
        assert wrong_type.status_code == 415
        first = client.patch(location, content=junk[:1000], headers={**patch, "Upload-Offset": "0"})
        assert first.status_code == 204
        assert first.headers["upload-offset"] == "1000"
        stale = client.patch(location, content=junk[:10], headers={**patch, "Upload-Offset": "0"})
        assert stale.status_code == 409
        assert stale.headers["upload-offset"] == "1000"
        too_far = client.patch(
            location, content=junk[1000:] + b"extra", headers={**patch, "Upload-Offset": "1000"}
        )
        assert too_far.status_code == 413
        head = client.head(location, headers=TUS)
        assert head.headers["upload-offset"] == "1000"
        assert head.headers["upload-length"] == str(len(junk))
        last = client.patch(
            location, content=junk[1000:], headers={**patch, "Upload-Offset": "1000"}
        )
        assert last.status_code == 415
        assert last.json()["detail"]
        assert client.head(location, headers=TUS).status_code == 404
        assert uploads_left(server) == []
        assert client.get("/tasks").json()["total"] == 0
        assert client.head("/uploads/not-a-uuid", headers=TUS).status_code == 422

        # Termination removes the upload and its bytes.
        made = client.post("/uploads/", headers={**TUS, "Upload-Length": "100"})
        location = made.headers["location"]
        client.patch(location, content=b"y" * 50, headers={**patch, "Upload-Offset": "0"})
        assert client.delete(location, headers=TUS).status_code == 204
        assert client.head(location, headers=TUS).status_code == 404
        assert uploads_left(server) == []
    assert list(p.name for p in (server.root / "temp_workspace").iterdir()) == ["uploads"]


def test_creation_counts_the_disk_that_unfinished_uploads_hold(start_tus_server, tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    server = start_tus_server(min_free_bytes=free - 300_000_000, max_upload_bytes=10**12)
    with server.client() as client:
        first = client.post("/uploads/", headers={**TUS, "Upload-Length": "200000000"})
        assert first.status_code == 201
        # The first one has promised its 200 MB: a second of the same size does not fit.
        second = client.post("/uploads/", headers={**TUS, "Upload-Length": "200000000"})
        assert second.status_code == 507
        assert "promised" in second.json()["detail"]
    server.kill()
    server.start()  # the unfinished upload, found on disk, holds its disk again
    with server.client() as client:
        again = client.post("/uploads/", headers={**TUS, "Upload-Length": "200000000"})
        assert again.status_code == 507
        assert client.delete(first.headers["location"], headers=TUS).status_code == 204
        third = client.post("/uploads/", headers={**TUS, "Upload-Length": "200000000"})
        assert third.status_code == 201


# -- the page ---------------------------------------------------------------------------------

TUS_INSTALLED = (conftest.REPO / "node_modules" / "tus-js-client" / "dist").is_dir()


class CuttableProxy:
    """A TCP proxy on loopback in front of the server whose connections can all be cut at
    once: a real dropped connection for the browser."""

    def __init__(self, port: int) -> None:
        self.upstream = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.open += [client, server]
            threading.Thread(target=self._pair, args=(client, server), daemon=True).start()

    def _pair(self, client: socket.socket, server: socket.socket) -> None:
        """Pump both ways; once both directions ended, close both (never leak a socket)."""
        pumps = [
            threading.Thread(target=self._pump, args=(a, b), daemon=True)
            for a, b in ((client, server), (server, client))
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        with self.lock:
            self.open = [s for s in self.open if s not in (client, server)]
        client.close()
        server.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """End every connection now open, both ways, at once."""
        with self.lock:
            sockets, self.open = self.open, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv()
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.mark.browser
def test_the_page_resumes_an_upload_after_the_connection_drops(start_tus_server, request, tmp_path):
    """The page sends with tus-js-client; every connection is cut at about 40 %: the upload
    goes on from where the server's copy stopped, and one task has the whole video."""
    if not TUS_INSTALLED:
        pytest.fail("tus-js-client is not installed (npm ci)")
    from playwright.sync_api import expect
    from test_web_page import throttle_upload

    video = padded_video(tmp_path / "walk.mp4", 3 * 1024 * 1024)
    server = start_tus_server()
    proxy = CuttableProxy(server.port)
    try:
        page = request.getfixturevalue("open_page")(proxy)
        throttle_upload(page, 400_000)
        page.set_input_files("#file-input", video)
        page.get_by_role("button", name="Upload and start").click()
        bar = page.locator("#upload-bar")
        wait_until(lambda: float(bar.get_attribute("aria-valuenow") or 0) >= 40, 30, "40 % sent")
        proxy.cut()
        throttle_upload(page, 4_000_000)
        expect(page.locator("#upload-progress")).to_be_hidden(timeout=60_000)
        expect(page.locator("#upload-error")).to_be_hidden()
    finally:
        proxy.close()
    with server.client() as client:
        tasks = client.get("/tasks").json()
        assert tasks["total"] == 1
        task_id = tasks["tasks"][0]
        assert client.get(f"/status/{task_id}").json()["original_filename"] == "walk.mp4"
    assert sha256(server.root / "temp_workspace" / task_id / "input.mp4") == sha256(video)
    log = server.output()
    assert log.count('POST /uploads/ HTTP/1.1" 201') == 1
    assert "HEAD /uploads/" in log  # where to go on from, asked after the drop
    assert "POST /upload HTTP" not in log
