"""Pydantic models, settings and enums shared by the server's modules (no logic here)."""

from __future__ import annotations

import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from training_server_trainer import (
    CHECKPOINT_EVERY_MIN,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_EVAL_STEP,
    DEFAULT_HOLD_OUT,
    DEFAULT_ITERATIONS,
    DEFAULT_MAX_IMAGE_SIZE,
    DEFAULT_RECHECK_AFTER,
    DOWN_SAMPLE_FACTORS,
    IMAGE_SIZE_MAX,
    IMAGE_SIZE_MIN,
    ITERATIONS_MAX,
    ITERATIONS_MIN,
    PRESETS,
)

HERE = Path(__file__).resolve().parent
GIB = 1024**3
MIB = 1024**2

VERSION = "0.1.0"
# Timestamps on the wire as datetime.isoformat() writes them ("+00:00", not pydantic's "Z"):
# the original server's clients parse them with datetime.fromisoformat(), which reads "Z"
# only from Python 3.11 on.
Timestamp = Annotated[
    datetime, PlainSerializer(datetime.isoformat, return_type=str, when_used="json")
]

# Bounds shared by the upload form, the train endpoint and the page.
FRAMES_MIN, FRAMES_MAX = 3, 2000
TRAINING_PRESETS = PRESETS


class TaskStatus(StrEnum):
    """Where a task is in its life; the wire values are the seed's, plus `cancelled`."""

    PENDING = "pending"  # accepted, waiting for a preprocessing slot
    PREPROCESSING = "preprocessing"  # run_pipeline.py is running
    PREPROCESSING_COMPLETED = "preprocessing_completed"  # dataset ready; resting or queued for GPU
    TRAINING = "training"  # the trainer is running
    TRAINING_COMPLETED = "training_completed"  # results ready
    FAILED = "failed"  # a stage failed or timed out; error_message says why
    CANCELLED = "cancelled"  # a user cancelled it


class Stage(StrEnum):
    """A pipeline stage, each run as one subprocess."""

    PREPROCESSING = "preprocessing"  # video -> frames -> SfM -> undistorted COLMAP dataset
    TRAINING = "training"  # gaussian-splatting-lightning main.py fit


class EndReason(StrEnum):
    """Why the last stage run of a task ended."""

    SUCCEEDED = "succeeded"  # exit code 0 and outputs present
    FAILED = "failed"  # non-zero exit code or missing outputs
    TIMED_OUT = "timed_out"  # ran past its stage timeout and was killed
    CANCELLED = "cancelled"  # a user asked for it to stop
    INTERRUPTED = "interrupted"  # the server stopped or died while it ran; it runs again


class ServerConfig(BaseSettings):
    """Server settings, read from TRAINING_SERVER_* environment variables and an optional .env."""

    model_config = SettingsConfigDict(
        env_prefix="TRAINING_SERVER_", env_file=".env", extra="ignore", frozen=True
    )

    @model_validator(mode="after")
    def _resolve_paths(self) -> ServerConfig:
        base = self.base_dir.expanduser().resolve()
        object.__setattr__(self, "base_dir", base)
        for name in ("temp_dir", "logs_dir", "db_path", "trainer_install_dir"):
            path = getattr(self, name).expanduser()
            object.__setattr__(self, name, path if path.is_absolute() else base / path)
        return self

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    # Relative temp_dir, logs_dir and db_path are resolved against base_dir (the project
    # folder by default), so the working directory the server starts from does not matter.
    base_dir: Path = HERE
    temp_dir: Path = Path("temp_workspace")
    logs_dir: Path = Path("logs")
    db_path: Path = Path("training_server.db")
    # Task folders that no database row knows, found when the database is new: refuse to
    # start (default), move them to temp_dir/quarantine/, or delete them.
    orphan_folders: Literal["refuse", "quarantine", "discard"] = "refuse"
    preprocess_timeout: float = Field(1800, gt=0, description="seconds")
    training_timeout: float = Field(18000, gt=0, description="seconds")
    cleanup_ttl: float = Field(43200, gt=0, description="seconds after a task ends")
    cleanup_interval: float = Field(3600, gt=0, description="seconds between cleanup sweeps")

    api_token: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list)

    max_upload_bytes: int = Field(4 * GIB, gt=0)
    min_free_bytes: int = Field(1 * GIB, ge=0, description="free disk kept after an upload")
    # Uploads held at once (503 + Retry-After beyond), and how long one may send nothing.
    max_concurrent_uploads: int = Field(8, ge=1, le=1024)
    upload_idle_timeout: float = Field(60, gt=0, description="seconds without a byte")
    # Resumable (tus) uploads not finished this long after their last byte are removed, and
    # Idempotency-Key answers are replayed for this long.
    resumable_upload_expiry: float = Field(86400, gt=0, description="seconds after last byte")
    idempotency_ttl: float = Field(86400, gt=0, description="seconds a key is remembered")
    # The request line and headers: at most this many bytes, within this many seconds.
    max_header_bytes: int = Field(64 * 1024, ge=4096, le=16 * MIB)
    header_timeout: float = Field(15, gt=0, description="seconds to send the headers")
    preprocess_slots: int = Field(1, ge=1, le=64)
    training_slots: int = Field(1, ge=1, le=16)
    # Where stages run: "local" (process groups here, the slot counts above) or "ray" (Ray
    # Jobs on the cluster at ray_address, as many at once as its free resources allow).
    executor: Literal["local", "ray"] = "local"
    ray_address: str = "http://127.0.0.1:8265"  # the cluster's Jobs (dashboard) address
    ray_training_gpus: float = Field(1, ge=0, description="GPUs one training asks Ray for")
    ray_training_cpus: float = Field(0, ge=0, description="CPUs one training asks Ray for")
    ray_preprocess_cpus: float = Field(2, ge=0, description="CPUs one preprocessing asks for")
    ray_max_attempts: int = Field(3, ge=1, le=100, description="runs of a stage lost to Ray")
    # Names of the server's environment variables handed to every Ray job (the nodes' own
    # environment is used otherwise), e.g. ["WANDB_API_KEY"].
    ray_pass_env: list[str] = Field(default_factory=list)
    kill_grace: float = Field(10, ge=0, description="seconds between SIGTERM and SIGKILL")
    log_max_bytes: int = Field(20 * MIB, ge=64 * 1024, description="per task log")
    probe_timeout: float = Field(60, gt=0)

    preprocess_command: list[str] = Field(
        default_factory=lambda: [sys.executable, str(HERE / "run_pipeline.py")]
    )
    preprocess_extra_args: list[str] = Field(default_factory=list)
    default_max_frames: int = Field(100, ge=FRAMES_MIN, le=FRAMES_MAX)
    default_min_frames: int = Field(20, ge=FRAMES_MIN, le=FRAMES_MAX)

    trainer_path: Path | None = None
    trainer_python: str = sys.executable
    # Where ./serve.sh installs the trainer on GPU machines (its status file tells /health
    # which install step failed).
    trainer_install_dir: Path = Path("third_party")
    trainer_config: Path | None = None
    trainer_iterations: int = Field(DEFAULT_ITERATIONS, ge=ITERATIONS_MIN, le=ITERATIONS_MAX)
    trainer_extra_args: list[str] = Field(default_factory=list)
    trainer_require_cuda: bool = True
    trainer_check_timeout: float = Field(120, gt=0)
    trainer_recheck_after: float = Field(
        DEFAULT_RECHECK_AFTER, ge=0, description="seconds before a training re-checks the trainer"
    )
    trainer_checkpoint_every: int = Field(
        DEFAULT_CHECKPOINT_EVERY, ge=CHECKPOINT_EVERY_MIN, description="steps between snapshots"
    )
    trainer_max_image_size: int = Field(
        DEFAULT_MAX_IMAGE_SIZE, ge=IMAGE_SIZE_MIN, le=IMAGE_SIZE_MAX, description="pixels"
    )
    trainer_hold_out: bool = DEFAULT_HOLD_OUT
    trainer_eval_step: int = Field(DEFAULT_EVAL_STEP, ge=2, le=1000)

    # Signed webhooks (training_server_webhooks): URLs every task event goes to; the secret
    # they are signed with (Standard Webhooks: "whsec_" + base64, or any other string used
    # as the key's bytes); hosts a per-task webhook_url may name (and the only ones that may
    # be link-local or metadata addresses); attempts, backoff and timeout of a delivery.
    webhook_urls: list[str] = Field(default_factory=list)
    webhook_secret: SecretStr | None = None
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    webhook_max_attempts: int = Field(8, ge=1, le=100)
    webhook_retry_base: float = Field(5, gt=0, description="seconds before the first retry")
    webhook_retry_max: float = Field(3600, gt=0, description="longest pause between attempts")
    webhook_timeout: float = Field(10, gt=0, description="seconds per delivery attempt")
    # GET /metrics without the API token (for a Prometheus that cannot send one).
    metrics_public: bool = False


class TrainingOptions(BaseModel):
    """Per-task options for the training stage."""

    model_config = ConfigDict(extra="forbid")

    iterations: int | None = Field(None, ge=ITERATIONS_MIN, le=ITERATIONS_MAX)
    preset: Literal["fast", "full"] | None = None
    # None: the factor that brings the longest side to max_image_size (or the server's).
    down_sample_factor: int | None = None
    max_image_size: int | None = Field(None, ge=IMAGE_SIZE_MIN, le=IMAGE_SIZE_MAX)
    hold_out: bool | None = None  # None: the server's trainer_hold_out
    keep_checkpoint: bool = False
    spz_sh_degree: int | None = Field(None, ge=0, le=3)  # None: all the model's SH bands

    @model_validator(mode="after")
    def _one_of_iterations_or_preset(self) -> TrainingOptions:
        if self.iterations is not None and self.preset is not None:
            raise ValueError("give either iterations or preset, not both")
        if self.down_sample_factor is not None and self.max_image_size is not None:
            raise ValueError("give either down_sample_factor or max_image_size, not both")
        if self.down_sample_factor not in (None, *DOWN_SAMPLE_FACTORS):
            raise ValueError("down_sample_factor must be 1, 2, 4 or 8")
        return self


class UploadParams(TrainingOptions):
    """Query or form fields of POST /upload (the seed's names included)."""

    max_frames: int | None = Field(None, ge=FRAMES_MIN, le=FRAMES_MAX)
    min_frames: int | None = Field(None, ge=FRAMES_MIN, le=FRAMES_MAX)
    auto_training: bool = True
    # Where this task's events are sent as well (its host must be in webhook_allowed_hosts).
    webhook_url: str | None = Field(None, max_length=2048)

    @model_validator(mode="after")
    def _frames_in_order(self) -> UploadParams:
        if (
            self.max_frames is not None
            and self.min_frames is not None
            and self.min_frames > self.max_frames
        ):
            raise ValueError("min_frames must not be larger than max_frames")
        return self


class TaskParams(BaseModel):
    """The resolved parameters a task runs with."""

    max_frames: int
    min_frames: int
    auto_training: bool
    iterations: int
    down_sample_factor: int | None = None  # None: chosen from max_image_size
    max_image_size: int | None = None  # None: the server's trainer_max_image_size
    hold_out: bool | None = None  # None: the server's trainer_hold_out
    keep_checkpoint: bool = False
    spz_sh_degree: int | None = None  # SH degree of model.spz; None: all the .ply has
    webhook_url: str | None = None  # this task's own webhook receiver, if any


class Progress(BaseModel):
    """What the running (or last) stage reported about its own advance."""

    stage: Stage
    step: str | None = None  # sub-stage, e.g. "features"
    label: str | None = None  # readable sub-stage name
    current: int | None = None
    total: int | None = None
    percent: float | None = None  # of the whole stage, 0..100
    rate: float | None = None  # items (training: iterations) per second
    eta_seconds: float | None = None
    loss: float | None = None
    psnr: float | None = None
    updated_at: Timestamp | None = None


class TaskResults(BaseModel):
    """Which results of a task can be downloaded now."""

    dataset: bool = False  # the COLMAP dataset (GET /download/{id} before training ends)
    model: bool = False  # the trained model (GET /download/{id}, /download/{id}/ply)


class WebhookDelivery(BaseModel):
    """One webhook delivery of a task's event and how its attempts went."""

    id: str  # the webhook-id header: the same on every attempt
    event: str  # task.preprocessing_completed, task.succeeded, task.failed, task.cancelled
    url: str  # scheme, host and path (a query, which may hold a secret, is not shown)
    state: Literal["pending", "delivered", "failed"]  # failed: gave up at the bound
    attempts: int
    last_attempt_at: Timestamp | None = None
    last_status: int | None = None  # the receiver's HTTP status code
    last_error: str | None = None
    next_attempt_at: Timestamp | None = None


class TaskPublic(BaseModel):
    """A task as the API shows it; the seed's status fields come first."""

    task_id: str
    status: TaskStatus
    message: str | None
    created_at: Timestamp
    updated_at: Timestamp
    error_message: str | None
    metadata: dict[str, Any] | None
    progress: Progress | None = None
    queue_position: int | None = None
    queued_for: Stage | None = None
    params: TaskParams
    original_filename: str | None = None
    video_size: int | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    end_reason: EndReason | None = None
    attempts: int = 0
    expired: bool = False
    # What the task allows now, from the server's one transition table (the page shows its
    # buttons from these, never from its own copy of the rules).
    allowed_actions: list[Literal["cancel", "retry", "train", "delete"]] = []
    results: TaskResults = Field(default_factory=lambda: TaskResults())
    active: bool = False  # it runs or waits in a queue: its log may still grow
    node: str | None = None  # Ray executor: the node its stage runs on ("host (ip, node id)")
    webhooks: list[WebhookDelivery] | None = None  # None: no webhooks configured


class TaskList(BaseModel):
    """One page of tasks, newest first: `tasks` holds their ids (as the original server
    answered, so its clients keep iterating ids), `items` the task objects."""

    tasks: list[str]
    items: list[TaskPublic]
    total: int
    limit: int
    offset: int


class UploadResponse(BaseModel):
    """The seed's upload answer plus where to follow the task."""

    task_id: str
    message: str
    status: TaskStatus
    auto_training: bool
    training_available: bool
    training_unavailable_reason: str | None = None
    status_url: str


class ActionResponse(BaseModel):
    """Answer to cancel, retry, train and delete."""

    task_id: str
    status: TaskStatus | None
    message: str


class CommandHealth(BaseModel):
    """Whether a stage's command can run here."""

    available: bool
    detail: str


class Health(BaseModel):
    """GET /health."""

    status: Literal["ok", "degraded"] = "ok"  # degraded: see `problems`
    problems: list[str] = []  # what keeps the server from taking work, in words
    loops: dict[str, bool] = {}  # the named background loops and whether each runs
    version: str
    queued: dict[Stage, int]
    running: dict[Stage, list[str]]
    slots: dict[Stage, int]
    disk_free_bytes: int
    disk_total_bytes: int
    preprocessing: CommandHealth
    training: CommandHealth
    auth_required: bool
    # With the Ray executor: address, reachable, ray_version, nodes (id, ip, hostname, alive,
    # GPUs and CPUs total and free), gpus_total, gpus_free, problem; None with the local one.
    cluster: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    """Every error answer has this shape."""

    detail: str
    errors: list[dict[str, Any]] | None = None


class ApiError(Exception):
    """An error answered with `status_code` and a JSON body `{"detail": ...}`."""

    status_code = 400

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class BadRequestError(ApiError):
    """The request is malformed (400)."""

    status_code = 400


class UnauthorizedError(ApiError):
    """A token is required and was missing or wrong (401)."""

    status_code = 401


class NotFoundError(ApiError):
    """No such task (404)."""

    status_code = 404


class ConflictError(ApiError):
    """The task's state does not allow the action (409)."""

    status_code = 409


class GoneError(ApiError):
    """The task's files were removed by the cleanup (410)."""

    status_code = 410


class PayloadTooLargeError(ApiError):
    """The upload is larger than allowed (413)."""

    status_code = 413


class UnsupportedMediaError(ApiError):
    """The upload is not a usable video, or not multipart (415)."""

    status_code = 415


class UnprocessableError(ApiError):
    """Parameters are out of range or of the wrong type (422)."""

    status_code = 422


class ServiceUnavailableError(ApiError):
    """The server cannot do this now, e.g. training is not configured (503)."""

    status_code = 503


class InsufficientStorageError(ApiError):
    """Not enough free disk (507)."""

    status_code = 507
