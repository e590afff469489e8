"""GET /metrics in Prometheus text format, from a registry of the app's own (not the process
global one, so several apps in one process stay apart).

Measured at scrape time: tasks by status and queue lengths (SQLite), running stages (the
runner), webhook deliveries and their attempts by state (the webhook table). Counted from the
event bus as tasks change: stage run durations (histogram by stage and outcome, from the
claim's and the ending's timestamps), upload bytes (each new task's video size), failures by
stage and reason. The route needs the API token unless TRAINING_SERVER_METRICS_PUBLIC=true.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from training_server_deps import require_token
from training_server_models import Stage, TaskStatus

if TYPE_CHECKING:
    from training_server_tasks import TaskManager

PREFIX = "training_server"
RUNNING = {
    TaskStatus.PREPROCESSING.value: Stage.PREPROCESSING,
    TaskStatus.TRAINING.value: Stage.TRAINING,
}
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 18000, float("inf"))


class _Snapshot(Collector):
    """Gauges read just before each scrape (collect() is synchronous; the reads are not)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def describe(self) -> Iterable[Metric]:
        return []  # names are known only at scrape time; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


class Metrics:
    """The app's registry, the event-fed counters and the scrape-time snapshot."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "How long stage runs took, by stage and how they ended",
            ["stage", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            f"{PREFIX}_upload_bytes",
            "Bytes of accepted video uploads",
            registry=self.registry,
        )
        self.uploads = Counter(
            f"{PREFIX}_uploads", "Accepted video uploads (tasks created)", registry=self.registry
        )
        self.failures = Counter(
            f"{PREFIX}_task_failures",
            "Stage runs that ended a task as failed, by stage and reason",
            ["stage", "reason"],
            registry=self.registry,
        )
        self.snapshot = _Snapshot()
        self.registry.register(self.snapshot)
        self._claims: dict[str, tuple[str, datetime]] = {}
        self._last_status: dict[str, str] = {}
        self._lock = asyncio.Lock()

    # -- from the event bus ------------------------------------------------------------------

    def observe(self, task: dict[str, Any]) -> None:
        """Count what a published task says happened (each status change once)."""
        task_id, status = task["task_id"], task["status"]
        previous = self._last_status.get(task_id)
        self._last_status[task_id] = status
        if previous == status:
            return
        born = task.get("created_at") == task.get("updated_at")  # created now, not retried
        if previous is None and status == TaskStatus.PENDING and born:
            self.uploads.inc()
            self.upload_bytes.inc(task.get("video_size") or 0)
        if status in RUNNING:
            self._claims[task_id] = (RUNNING[status].value, _when(task["updated_at"]))
            return
        claim = self._claims.pop(task_id, None)
        if claim is None:
            return  # its run began before this server started: no start time seen
        stage, started = claim
        outcome = task.get("end_reason") or "unknown"
        seconds = max(0.0, (_when(task["updated_at"]) - started).total_seconds())
        self.stage_seconds.labels(stage=stage, outcome=outcome).observe(seconds)
        if status == TaskStatus.FAILED:
            self.failures.labels(stage=stage, reason=outcome).inc()

    def forget(self, task_id: str) -> None:
        """A deleted task."""
        self._last_status.pop(task_id, None)
        self._claims.pop(task_id, None)

    async def follow(self, manager: TaskManager) -> None:
        """Observe every event of the manager's bus, for good."""
        async with manager.events.subscribe() as queue:
            while True:
                message = await queue.get()
                if message.get("type") == "task":
                    self.observe(message["task"])
                elif message.get("type") == "deleted":
                    self.forget(message["task_id"])

    # -- at scrape time ----------------------------------------------------------------------

    async def scrape(self, manager: TaskManager, webhooks: Any = None) -> bytes:
        """The exposition text, with the gauges read now."""
        families: list[Metric] = []
        by_status = GaugeMetricFamily(
            f"{PREFIX}_tasks", "Tasks in the store by status", labels=["status"]
        )
        for status in TaskStatus:
            _, total = await manager.db.list_tasks([status.value], 0, 0)
            by_status.add_metric([status.value], total)
        families.append(by_status)
        queued = await manager.db.queue_counts()
        queue = GaugeMetricFamily(
            f"{PREFIX}_queue_length", "Tasks waiting for a stage", labels=["stage"]
        )
        running = GaugeMetricFamily(
            f"{PREFIX}_running_stages", "Stage runs in progress", labels=["stage"]
        )
        slots = GaugeMetricFamily(f"{PREFIX}_stage_slots", "Runs allowed at once", labels=["stage"])
        for stage in Stage:
            queue.add_metric([stage.value], queued.get(stage.value, 0))
            running.add_metric([stage.value], len(manager.runner.running_ids(stage)))
            configured = (
                manager.settings.preprocess_slots
                if stage == Stage.PREPROCESSING
                else manager.settings.training_slots
            )
            slots.add_metric([stage.value], configured)
        families += [queue, running, slots]
        if webhooks is not None:
            counts = await webhooks.counts()
            deliveries = GaugeMetricFamily(
                f"{PREFIX}_webhook_deliveries",
                "Webhook deliveries by state (pending, delivered, failed: gave up)",
                labels=["state"],
            )
            attempts = CounterMetricFamily(
                f"{PREFIX}_webhook_attempts",
                "Webhook delivery attempts, by the state their delivery is in now",
                labels=["state"],
            )
            for state in ("pending", "delivered", "failed"):
                number, tries = counts.get(state, (0, 0))
                deliveries.add_metric([state], number)
                attempts.add_metric([state], tries)
            families += [deliveries, attempts]
        async with self._lock:  # one scrape at a time owns the snapshot
            self.snapshot.families = families
            return generate_latest(self.registry)


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this server (text exposition format)."""
    app = request.app
    if not app.state.settings.metrics_public:
        await require_token(request)
    body = await app.state.metrics.scrape(app.state.manager, getattr(app.state, "webhooks", None))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI) -> FastAPI:
    """Serve /metrics and follow the manager's events for the app's lifetime (idempotent);
    returns the app."""
    if getattr(app.state, "metrics", None) is not None:
        return app
    from training_server_tasks import _watched  # the task manager's watched loops

    app.state.metrics = Metrics()
    app.include_router(router)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            manager: TaskManager = app.state.manager
            loop = asyncio.create_task(
                _watched("metrics", lambda: app.state.metrics.follow(manager)), name="metrics"
            )
            manager._loops.append(loop)  # shown by /health
            try:
                yield
            finally:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop

    app.router.lifespan_context = lifespan
    return app
