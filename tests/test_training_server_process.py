"""Subprocess lifecycle and the task log, with real small scripts (no mocks)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import pid_alive
from training_server_process import (
    MAX_LINE_CHARS,
    TaskLog,
    kill_stale_group,
    process_start_time,
    run_captured,
    run_process,
    tail_text,
)

PY = sys.executable

STUBBORN_TREE = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "print('child up', flush=True)\\nwhile True: time.sleep(1)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("parent up", flush=True)
while True: time.sleep(1)
"""


def read_pids(path: Path) -> list[int]:
    for _ in range(100):
        if path.exists() and path.read_text().strip():
            return [int(p) for p in path.read_text().split()]
        time.sleep(0.05)
    raise AssertionError("the script did not write its pids")


async def test_output_is_drained_and_exit_code_kept(tmp_path: Path) -> None:
    chunks: list[bytes] = []
    outcome = await run_process(
        [PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
        cwd=tmp_path,
        timeout_s=30,
        on_output=chunks.append,
    )
    assert outcome.returncode == 3
    assert not outcome.timed_out
    text = b"".join(chunks).decode()
    assert "out" in text and "err" in text


async def test_shell_strings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        await run_process("echo hi", cwd=tmp_path, timeout_s=5, on_output=lambda _: None)


async def test_timeout_kills_the_whole_tree_even_when_it_ignores_sigterm(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    started = time.monotonic()
    outcome = await run_process(
        [PY, "-c", STUBBORN_TREE, str(pid_file)],
        cwd=tmp_path,
        timeout_s=1.5,
        on_output=lambda _: None,
        kill_grace=0.5,
    )
    elapsed = time.monotonic() - started
    assert outcome.timed_out
    assert outcome.returncode is not None and outcome.returncode < 0
    assert elapsed < 6, elapsed
    for pid in read_pids(pid_file):
        assert not pid_alive(pid), f"process {pid} survived"


async def test_cancel_kills_the_tree_and_is_reraised(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    task = asyncio.create_task(
        run_process(
            [PY, "-c", STUBBORN_TREE, str(pid_file)],
            cwd=tmp_path,
            timeout_s=60,
            on_output=lambda _: None,
            kill_grace=0.5,
        )
    )
    pids = await asyncio.to_thread(read_pids, pid_file)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for pid in pids:
        assert not pid_alive(pid)


async def test_children_left_behind_by_a_finished_leader_are_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    script = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " stdout=subprocess.DEVNULL)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
    )
    outcome = await run_process(
        [PY, "-c", script], cwd=tmp_path, timeout_s=30, on_output=lambda _: None, kill_grace=0.5
    )
    # The child holds the output pipe open: the leader's exit must still be seen at once.
    assert outcome.returncode == 0
    assert not outcome.timed_out
    assert outcome.duration < 10
    assert not pid_alive(read_pids(pid_file)[0])


async def test_a_stage_that_closes_its_output_still_times_out(tmp_path: Path) -> None:
    script = "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)\n"
    started = time.monotonic()
    outcome = await run_process(
        [PY, "-c", script], cwd=tmp_path, timeout_s=1, on_output=lambda _: None, kill_grace=0.5
    )
    assert outcome.timed_out
    assert time.monotonic() - started < 5


async def test_run_captured_bounds_output(tmp_path: Path) -> None:
    outcome, text = await run_captured(
        [PY, "-c", "print('x' * 100000)"], cwd=tmp_path, timeout_s=10, limit=1000
    )
    assert outcome.returncode == 0
    assert len(text) == 1000


def test_kill_stale_group_spares_a_reused_pid(tmp_path: Path) -> None:
    import subprocess

    proc = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        # A record with another start time means the pid now belongs to someone else.
        assert kill_stale_group(proc.pid, start + 12345) == 0
        assert proc.poll() is None
        assert kill_stale_group(proc.pid, start) == 1
        assert proc.wait(5) < 0
    finally:
        proc.kill()
        proc.wait()


def test_log_thins_out_progress_bar_redraws(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = TaskLog(path, max_bytes=10**6)
    for step in range(1000):
        log.feed(
            f"\rTraining:  {step // 10}%|#    | {step}/1000 [00:01<00:09, 100.00it/s]".encode()
        )
    log.feed(b"\nfinished\n")
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) < 10
    assert "999/1000" in lines[-2]  # the bar's last state precedes the next line
    assert lines[-1].endswith(" finished")
    assert all(line[:4].isdigit() for line in lines)  # timestamped


def test_log_strips_cursor_movements_and_keeps_a_tail(tmp_path: Path) -> None:
    log = TaskLog(tmp_path / "log", max_bytes=10**6)
    log.feed(b"\x1b[Aline one\n\x1b[A\x1b[A\nline two\nunterminated")
    log.close()
    text = (tmp_path / "log").read_text()
    assert "\x1b" not in text
    assert log.tail == ["line one", "line two", "unterminated"]


def test_log_size_is_bounded_and_keeps_the_end(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = TaskLog(path, max_bytes=100_000)
    block = b"".join(b"line %d\n" % i for i in range(200_000))
    for start in range(0, len(block), 65536):
        log.feed(block[start : start + 65536])
    log.feed(b"x" * 10_000_000)  # one line without an end
    log.feed(b"\nlast words\n")
    log.close()
    size = path.stat().st_size
    assert size < 100_000 + 300 * (MAX_LINE_CHARS + 60), size
    text = path.read_text()
    assert "log limit" in text
    assert text.rstrip().endswith("last words")


def test_a_big_log_is_rotated_when_a_stage_starts(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("old\n" * 50_000)
    TaskLog(path, max_bytes=100_000).close()
    assert (tmp_path / "log.1").exists()
    assert path.stat().st_size < 1000


def test_tail_text_returns_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("".join(f"{i}\n" for i in range(100_000)))
    assert tail_text(path, 3) == "99997\n99998\n99999\n"
    assert tail_text(tmp_path / "missing", 3) == ""


def test_process_start_time_of_self() -> None:
    assert process_start_time(os.getpid()) is not None
    assert process_start_time(2**22 + 17) is None
