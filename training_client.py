"""A command-line client of the training server, for people and scripts.

    python -m training_client submit video.mp4 --preset fast --wait --download out/
    python -m training_client status ID | list [--status S] | logs ID [--follow]
    python -m training_client cancel|retry|train|delete ID | download ID | health

The server comes from `--server` or `TRAINING_SERVER_URL` (default http://localhost:8000), the
token from `--token` or `TRAINING_SERVER_API_TOKEN`. `--json` prints machine-readable output on
stdout; progress bars and messages go to stderr.

Exit codes: 0 done; 1 the task failed or was cancelled (its error_message is printed);
2 usage error; 3 the server is unreachable or refused the request (its `detail` is printed);
4 the token is missing or refused.

It talks to the server over HTTP only (httpx) and imports nothing of the server. Every request
goes through `Api`, which calls only the (method, path template) pairs in `ROUTES`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import IO, Any, NoReturn, Protocol

import click
import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4

DEFAULT_SERVER = "http://localhost:8000"
META_KEY = "training_client.context"
# Every (method, path template) the client calls; `Api` refuses any other.
ROUTES: frozenset[tuple[str, str]] = frozenset(
    {
        ("POST", "/upload"),
        ("POST", "/uploads/"),
        ("HEAD", "/uploads/{upload_id}"),
        ("PATCH", "/uploads/{upload_id}"),
        ("GET", "/status/{task_id}"),
        ("GET", "/tasks"),
        ("POST", "/tasks/{task_id}/cancel"),
        ("POST", "/tasks/{task_id}/retry"),
        ("POST", "/tasks/{task_id}/train"),
        ("DELETE", "/tasks/{task_id}"),
        ("GET", "/logs/{task_id}"),
        ("GET", "/logs/{task_id}/stream"),
        ("GET", "/events"),
        ("GET", "/health"),
        ("GET", "/download/{task_id}"),
        ("GET", "/download/{task_id}/ply"),
        ("GET", "/download/{task_id}/spz"),
    }
)
DOWNLOAD_ROUTES = {
    "zip": "/download/{task_id}",
    "ply": "/download/{task_id}/ply",
    "spz": "/download/{task_id}/spz",
}
STATUSES = (
    "pending",
    "preprocessing",
    "preprocessing_completed",
    "training",
    "training_completed",
    "failed",
    "cancelled",
)
ENDED_BADLY = {"failed", "cancelled"}
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".heic", ".heif", ".webp", ".tif", ".tiff", ".bmp"}
CHUNK = 256 * 1024
POLL_SECONDS = 1.0
STREAM_READ_TIMEOUT = 40.0  # the server pings every 15 s: silence this long means it dropped
UNREACHABLE_PATIENCE = 60.0  # seconds --wait keeps polling a server that went away

stderr = Console(stderr=True, highlight=False)


class ClientError(Exception):
    """A failure that ends the command with `exit_code` after printing `message`."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class ServerUnreachable(ClientError):
    """No answer: connection refused, DNS, timeout, a stream cut short."""


class ServerRefused(ClientError):
    """The server answered with an error status (its `detail` is the message)."""


class AuthFailed(ClientError):
    """401/403: the token is missing or wrong."""

    exit_code = EXIT_AUTH


class TaskEndedBadly(ClientError):
    """A task the command waited on failed or was cancelled."""

    exit_code = EXIT_TASK_FAILED


def _detail(response: httpx.Response) -> str:
    """The error answer's `detail` (the server's error shape), else its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    return json.dumps(body)[:500]


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    if response.is_stream_consumed is False:
        response.read()
    message = f"{response.status_code} {response.reason_phrase}: {_detail(response)}"
    if response.status_code in (401, 403):
        raise AuthFailed(message, response.status_code)
    raise ServerRefused(message, response.status_code)


class Api:
    """The server's HTTP API: every call names its route template from `ROUTES`."""

    def __init__(self, server: str, token: str | None, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def _url(self, method: str, template: str, task_id: str | None) -> str:
        if (method, template) not in ROUTES:
            raise AssertionError(f"{method} {template} is not one of the client's routes")
        for name in ("{task_id}", "{upload_id}"):
            if name in template:
                if task_id is None:
                    raise AssertionError(f"{template} needs an id")
                return template.replace(name, httpx.URL(task_id).raw_path.decode())
        return template

    def request(
        self, method: str, template: str, task_id: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One request; errors become `ClientError`s with the server's detail."""
        url = self._url(method, template, task_id)
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"Cannot reach {self.server}: {exc}") from None
        _raise_for(response)
        return response

    @contextmanager
    def stream(
        self, method: str, template: str, task_id: str | None = None, **kwargs: Any
    ) -> Iterator[httpx.Response]:
        """A streamed response (downloads, Server-Sent Events), closed on exit."""
        url = self._url(method, template, task_id)
        try:
            with self.http.stream(method, url, **kwargs) as response:
                _raise_for(response)
                yield response
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"Cannot reach {self.server}: {exc}") from None

    def json(self, method: str, template: str, task_id: str | None = None, **kw: Any) -> Any:
        """A request whose answer is JSON."""
        return self.request(method, template, task_id, **kw).json()

    def status(self, task_id: str) -> dict[str, Any]:
        """GET /status/{id}: the task object."""
        return self.json("GET", "/status/{task_id}", task_id)


# --- uploads -------------------------------------------------------------------------------


class ProgressFile:
    """A binary file that reports its read position after each read (httpx streams the
    multipart body from it, so the position is the bytes sent)."""

    def __init__(self, f: IO[bytes], on_progress: Callable[[int], None]) -> None:
        self._f = f
        self._on_progress = on_progress

    def read(self, size: int = -1) -> bytes:
        """Read and report the new position."""
        data = self._f.read(size)
        self._on_progress(self._f.tell())
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        """Seek (httpx rewinds before sending)."""
        position = self._f.seek(offset, whence)
        self._on_progress(position)
        return position

    def tell(self) -> int:
        """The position."""
        return self._f.tell()

    def fileno(self) -> int:
        """The descriptor (httpx takes the Content-Length from its size)."""
        return self._f.fileno()


class Uploader(Protocol):
    """One way of sending a video to the server; answers the new task (`task_id`, …).
    `POST /upload` today; a resumable tus uploader (`/uploads/`) can implement the same."""

    def upload(
        self, path: Path, params: dict[str, str], on_progress: Callable[[int], None]
    ) -> dict[str, Any]: ...


class MultipartUploader:
    """`POST /upload`: one multipart request (field `file`), streamed from the file;
    the parameters go in the query so the server can refuse them before the body is sent."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def upload(
        self, path: Path, params: dict[str, str], on_progress: Callable[[int], None]
    ) -> dict[str, Any]:
        """Send the file; the server's 202 answer."""
        return self.upload_capture([path], params, on_progress)

    def upload_capture(
        self, paths: list[Path], params: dict[str, str], on_progress: Callable[[int], None]
    ) -> dict[str, Any]:
        """Send several files (photos, ZIPs of photos, videos of one scene) in one request,
        one `file` part each: the server makes one task, one capture, of them."""
        sent = [0] * len(paths)

        def progress(index: int) -> Callable[[int], None]:
            def update(position: int) -> None:
                sent[index] = position
                on_progress(sum(sent))

            return update

        with ExitStack() as stack:
            files = [
                (
                    "file",
                    (
                        path.name,
                        ProgressFile(stack.enter_context(path.open("rb")), progress(k)),
                        "application/octet-stream",
                    ),
                )
                for k, path in enumerate(paths)
            ]
            return self.api.json("POST", "/upload", params=params, files=files, timeout=None)


TUS_HEADERS = {"Tus-Resumable": "1.0.0"}
TUS_CHUNK = 1024 * 1024


class TusUploader:
    """`/uploads/` (tus 1.0), resumable: the upload's id is kept in `state_dir` under a key of
    the server, the file (path, size, mtime) and the parameters, so a dropped connection is
    resumed from the server's offset (HEAD) up to `retries` times, and running the same
    command again after Ctrl-C or a crash goes on where the server's copy stopped."""

    def __init__(self, api: Api, state_dir: Path, retries: int = 5) -> None:
        self.api = api
        self.state_dir = state_dir
        self.retries = retries

    def _state_file(self, path: Path, params: dict[str, str]) -> Path:
        info = path.stat()
        key = "|".join(
            [self.api.server, str(path.resolve()), str(info.st_size), str(info.st_mtime_ns)]
            + [f"{k}={v}" for k, v in sorted(params.items())]
        )
        return self.state_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".id")

    def _create(self, path: Path, size: int, params: dict[str, str]) -> str:
        pairs = {"filename": path.name, **params}
        metadata = ",".join(
            f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items()
        )
        headers = {**TUS_HEADERS, "Upload-Length": str(size), "Upload-Metadata": metadata}
        answer = self.api.request("POST", "/uploads/", headers=headers)
        return answer.headers["Location"].rstrip("/").rsplit("/", 1)[-1]

    def _offset(self, upload_id: str) -> int | None:
        try:
            answer = self.api.request(
                "HEAD", "/uploads/{upload_id}", upload_id, headers=TUS_HEADERS
            )
        except ServerRefused as exc:
            if exc.http_status in (404, 410):
                return None  # expired or finished long ago: start again
            raise
        return int(answer.headers["Upload-Offset"])

    def _send(
        self, upload_id: str, path: Path, offset: int, size: int, on_progress: Callable[[int], None]
    ) -> httpx.Response:
        def body() -> Iterator[bytes]:
            sent = offset
            with path.open("rb") as f:
                f.seek(offset)
                while chunk := f.read(TUS_CHUNK):
                    yield chunk
                    sent += len(chunk)
                    on_progress(sent)

        headers = {
            **TUS_HEADERS,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(size - offset),
        }
        return self.api.request(
            "PATCH",
            "/uploads/{upload_id}",
            upload_id,
            content=body(),
            headers=headers,
            timeout=None,
        )

    def upload(
        self, path: Path, params: dict[str, str], on_progress: Callable[[int], None]
    ) -> dict[str, Any]:
        """Send (or go on sending) the file; the new task's status, as /status gives it."""
        size = path.stat().st_size
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = self._state_file(path, params)
        upload_id = state.read_text().strip() if state.is_file() else None
        for attempt in range(self.retries + 1):
            try:
                offset = self._offset(upload_id) if upload_id else None
                if upload_id is None or offset is None:
                    upload_id = self._create(path, size, params)
                    state.write_text(upload_id)
                    offset = 0
                on_progress(offset)
                answer = self._send(upload_id, path, offset, size, on_progress)
                break
            except ServerUnreachable:
                if attempt == self.retries:
                    raise
                time.sleep(min(2**attempt, 10))
        state.unlink(missing_ok=True)
        task = self.api.status(answer.headers["Upload-Task-Id"])
        return {**task, "auto_training": task["params"]["auto_training"]}


def upload_params(
    preset: str | None,
    iterations: int | None,
    max_frames: int | None,
    no_train: bool,
) -> dict[str, str]:
    """The upload's parameters as the server names them."""
    params = {"start_training": "false" if no_train else "true"}
    if preset:
        params["preset"] = preset
    if iterations is not None:
        params["iterations"] = str(iterations)
    if max_frames is not None:
        params["max_frames"] = str(max_frames)
    return params


def _with_bar(
    label: str, size: int, quiet: bool, send: Callable[[Callable[[int], None]], Any]
) -> Any:
    """Run `send(on_progress)` under a bytes / speed / ETA bar on stderr."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, disable=quiet, transient=False) as progress:
        bar = progress.add_task(label, total=size)
        answer = send(lambda sent: progress.update(bar, completed=sent))
        progress.update(bar, completed=size)
    return answer


def capture_with_bar(
    uploader: MultipartUploader, paths: list[Path], params: dict[str, str], quiet: bool
) -> Any:
    """Upload several files as one capture with one bar for all their bytes."""
    size = sum(p.stat().st_size for p in paths)
    send = partial(uploader.upload_capture, paths, params)
    return _with_bar(f"upload {len(paths)} files", size, quiet, send)


def upload_with_bar(uploader: Uploader, path: Path, params: dict[str, str], quiet: bool) -> Any:
    """Upload one file with a bytes / speed / ETA bar on stderr."""
    send = partial(uploader.upload, path, params)
    return _with_bar(f"upload {path.name}", path.stat().st_size, quiet, send)


# --- following tasks -----------------------------------------------------------------------


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from a Server-Sent Events stream's lines."""
    event, data = "message", []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def finished(task: dict[str, Any]) -> bool:
    """Whether the task neither runs nor waits in a queue any more."""
    if "active" in task:
        return not task["active"]
    return task.get("status") in {"training_completed", *ENDED_BADLY}


class Follower:
    """Follows tasks to their end: the event stream (`GET /events`), with `/status` polling
    when the stream cannot be had or drops; a server that goes away (a restart) is polled
    for up to `UNREACHABLE_PATIENCE` seconds before the wait gives up (exit 3)."""

    def __init__(self, api: Api, on_update: Callable[[dict[str, Any]], None]) -> None:
        self.api = api
        self.on_update = on_update
        self.tasks: dict[str, dict[str, Any]] = {}

    def _seen(self, task: dict[str, Any]) -> None:
        self.tasks[task["task_id"]] = task
        self.on_update(task)

    def _pending(self, ids: Iterable[str]) -> list[str]:
        return [i for i in ids if i not in self.tasks or not finished(self.tasks[i])]

    def follow(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Block until every task in `ids` has ended; their last task objects."""
        # No stream, or it dropped: poll (a real error shows there again).
        with suppress(ServerUnreachable, ServerRefused):
            self._stream(ids)
        last_answer = time.monotonic()
        while waiting := self._pending(ids):
            try:
                for task_id in waiting:
                    self._seen(self.api.status(task_id))
                last_answer = time.monotonic()
            except ServerUnreachable:  # a restart: the task is re-queued there, so wait
                if time.monotonic() - last_answer > UNREACHABLE_PATIENCE:
                    raise
            if self._pending(ids):
                time.sleep(POLL_SECONDS)
        return {i: self.tasks[i] for i in ids}

    def _stream(self, ids: list[str]) -> None:
        timeout = httpx.Timeout(30.0, read=STREAM_READ_TIMEOUT)
        with self.api.stream("GET", "/events", timeout=timeout) as response:
            for event, data in sse_events(response.iter_lines()):
                if event == "hello":  # subscribed: what happened before is in /status
                    for task_id in ids:
                        self._seen(self.api.status(task_id))
                elif event == "task":
                    task = json.loads(data).get("task") or {}
                    if task.get("task_id") in ids:
                        self._seen(task)
                elif event == "deleted":
                    gone = json.loads(data).get("task_id")
                    if gone in ids:
                        raise ServerRefused(f"Task {gone} was deleted while waiting.", 404)
                if not self._pending(ids):
                    return


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_info(progress: dict[str, Any]) -> str:
    """The stage's step, step/total, ETA and (training) loss / PSNR as one line."""
    parts = []
    if progress.get("label") or progress.get("step"):
        parts.append(str(progress.get("label") or progress.get("step")))
    if progress.get("current") is not None and progress.get("total"):
        parts.append(f"{progress['current']}/{progress['total']}")
    if progress.get("eta_seconds") is not None:
        parts.append(f"ETA {_duration(progress['eta_seconds'])}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("psnr") is not None:
        parts.append(f"PSNR {progress['psnr']:.2f}")
    return "  ".join(parts)


class StageBars:
    """A rich progress bar per task and stage: the bar is the stage's percent (or, in
    training, iterations done of the total), with step/total, ETA and loss/PSNR beside it."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bars: dict[tuple[str, str], TaskID] = {}

    def update(self, task: dict[str, Any]) -> None:
        """Show the task's latest state."""
        task_id, status = task["task_id"], task.get("status", "")
        progress = task.get("progress") or {}
        stage = progress.get("stage") or (
            "training" if status.startswith("training") else "preprocessing"
        )
        key = (task_id, stage)
        label = f"{task_id[:8]} {stage}"
        if key not in self.bars:
            for (other_id, _), bar in self.bars.items():
                if other_id == task_id:
                    self.progress.update(bar, completed=self.progress.tasks[bar].total)
            self.bars[key] = self.progress.add_task(label, total=100, info=status)
        bar = self.bars[key]
        current, total = progress.get("current"), progress.get("total")
        if stage == "training" and isinstance(current, int) and isinstance(total, int) and total:
            self.progress.update(bar, total=total, completed=current)
        elif progress.get("percent") is not None:
            self.progress.update(bar, total=100, completed=progress["percent"])
        if status in ("preprocessing_completed", "training_completed") and stage in status:
            self.progress.update(bar, completed=self.progress.tasks[bar].total)
        info = progress_info(progress) if progress.get("stage") == stage else ""
        self.progress.update(bar, description=f"{label} [{status}]", info=info)


def stage_progress(quiet: bool) -> Progress:
    """The Progress display the stage bars live in (stderr)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[info]}"),
        console=stderr,
        disable=quiet,
    )


# --- downloads -----------------------------------------------------------------------------


def _filename(response: httpx.Response, fallback: str) -> str:
    header = response.headers.get("content-disposition", "")
    match = re.search(r"filename\*=UTF-8''([^;]+)", header) or re.search(
        r'filename="?([^";]+)"?', header
    )
    name = httpx.URL("/" + match.group(1)).path.lstrip("/") if match else fallback
    return Path(name).name or fallback


def download(api: Api, task_id: str, fmt: str, directory: Path, quiet: bool) -> Path:
    """Download a task's result (`zip`, `ply` or `spz`) into `directory`, with a bar."""
    directory.mkdir(parents=True, exist_ok=True)
    fallback = f"{task_id}.{fmt}"
    with api.stream("GET", DOWNLOAD_ROUTES[fmt], task_id, timeout=None) as response:
        target = directory / _filename(response, fallback)
        size = int(response.headers.get("content-length", 0)) or None
        partial = target.with_name(target.name + ".part")
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
        )
        with Progress(*columns, console=stderr, disable=quiet) as progress:
            bar = progress.add_task(f"download {target.name}", total=size)
            with partial.open("wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    progress.advance(bar, len(chunk))
    partial.replace(target)
    return target


# --- the command line ----------------------------------------------------------------------


class Context:
    """What every command needs: the API, and whether to print JSON."""

    def __init__(self, server: str, token: str | None, as_json: bool) -> None:
        self.api = Api(server, token)
        self.as_json = as_json

    def emit(self, value: Any, text: str | None = None) -> None:
        """JSON on stdout with --json, else the text (if any)."""
        if self.as_json:
            click.echo(json.dumps(value, indent=2))
        elif text is not None:
            click.echo(text)

    def emit_line(self, value: dict[str, Any], text: str | None = None) -> None:
        """One JSON object per line with --json (log streams), else the text (if any)."""
        if self.as_json:
            click.echo(json.dumps(value))
        elif text is not None:
            click.echo(text)


class Cli(click.Group):
    """Turns `ClientError`s into their message on stderr (and JSON with --json) and the
    documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            stderr.print(f"error: {exc.message}", markup=False)
            state = ctx.meta.get(META_KEY)
            if state is not None and state.as_json and not isinstance(exc, TaskEndedBadly):
                body = {"error": exc.message, "exit_code": exc.exit_code}
                click.echo(json.dumps({**body, "http_status": exc.http_status}))
            raise click.exceptions.Exit(exc.exit_code) from None


def _fail(message: str) -> NoReturn:
    raise click.UsageError(message)


def _setup(ctx: click.Context, server: str, token: str | None, as_json: bool) -> Context:
    state = Context(server, token or None, as_json)
    ctx.meta[META_KEY] = state  # shared with the group's context, which reports errors
    ctx.call_on_close(state.api.close)
    return state


def common(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command takes: --server, --token, --json."""
    options = [
        click.option(
            "--server",
            envvar="TRAINING_SERVER_URL",
            default=DEFAULT_SERVER,
            show_default=True,
            help="Server URL (env TRAINING_SERVER_URL).",
        ),
        click.option(
            "--token",
            envvar="TRAINING_SERVER_API_TOKEN",
            default=None,
            help="API token (env TRAINING_SERVER_API_TOKEN).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Client of the Gaussian Splatting training server.

    Exit codes: 0 done, 1 task failed or cancelled, 2 usage error, 3 server unreachable or
    refused the request, 4 token missing or refused."""


def _describe(task: dict[str, Any]) -> str:
    lines = [f"{task['task_id']}  {task.get('status')}"]
    if task.get("message"):
        lines.append(f"  message: {task['message']}")
    progress = task.get("progress") or {}
    if progress:
        percent = progress.get("percent")
        share = f" {percent:.1f}%" if isinstance(percent, int | float) else ""
        lines.append(f"  progress: {progress.get('stage')}{share}  {progress_info(progress)}")
    if task.get("queue_position"):
        lines.append(f"  queue: #{task['queue_position']} for {task.get('queued_for')}")
    if task.get("allowed_actions"):
        lines.append(f"  allowed: {', '.join(task['allowed_actions'])}")
    results = [name for name, ready in (task.get("results") or {}).items() if ready]
    if results:
        lines.append(f"  results: {', '.join(results)}")
    if task.get("error_message"):
        lines.append(f"  error: {task['error_message']}")
    return "\n".join(lines)


def _check_ended(tasks: Iterable[dict[str, Any]]) -> None:
    bad = [t for t in tasks if t.get("status") in ENDED_BADLY]
    if bad:
        reasons = "; ".join(
            f"task {t['task_id']} {t['status']}: {t.get('error_message') or 'no reason given'}"
            for t in bad
        )
        raise TaskEndedBadly(reasons)


@cli.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--preset", type=click.Choice(["fast", "full"]), help="Training preset.")
@click.option("--iterations", type=click.IntRange(min=1), help="Training iterations.")
@click.option("--max-frames", type=click.IntRange(min=1), help="Most frames kept.")
@click.option("--no-train", is_flag=True, help="Preprocess only (no training after).")
@click.option("--wait", is_flag=True, help="Follow the task(s) to the end.")
@click.option(
    "--one-capture",
    is_flag=True,
    help="Send all FILES as one task (e.g. orbits of one scene at two heights); photos and "
    "ZIPs of photos always go as one.",
)
@click.option(
    "--resumable",
    is_flag=True,
    help="Upload with tus (/uploads/): a dropped connection, or running the same command "
    "again, goes on where the server's copy stopped.",
)
@click.option(
    "--download",
    "download_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Download the result into DIR at the end (implies --wait).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["zip", "ply", "spz"]),
    default="zip",
    show_default=True,
    help="What --download fetches.",
)
@common
@click.pass_context
def submit(
    ctx: click.Context,
    files: tuple[Path, ...],
    preset: str | None,
    iterations: int | None,
    max_frames: int | None,
    no_train: bool,
    wait: bool,
    one_capture: bool,
    resumable: bool,
    download_dir: Path | None,
    fmt: str,
    server: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Upload videos (one task each), or photos / ZIPs of photos / --one-capture videos (one
    task for all FILES); optionally follow them and download the results."""
    stills = [f for f in files if f.suffix.lower() in PHOTO_SUFFIXES | {".zip"}]
    together = one_capture or bool(stills)
    if together and resumable:
        _fail(
            "--resumable sends one video per upload: photos, ZIPs and --one-capture go in one "
            "POST /upload (drop --resumable)"
        )
    if len(set(map(Path.resolve, files))) < len(files):
        _fail("the same file is given twice")
    if preset and iterations is not None:
        _fail("give --preset or --iterations, not both")
    if no_train and (preset or iterations is not None):
        _fail("--preset/--iterations are training options; they do not go with --no-train")
    if no_train and download_dir and fmt != "zip":
        _fail(f"--no-train makes a dataset, not a model: --format {fmt} needs training")
    state = _setup(ctx, server, token, as_json)
    params = upload_params(preset, iterations, max_frames, no_train)
    uploader: Uploader = (
        TusUploader(state.api, Path(click.get_app_dir("gs-training-client")) / "uploads")
        if resumable
        else MultipartUploader(state.api)
    )
    answers = []
    batches = [list(files)] if together else [[path] for path in files]
    for batch in batches:
        if together:  # not resumable (refused above): one multipart request
            answer = capture_with_bar(MultipartUploader(state.api), batch, params, as_json)
        else:
            answer = upload_with_bar(uploader, batch[0], params, quiet=as_json)
        answers.append(answer)
        if not as_json:
            names = ", ".join(p.name for p in batch)
            stderr.print(f"{answer['task_id']}  {answer.get('status')}  ({names})")
        if answer.get("auto_training") and not answer.get("training_available", True):
            reason = answer.get("training_unavailable_reason") or "training is not available"
            stderr.print(f"note: {reason}", markup=False)
    ids = [a["task_id"] for a in answers]
    if not (wait or download_dir):
        state.emit({"tasks": answers}, "\n".join(ids))
        return
    with stage_progress(quiet=as_json) as progress:
        ended = Follower(state.api, StageBars(progress).update).follow(ids)
    results = []
    for task_id in ids:
        task = dict(ended[task_id])
        if download_dir and task.get("status") not in ENDED_BADLY:
            if task.get("status") != "training_completed" and fmt != "zip":
                stderr.print(f"{task_id}: no model to download as {fmt}; it is {task['status']}")
            else:
                saved = download(state.api, task_id, fmt, download_dir, quiet=as_json)
                task["downloaded"] = str(saved)
        results.append(task)
    state.emit({"tasks": results}, "\n\n".join(_describe(t) for t in results))
    _check_ended(results)


@cli.command()
@click.argument("task_id")
@common
@click.pass_context
def status(ctx: click.Context, task_id: str, server: str, token: str | None, as_json: bool) -> None:
    """Show a task (exit 1 when it failed or was cancelled)."""
    state = _setup(ctx, server, token, as_json)
    task = state.api.status(task_id)
    state.emit(task, _describe(task))
    _check_ended([task])


@cli.command("list")
@click.option("--status", "statuses", multiple=True, type=click.Choice(STATUSES), help="Filter.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@common
@click.pass_context
def list_tasks(
    ctx: click.Context,
    statuses: tuple[str, ...],
    limit: int,
    offset: int,
    server: str,
    token: str | None,
    as_json: bool,
) -> None:
    """List tasks, newest first (--status may repeat)."""
    state = _setup(ctx, server, token, as_json)
    params: list[tuple[str, str | int]] = [("limit", limit), ("offset", offset)]
    params += [("status", s) for s in statuses]
    page = state.api.json("GET", "/tasks", params=params)
    rows = [
        f"{t['task_id']}  {t.get('status', ''):<24} {t.get('original_filename') or ''}"
        for t in page.get("items", [])
    ]
    rows.append(f"({len(page.get('items', []))} of {page.get('total')})")
    state.emit(page, "\n".join(rows))


@cli.command()
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Follow the log live until the task stops.")
@click.option("--lines", type=click.IntRange(min=1), help="Only the last N lines.")
@common
@click.pass_context
def logs(
    ctx: click.Context,
    task_id: str,
    follow: bool,
    lines: int | None,
    server: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Print a task's log (with --follow: live, then exit by the task's end status).
    With --json, each line is a JSON object {"line": …} and the end {"end": status}."""
    state = _setup(ctx, server, token, as_json)
    if not follow:
        params = {"lines": lines} if lines else None
        with state.api.stream("GET", "/logs/{task_id}", task_id, params=params) as response:
            for line in response.iter_lines():
                state.emit_line({"line": line}, line)
        return
    params = {"lines": lines if lines is not None else 100}
    timeout = httpx.Timeout(30.0, read=STREAM_READ_TIMEOUT)
    with state.api.stream(
        "GET", "/logs/{task_id}/stream", task_id, params=params, timeout=timeout
    ) as response:
        for event, data in sse_events(response.iter_lines()):
            if event == "log":
                state.emit_line({"line": data}, data)
            elif event == "end":
                state.emit_line({"end": data})
                if data in ENDED_BADLY or data == "deleted":
                    task = state.api.status(task_id) if data != "deleted" else {}
                    reason = task.get("error_message") or "no reason given"
                    raise TaskEndedBadly(f"task {task_id} {data}: {reason}")
                return
    raise ServerUnreachable("The log stream ended before the task did.")


def _action(name: str, method: str, template: str) -> click.Command:
    @click.argument("task_id")
    @common
    @click.pass_context
    def command(
        ctx: click.Context, task_id: str, server: str, token: str | None, as_json: bool, **kw: Any
    ) -> None:
        state = _setup(ctx, server, token, as_json)
        body = {k: v for k, v in kw.items() if v is not None} if name == "train" else None
        kwargs = {"json": body} if body else {}
        answer = state.api.json(method, template, task_id, **kwargs)
        state.emit(
            answer,
            f"{answer.get('task_id')}  {answer.get('status') or ''}  "
            f"{answer.get('message') or ''}".rstrip(),
        )

    command.__name__ = name
    command.__doc__ = {
        "cancel": "Stop the running stage or take the task out of its queue.",
        "retry": "Run a failed or cancelled task again from its unfinished stage.",
        "train": "Queue a preprocessed task for training (again).",
        "delete": "Cancel the task if it runs and remove its files and record.",
    }[name]
    if name == "train":
        command = click.option("--iterations", type=click.IntRange(min=1))(command)
        command = click.option("--preset", type=click.Choice(["fast", "full"]))(command)
    return cli.command(name)(command)


for _name, _method, _template in (
    ("cancel", "POST", "/tasks/{task_id}/cancel"),
    ("retry", "POST", "/tasks/{task_id}/retry"),
    ("train", "POST", "/tasks/{task_id}/train"),
    ("delete", "DELETE", "/tasks/{task_id}"),
):
    _action(_name, _method, _template)


@cli.command("download")
@click.argument("task_id")
@click.option(
    "--format", "fmt", type=click.Choice(["zip", "ply", "spz"]), default="zip", show_default=True
)
@click.option(
    "--output",
    "-o",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to save into.",
)
@common
@click.pass_context
def download_command(
    ctx: click.Context,
    task_id: str,
    fmt: str,
    directory: Path,
    server: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Download a task's result: zip (the model, or the dataset before training ends),
    ply or spz (the trained model)."""
    state = _setup(ctx, server, token, as_json)
    saved = download(state.api, task_id, fmt, directory, quiet=as_json)
    state.emit({"task_id": task_id, "path": str(saved), "bytes": saved.stat().st_size}, str(saved))


@cli.command()
@common
@click.pass_context
def health(ctx: click.Context, server: str, token: str | None, as_json: bool) -> None:
    """The server's version, queues, disk and whether each stage can run."""
    state = _setup(ctx, server, token, as_json)
    body = state.api.json("GET", "/health")
    lines = [f"{state.api.server}: {body.get('status')} (version {body.get('version')})"]
    lines += [f"  problem: {p}" for p in body.get("problems") or []]
    for stage in ("preprocessing", "training"):
        info = body.get(stage) or {}
        available = "available" if info.get("available") else "not available"
        lines.append(f"  {stage}: {available}  {info.get('detail') or ''}".rstrip())
    lines.append(f"  queued: {body.get('queued')}  running: {body.get('running')}")
    if body.get("disk_free_bytes") is not None:
        lines.append(f"  disk free: {body['disk_free_bytes'] / 2**30:.1f} GiB")
    state.emit(body, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit code (Ctrl-C: 130)."""
    try:
        result = cli.main(args=argv, prog_name="training_client", standalone_mode=False)
    except click.ClickException as exc:  # usage errors: 2
        exc.show()
        return exc.exit_code
    except click.Abort:
        stderr.print("aborted")
        return 130
    return result if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    sys.exit(main())
