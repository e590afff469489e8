"""Ray cluster benchmark (issue 15): stand-in trainings of fixed length on a real local Ray
cluster with one GPU node and then two, and how long a stage takes from its claim to its first
output line on Ray against the local executor.

    python bench/ray_cluster.py [--tasks 8] [--seconds 12] [--repeats 1] [--quick]

A real cluster on loopback, started with `ray start` by tests/ray_local.py (as the tests start it):
a head with no GPU (2 CPUs) and worker nodes that advertise one GPU each (no GPU is needed:
the stand-in trainer uses none); it is stopped by killing its own processes (found by its temp
folder and ports), never with `ray stop`. A real server (`training_server.py`, as the tests run
it) with the stand-in pipeline and trainer and `TRAINING_SERVER_EXECUTOR=ray` gets `--tasks`
uploads of tests/data/tum_office_orbit.mp4, each trained for a fixed number of steps (about
`--seconds` s); we time the batch from the first upload to the last `training_completed`, with
one GPU worker, then again after a second worker joined (a fresh server each time). The same
settings with `TRAINING_SERVER_EXECUTOR=local` (one training slot) give the local reference.

Latency: a stage's claim is the `updated_at` of the first `/events` task event that shows the
task in `preprocessing` / `training`; its first output line is the first line of the task log
after `[server] Stage … started` that is not the server's own. Both are the server's UTC
timestamps. Goals (issue 15): two nodes give ≥ 1.9× the tasks per hour of one, and the median
claim → first output line is at most 1 s longer on Ray than local.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from common import (
    OFFICE_VIDEO,
    Section,
    Table,
    log,
    median,
    ratios,
    runs_text,
    start_training_server,
    stat,
    stop_server,
    verdict,
)
from ray_local import RAY, Cluster

from conftest import ServerProcess, upload

GOAL_SPEEDUP = 1.9
GOAL_EXTRA_S = 1.0
STEP_SECONDS = 0.01  # the stand-in trainer's sleep per step
PIPELINE_SECONDS = 0.5  # the stand-in pipeline's run
STAGES = ("preprocessing", "training")
TERMINAL = {"training_completed", "failed", "cancelled"}


# -- following a server ----------------------------------------------------------------------


class Events:
    """The server's `/events` stream, followed in a thread: every task's status changes as
    (status, updated_at, node), in order."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.changes: dict[str, list[tuple[str, str, str | None]]] = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("the server's /events stream did not start")

    def _follow(self) -> None:
        timeout = httpx.Timeout(10, read=None)
        with (
            contextlib.suppress(httpx.HTTPError, ValueError),
            httpx.Client(timeout=timeout) as client,
            client.stream("GET", f"{self.url}/events") as response,
        ):
            for line in response.iter_lines():
                if line.startswith("event: hello"):
                    self.ready.set()
                if not line.startswith("data:"):
                    continue
                data = json.loads(line[5:].strip() or "null")
                if not isinstance(data, dict) or data.get("type") != "task":
                    continue
                task = data["task"]
                with self.lock:
                    seen = self.changes.setdefault(task["task_id"], [])
                    change = (task["status"], task["updated_at"], task.get("node"))
                    if not seen or (seen[-1][0], seen[-1][2]) != (change[0], change[2]):
                        seen.append(change)

    def of(self, task_id: str) -> list[tuple[str, str, str | None]]:
        """The changes seen of one task."""
        with self.lock:
            return list(self.changes.get(task_id, []))

    def first(self, task_id: str, status: str) -> str | None:
        """`updated_at` of the first event that showed the task in `status`."""
        return next((at for s, at, _ in self.of(task_id) if s == status), None)


def parse_stamp(text: str) -> float:
    """Seconds since the epoch of a server timestamp (`…Z` or `…+00:00`)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def log_times(text: str) -> dict[str, dict[str, str]]:
    """From a task log: per stage, the stamps of `Stage … started`, of its `Running:` line
    and of the first line after it that is not the server's."""
    found: dict[str, dict[str, str]] = {}
    current: str | None = None
    for line in text.splitlines():
        stamp, _, rest = line.partition(" ")
        if rest.startswith("[server] Stage ") and " started " in rest:
            current = rest.split()[2]
            found.setdefault(current, {})["started"] = stamp
        elif current is None:
            continue
        elif rest.startswith("[server] Running: "):
            found[current].setdefault("running", stamp)
        elif not rest.startswith("[server]") and "first_output" not in found[current]:
            found[current]["first_output"] = stamp
    return found


def batch(server: ServerProcess, tasks: int, seconds: float, label: str) -> dict[str, Any]:
    """Upload `tasks` videos, wait until all are trained; the times of every task."""
    events = Events(server.url)
    began = datetime.now(UTC).isoformat()
    with server.client() as client:
        ids = []
        for _ in range(tasks):
            answer = upload(client, OFFICE_VIDEO)
            answer.raise_for_status()
            ids.append(answer.json()["task_id"])
        log(f"ray_cluster {label}: {tasks} tasks uploaded")
        deadline = time.monotonic() + tasks * seconds * 4 + 180
        statuses: dict[str, dict[str, Any]] = {}
        while True:
            for task_id in ids:  # the events decide; /status checks now and then
                if not any(s in TERMINAL for s, _, _ in events.of(task_id)):
                    statuses[task_id] = client.get(f"/status/{task_id}").json()
            done = [t for t in ids if statuses.get(t, {}).get("status") in TERMINAL]
            done += [t for t in ids if any(s in TERMINAL for s, _, _ in events.of(t))]
            if len(set(done)) == len(ids):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: the tasks did not finish: {statuses}")
            time.sleep(2.0)
        results = []
        for task_id in ids:
            status = client.get(f"/status/{task_id}").json()
            if status["status"] != "training_completed":
                raise RuntimeError(f"{label}: a task did not complete: {status}")
            changes = events.of(task_id)
            results.append(
                {
                    "task_id": task_id,
                    "claims": {s: events.first(task_id, s) for s in STAGES},
                    "completed": events.first(task_id, "training_completed")
                    or status["updated_at"],
                    "nodes": sorted({n for s, _, n in changes if n and s == "training"}),
                    "log": log_times(client.get(f"/logs/{task_id}").text),
                }
            )
    return {"label": label, "began": began, "tasks": results}


def bare_jobs(address: str, samples: int = 5) -> list[dict[str, float]]:
    """Ray's own floor: `submit_job` of a one-line `echo` asking for one GPU, then its status
    and its log read every 50 ms; seconds from the submission to RUNNING and to the line."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    found = []
    for k in range(samples):
        job = f"bench-bare-{os.getpid()}-{k}-{time.monotonic_ns()}"
        began = time.perf_counter()
        client.submit_job(entrypoint="echo first-line", submission_id=job, entrypoint_num_gpus=1)
        running = line = None
        while line is None and time.perf_counter() - began < 60:
            now = time.perf_counter() - began
            if running is None and str(client.get_job_status(job)).endswith(
                ("RUNNING", "SUCCEEDED")
            ):
                running = now
            if "first-line" in client.get_job_logs(job):
                line = now
            time.sleep(0.05)
        while not str(client.get_job_status(job)).endswith(("SUCCEEDED", "FAILED", "STOPPED")):
            time.sleep(0.1)
        with contextlib.suppress(Exception):
            client.delete_job(job)
        if running is not None and line is not None:
            found.append({"running": running, "first_line": line})
    return found


def ray_settings(address: str) -> dict[str, Any]:
    """Server settings of the Ray runs (the local run uses the same but the executor)."""
    return {
        "executor": "ray",
        "ray_address": address,
        "ray_preprocess_cpus": 1,
        "ray_training_cpus": 0,
        "ray_pass_env": ["FAKE_TRAINER_STEP_SECONDS", "FAKE_PIPELINE_SECONDS"],
    }


def serve(root: Path, seconds: float, **overrides: Any) -> ServerProcess:
    """A server with the stand-ins, trainings of about `seconds` s."""
    env = {
        "FAKE_TRAINER_STEP_SECONDS": str(STEP_SECONDS),
        "FAKE_PIPELINE_SECONDS": str(PIPELINE_SECONDS),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    iterations = max(50, round(seconds / STEP_SECONDS))
    return start_training_server(root, env, trainer_iterations=iterations, **overrides)


def wait_cluster_ready(server: ServerProcess, gpus: int, timeout: float = 120) -> None:
    """/health once the storage probe passed and the cluster shows `gpus` GPUs."""
    deadline = time.monotonic() + timeout
    cluster: dict[str, Any] = {}
    with server.client() as client:
        while time.monotonic() < deadline:
            cluster = client.get("/health").json().get("cluster") or {}
            ready = cluster.get("reachable") and not cluster.get("problem")
            if ready and cluster.get("gpus_total") == gpus:
                return
            time.sleep(0.5)
    raise RuntimeError(f"the cluster never became ready for the server: {cluster}")


def run(repeats: int = 1, tasks: int = 8, seconds: float = 12.0) -> Section:
    """Run the Ray cluster benchmark; returns its section of BENCHMARKS.md."""
    if not RAY.exists():
        raise RuntimeError(f"Ray is not installed in this Python ({RAY} is missing)")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"ray1": [], "ray2": [], "local": []}
    bare: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as folder:
        work = Path(folder)
        cluster = Cluster()
        try:
            log("ray_cluster: starting the head and one GPU worker")
            cluster.start_head()
            cluster.add_worker()
            cluster.wait_nodes(2)
            log("ray_cluster: bare Ray Jobs (Ray's own start and log latency)")
            bare = bare_jobs(cluster.address)
            for gpus in (1, 2):
                if gpus == 2:
                    log("ray_cluster: adding the second GPU worker")
                    cluster.add_worker()
                    cluster.wait_nodes(3)
                for r in range(repeats):
                    label = f"ray{gpus}"
                    server = serve(work / f"{label}-{r}", seconds, **ray_settings(cluster.address))
                    try:
                        wait_cluster_ready(server, gpus)
                        runs[label].append(batch(server, tasks, seconds, f"{label} run {r + 1}"))
                    finally:
                        stop_server(server)
                    log(f"ray_cluster: {label} run {r + 1}: {wall(runs[label][-1]):.1f} s")
        finally:
            cluster.stop()
        local = {**ray_settings(cluster.address), "executor": "local"}
        for r in range(repeats):
            server = serve(work / f"local-{r}", seconds, **local)
            try:
                runs["local"].append(batch(server, tasks, seconds, f"local run {r + 1}"))
            finally:
                stop_server(server)
            log(f"ray_cluster: local run {r + 1}: {wall(runs['local'][-1]):.1f} s")
    raw = {"runs": runs, "repeats": repeats, "tasks": tasks, "seconds": seconds,
           "step_seconds": STEP_SECONDS, "pipeline_seconds": PIPELINE_SECONDS,
           "cpus": os.cpu_count(), "bare": bare}  # fmt: skip
    section = report(raw)
    section.seconds = time.perf_counter() - start
    return section


# -- the report ------------------------------------------------------------------------------


def wall(one: dict[str, Any]) -> float:
    """Seconds from the first upload to the last training_completed of one batch."""
    return max(parse_stamp(t["completed"]) for t in one["tasks"]) - parse_stamp(one["began"])


def training_span(one: dict[str, Any]) -> float:
    """Seconds from the batch's first training claim to its last training_completed: the
    trainings' own throughput, without the uploads and first preprocessing before them."""
    claims = [
        parse_stamp(t["claims"]["training"]) for t in one["tasks"] if t["claims"].get("training")
    ]
    return max(parse_stamp(t["completed"]) for t in one["tasks"]) - min(claims)


def latencies(one: dict[str, Any], stage: str, since: str = "claim") -> list[float]:
    """Per task of a batch: seconds from the stage's claim (or its `Running:` line) to its
    first output line."""
    found = []
    for task in one["tasks"]:
        times = task["log"].get(stage, {})
        if "first_output" not in times:
            continue
        if since == "claim":
            began = task["claims"].get(stage) or times.get("started")
        else:
            began = times.get("running")
        if began:
            found.append(parse_stamp(times["first_output"]) - parse_stamp(began))
    return found


def training_seconds(one: dict[str, Any]) -> list[float]:
    """Per task: seconds from its training's claim to training_completed."""
    return [
        parse_stamp(t["completed"]) - parse_stamp(t["claims"]["training"])
        for t in one["tasks"]
        if t["claims"].get("training")
    ]


def over_claims(one: dict[str, Any], gpus: int) -> int:
    """Trainings claimed while `gpus` earlier ones were more than a second from their
    `training_completed` (the job waits in Ray's queue for a GPU, and that wait counts in
    its latency); the second allows for the end of a job to reach the server."""
    spans = sorted(
        (parse_stamp(t["claims"]["training"]), parse_stamp(t["completed"]))
        for t in one["tasks"]
        if t["claims"].get("training")
    )
    return sum(
        1
        for i, (claim, _) in enumerate(spans)
        if sum(1 for c, end in spans[:i] if c <= claim < end - 1.0) >= gpus
    )


def batches_text(repeats: int) -> str:
    """How the batches were repeated, for the introduction."""
    if repeats == 1:
        return "One batch of each (the spreads are over its tasks, not over runs)."
    return runs_text(repeats)


def report(raw: dict[str, Any]) -> Section:
    """The Ray cluster tables."""
    runs, tasks, repeats = raw["runs"], raw["tasks"], raw["repeats"]
    section = Section(
        "ray_cluster",
        f"Ray cluster: {tasks} stand-in trainings on one GPU node and on two",
        intro=(
            "A real Ray cluster on loopback (`ray start`: a head with no GPU and worker nodes "
            "advertising one GPU each) and a real server with the stand-in pipeline "
            f"({raw['pipeline_seconds']:g} s) and trainer ({raw['seconds']:g} s of steps; "
            "no GPU is used), `TRAINING_SERVER_EXECUTOR=ray`; "
            f"{tasks} uploads of the office video, timed from the first upload to the last "
            "`training_completed`. The local executor (one training slot) with the same "
            "settings is the reference. Latency: from a stage's claim (its status's "
            "`updated_at` in `/events`) to its first output line in the task log (the "
            "server's timestamps), over every task of the runs. "
            f"{batches_text(repeats)} Every node runs on this one machine."
        ),
    )
    table = Table(
        [
            "executor",
            "tasks",
            "batch s",
            "trainings span s",
            "trainings per hour",
            "one training s",
            "nodes used",
        ]
    )
    names = {"ray1": "Ray, 1 GPU node", "ray2": "Ray, 2 GPU nodes", "local": "local, 1 slot"}
    walls = {key: [wall(one) for one in runs[key]] for key in names}
    spans = {key: [training_span(one) for one in runs[key]] for key in names}
    for key, title in names.items():
        if not runs[key]:
            continue
        nodes = [len({n for t in one["tasks"] for n in t["nodes"]}) for one in runs[key]]
        table.add(
            title,
            tasks,
            stat(walls[key], 1),
            stat(spans[key], 1),
            stat([tasks * 3600 / w for w in spans[key]], 0),
            stat([s for one in runs[key] for s in training_seconds(one)], 1),
            stat(nodes, 0) if key != "local" else "–",
        )
    late = Table(
        ["stage", "local s", "Ray s", "Ray − local s", "of which after `Running:`, Ray − local s"],
        caption="Claim → first output line (median (min–max) over the tasks)",
    )
    extra: dict[str, float] = {}
    ray_runs = runs["ray1"] + runs["ray2"]
    for stage in STAGES:
        here = [x for one in runs["local"] for x in latencies(one, stage)]
        there = [x for one in ray_runs for x in latencies(one, stage)]
        here_run = [x for one in runs["local"] for x in latencies(one, stage, "running")]
        there_run = [x for one in ray_runs for x in latencies(one, stage, "running")]
        extra[stage] = median(there) - median(here)
        late.add(
            stage,
            stat(here),
            stat(there),
            f"{extra[stage]:+.2f}",
            f"{median(there_run) - median(here_run):+.2f}",
        )
    speedup = ratios(spans["ray1"], spans["ray2"])
    batch_speedup = ratios(walls["ray1"], walls["ray2"])
    goals = Table(["goal", "measured", "verdict"], caption="Goals (issue 15)")
    met = median(speedup) >= GOAL_SPEEDUP if speedup else None
    goals.add(f"trainings per hour, 2 nodes ÷ 1 node ≥ {GOAL_SPEEDUP:g}×", f"{stat(speedup)}×",
              verdict(met))  # fmt: skip
    for stage in STAGES:
        value = extra[stage]
        goals.add(
            f"{stage}: claim → first output line, Ray − local ≤ {GOAL_EXTRA_S:g} s",
            f"{value:+.2f} s",
            verdict(value <= GOAL_EXTRA_S if value == value else None),
        )
    section.tables = [table, late, goals]
    local_ratio = ratios(spans["local"], spans["ray1"])
    ray_training = [s for one in runs["ray1"] for s in training_seconds(one)]
    local_training = [s for one in runs["local"] for s in training_seconds(one)]
    over = sum(over_claims(one, 1) for one in runs["ray1"])
    over += sum(over_claims(one, 2) for one in runs["ray2"])
    claims = sum(len(one["tasks"]) for one in ray_runs)
    bare = raw.get("bare") or []
    if bare:
        floor = Table(
            ["what", "submission → RUNNING s", "submission → its line in the log s"],
            caption="Ray's own floor: a bare Ray Job (`echo`, one GPU), read every 50 ms",
        )
        floor.add(
            f"{len(bare)} bare jobs",
            stat([b["running"] for b in bare]),
            stat([b["first_line"] for b in bare]),
        )
        section.tables.insert(2, floor)
    section.notes += [
        f"Whole batches (from the first upload, with the uploads and the first preprocessing "
        f"before any training): 2 nodes ÷ 1 node = {stat(batch_speedup)}×; the goal is read "
        "on the trainings' span, from the first training claim to the last "
        "`training_completed`.",
        f"Ray with one GPU node gives {stat(local_ratio)}× the trainings per hour of the local "
        "executor with its one training slot; one training takes "
        f"{median(ray_training) - median(local_training):+.1f} s longer from its claim to "
        "`training_completed` as a Ray Job (the start above, and the end: the job's status "
        "polled every 0.5 s and its log caught up).",
        f"{over} of the {claims} training claims on Ray came while every GPU of the cluster "
        "was taken by earlier trainings that ran on for more than a second (the server's "
        "view of the cluster's free GPUs lags); such a job waits in Ray's queue, and its "
        "wait counts in its latency above.",
        "The batch includes the uploads and the first preprocessing, before any training "
        f"runs; every node, the server and the stand-ins share this machine's {raw['cpus']} "
        "cores.",
        "Ray's part of the latency includes submitting the job, starting its supervisor on a "
        "node, starting the entrypoint there, and the server following the job's log "
        "through the Jobs API; the bare-job table is what Ray itself takes for the first "
        "three, with no server in between.",
    ]
    section.raw = raw
    return section


def render(raw: dict[str, Any]) -> Section:
    """The section again from its saved raw numbers."""
    return report(raw)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=12.0, help="one training's steps")
    parser.add_argument("--quick", action="store_true", help="3 tasks of 4 s, one run")
    args = parser.parse_args()
    section = run(1, 3, 4.0) if args.quick else run(args.repeats, args.tasks, args.seconds)
    section.save()
    print(section.text())


if __name__ == "__main__":
    main()
