"""Subprocess lifecycle and the task log: stages run as argv lists in their own process group,
their output is drained continuously into a bounded, timestamped log, and they always end —
terminate, a bounded grace, then kill, for the whole group — even when the caller is cancelled.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import re
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("training_server")

READ_CHUNK = 64 * 1024
MAX_LINE_CHARS = 4096  # longer lines are cut in the log
MAX_PENDING_BYTES = 256 * 1024  # an unterminated line longer than this is flushed as a line
TAIL_LINES = 200  # kept in memory; written after the cut when the log hits its size limit
OVERFLOW_KEEP = 256 * 1024  # characters kept of the output that came after the size limit
REDRAW_INTERVAL = 2.0  # seconds between logged redraws of a `\r` progress bar


@dataclass(frozen=True)
class ProcessOutcome:
    """How a stage process ended."""

    returncode: int | None
    timed_out: bool
    duration: float


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if it is gone."""
    stat = _read_stat(pid)
    return int(stat[19]) if stat else None


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return raw[raw.rfind(b")") + 2 :].decode("ascii", "replace").split()


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat and stat[2] == str(pgid) and stat[0] != "Z":
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send `sig` to a whole process group; returns False when the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def kill_stale_group(pid: int, start_time: int | None) -> int:
    """Kill what is left of a stage process group recorded before a server restart.

    The group id is the recorded leader pid. If a process now holds that pid with another
    start time, the pid was reused by something unrelated and nothing is touched. Returns how
    many processes were signalled.
    """
    current_start = process_start_time(pid)
    if current_start is not None and start_time is not None and current_start != start_time:
        return 0
    members = group_members(pid)
    if members:
        signal_group(pid, signal.SIGKILL)
    return len(members)


TASK_MARKER = "TRAINING_SERVER_TASK_ID"


def processes_marked(task_id: str) -> list[int]:
    """Pids of live processes whose environment carries this task's marker (every stage
    process and its descendants inherit it)."""
    return marked_processes().get(task_id, [])


def marked_processes() -> dict[str, list[int]]:
    """Live processes carrying any task's marker, by task id (one scan of /proc)."""
    prefix = f"{TASK_MARKER}=".encode()
    found: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(prefix):
                stat = _read_stat(int(entry.name))
                if stat and stat[0] != "Z":
                    task_id = item[len(prefix) :].decode("ascii", "replace")
                    found.setdefault(task_id, []).append(int(entry.name))
                break
    return found


def kill_pids(pids: list[int]) -> int:
    """SIGKILL each pid (gone ones are skipped); returns how many were signalled."""
    killed = 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def kill_marked(task_id: str) -> int:
    """SIGKILL every live process carrying the task's marker; returns how many."""
    pids = processes_marked(task_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


async def await_shielded(awaitable: Awaitable[T]) -> T:
    """Await to the end even if the caller is cancelled meanwhile; re-raise the cancel after."""
    future = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result


async def _end_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """Terminate the process group, wait up to `grace`, then kill whatever is left."""
    pgid = proc.pid
    if proc.returncode is None:
        signal_group(pgid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
    # Children may outlive the leader (or ignore SIGTERM): give them the same grace.
    if group_members(pgid):
        signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        # Nothing signals the end of a process that is not our child: poll.
        while group_members(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    signal_group(pgid, signal.SIGKILL)
    if proc.returncode is None:
        await proc.wait()
    deadline = time.monotonic() + 5
    while group_members(pgid) and time.monotonic() < deadline:
        signal_group(pgid, signal.SIGKILL)
        await asyncio.sleep(0.02)


class _PipeReader:
    """Delivers what arrives on a pipe's read end to `on_output`, from the event loop's own
    reader callback. It owns the descriptor from its construction (no await in between, so
    no cancel can leave the descriptor with two owners) and closes it exactly once."""

    def __init__(self, fd: int, on_output: Callable[[bytes], None]) -> None:
        self._fd = fd
        self._on_output = on_output
        self._loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            self._on_output(data)
        except Exception:  # a sink error must neither block the pipe nor hide the outcome
            log.exception("an output sink failed; the output goes on being read")

    def close(self) -> None:
        """Stop reading and close the descriptor (once)."""
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if not self.ended.done():
            self.ended.set_result(None)


class LocalProcess:
    """A stage command running here, in its own process group (start_new_session), with
    stdout+stderr on one pipe that nobody but this object reads or closes."""

    def __init__(self, proc: asyncio.subprocess.Process, read_fd: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.start_time = process_start_time(proc.pid)
        self._read_fd: int | None = read_fd
        self._reader: _PipeReader | None = None

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None,
        kill_grace: float,
    ) -> LocalProcess:
        """Start `argv`. A cancel that lands while it starts waits for the start, ends the new
        process group, and is re-raised: a started process is never lost."""
        if isinstance(argv, str | bytes) or not all(isinstance(a, str) for a in argv):
            raise TypeError("argv must be a sequence of str, never a shell string")
        # Our own pipe, not asyncio's: Process.wait() would also wait for every holder of an
        # asyncio pipe to close it, so a child keeping the output open would hide the exit.
        read_fd, write_fd = os.pipe()
        spawn = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        )
        try:
            try:
                proc = await asyncio.shield(spawn)
            except asyncio.CancelledError:
                while not spawn.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(spawn)
                if not spawn.cancelled() and spawn.exception() is None:
                    await await_shielded(_end_group(spawn.result(), kill_grace))
                raise
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(proc, read_fd)

    def follow(self, on_output: Callable[[bytes], None]) -> None:
        """Start delivering the output to `on_output` (once)."""
        if self._read_fd is not None:
            self._reader = _PipeReader(self._read_fd, on_output)
            self._read_fd = None

    @property
    def returncode(self) -> int | None:
        """The leader's exit code, None while it runs."""
        return self.proc.returncode

    async def wait(self) -> int:
        """The leader's exit code, once it has exited."""
        return await self.proc.wait()

    async def stop(self, grace: float) -> None:
        """Terminate the whole group, wait up to `grace`, then kill what is left."""
        await _end_group(self.proc, grace)

    async def close(self) -> None:
        """Read the output to its end (bounded) and release the pipe."""
        if self._read_fd is not None:  # never followed
            os.close(self._read_fd)
            self._read_fd = None
        if self._reader is not None:
            # The pipe closes once every holder is dead; a process that escaped the group
            # (a new session of its own) could hold it open, so do not wait forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader.ended), 5)
            self._reader.close()


async def follow_to_end(
    handle: Any,
    *,
    timeout_s: float,
    on_output: Callable[[bytes], None],
    kill_grace: float,
    started: float | None = None,
) -> ProcessOutcome:
    """Follow a started run (`follow`, `wait`, `stop`, `close`: a local process group or a
    job elsewhere) until it ends or `timeout_s` (counted from `started`) passes; always stop
    it and release it, even when the caller is cancelled (the cancel is re-raised after)."""
    started = time.monotonic() if started is None else started
    timed_out = False
    returncode: int | None = None
    try:
        handle.follow(on_output)
        remaining = max(0.0, timeout_s - (time.monotonic() - started))
        try:
            returncode = await asyncio.wait_for(handle.wait(), remaining)
        except TimeoutError:
            timed_out = True
    finally:
        await await_shielded(_stop_and_close(handle, kill_grace))
    if returncode is None:
        returncode = getattr(handle, "returncode", None)
    return ProcessOutcome(returncode, timed_out, time.monotonic() - started)


async def _stop_and_close(handle: Any, grace: float) -> None:
    try:
        await handle.stop(grace)
    finally:
        await handle.close()


async def run_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    timeout_s: float,
    on_output: Callable[[bytes], None],
    on_started: Callable[[int, int | None], Awaitable[None]] | None = None,
    env: Mapping[str, str] | None = None,
    kill_grace: float = 10.0,
) -> ProcessOutcome:
    """Run `argv` in its own process group with stdout+stderr drained into `on_output`.

    Ends the whole group on timeout, on cancellation and after the leader exits; the cleanup
    runs to its end even if the caller is cancelled, and the cancel is re-raised afterwards.
    """
    started = time.monotonic()
    process = await LocalProcess.spawn(argv, cwd=cwd, env=env, kill_grace=kill_grace)
    try:
        if on_started is not None:
            await on_started(process.pid, process.start_time)
    except BaseException:
        await await_shielded(_stop_and_close(process, kill_grace))
        raise
    return await follow_to_end(
        process, timeout_s=timeout_s, on_output=on_output, kill_grace=kill_grace, started=started
    )


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b")
_BAR = re.compile(r"\d+%\||\|\s*\d+/[\d?]+\s*\[|\b\d+it \[")


def redraw_key(line: str) -> str | None:
    """A key naming the progress display `line` redraws (a tqdm bar, a `@progress` line of the
    stage protocol), or None for an ordinary line."""
    if line.startswith("@progress "):
        cut = line.find('"current"')
        return line[: cut if cut > 0 else 40]
    if _BAR.search(line):
        return line.split(":", 1)[0][:60] if ":" in line[:80] else line[:20]
    return None


class TaskLog:
    """A task's log file: timestamped lines, progress redraws thinned out, size bounded.

    Stage output arrives as raw bytes; lines end at `\\n` or `\\r` and lose terminal escape
    sequences. A line that redraws a progress display (ended by `\\r`, or shaped like a tqdm
    bar or a `@progress` line) is written at most every REDRAW_INTERVAL seconds per display;
    the last state of each display is written before the next ordinary line. Once the file
    holds `max_bytes`, further output is not parsed at all: only its last OVERFLOW_KEEP
    characters are kept, and their last TAIL_LINES lines are written when the log is closed.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > max_bytes:
            path.replace(path.with_name(path.name + ".1"))
        self.path = path
        self.max_bytes = max_bytes
        self._file: IO[str] = path.open("a", encoding="utf-8", errors="replace")
        self._size = self._file.tell()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._redraws: dict[str, str] = {}  # display -> its latest unwritten state
        self._last_redraw_write: dict[str, float] = {}
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._overflow = ""  # the end of what came after the size limit
        self._overflow_chars = 0
        self._last_flush = time.monotonic()

    @property
    def tail(self) -> list[str]:
        """The latest output lines (redraws included), oldest first."""
        if self._overflow:
            return [line for line in self._overflow.splitlines() if line.strip()][-TAIL_LINES:]
        return list(self._tail)

    def event(self, text: str) -> None:
        """Write one of the server's own lines (these are never cut)."""
        stamp = _stamp()
        self._emit([f"{stamp} [server] {line}\n" for line in text.splitlines() or [""]])
        self._flush()

    def feed(self, chunk: bytes) -> None:
        """Take raw stage output."""
        text = self._pending + self._decoder.decode(chunk)
        self._pending = ""
        if self._size >= self.max_bytes:
            self._spill(text)
            return
        stamp = _stamp()
        records: list[str] = []
        size = self._size
        start = 0
        length = len(text)
        while start < length:
            nl = text.find("\n", start)
            cr = text.find("\r", start, nl if nl >= 0 else length)
            if nl < 0 and cr < 0:
                break
            end = cr if cr >= 0 else nl
            before = len(records)
            self._line(text[start:end], stamp, records, carriage_return=text[end] == "\r")
            start = end + 1
            size += sum(len(record) for record in records[before:])
            if size >= self.max_bytes:
                self._emit(records)
                records = []
                self._spill(text[start:])
                return
        rest = text[start:]
        if len(rest) > MAX_PENDING_BYTES:
            self._line(rest, stamp, records, carriage_return=False)
            rest = ""
        self._pending = rest
        self._emit(records)
        if time.monotonic() - self._last_flush > 0.5:
            self._flush()

    def _spill(self, text: str) -> None:
        """Past the size limit: keep only the end of the output, unparsed."""
        if not self._overflow_chars:
            self._emit(
                [
                    f"{_stamp()} [server] log limit of {self.max_bytes} bytes reached; "
                    f"only the last {TAIL_LINES} lines of this stage will follow\n"
                ]
            )
        self._overflow_chars += len(text)
        self._overflow = (self._overflow + text)[-OVERFLOW_KEEP:]

    def _line(self, line: str, stamp: str, records: list[str], *, carriage_return: bool) -> None:
        if "\x1b" in line:
            line = _ESCAPES.sub("", line)
        line = line.rstrip()
        if not line.strip():
            return
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + f" [... {len(line) - MAX_LINE_CHARS} chars cut]"
        key = redraw_key(line.lstrip())
        if key is None and carriage_return:
            key = "\r"
        if key is not None:
            now = time.monotonic()
            if now - self._last_redraw_write.get(key, 0.0) >= REDRAW_INTERVAL:
                self._last_redraw_write[key] = now
                self._redraws.pop(key, None)
                self._tail.append(line)
                records.append(f"{stamp} {line}\n")
            else:
                self._redraws[key] = line
            return
        self._take_redraws(stamp, records)
        self._tail.append(line)
        records.append(f"{stamp} {line}\n")

    def _take_redraws(self, stamp: str, records: list[str]) -> None:
        """The last unwritten state of every progress display, as records."""
        for line in self._redraws.values():
            self._tail.append(line)
            records.append(f"{stamp} {line}\n")
        self._redraws.clear()

    def _emit(self, records: list[str]) -> None:
        if records:
            text = "".join(records)
            self._file.write(text)
            self._size += len(text)

    def _flush(self) -> None:
        self._file.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Write what is still held and close the file."""
        self.end_output()
        self._flush()
        self._file.close()

    def end_output(self) -> None:
        """Write what the stage's output left held: a last redraw, the tail after a cut."""
        stamp = _stamp()
        records: list[str] = []
        if self._overflow_chars:
            self._overflow += self._pending
            kept = self.tail
            records.append(
                f"{stamp} [server] {self._overflow_chars} characters of output omitted; "
                f"the last {len(kept)} lines:\n"
            )
            records += [f"{stamp} {line[:MAX_LINE_CHARS]}\n" for line in kept]
        else:
            if self._pending.strip():
                self._line(self._pending, stamp, records, carriage_return=False)
            self._take_redraws(stamp, records)
        self._pending = ""
        self._overflow = ""
        self._overflow_chars = 0
        self._emit(records)

    def __enter__(self) -> TaskLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tail_text(path: Path, lines: int, max_bytes: int = 8 * 1024 * 1024) -> str:
    """The last `lines` lines of a text file, reading backwards in blocks (at most max_bytes)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            pos = end
            data = b""
            while pos > 0 and data.count(b"\n") <= lines and end - pos < max_bytes:
                step = min(64 * 1024, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace")
    parts = text.splitlines(keepends=True)
    return "".join(parts[-lines:]) if lines else ""


async def run_captured(
    argv: Sequence[str], *, cwd: Path, timeout_s: float, limit: int = 64 * 1024
) -> tuple[ProcessOutcome, str]:
    """Run a short command to its end and return how it ended and its (bounded) output."""
    output = bytearray()

    def keep(chunk: bytes) -> None:
        room = limit - len(output)
        if room > 0:
            output.extend(chunk[:room])

    outcome = await run_process(argv, cwd=cwd, timeout_s=timeout_s, on_output=keep, kill_grace=1)
    return outcome, output.decode("utf-8", "replace")
