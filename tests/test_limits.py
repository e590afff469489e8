"""Limits on what a client may hold (issue 11, items 6 and 7): silent uploads are cut, uploads
at once are capped, declared sizes are reserved against the free disk, and request headers
are bounded in bytes and in time. Real servers on loopback, driven over raw sockets."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from pathlib import Path

import httpx

from conftest import ServerProcess, upload

BOUNDARY = "limitsboundary"


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _start_upload(server: ServerProcess, declared: int) -> socket.socket:
    """A POST /upload whose headers and first body bytes are sent, the rest held back."""
    head = (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    part = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=file; filename=v.mp4\r\n"
        f"Content-Type: video/mp4\r\n\r\n"
    ).encode()
    sock = _connect(server)
    sock.sendall(head + part + b"x")
    return sock


def _read_answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        pass
    return data


def _task_folders(server: ServerProcess) -> list[Path]:
    temp = server.root / "temp_workspace"
    return [p for p in temp.iterdir() if p.is_dir()] if temp.is_dir() else []


def _wait(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_silent_upload_is_cut_with_408_and_leaves_nothing(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(upload_idle_timeout=1.5)
    sock = _start_upload(server, 10_000_000)
    assert _wait(lambda: len(_task_folders(server)) == 1, 10), "the upload did not begin"
    began = time.monotonic()
    answer = _read_answer(sock, 30)
    waited = time.monotonic() - began
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in answer.lower()
    assert 1.0 < waited < 20, waited
    assert _wait(lambda: _task_folders(server) == [], 10), _task_folders(server)
    # The server still takes uploads.
    with server.client() as client:
        assert upload(client).status_code == 202


def test_a_slow_upload_that_keeps_sending_is_not_cut(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(upload_idle_timeout=2)
    sock = _start_upload(server, 10_000_000)
    for _ in range(6):  # 3 s in all, each gap under the idle timeout
        time.sleep(0.5)
        sock.sendall(b"y" * 100)
    sock.settimeout(0.2)
    try:
        early = sock.recv(100)
    except TimeoutError:
        early = b""
    sock.close()
    assert early == b"", early


def test_uploads_beyond_the_limit_get_503_with_retry_after(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(max_concurrent_uploads=2)
    held = [_start_upload(server, 10_000_000) for _ in range(2)]
    assert _wait(lambda: len(_task_folders(server)) == 2, 10)
    with server.client() as client:
        refused = upload(client)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) > 0
        assert "TRAINING_SERVER_MAX_CONCURRENT_UPLOADS" in refused.json()["detail"]
        assert len(_task_folders(server)) == 2  # the refused one made no folder
        for sock in held:
            sock.close()
        assert _wait(lambda: _task_folders(server) == [], 10)
        assert upload(client).status_code == 202  # the slots came back


def test_declared_sizes_of_uploads_in_flight_are_reserved(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    free = shutil.disk_usage(tmp_path).free
    declared = int(free * 0.6)  # one fits; two do not
    server = start_server(max_upload_bytes=free * 2)
    first = _start_upload(server, declared)
    assert _wait(lambda: len(_task_folders(server)) == 1, 10)
    second = _start_upload(server, declared)
    answer = _read_answer(second, 10)
    second.close()
    assert answer.startswith(b"HTTP/1.1 507"), answer[:300]
    assert b"promised to uploads in progress" in answer
    first.close()
    assert _wait(lambda: _task_folders(server) == [], 10)
    # Once the first is gone, the same declaration is accepted (it is read, not refused).
    third = _start_upload(server, declared)
    assert _wait(lambda: len(_task_folders(server)) == 1, 10)
    third.close()


def test_a_huge_request_header_is_refused(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    sock = _connect(server)
    began = time.monotonic()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * 1024 * 1024))
    answer = _read_answer(sock, 10)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert time.monotonic() - began < 10
    # A header under the limit still works.
    ok = httpx.get(f"{server.url}/health", headers={"X-Fine": "b" * 8000}, timeout=10)
    assert ok.status_code == 200


def test_connections_that_send_no_or_part_of_a_header_are_closed(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(header_timeout=1)
    silent = _connect(server)
    partial = _connect(server)
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
    began = time.monotonic()
    partial_answer = _read_answer(partial, 20)
    silent_answer = _read_answer(silent, 20)
    waited = time.monotonic() - began
    silent.close()
    partial.close()
    assert partial_answer.startswith(b"HTTP/1.1 408"), partial_answer[:200]
    assert silent_answer == b"" or silent_answer.startswith(b"HTTP/1.1 408")
    assert waited < 15, waited  # both closed: _read_answer ends on close, not on its timeout
    # A keep-alive connection that starts a second request and stalls is closed too.
    keep = _connect(server)
    keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    keep.settimeout(10)
    first = keep.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    keep.sendall(b"GET /health HTTP/1.1\r\nHo")
    stalled = _read_answer(keep, 20)
    keep.close()
    assert b"HTTP/1.1 408" in stalled, stalled[-200:]  # after the rest of the first answer
