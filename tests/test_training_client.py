"""The client CLI (`python -m training_client`) run as a real subprocess against real servers
with the stand-in stages: submit to the end with downloads, --json outputs, the documented
exit codes, the wait across a server restart, and the OpenAPI schema as the contract (the CLI
calls only declared routes; every route declares its response model and error answers)."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_reliability import padded_video

import training_client
from conftest import (
    OFFICE_VIDEO,
    REPO,
    STATIC_VIDEO,
    ServerProcess,
    free_port,
    settings_env,
    wait_status,
)

TOKEN = "client-test-token"
ACCESS_LINE = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD) (\S+) HTTP/1\.1"')


def run_cli(
    *args: str,
    server: str | None = None,
    token: str | None = None,
    timeout: float = 120,
    config_home: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m training_client ARGS` with the server and token in its environment (and
    `config_home` as where it keeps the state of resumable uploads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_SERVER_")}
    if config_home is not None:
        env["XDG_CONFIG_HOME"] = str(config_home)
    if server:
        env["TRAINING_SERVER_URL"] = server
    if token:
        env["TRAINING_SERVER_API_TOKEN"] = token
    env["COLUMNS"] = "160"
    return subprocess.run(
        [sys.executable, "-m", "training_client", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_out(result: subprocess.CompletedProcess[str]) -> Any:
    """The command's stdout as JSON (failing with its output otherwise)."""
    try:
        return json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"not JSON (rc {result.returncode}):\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server with the stand-in stages for the tests that do not need their own."""
    root = tmp_path_factory.mktemp("client-server")
    process = ServerProcess(root, settings_env(root)).start()
    yield process
    process.kill()


def test_submit_wait_download_runs_to_the_end(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "submit",
        str(OFFICE_VIDEO),
        "--iterations",
        "300",
        "--max-frames",
        "12",
        "--wait",
        "--download",
        str(out),
        server=server.url,
    )
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.split()[0]
    assert "training_completed" in result.stdout
    assert "upload tum_office_orbit.mp4" in result.stderr  # the upload bar
    assert f"{task_id[:8]} training" in result.stderr  # a bar per stage
    assert "300/300" in result.stderr and "loss" in result.stderr and "PSNR" in result.stderr
    with server.client() as client:
        task = client.get(f"/status/{task_id}").json()
    assert task["status"] == "training_completed"
    assert task["params"]["iterations"] == 300 and task["params"]["max_frames"] == 12

    archive = out / f"{task_id}_output.zip"
    with zipfile.ZipFile(archive) as z:
        plys = [n for n in z.namelist() if n.endswith(".ply")]
        assert plys, z.namelist()
        assert z.read(plys[0]).startswith(b"ply\n")

    ply = json_out(run_cli("download", task_id, "--format", "ply", "-o", str(out), "--json",
                           server=server.url))  # fmt: skip
    path = Path(ply["path"])
    assert path.parent == out and path.suffix == ".ply"
    assert path.stat().st_size == ply["bytes"] == task["metadata"]["training"]["ply_size_bytes"]
    assert path.read_bytes().startswith(b"ply\n")

    spz = json_out(run_cli("download", task_id, "--format", "spz", "-o", str(out), "--json",
                           server=server.url))  # fmt: skip
    data = gzip.decompress(Path(spz["path"]).read_bytes())
    assert data[:4] == b"NGSP"  # SPZ's magic inside its gzip stream


def test_json_outputs_parse(server: ServerProcess, tmp_path: Path) -> None:
    url = server.url
    submitted = json_out(run_cli("submit", str(OFFICE_VIDEO), "--no-train", "--json", server=url))
    [answer] = submitted["tasks"]
    task_id = answer["task_id"]
    assert answer["status"] == "pending" and answer["auto_training"] is False

    # Several videos make several tasks, followed together.
    waited = run_cli(
        "submit", str(OFFICE_VIDEO), str(STATIC_VIDEO), "--no-train", "--wait", "--json",
        server=url,
    )  # fmt: skip
    assert waited.returncode == 0, waited.stderr
    both = json_out(waited)["tasks"]
    assert [t["original_filename"] for t in both] == [OFFICE_VIDEO.name, STATIC_VIDEO.name]
    assert all(t["status"] == "preprocessing_completed" for t in both)
    assert all(t["results"]["dataset"] is True for t in both)
    done = both[0]

    with server.client() as client:
        wait_status(client, task_id, "preprocessing_completed")
    status = json_out(run_cli("status", task_id, "--json", server=url))
    assert status["task_id"] == task_id and "train" in status["allowed_actions"]

    page = json_out(run_cli("list", "--status", "preprocessing_completed", "--json", server=url))
    assert {task_id, done["task_id"]} <= set(page["tasks"])
    assert all(item["status"] == "preprocessing_completed" for item in page["items"])

    lines = [
        json.loads(x) for x in run_cli("logs", task_id, "--json", server=url).stdout.splitlines()
    ]
    assert lines and all(set(x) == {"line"} for x in lines)
    followed = run_cli("logs", task_id, "--follow", "--json", server=url)
    assert followed.returncode == 0, followed.stderr
    events = [json.loads(x) for x in followed.stdout.splitlines()]
    assert events[-1] == {"end": "preprocessing_completed"}
    assert [x["line"] for x in events[:-1]][-3:] == [x["line"] for x in lines][-3:]

    health = json_out(run_cli("health", "--json", server=url))
    assert health["status"] == "ok" and health["auth_required"] is False

    zip_dl = json_out(run_cli("download", task_id, "-o", str(tmp_path), "--json", server=url))
    assert zipfile.ZipFile(zip_dl["path"]).testzip() is None

    refused = run_cli("retry", task_id, "--json", server=url)  # not allowed: exit 3, detail
    assert refused.returncode == 3
    error = json_out(refused)
    assert error["http_status"] == 409 and error["exit_code"] == 3 and error["error"]
    assert error["error"] in refused.stderr.replace("\n", "")

    trained = json_out(run_cli("train", task_id, "--iterations", "300", "--json", server=url))
    assert trained["task_id"] == task_id
    with server.client() as client:
        final = wait_status(client, task_id, "training_completed")
    assert final["params"]["iterations"] == 300

    deleted = json_out(run_cli("delete", task_id, "--json", server=url))
    assert deleted["task_id"] == task_id
    gone = run_cli("status", task_id, "--json", server=url)
    assert gone.returncode == 3 and json_out(gone)["http_status"] == 404


def test_photos_a_zip_and_videos_of_one_scene_go_as_one_task_each_submit(
    server: ServerProcess, tmp_path: Path
) -> None:
    from test_photo_sources import jpeg, make_zip, office_photos

    photos = [jpeg(image, model="Desk") for image in office_photos(12)]
    archive = tmp_path / "desk.zip"
    archive.write_bytes(make_zip([(f"desk/{k:02}.jpg", p) for k, p in enumerate(photos[:6])]))
    loose = []
    for k, data in enumerate(photos[6:]):
        loose.append(tmp_path / f"loose-{k}.jpg")
        loose[-1].write_bytes(data)
    result = run_cli(
        "submit", str(archive), *map(str, loose), "--no-train", "--wait", "--json",
        server=server.url, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (task,) = json_out(result)["tasks"]
    assert task["status"] == "preprocessing_completed", task
    sources = task["metadata"]["video"]["sources"]
    assert sum(source["images"] for source in sources) == 12, sources
    # Videos stay one task each, unless --one-capture joins them.
    copy = padded_video(tmp_path / "second.mp4", OFFICE_VIDEO.stat().st_size + 1024)
    result = run_cli(
        "submit", str(OFFICE_VIDEO), str(copy), "--no-train", "--one-capture", "--json",
        server=server.url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(json_out(result)["tasks"]) == 1


def test_failed_task_exits_1_with_its_error(
    start_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FAKE_PIPELINE_MODE", "fail")
    server = start_server()
    result = run_cli("submit", str(OFFICE_VIDEO), "--wait", "--download", str(tmp_path / "d"),
                     server=server.url)  # fmt: skip
    assert result.returncode == 1, result.stderr
    task_id = result.stdout.split()[0]
    with server.client() as client:
        task = client.get(f"/status/{task_id}").json()
    assert task["status"] == "failed" and task["error_message"]
    flat = " ".join(result.stderr.split())
    assert " ".join(task["error_message"].split()) in flat
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())

    status = run_cli("status", task_id, server=server.url)
    assert status.returncode == 1
    assert " ".join(task["error_message"].split()) in " ".join(status.stderr.split())
    as_json = run_cli("status", task_id, "--json", server=server.url)
    assert as_json.returncode == 1 and json_out(as_json)["status"] == "failed"


def test_token_missing_or_wrong_exits_4(start_server: Any) -> None:
    server = start_server(api_token=TOKEN)
    for token in (None, "wrong-token"):
        for args in (("health",), ("list",), ("submit", str(OFFICE_VIDEO))):
            result = run_cli(*args, server=server.url, token=token)
            assert result.returncode == 4, (args, token, result.stderr)
            assert "401" in result.stderr
    ok = run_cli("health", "--json", server=server.url, token=TOKEN)
    assert ok.returncode == 0 and json_out(ok)["auth_required"] is True
    flag = run_cli("--help", server=server.url)  # the group's help: exit 0
    assert flag.returncode == 0 and "Exit codes" in flag.stdout
    by_flag = run_cli("list", "--json", "--token", TOKEN, "--server", server.url)
    assert by_flag.returncode == 0 and json_out(by_flag)["total"] == 0


def test_server_down_exits_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (("health",), ("status", "0" * 8), ("submit", str(OFFICE_VIDEO), "--wait")):
        result = run_cli(*args, server=url)
        assert result.returncode == 3, (args, result.stderr)
        assert "Cannot reach" in result.stderr
    as_json = run_cli("health", "--json", server=url)
    assert as_json.returncode == 3 and json_out(as_json)["exit_code"] == 3


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    photo = tmp_path / "frame.jpg"
    photo.write_bytes(b"\xff\xd8\xff")
    cases = {
        ("submit",): "Missing argument",
        ("submit", str(tmp_path / "missing.mp4")): "does not exist",
        ("submit", str(photo), "--resumable"): "--resumable sends one video per upload",
        ("submit", str(OFFICE_VIDEO), str(OFFICE_VIDEO)): "the same file is given twice",
        ("submit", str(OFFICE_VIDEO), "--preset", "fast", "--iterations", "5"): "not both",
        ("submit", str(OFFICE_VIDEO), "--no-train", "--download", "d", "--format", "ply"): (
            "needs training"
        ),
        ("submit", str(OFFICE_VIDEO), "--preset", "slow"): "Invalid value",
        ("download", "x", "--format", "obj"): "Invalid value",
        ("list", "--status", "nope"): "Invalid value",
        ("bogus",): "No such command",
    }
    for args, message in cases.items():
        result = run_cli(*args, server="http://127.0.0.1:9")
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_wait_survives_a_server_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event stream drops when the server dies; the CLI polls /status until the
    restarted server (same port) has run the re-queued task to its end."""
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "3")
    server = ServerProcess(tmp_path, settings_env(tmp_path)).start()
    second: ServerProcess | None = None
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_SERVER_")}
    cli = subprocess.Popen(
        [sys.executable, "-m", "training_client", "submit", str(OFFICE_VIDEO), "--no-train",
         "--wait", "--json", "--server", server.url],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with server.client() as client:
            deadline = time.monotonic() + 60
            running: list[dict[str, Any]] = []
            while not running and time.monotonic() < deadline:
                running = client.get("/tasks", params={"status": "preprocessing"}).json()["items"]
                time.sleep(0.1)
            assert running, "the task never started preprocessing"
        server.kill()
        time.sleep(1.5)  # the CLI's stream has dropped; it polls a server that is gone
        second = ServerProcess(tmp_path, server.env, port=server.port).start()
        stdout, stderr = cli.communicate(timeout=90)
        assert cli.returncode == 0, stderr
        [task] = json.loads(stdout)["tasks"]
        assert task["task_id"] == running[0]["task_id"]
        assert task["status"] == "preprocessing_completed"
    finally:
        if cli.poll() is None:
            cli.kill()
        server.kill()
        if second:
            second.kill()


# --- the OpenAPI schema as the contract ------------------------------------------------------


class Interrupted(Exception):
    """Raised from the progress callback to cut an upload off mid-stream."""


def interrupted_then_resumed(server: ServerProcess, tmp_path: Path) -> tuple[str, Path]:
    """A 40 MB resumable upload cut off at about 40 % by the client's own code (the
    connection drops mid-PATCH), then `submit --resumable` run again with the same state:
    it asks the server for the offset (HEAD) and sends only the rest. Returns the task id
    and the video."""
    video = padded_video(tmp_path / "big.mp4", 40 * 1024 * 1024)
    config = tmp_path / "config"
    state_dir = config / "gs-training-client" / "uploads"
    params = training_client.upload_params(None, None, None, no_train=True)

    def cut(sent: int) -> None:
        if sent > 16 * 1024 * 1024:
            raise Interrupted

    api = training_client.Api(server.url, None)
    try:
        with pytest.raises(Interrupted):
            training_client.TusUploader(api, state_dir).upload(video, params, cut)
    finally:
        api.close()
    (state,) = state_dir.glob("*.id")  # kept for the resume
    head = httpx.head(
        f"{server.url}/uploads/{state.read_text().strip()}", headers={"Tus-Resumable": "1.0.0"}
    )
    offset = int(head.headers["Upload-Offset"])
    assert 0 < offset < video.stat().st_size, offset  # the server kept what it got
    done = run_cli(
        "submit", str(video), "--resumable", "--no-train", "--wait", "--json",
        server=server.url, config_home=config,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    task = json_out(done)["tasks"][0]
    assert task["status"] == "preprocessing_completed"
    assert not list(state_dir.glob("*.id"))  # forgotten once the task exists
    return task["task_id"], video


def test_a_resumable_submit_goes_on_where_the_server_copy_stopped(
    server: ServerProcess, tmp_path: Path
) -> None:
    log_start = len(server.output())
    task_id, video = interrupted_then_resumed(server, tmp_path)
    requests = ACCESS_LINE.findall(server.output()[log_start:])
    # One HEAD by the test (the offset kept), one by the resuming client.
    assert [m for m, t in requests if t.startswith("/uploads/")].count("HEAD") == 2
    stored = next((server.root / "temp_workspace" / task_id).glob("input.*"))
    assert stored.read_bytes() == video.read_bytes()


def declared_operations(schema: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path template) of every operation the schema declares."""
    return {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}


def template_of(path: str, templates: set[str]) -> str | None:
    """The declared path template a concrete request path matches, if any."""
    for template in templates:
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return template
    return None


def fetch_schema(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/openapi.json", headers=server.auth_headers(), timeout=30)
    response.raise_for_status()
    return response.json()


def test_cli_calls_only_what_the_schema_declares(server: ServerProcess, tmp_path: Path) -> None:
    """Every request the CLI makes (read back from the server's access log) is a declared
    (method, path template), and so is every route in the client's own table."""
    schema = fetch_schema(server)
    declared = declared_operations(schema)
    assert declared >= training_client.ROUTES, training_client.ROUTES - declared

    log_start = len(server.output())
    url = server.url
    done = run_cli("submit", str(OFFICE_VIDEO), "--iterations", "300", "--wait", "--download",
                   str(tmp_path), "--format", "spz", server=url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.split()[0]
    for args in (
        ("status", task_id),
        ("list", "--status", "training_completed"),
        ("logs", task_id, "--lines", "5"),
        ("logs", task_id, "--follow"),
        ("health",),
        ("download", task_id, "-o", str(tmp_path)),
        ("download", task_id, "--format", "ply", "-o", str(tmp_path)),
        ("cancel", task_id),  # 409: nothing to cancel, but the route is called
        ("retry", task_id),
        ("train", task_id, "--preset", "fast"),
        ("delete", task_id),
    ):
        result = run_cli(*args, server=url)
        assert result.returncode in (0, 3), (args, result.stderr)
    interrupted_then_resumed(server, tmp_path)  # the resumable upload's routes

    requests = ACCESS_LINE.findall(server.output()[log_start:])
    templates = {p for _, p in declared}
    called = set()
    for method, target in requests:
        path = target.split("?", 1)[0]
        template = template_of(path, templates)
        assert template and (method, template) in declared, f"{method} {path} is not declared"
        called.add((method, template))
    assert called == training_client.ROUTES, training_client.ROUTES ^ called


# Routes whose schema entry still lacks a response model or declared error answers, with the
# fix (in files the client's owner does not own). Each is skipped with this reason until fixed.
DOWNLOAD_ERRORS = (
    "keep the 200 content and add the error answers as ErrorBody: responses={200: ..., "
    "**{code: {'model': ErrorBody} for code in (401, 404, 409, 410, 422)}}"
)
UNFIXED: dict[tuple[str, str], str] = {}


def route_problems(schema: dict[str, Any], method: str, path: str) -> list[str]:
    """What the schema's entry for one operation lacks: a success answer with a model (a JSON
    schema, or a declared non-JSON media type) and error answers as `{"detail": str}`
    (401 for the token; 404 and 422 where the path has a task id)."""
    operation = schema["paths"][path][method.lower()]
    responses = operation.get("responses", {})
    problems = []
    success = [r for code, r in responses.items() if code.startswith("2")]
    if not success:
        problems.append("no success answer")
    for code, answer in responses.items():
        if not code.startswith("2"):
            continue
        if code in {"201", "204"} or method == "HEAD" or method == "OPTIONS":
            continue  # no body by definition (tus answers in headers): nothing to model
        content = answer.get("content") or {}
        typed = [t for t, body in content.items() if t != "application/json" or body.get("schema")]
        if not typed:
            problems.append(f"success answer without a model: {content}")
    wanted = {"401"} | ({"404", "422"} if "{task_id}" in path else set())
    missing = wanted - responses.keys()
    if missing:
        problems.append(f"error answers not declared: {sorted(missing)}")
    for code, answer in responses.items():
        if code[0] not in "45":
            continue
        body = (answer.get("content") or {}).get("application/json", {}).get("schema", {})
        if body.get("$ref") != "#/components/schemas/ErrorBody":
            problems.append(f"{code} is not declared as application/json ErrorBody")
    return problems


def test_declared_routes_have_models_and_error_answers(server: ServerProcess) -> None:
    """Every route in the schema that is not listed as not yet fixed declares its model and
    its error answers (new routes are checked too)."""
    schema = fetch_schema(server)
    problems = {
        f"{m} {p}": found
        for m, p in sorted(declared_operations(schema) - UNFIXED.keys())
        if (found := route_problems(schema, m, p))
    }
    assert not problems, json.dumps(problems, indent=1)


@pytest.mark.parametrize(("method", "path"), sorted(UNFIXED), ids=lambda x: x)
def test_not_yet_fixed_routes(server: ServerProcess, method: str, path: str) -> None:
    """The routes listed as lacking: pass once fixed, else skip saying what the fix is."""
    schema = fetch_schema(server)
    if path not in schema["paths"] or method.lower() not in schema["paths"][path]:
        pytest.fail(f"{method} {path} is no longer declared: remove it from UNFIXED")
    problems = route_problems(schema, method, path)
    if problems:
        pytest.skip(f"not fixed yet: {UNFIXED[(method, path)]} ({'; '.join(problems)})")
