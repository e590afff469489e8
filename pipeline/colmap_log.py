"""Progress of one long pycolmap call, read from COLMAP's own log.

pycolmap reports how far a feature extraction or a matching run has come only in its log
(glog, written to stderr): "Processed file [i/n]" after each frame, "Processing block [i/n]"
before each block of pairs. Calling it once for every frame is faster than calling it in
chunks to report progress between them (each call ends with idle cores while its last frames
finish, and a matching call indexes its frames' descriptors again), so this reads those lines
instead: for the duration of the call, file descriptor 2 goes through a pipe; a thread counts
the progress lines and passes every other line on to the real stderr (COLMAP's informational
lines only when the log is verbose, as configure_logging left it).

The reader thread never writes into the pipe it reads (it writes to a copy of the original
descriptor), so a full pipe cannot block it; whoever reports progress polls `count`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

import pycolmap

# "I20261201 16:45:57.282970 139870643156672 feature_extraction.cc:270] Processed file [1/2]"
_PROGRESS = re.compile(rb"\] (Processed file|Processing block) \[(\d+)/(\d+)\]")
_INFO = re.compile(rb"^I\d{8} ")
# The reader drains what is left in the pipe after the call in well under this.
JOIN_SECONDS = 5.0


class LogProgress:
    """What the progress lines said so far: items done of `total` (None: no line yet)."""

    def __init__(self) -> None:
        self.done = 0
        self.total: int | None = None
        self.lines = 0  # progress lines seen

    def count(self) -> int:
        """Items finished so far (a block line names the block starting: those before it)."""
        return self.done

    def feed(self, line: bytes) -> bool:
        """Take one log line; True when it was a progress line (not passed on)."""
        found = _PROGRESS.search(line)
        if found is None:
            return False
        step, total = int(found.group(2)), int(found.group(3))
        self.total = total
        self.lines += 1
        finished = step if found.group(1) == b"Processed file" else step - 1
        self.done = max(self.done, finished)
        return True


def _pump(read_fd: int, out_fd: int, state: LogProgress, verbose: bool) -> None:
    """Read log lines until the pipe closes: count progress, pass the rest on."""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                _route(line + b"\n", out_fd, state, verbose)
        if pending:
            _route(pending, out_fd, state, verbose)


def _route(line: bytes, out_fd: int, state: LogProgress, verbose: bool) -> None:
    if state.feed(line) and not verbose:
        return
    if not verbose and _INFO.match(line):
        return
    with contextlib.suppress(OSError):  # stderr gone: keep draining the pipe regardless
        os.write(out_fd, line)


@contextlib.contextmanager
def progress_from_log() -> Iterator[LogProgress]:
    """Count COLMAP's progress lines while the block runs (see the module docstring)."""
    level = pycolmap.logging.minloglevel
    state = LogProgress()
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    thread = threading.Thread(
        target=_pump, args=(read_fd, saved, state, level <= 0), name="colmap-log", daemon=True
    )
    thread.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pycolmap.logging.minloglevel = 0  # the progress lines are informational
    try:
        yield state
    finally:
        pycolmap.logging.minloglevel = level
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the thread drains it and ends
        thread.join(JOIN_SECONDS)
        if not thread.is_alive():  # else it may still write to `saved`: leave it open
            os.close(saved)
