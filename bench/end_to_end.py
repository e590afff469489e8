"""End-to-end benchmark without a GPU: upload of the real office video → the server runs the
real `run_pipeline.py` → `preprocessing_completed`.

    python bench/end_to_end.py [--repeats 3] [--quick]

A server with its default preprocessing command (this repository's run_pipeline.py) and
`start_training=false`; the client follows the server's own event stream (`GET /events`,
what the web page listens to) and times, from the first byte of the upload: the upload's
answer, the task entering `preprocessing`, the first progress the pipeline reports (a
`progress` with a count, as the page shows it), and `preprocessing_completed`. The
pipeline's own run time (`total_seconds` in its summary) is shown beside the total, so the
server's share (queueing, process start-up, probe, bookkeeping) is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import httpx
from common import (
    OFFICE_VIDEO,
    REPO,
    RESULTS,
    Section,
    Table,
    log,
    remove,
    runs_text,
    start_training_server,
    stat,
    stop_server,
)
from upload import post_file

FINAL = {"preprocessing_completed", "failed", "cancelled", "training_completed"}


class EventRecorder:
    """Follows GET /events in a thread; keeps (monotonic time, task) for every task event."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> EventRecorder:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the event stream did not open")
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join(5)

    def _follow(self) -> None:
        event = ""
        with (
            httpx.Client(timeout=httpx.Timeout(5, read=None)) as client,
            client.stream("GET", f"{self.url}/events") as response,
        ):
            for line in response.iter_lines():
                if self._done.is_set():
                    return
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                    if event == "hello":
                        self._ready.set()
                elif line.startswith("data:") and event == "task":
                    task = json.loads(line.split(":", 1)[1])["task"]
                    with self._lock:
                        self.events.append((time.monotonic(), task))

    def for_task(self, task_id: str) -> list[tuple[float, dict[str, Any]]]:
        """The events of one task so far."""
        with self._lock:
            return [(t, task) for t, task in self.events if task["task_id"] == task_id]

    def wait_final(self, task_id: str, timeout: float) -> list[tuple[float, dict[str, Any]]]:
        """Wait for the task's final status; returns its events."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.for_task(task_id)
            if events and events[-1][1]["status"] in FINAL:
                return events
            time.sleep(0.05)
        raise TimeoutError(f"task {task_id} did not finish in {timeout} s")


def one_run(server: Any, recorder: EventRecorder) -> dict[str, Any]:
    """Upload the office video and follow it to preprocessing_completed."""
    start = time.monotonic()
    status, answer, upload_s = post_file(server.url, OFFICE_VIDEO, "?start_training=false")
    if status != 202:
        raise RuntimeError(f"upload answered {status}: {answer}")
    task_id = answer["task_id"]
    events = recorder.wait_final(task_id, 600)
    started = next((t for t, e in events if e["status"] == "preprocessing"), None)
    progress = next(
        (
            t
            for t, e in events
            if e["status"] == "preprocessing"
            and e.get("progress")
            and e["progress"].get("current") is not None
        ),
        None,
    )
    final_time, final = events[-1]
    summary = ((final.get("metadata") or {}).get("preprocessing")) or {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        client.delete(f"/tasks/{task_id}").raise_for_status()
    return {
        "status": final["status"],
        "upload_s": upload_s,
        "preprocessing_s": started - start if started else None,
        "first_progress_s": progress - start if progress else None,
        "total_s": final_time - start,
        "pipeline_s": summary.get("total_seconds"),
        "registered": summary.get("frames_registered"),
        "kept": summary.get("frames_kept"),
        "error": final.get("error_message"),
    }


def run(repeats: int = 3) -> Section:
    """Run the end-to-end benchmark; returns its section of BENCHMARKS.md."""
    start = time.perf_counter()
    work = RESULTS / "end_to_end_work"
    remove(work)
    runs = []
    server = start_training_server(
        work,
        min_free_bytes=0,
        preprocess_command=[sys.executable, str(REPO / "run_pipeline.py")],
    )
    try:
        with EventRecorder(server.url) as recorder:
            for r in range(repeats):
                result = one_run(server, recorder)
                runs.append(result)
                log(
                    f"end to end run {r + 1}/{repeats}: {result['status']} in "
                    f"{result['total_s']:.1f} s, first progress {result['first_progress_s']} s"
                )
    finally:
        stop_server(server)
        remove(work)
    section = report(runs)
    section.seconds = time.perf_counter() - start
    return section


def report(runs: list[dict[str, Any]]) -> Section:
    """The end-to-end table."""
    section = Section(
        "end_to_end",
        "5. End to end without GPU: upload → preprocessing_completed (office video)",
        intro=(
            "A server with the real `run_pipeline.py`; the office video (0.9 MB) uploaded with "
            "`start_training=false`; times from the upload's first byte, as seen on the "
            "server's event stream (`GET /events`, what the page follows). "
            f"{runs_text(len(runs))}"
        ),
    )
    table = Table(["milestone", "seconds from the upload's start"])
    ok = [r for r in runs if r["status"] == "preprocessing_completed"]

    def values(key: str) -> list[float]:
        return [r[key] for r in ok if r.get(key) is not None]

    table.add("upload answered (202, task created)", stat(values("upload_s")))
    table.add("status `preprocessing` (stage started)", stat(values("preprocessing_s")))
    table.add("first progress shown (pipeline's first count)", stat(values("first_progress_s")))
    table.add("`preprocessing_completed`", stat(values("total_s")))
    table.add("— of which the pipeline's own run (its summary)", stat(values("pipeline_s")))
    overhead = [r["total_s"] - r["pipeline_s"] for r in ok if r.get("pipeline_s") is not None]
    table.add("— the rest (upload, probe, queue, process start, bookkeeping)", stat(overhead))
    section.tables = [table]
    if ok:
        section.notes.append(
            f"Registered {ok[0]['registered']} of {ok[0]['kept']} frames in every run."
            if all(r["registered"] == ok[0]["registered"] for r in ok)
            else "Registered frames varied: "
            + ", ".join(f"{r['registered']}/{r['kept']}" for r in ok)
        )
    failed = [r for r in runs if r["status"] != "preprocessing_completed"]
    for r in failed:
        section.notes.append(f"A run ended `{r['status']}`: {r['error']}")
    section.raw = {"runs": runs}
    return section


def render(raw: dict[str, Any]) -> Section:
    """The section again from its saved raw numbers."""
    return report(raw["runs"])


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run")
    args = parser.parse_args()
    section = run(1 if args.quick else args.repeats)
    section.save()
    print(section.text())


if __name__ == "__main__":
    main()
