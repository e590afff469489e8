"""Faults, crashes and load against real servers: nothing lost, nothing stuck, nothing left
running. Figures measured here are written to test-artifacts/reliability.json (RELIABILITY.md
quotes them). `KILL_ROUNDS=100 ./test.sh tests/test_reliability.py` runs the full kill count.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from conftest import (
    OFFICE_VIDEO,
    REPO,
    TERMINAL,
    free_port,
    pid_alive,
    recorded_pids,
    upload,
    wait_for,
    wait_status,
)

ARTIFACTS = REPO / "test-artifacts"
RUNNING = {"preprocessing", "training"}


def record(name: str, values: dict[str, Any]) -> None:
    """Keep a measured figure for RELIABILITY.md."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "reliability.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = values
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def integrity(db_path: Path) -> str:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def padded_video(path: Path, size: int, *, sparse: bool = False) -> Path:
    """A valid MP4 of `size` bytes: the office video plus a trailing `free` box (padding that
    every MP4 reader skips), so uploads of any size pass the content check."""
    data = OFFICE_VIDEO.read_bytes()
    pad = size - len(data)
    assert pad > 16
    with path.open("wb") as f:
        f.write(data)
        f.write((1).to_bytes(4, "big") + b"free" + pad.to_bytes(8, "big"))
        remaining = pad - 16
        if sparse:
            f.truncate(size)
        else:
            block = os.urandom(1024 * 1024)
            while remaining > 0:
                remaining -= f.write(block[: min(len(block), remaining)])
    return path


def stage_processes_older_than(marker: str, when: float) -> list[int]:
    """Live stage processes (fake pipeline / fake trainer) whose command line names `marker`
    and that started before `when`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker not in cmdline or "pipeline.probe" in cmdline:
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if proc.info["create_time"] < when:
            found.append(proc.info["pid"])
    return found


# -- SIGKILL at random points, many times ------------------------------------------------


KILL_ROUNDS = int(os.environ.get("KILL_ROUNDS", "30"))


@pytest.mark.slow
@pytest.mark.timeout(120 + 8 * KILL_ROUNDS)  # a round takes 3-4 s; the default 300 s fits ~60
def test_sigkill_at_random_points_loses_nothing(start_server, tmp_path, monkeypatch):
    rounds = KILL_ROUNDS
    rng = random.Random(20261128)
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.6")
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.004")
    port = free_port()
    accepted: set[str] = set()
    db_path = tmp_path / "training_server.db"
    kills_during = {"upload": 0, "preprocessing": 0, "training": 0, "idle": 0}
    settings = {"port": port, "trainer_iterations": 200, "kill_grace": 1}
    video = OFFICE_VIDEO.read_bytes()
    killed_at = 0.0
    for _ in range(rounds):
        server = start_server(**settings)
        with server.client() as client:
            # After every restart: every accepted task is there, nothing from before runs.
            for task_id in accepted:
                assert client.get(f"/status/{task_id}").status_code == 200
            assert integrity(db_path) == "ok"
            leftovers = stage_processes_older_than(str(tmp_path), killed_at)
            assert leftovers == [], [" ".join(psutil.Process(p).cmdline()) for p in leftovers]
            # Work for this round: a few uploads, one of them slow enough to be cut.
            for _ in range(rng.randint(0, 2)):
                response = upload(client)
                assert response.status_code == 202
                accepted.add(response.json()["task_id"])

            def slow_upload(server=server) -> None:
                body_parts = [video[i : i + 65536] for i in range(0, len(video), 65536)]

                def body():
                    yield (
                        b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.mp4"'
                        b"\r\n\r\n"
                    )
                    for part in body_parts:
                        time.sleep(0.05)
                        yield part
                    yield b"\r\n--b--\r\n"

                try:
                    with server.client() as own:
                        response = own.post(
                            "/upload",
                            content=body(),
                            headers={"Content-Type": "multipart/form-data; boundary=b"},
                        )
                    if response.status_code == 202:
                        accepted.add(response.json()["task_id"])
                except httpx.HTTPError:
                    pass  # cut by the kill: not accepted

            uploader = threading.Thread(target=slow_upload, daemon=True)
            if rng.random() < 0.4:
                uploader.start()
            time.sleep(rng.uniform(0.0, 2.5))
            statuses = {t["status"] for t in client.get("/tasks").json()["items"]}
        if uploader.is_alive():
            kills_during["upload"] += 1
        for stage in ("preprocessing", "training"):
            if stage in statuses:
                kills_during[stage] += 1
        if not statuses & RUNNING and not uploader.is_alive():
            kills_during["idle"] += 1
        server.kill()
        killed_at = time.time()
        if uploader.ident is not None:
            uploader.join(10)

    server = start_server(**settings)
    with server.client() as client:
        assert stage_processes_older_than(str(tmp_path), killed_at) == []
        for task_id in accepted:
            status = wait_status(client, task_id, TERMINAL, timeout=300)
            assert status["status"] == "training_completed", status
        tasks = client.get("/tasks", params={"limit": 1000}).json()["items"]
        assert not [t for t in tasks if t["status"] in RUNNING]
    assert integrity(db_path) == "ok"
    record(
        "sigkill_rounds",
        {"rounds": rounds, "accepted_tasks": len(accepted), "kills_during": kills_during},
    )


# -- stages that misbehave ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["close_stdout", "silent", "hang"])
def test_timeouts_end_stages_that_misbehave(start_server, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", mode)
    server = start_server(preprocess_timeout=2, kill_grace=1)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        started = time.monotonic()
        status = wait_status(client, task_id, TERMINAL, timeout=30)
        elapsed = time.monotonic() - started
        assert status["end_reason"] == "timed_out"
        assert elapsed < 2 + 1 + 8, elapsed
    for pid in recorded_pids(tmp_path):
        assert not pid_alive(pid)
    record(f"timeout_{mode}", {"seconds_to_failed": round(elapsed, 2), "timeout": 2})


@pytest.mark.parametrize("mode", ["close_stdout", "silent", "spawn"])
def test_cancel_ends_stages_that_misbehave(start_server, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", mode)
    server = start_server(kill_grace=1)
    with server.client() as client:
        task_id = upload(client).json()["task_id"]
        wait_for(client, task_id, lambda s: len(recorded_pids(tmp_path)) >= 1, timeout=20)
        time.sleep(0.3)
        started = time.monotonic()
        assert client.post(f"/tasks/{task_id}/cancel").json()["status"] == "cancelled"
        elapsed = time.monotonic() - started
        assert elapsed < 1 + 8
    for pid in recorded_pids(tmp_path):
        assert not pid_alive(pid)


def test_a_flood_of_output_keeps_the_log_bounded_and_the_server_responsive(
    start_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "flood")
    monkeypatch.setenv("FAKE_PIPELINE_FLOOD_MB", "300")
    cap = 2 * 1024 * 1024
    server = start_server(log_max_bytes=cap)
    latencies = []
    with server.client() as client:
        task_id = upload(client, start_training="false").json()["task_id"]
        started = time.monotonic()
        while time.monotonic() - started < 120:
            t0 = time.monotonic()
            status = client.get(f"/status/{task_id}").json()
            latencies.append(time.monotonic() - t0)
            if status["status"] not in {"pending", "preprocessing"}:
                break
            time.sleep(0.05)
        assert status["status"] == "preprocessing_completed", status
        log_size = (tmp_path / "logs" / task_id / "training_server.log").stat().st_size
        assert log_size < cap + 300 * 4200, log_size
        tail = client.get(f"/logs/{task_id}", params={"lines": 5}).text
        assert "Stage preprocessing ended: succeeded" in tail
    worst = max(latencies)
    assert worst < 2.0, worst
    record(
        "output_flood",
        {
            "output_mb": 300,
            "log_bytes": log_size,
            "status_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "status_max_ms": round(worst * 1000, 1),
        },
    )


# -- a full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB tmpfs (needs root, as in CI); the server keeps all its files there."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_upload_gives_507_and_keeps_serving(start_server, small_disk, tmp_path):
    big = padded_video(tmp_path / "big.mp4", 80 * 1024 * 1024)
    server = start_server(root=small_disk, min_free_bytes=0)
    with server.client() as client:
        with big.open("rb") as f:  # Content-Length known: refused before a byte is written
            response = client.post("/upload", files={"file": ("big.mp4", f, "video/mp4")})
        assert response.status_code == 507
        assert "free disk" in response.json()["detail"]
        body = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n\r\n'
            + big.read_bytes()
            + b"\r\n--b--\r\n"
        )

        def chunks():
            for start in range(0, len(body), 1 << 20):
                yield body[start : start + (1 << 20)]

        response = client.post(  # chunked: the disk fills while it is written
            "/upload", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"}
        )
        assert response.status_code == 507
        assert "disk" in response.json()["detail"]
        assert list((small_disk / "temp_workspace").iterdir()) == []
        assert integrity(small_disk / "training_server.db") == "ok"
        assert client.get("/health").status_code == 200
        assert upload(client, start_training="false").status_code == 202


def test_a_full_disk_during_a_stage_fails_it_clearly(start_server, small_disk, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "fill")
    server = start_server(root=small_disk, min_free_bytes=0)
    with server.client() as client:
        task_id = upload(client, start_training="false").json()["task_id"]
        status = wait_status(client, task_id, TERMINAL)
        assert status["status"] == "failed"
        assert "No space left on device" in status["error_message"]
        # The partial output is gone, the video kept for a retry.
        task_dir = small_disk / "temp_workspace" / task_id
        assert {p.name for p in task_dir.iterdir()} == {"input.mp4"}
        assert integrity(small_disk / "training_server.db") == "ok"
        assert client.get("/health").status_code == 200
    server.kill()
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "ok")
    server = start_server(root=small_disk, min_free_bytes=0)
    with server.client() as client:
        assert client.post(f"/tasks/{task_id}/retry").status_code == 200
        assert wait_status(client, task_id, {"preprocessing_completed"})


# -- many tasks: no zombies, no leaked descriptors ----------------------------------------


@pytest.mark.slow
def test_a_hundred_tasks_leave_no_zombies_and_no_leaked_descriptors(start_server, monkeypatch):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.02")
    server = start_server()
    proc = psutil.Process(server.proc.pid)
    with server.client() as client:
        ids = []
        fds_after_10 = 0
        for index in range(100):
            answer = upload(client, start_training="false")
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["task_id"])
            if index == 9:
                wait_status(client, ids[-1], {"preprocessing_completed"})
                fds_after_10 = proc.num_fds()
        for task_id in ids:
            assert wait_status(client, task_id, {"preprocessing_completed"})["status"]
        time.sleep(0.5)
        zombies = [c.pid for c in proc.children(recursive=True) if c.status() == "zombie"]
        fds_after_100 = proc.num_fds()
        assert zombies == []
        assert proc.children(recursive=True) == []
        assert fds_after_100 <= fds_after_10 + 4, (fds_after_10, fds_after_100)
    record(
        "hundred_tasks",
        {"zombies": len(zombies), "fds_after_10": fds_after_10, "fds_after_100": fds_after_100},
    )


# -- load --------------------------------------------------------------------------------


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, bytes]:
    """One keep-alive HTTP/1.1 GET on an open connection; returns (status, body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split()[1])
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    return code, await reader.readexactly(length)


async def _poll(url: str, task_id: str, seconds: float, clients: int) -> dict[str, Any]:
    """`clients` keep-alive connections polling /status and /tasks in a loop for `seconds`.

    A bare asyncio client: httpx's connection pool itself tops out near 60 requests/s at 100
    connections on 2 cores, which would measure the client instead of the server."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        path = f"/status/{task_id}" if index % 2 else "/tasks?limit=20"
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    code, body = await _get(reader, writer, path)
                    if code != 200:
                        errors.append(f"{code} {body[:100]!r}")
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors.append(repr(exc))
                    return
                latencies.append(time.monotonic() - t0)
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
        "errors": errors,
    }


def _peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    proc = psutil.Process(pid)
    peak = 0
    while not stop.is_set():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.02)
    out.append(peak)


@pytest.mark.slow
def test_load_while_preprocessing_a_real_video(start_server, tmp_path):
    """100 pollers of /status and /tasks, plus three 200 MB uploads, while run_pipeline.py
    reconstructs the office video; compared with the same pollers against the idle server."""
    sys_python_pipeline = json.dumps([os.sys.executable, str(REPO / "run_pipeline.py")])
    server = start_server(preprocess_command=sys_python_pipeline, min_free_bytes=0)
    uploads = [padded_video(tmp_path / f"u{i}.mp4", 200 * 1024 * 1024) for i in range(3)]
    with server.client() as client:
        target = upload(client, start_training="false").json()["task_id"]
        rested = wait_status(client, target, {"preprocessing_completed", *TERMINAL}, timeout=300)
        assert rested["status"] == "preprocessing_completed", rested
        idle = asyncio.run(_poll(server.url, target, 6, 100))

        busy_task = upload(client, start_training="false").json()["task_id"]
        wait_for(client, busy_task, lambda s: s["status"] == "preprocessing", timeout=60)
        upload_results: list[int] = []

        def send(path: Path) -> None:
            with server.client() as own, path.open("rb") as f:
                response = own.post(
                    "/upload",
                    files={"file": (path.name, f, "video/mp4")},
                    params={"start_training": "false"},
                )
                upload_results.append(response.status_code)

        senders = [threading.Thread(target=send, args=(p,)) for p in uploads]
        for sender in senders:
            sender.start()
        loaded = asyncio.run(_poll(server.url, target, 6, 100))
        for sender in senders:
            sender.join(120)
        still_preprocessing = client.get(f"/status/{busy_task}").json()["status"]
    assert upload_results == [202, 202, 202]
    assert idle["errors"] == [] and loaded["errors"] == []
    assert "database is locked" not in server.output()
    record(
        "load",
        {
            "idle": {k: v for k, v in idle.items() if k != "errors"},
            "loaded": {k: v for k, v in loaded.items() if k != "errors"},
            "rps_ratio_loaded_over_idle": round(loaded["rps"] / idle["rps"], 2),
            "preprocessing_during_load": still_preprocessing,
        },
    )


@pytest.mark.slow
def test_memory_stays_flat_during_a_1gb_upload(start_server, tmp_path):
    video = padded_video(tmp_path / "one_gb.mp4", 1024 * 1024 * 1024)
    server = start_server(min_free_bytes=0, preprocess_command=json.dumps(["/bin/true"]))
    proc = psutil.Process(server.proc.pid)
    with server.client() as client:
        client.get("/tasks")
        baseline = proc.memory_info().rss
        stop = threading.Event()
        peak: list[int] = []
        sampler = threading.Thread(target=_peak_rss, args=(server.proc.pid, stop, peak))
        sampler.start()
        started = time.monotonic()
        with video.open("rb") as f:
            response = client.post("/upload", files={"file": ("one_gb.mp4", f, "video/mp4")})
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
    assert response.status_code == 202, response.text
    growth = peak[0] - baseline
    assert growth < 64 * 1024 * 1024, growth
    record(
        "upload_1gb",
        {
            "rss_growth_mb": round(growth / 2**20, 1),
            "seconds": round(elapsed, 2),
            "mb_per_s": round(1024 / elapsed, 1),
        },
    )
