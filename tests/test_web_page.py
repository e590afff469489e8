"""The web page at `/`, driven in headless Chromium (Debian's `chromium`, through Playwright)
against real servers on loopback ports with the stand-in pipeline and trainer.

Screenshots of the main states go to test-artifacts/web/ (ignored by git)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from conftest import OFFICE_VIDEO, REPO, ServerProcess, upload, wait_status

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts" / "web"
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # WebGL 2 without a GPU: ANGLE on SwiftShader (software Vulkan).
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]
VIEWER_INSTALLED = (REPO / "node_modules" / "@sparkjsdev" / "spark" / "dist").is_dir()
VIEWER_BACKGROUND_BGR = np.array([0x1C, 0x17, 0x14])  # the viewers' #14171c
TOKEN = "s3cret-token"


def missing(what: str) -> None:
    """Fail, saying what to install: ./test.sh installs the browser and the viewer."""
    pytest.fail(f"{what} (./test.sh installs it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """`open_page(server, path="/", width=1280, height=900, scheme="light")`: a fresh browser
    context on the page; fails the test if the page throws an uncaught error."""
    contexts = []
    errors: list[str] = []

    def open_(
        server: ServerProcess,
        path: str = "/",
        width: int = 1280,
        height: int = 900,
        scheme: str = "light",
        wait_ready: bool = True,
    ) -> Page:
        context = browser.new_context(
            viewport={"width": width, "height": height}, color_scheme=scheme
        )
        context.set_default_timeout(20_000)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url + path)
        if wait_ready:
            page.wait_for_selector("html[data-ready=true]", state="attached")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


def shot(page: Page, name: str, target: Locator | None = None) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if target is None:
        page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)
    else:
        target.screenshot(path=ARTIFACTS / f"{name}.png")


def drawn_pixels(viewer: Locator) -> tuple[int, int]:
    """How many pixels of a 3D view differ from its empty background, and in how many
    distinct colours (coarsely binned): a blank or one-colour canvas gives (0, 0) or (n, 1)."""
    image = cv2.imdecode(np.frombuffer(viewer.screenshot(), np.uint8), cv2.IMREAD_COLOR)
    drawn = np.abs(image.astype(int) - VIEWER_BACKGROUND_BGR).sum(axis=2) > 40
    colours = np.unique(image[drawn] // 32, axis=0)
    return int(drawn.sum()), len(colours)


def expect_rendered(panel: Locator, min_pixels: int = 300) -> None:
    viewer = panel.locator(".viewer")
    expect(viewer).to_have_attribute("data-state", "ready", timeout=40_000)
    expect(viewer).to_have_attribute("data-rendered", re.compile(r"^([2-9]|\d\d+)"))
    pixels, colours = drawn_pixels(viewer)
    assert pixels >= min_pixels, f"the 3D view looks blank: {pixels} drawn pixels"
    assert colours >= 2, f"the 3D view is drawn in {colours} colour(s) only"


def need_viewer() -> None:
    if not VIEWER_INSTALLED:
        missing("the 3D viewer is not installed (npm ci)")


def throttle_upload(page: Page, bytes_per_second: int) -> None:
    """Slow the page's uploads down (Chrome's network emulation), to watch their progress."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {
            "offline": False,
            "latency": 0,
            "downloadThroughput": -1,
            "uploadThroughput": bytes_per_second,
        },
    )


def row(page: Page, task_id: str) -> Locator:
    return page.locator(f'.task-row[data-id="{task_id}"]')


def api_upload(server: ServerProcess, **params: str) -> str:
    with server.client() as client:
        answer = upload(client, **params)
        assert answer.status_code == 202, answer.text
        return answer.json()["task_id"]


# -- the whole way: upload through the page, follow, look, download -------------------------


def test_upload_and_follow_a_task_to_its_3d_result(start_server, monkeypatch, open_page):
    need_viewer()
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "3")
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.01")
    server = start_server()
    older = api_upload(server, start_training="false")
    page = open_page(server)
    expect(row(page, older)).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    throttle_upload(page, 450_000)
    page.set_input_files("#file-input", OFFICE_VIDEO)
    expect(page.locator("#file-title")).to_have_text(OFFICE_VIDEO.name)
    page.fill("#min-frames", "10")
    page.fill("#max-frames", "30")
    page.get_by_role("button", name="Upload and start").click()

    numbers = page.locator("#upload-numbers")
    expect(numbers).to_have_text(
        re.compile(r"^\d+ (B|KiB) of 883 KiB \(\d+ %\) · \d+ KiB/s · (\d+ s left|almost done)$")
    )
    sent = int(page.locator("#upload-bar").get_attribute("aria-valuenow"))
    shot(page, "01-upload-progress")
    expect(page.locator("#upload-bar")).not_to_have_attribute("aria-valuenow", str(sent))
    assert int(page.locator("#upload-bar").get_attribute("aria-valuenow")) > sent

    # The new task opens by itself, first on the board.
    title = page.locator("#detail-title")
    expect(title).to_have_text(OFFICE_VIDEO.name, timeout=30_000)
    task_id = page.evaluate("location.hash").removeprefix("#task=")
    first = page.locator(".task-row").first
    expect(first).to_have_attribute("data-id", task_id)
    expect(page.locator("#upload-progress")).to_be_hidden()

    # Watch it run: the stage bar advances, the row keeps its height.
    progress = page.get_by_role("progressbar", name="Progress of the running stage")
    seen: dict[str, list[float]] = {"preprocessing": [], "training": []}
    heights = set()
    shots = set()
    badge = page.locator(".detail-head .badge")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = first.get_attribute("data-status")
        if status in seen and progress.is_visible():
            # The bar and the stage it shows, read at once: the board's row and the detail
            # panel render separately, so the row may still say preprocessing while the bar
            # already shows training from 0.
            shown, value = progress.evaluate(
                "b => [b.dataset.status, b.getAttribute('aria-valuenow')]"
            )
            if value is not None and shown in seen:
                seen[shown].append(float(value))
            heights.add(round(first.bounding_box()["height"]))
            if status not in shots and float(value or 0) > 20:
                shots.add(status)
                shot(page, f"02-{status}")
        if status == "training_completed":
            break
        time.sleep(0.2)
    expect(badge).to_have_text("Done")
    for stage, values in seen.items():
        # The server stores progress about once a second: a few steps per stage here.
        assert len(set(values)) >= 2, f"the {stage} bar did not advance: {values}"
        assert values == sorted(values), f"the {stage} bar went backwards: {values}"
    assert len(heights) == 1, f"the task's row changed height while it ran: {heights}"

    # The parameters chosen on the page reached the server.
    with server.client() as client:
        params = client.get(f"/tasks/{task_id}").json()["params"]
    assert (params["min_frames"], params["max_frames"]) == (10, 30)

    # The result: summary in numbers, the splats in 3D, downloads.
    summary = page.locator(".summary")
    expect(summary).to_contain_text("12 frames were kept")
    expect(summary).to_contain_text("147 points")
    expect(summary).to_contain_text("0.42 px")
    expect(page.get_by_role("tab", name="3D model")).to_have_attribute("aria-selected", "true")
    model = page.locator("#panel-model")
    expect_rendered(model)
    expect(model.locator(".viewer-legend")).to_contain_text("3,000 Gaussians")
    shot(page, "03-done-3d-model")

    ply = page.get_by_role("link", name="Download .ply")
    assert ply.get_attribute("href").endswith(f"/download/{task_id}/ply")
    answer = page.request.get(ply.get_attribute("href"))
    assert answer.status == 200
    assert answer.body().startswith(b"ply\n")
    zip_link = page.get_by_role("link", name="Download ZIP")
    assert page.request.get(zip_link.get_attribute("href")).body()[:2] == b"PK"
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.get_by_role("button", name="Retry")).to_be_hidden()

    # The camera path and the points.
    page.get_by_role("tab", name="Cameras and points").click()
    sparse = page.locator("#panel-sparse")
    expect_rendered(sparse)
    expect(sparse.locator(".viewer-legend")).to_have_text("147 points · 12 cameras")
    shot(page, "04-cameras-and-points", page.locator("#detail"))

    # The kept frames, as thumbnails that load.
    page.get_by_role("tab", name="Frames").click()
    thumbs = page.locator("#panel-frames img")
    expect(thumbs).to_have_count(12)
    page.wait_for_function(
        "[...document.querySelectorAll('#panel-frames img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    page.get_by_role("button", name="Frame 3 of 12: frame_00002.jpg").click()
    dialog = page.locator("#frame-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#frame-title")).to_contain_text("Frame 3 of 12")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#frame-title")).to_contain_text("Frame 4 of 12 · frame_00003.jpg")
    page.wait_for_function("document.querySelector('#frame-image').naturalWidth === 160")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()


# -- the log ---------------------------------------------------------------------------------


def test_log_follows_live_and_can_pause(start_server, monkeypatch, open_page):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "3")
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.025")
    server = start_server(trainer_iterations=150)
    task_id = api_upload(server)
    page = open_page(server, f"/#task={task_id}")
    log_tab = page.get_by_role("tab", name="Log")
    expect(log_tab).to_have_attribute("aria-selected", "true")
    log_tab.click()  # chosen: the page then keeps it open as the task moves on
    log = page.get_by_role("log", name="Task log")
    lines = log.locator(".log-line")
    expect(lines.first).to_be_visible()
    expect(page.locator(".log-state")).to_have_text("Following live")

    # New lines arrive while the task runs.
    expect(page.locator(".task-row").first).to_have_attribute("data-status", "training")
    before = lines.count()
    page.wait_for_function(
        f"document.querySelectorAll('.log .log-line').length > {before + 5}", timeout=15_000
    )
    # Following keeps the newest line in view.
    assert log.evaluate("el => el.scrollHeight - el.scrollTop - el.clientHeight") < 30

    # Paused: the view holds still and counts what waits.
    pause = page.get_by_role("button", name="Pause")
    pause.click()
    follow = page.get_by_role("button", name=re.compile(r"^Follow"))
    expect(follow).to_have_attribute("aria-pressed", "false")
    held = lines.count()
    expect(follow).to_have_text(re.compile(r"^Follow \(\d+ new\)$"), timeout=10_000)
    assert lines.count() == held
    shot(page, "05-log-paused", page.locator("#detail"))

    follow.click()
    expect(page.get_by_role("button", name="Pause")).to_have_attribute("aria-pressed", "true")
    assert lines.count() > held

    # The stream ends with the task, and the last lines say how.
    expect(page.locator(".log-state")).to_have_text(
        "The log ended: the task is training completed.", timeout=30_000
    )
    expect(lines.last).to_contain_text("[server] Stage training ended: succeeded")


# -- cancel, retry, delete ------------------------------------------------------------------


def test_cancel_a_running_and_a_waiting_task_then_delete(start_server, monkeypatch, open_page):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "120")
    server = start_server()
    running = api_upload(server)
    waiting = api_upload(server)
    page = open_page(server, f"/#task={waiting}", scheme="dark")

    # The waiting one shows its place in line, and can be taken off the queue.
    expect(row(page, waiting)).to_contain_text("Waiting to be preprocessed · #1 in line")
    expect(row(page, running)).to_have_attribute("data-status", "preprocessing")
    expect(page.locator(".progress-facts")).to_have_text("Next in line")
    shot(page, "06-waiting-dark")
    page.get_by_role("button", name="Remove from queue").click()
    expect(page.locator(".detail-head .badge")).to_have_text("Cancelled")
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    expect(page.get_by_role("button", name="Remove from queue")).to_be_hidden()

    # The running one is stopped.
    row(page, running).click()
    expect(page.locator("#detail-title")).to_have_text(OFFICE_VIDEO.name)
    expect(page.locator(".detail-head .badge")).to_have_text("Preprocessing")
    expect(page.get_by_role("button", name="Download ZIP")).to_be_hidden()
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.locator(".detail-head .badge")).to_have_text("Cancelled", timeout=20_000)
    expect(row(page, running)).to_have_attribute("data-status", "cancelled")
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_hidden()
    with server.client() as client:
        for task_id in (running, waiting):
            assert client.get(f"/tasks/{task_id}").json()["status"] == "cancelled"

    # Delete asks first; keeping it changes nothing.
    page.get_by_role("button", name="Delete").click()
    confirm = page.locator("#confirm-dialog")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text("cannot be undone")
    shot(page, "07-delete-confirm")
    confirm.get_by_role("button", name="Keep it").click()
    expect(confirm).to_be_hidden()
    expect(row(page, running)).to_be_visible()
    page.get_by_role("button", name="Delete").click()
    confirm.get_by_role("button", name="Delete").click()
    expect(row(page, running)).to_have_count(0)
    expect(page.locator("#detail-empty")).to_be_visible()
    with server.client() as client:
        assert client.get(f"/tasks/{running}").status_code == 404

    # Retry puts the other one back in line.
    row(page, waiting).click()
    page.get_by_role("button", name="Retry").click()
    expect(page.locator(".detail-head .badge")).to_have_text("Preprocessing")


# -- refused uploads --------------------------------------------------------------------------


def test_refused_uploads_show_why(start_server, open_page, tmp_path):
    server = start_server(max_upload_bytes=300_000, trainer_path=tmp_path / "no-trainer")
    page = open_page(server)
    error = page.locator("#upload-error")
    button = page.get_by_role("button", name="Upload and start")

    # This server cannot train: the page says so before anyone uploads.
    expect(page.locator("#health-banner")).to_contain_text(
        "Training is not available on this server"
    )

    # Settings the server would refuse are caught before anything is sent.
    not_video = tmp_path / "holiday.mp4"
    not_video.write_bytes(b"these are my notes, not a video\n" * 100)
    page.set_input_files("#file-input", not_video)
    page.fill("#min-frames", "50")
    page.fill("#max-frames", "10")
    button.click()
    expect(error).to_contain_text("Check the settings.")
    expect(error).to_contain_text("“At least” must not be more than “At most”.")
    expect(page.locator("#min-frames")).to_be_focused()
    page.fill("#min-frames", "")
    page.fill("#max-frames", "")

    # Not a video: the server's own reason.
    button.click()
    expect(error).to_contain_text("This file cannot be used.", timeout=30_000)
    expect(error).to_contain_text(re.compile(r"video", re.IGNORECASE))
    shot(page, "08-not-a-video")
    with server.client() as client:
        assert client.get("/tasks").json()["total"] == 0

    # Too large for this server.
    page.set_input_files("#file-input", OFFICE_VIDEO)
    expect(error).to_be_hidden()
    button.click()
    expect(error).to_contain_text("The video is too large.", timeout=30_000)
    expect(button).to_be_enabled()
    shot(page, "09-too-large", page.locator(".upload"))

    # An upload can be stopped half way; nothing is left behind.
    throttle_upload(page, 50_000)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(OFFICE_VIDEO.read_bytes()[:250_000])  # under this server's limit
    page.set_input_files("#file-input", clip)
    button.click()
    expect(page.locator("#upload-numbers")).to_contain_text("KiB/s")
    page.get_by_role("button", name="Stop upload").click()
    expect(page.locator("#toasts")).to_contain_text("Upload stopped.")
    expect(page.locator("#upload-progress")).to_be_hidden()
    expect(error).to_be_hidden()
    with server.client() as client:
        assert client.get("/tasks").json()["total"] == 0


# -- the token --------------------------------------------------------------------------------


def test_token_is_asked_once_and_sent_everywhere(start_server, monkeypatch, open_page):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.3")
    server = start_server(api_token=TOKEN)
    first = api_upload(server, start_training="false")
    with server.client() as client:
        wait_status(client, first, "preprocessing_completed", timeout=30)
    page = open_page(server, f"/#task={first}", wait_ready=False)

    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "locked")
    shot(page, "10-token-prompt")
    page.fill("#token-input", "wrong")
    page.get_by_role("button", name="Save token").click()
    expect(page.locator("#token-error")).to_contain_text("refused")
    expect(dialog).to_be_visible()
    page.fill("#token-input", TOKEN)
    page.get_by_role("button", name="Save token").click()
    expect(dialog).to_be_hidden()

    # With the token: the board, the live stream, images and downloads.
    expect(row(page, first)).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    second = api_upload(server, start_training="false")
    expect(row(page, second)).to_be_visible()
    expect(page.locator(".task-row").first).to_have_attribute("data-id", second)
    expect(page.locator("#detail-title")).to_have_text(OFFICE_VIDEO.name)
    page.get_by_role("tab", name="Frames").click()
    expect(page.locator("#panel-frames img")).to_have_count(12)
    page.wait_for_function(
        "[...document.querySelectorAll('#panel-frames img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    zip_link = page.get_by_role("link", name="Download dataset (ZIP)")
    assert "token" not in zip_link.get_attribute("href")  # the session cookie authenticates
    assert page.request.get(zip_link.get_attribute("href")).status == 200

    # Kept in the browser: no question after a reload.
    page.reload()
    page.wait_for_selector("html[data-ready=true]", state="attached")
    expect(row(page, second)).to_be_visible()
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("button", name="Token")).to_be_visible()


# -- a server restart ------------------------------------------------------------------------


def test_board_reconnects_after_a_server_restart(start_server, monkeypatch, open_page, tmp_path):
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.3")
    server = start_server()
    before = api_upload(server, start_training="false")
    page = open_page(server)
    expect(row(page, before)).to_be_visible()
    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-state", "live")

    server.kill()
    expect(connection).not_to_have_attribute("data-state", "live", timeout=15_000)
    shot(page, "11-server-down", page.locator(".topbar"))

    again = start_server(root=tmp_path, port=server.port)
    after = api_upload(again, start_training="false")
    expect(row(page, after)).to_be_visible(timeout=30_000)
    expect(connection).to_have_attribute("data-state", "live", timeout=30_000)
    expect(row(page, before)).to_be_visible()
    expect(row(page, after)).to_have_attribute("data-status", "preprocessing_completed")


# -- phones, dark theme, keyboard, training on request, the viewer's absence ------------------


def test_phone_dark_theme_keyboard_and_training_on_request(start_server, monkeypatch, open_page):
    need_viewer()
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.3")
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.005")
    server = start_server()
    task_id = api_upload(server, start_training="false")
    with server.client() as client:
        wait_status(client, task_id, "preprocessing_completed", timeout=30)

    page = open_page(server, f"/#task={task_id}", width=360, height=780, scheme="dark")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"the page is {width} px wide on a 360 px screen"
    expect(page.locator(".detail-head .badge")).to_have_text("Dataset ready")
    expect(page.get_by_role("link", name="Download dataset (ZIP)")).to_be_visible()
    expect(page.get_by_role("button", name="Retry")).to_be_hidden()

    # Keyboard: the tabs move with the arrow keys.
    sparse_tab = page.get_by_role("tab", name="Cameras and points")
    expect(sparse_tab).to_have_attribute("aria-selected", "true")
    expect_rendered(page.locator("#panel-sparse"))
    sparse_tab.focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Frames")).to_be_focused()
    expect(page.get_by_role("tab", name="Frames")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-frames img")).to_have_count(12)
    page.wait_for_function(
        "[...document.querySelectorAll('#panel-frames img')].slice(0, 4)"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    shot(page, "12-phone-dark-dataset")

    # Training on request, followed to the splats, on the phone.
    page.get_by_role("combobox", name="Training quality").select_option("")
    page.get_by_role("button", name="Start training").click()
    expect(page.locator(".detail-head .badge")).to_have_text("Done", timeout=60_000)
    page.get_by_role("tab", name="3D model").click()  # the tab picked above stays open
    expect_rendered(page.locator("#panel-model"))
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    shot(page, "13-phone-dark-done")

    # Without the 3D libraries (no `npm ci`), the viewer says why and the rest works.
    bare = open_page(server, f"/#task={task_id}", wait_ready=False)
    bare.route("**/vendor/**", lambda route: route.fulfill(status=404, body="Not Found"))
    bare.reload()
    message = bare.locator("#panel-model .viewer-message")
    expect(message).to_have_text(
        "The 3D viewer is not installed: run npm ci in the server's folder, then restart "
        "the server."
    )
    shot(bare, "15-viewer-not-installed", bare.locator("#detail"))
    bare.get_by_role("tab", name="Frames").click()
    expect(bare.locator("#panel-frames img")).to_have_count(12)


# -- the splat view loads the small SPZ; the quality in words (issues 12 and 13) -----------


def test_splat_view_loads_the_spz_and_says_how_good_the_model_is(
    start_server, monkeypatch, open_page
):
    need_viewer()
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.3")
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.005")
    server = start_server()
    task_id = api_upload(server)
    with server.client() as client:
        task = wait_status(client, task_id, "training_completed", timeout=90)
        training = client.get(f"/tasks/{task_id}").json()["metadata"]["training"]
        assert training.get("spz_path"), f"no SPZ was written: {training.get('spz_error')}"
        assert client.get(f"/download/{task_id}/spz").status_code == 200
    assert task["results"]["model"] is True

    page = open_page(server, f"/#task={task_id}", width=1100, height=820)
    downloads: list[str] = []
    page.on("request", lambda r: downloads.append(r.url) if "/download/" in r.url else None)
    page.reload()
    model = page.locator("#panel-model")
    expect_rendered(model)
    viewer = model.locator(".viewer")
    expect(viewer).to_have_attribute("data-file", "spz")
    expect(model.locator(".viewer-legend")).to_contain_text(re.compile(r"Gaussians · .* \.spz"))
    assert any(u.endswith(f"/download/{task_id}/spz") for u in downloads), downloads
    assert not any(u.endswith(f"/download/{task_id}/ply") for u in downloads), downloads
    shot(page, "16-spz-model", page.locator("#detail"))

    # The .ply stays downloadable, the .spz too.
    ply = page.get_by_role("link", name="Download .ply")
    assert page.request.get(ply.get_attribute("href")).body().startswith(b"ply\n")
    spz = page.get_by_role("link", name="Download .spz")
    assert spz.get_attribute("href").split("?")[0].endswith(f"/download/{task_id}/spz")

    # The quality in words, and the training resolution without "1/null".
    summary = page.locator(".summary")
    quality = training.get("quality")
    if quality and quality.get("psnr") is not None:
        expect(summary).to_contain_text(f"{quality['psnr']:.1f} dB PSNR")
        if quality["split"] == "held_out":
            expect(summary).to_contain_text("frames the model never saw")
        else:
            expect(summary).to_contain_text("so it overstates quality")
    page.locator(".more-facts summary").click()
    expect(page.locator(".facts")).not_to_contain_text("1/null")


# -- the scene stands upright; previews mid-training (issue 13) -----------------------------


def tilt_sparse_model(sparse: Path, tilt: float) -> None:
    """Turn the stand-in's COLMAP model (cameras on a level circle in the x-z plane) about the
    x axis by `tilt` radians, as a capture whose world frame came out tilted: the camera path
    is then a tilted circle in COLMAP's coordinates, and only the scene's upright frame (which
    the server computes from the model) puts it level again."""
    q = np.array(
        [[1, 0, 0], [0, math.cos(tilt), -math.sin(tilt)], [0, math.sin(tilt), math.cos(tilt)]]
    )
    qw, qx = math.cos(tilt / 2), math.sin(tilt / 2)  # the quaternion of q

    def times(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
        aw, ax, ay, az = a
        bw, bx, by, bz = b
        return (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        )

    data = (sparse / "images.bin").read_bytes()
    (count,) = struct.unpack_from("<Q", data)
    out, at = [struct.pack("<Q", count)], 8
    for _ in range(count):
        image_id, *rest = struct.unpack_from("<i4d3di", data, at)
        rotation, translation, camera_id = rest[:4], rest[4:7], rest[7]
        at += struct.calcsize("<i4d3di")
        end = data.index(b"\0", at) + 1
        name = data[at:end]
        (points2d,) = struct.unpack_from("<Q", data, end)
        assert points2d == 0
        at = end + 8
        # World-to-camera R' = R qᵀ: the world turned by q, the cameras with it.
        turned = times(tuple(rotation), (qw, -qx, 0.0, 0.0))
        out.append(struct.pack("<i4d3di", image_id, *turned, *translation, camera_id))
        out.append(name + struct.pack("<Q", 0))
    (sparse / "images.bin").write_bytes(b"".join(out))

    data = (sparse / "points3D.bin").read_bytes()
    (count,) = struct.unpack_from("<Q", data)
    out, at = [struct.pack("<Q", count)], 8
    for _ in range(count):
        point_id, x, y, z, r, g, b, error, track = struct.unpack_from("<Q3d3BdQ", data, at)
        at += struct.calcsize("<Q3d3BdQ")
        rest = data[at : at + 8 * track]
        at += 8 * track
        moved = q @ np.array([x, y, z])
        out.append(struct.pack("<Q3d3BdQ", point_id, *moved, r, g, b, error, track) + rest)
    (sparse / "points3D.bin").write_bytes(b"".join(out))


def test_the_camera_path_opens_level_in_the_upright_frame(
    start_server, monkeypatch, open_page, tmp_path
):
    need_viewer()
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.3")
    server = start_server()
    task_id = api_upload(server, start_training="false")
    with server.client() as client:
        wait_status(client, task_id, "preprocessing_completed", timeout=30)
    sparse_dir = tmp_path / "temp_workspace" / task_id / "images_undistorted" / "sparse" / "0"
    tilt_sparse_model(sparse_dir, 0.5)
    with server.client() as client:
        body = client.get(f"/tasks/{task_id}/sparse").json()
    assert body["scene"] is not None
    raw = np.array([camera["center"] for camera in body["cameras"]])
    # In COLMAP's coordinates the path climbs: the y spread is a good part of its width.
    assert np.ptp(raw[:, 1]) > 0.4 * np.ptp(raw[:, 0])

    page = open_page(server, f"/#task={task_id}", width=1100, height=820)
    expect(page.get_by_role("tab", name="Cameras and points")).to_have_attribute(
        "aria-selected", "true"
    )
    panel = page.locator("#panel-sparse")
    expect_rendered(panel)
    viewer = panel.locator(".viewer")
    expect(viewer).to_have_attribute("data-frame", "upright")
    path = np.array(json.loads(viewer.get_attribute("data-camera-path")))
    assert path.shape == (len(body["cameras"]), 3)
    rise = np.ptp(path[:, 1])
    extent = max(np.ptp(path[:, 0]), np.ptp(path[:, 2]))
    assert extent > 0.5, f"the camera path is not spread out: {path}"
    assert rise < 0.02 * extent, f"the camera path is not level: rise {rise}, width {extent}"
    shot(page, "17-cameras-upright", viewer)

    # Without a scene (an older server), the page draws what it gets, as before.
    def no_scene(route):
        answer = route.fetch()
        data = answer.json()
        data["scene"] = None
        route.fulfill(response=answer, json=data)

    old = open_page(server, f"/#task={task_id}", width=1100, height=820, wait_ready=False)
    old.route(f"**/tasks/{task_id}/sparse", no_scene)
    old.reload()
    old_viewer = old.locator("#panel-sparse .viewer")
    expect_rendered(old.locator("#panel-sparse"))
    expect(old_viewer).to_have_attribute("data-frame", "colmap")
    drawn = np.array(json.loads(old_viewer.get_attribute("data-camera-path")))
    assert drawn == pytest.approx(raw, abs=1e-3)


def test_the_training_preview_shows_while_the_task_trains(start_server, monkeypatch, open_page):
    need_viewer()
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.3")
    monkeypatch.setenv("FAKE_TRAINER_STEP_SECONDS", "0.015")
    server = start_server(trainer_iterations=3000, trainer_checkpoint_every=500)
    task_id = api_upload(server)
    with server.client() as client:
        task = wait_for_preview(client, task_id)
    assert task["status"] == "training"

    page = open_page(server, f"/#task={task_id}", width=1100, height=820)
    expect(page.get_by_role("tab", name="3D model")).to_have_attribute("aria-selected", "true")
    model = page.locator("#panel-model")
    legend = model.locator(".viewer-legend")
    expect(legend).to_contain_text(re.compile(r"Preview at step [\d,]+ of 3,000"), timeout=30_000)
    expect_rendered(model)
    expect(model.locator(".viewer")).to_have_attribute("data-preview", re.compile(r".+"))
    # The viewer marks the first frame with the splats drawn (bench/first_splats.py times it).
    expect(model.locator(".viewer")).to_have_attribute("data-drawn", re.compile(r"^[1-9]"))
    drawn = page.evaluate(
        "performance.getEntriesByName('splats-drawn').map((e) => [e.detail.type, e.detail.count])"
    )
    assert drawn and drawn[0] == ["spz", 3000], drawn
    shot(page, "18-training-preview", page.locator("#detail"))
    with server.client() as client:
        status = client.get(f"/tasks/{task_id}").json()["status"]
    assert status == "training", "the preview was only seen after training ended"


def wait_for_preview(client, task_id: str, timeout: float = 60) -> dict:
    """The task once the server recorded its first training preview."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_id}").json()
        if (task.get("metadata") or {}).get("training_preview"):
            return task
        if task["status"] not in {
            "pending",
            "preprocessing",
            "preprocessing_completed",
            "training",
        }:
            pytest.fail(f"the task ended as {task['status']} without a preview")
        time.sleep(0.2)
    pytest.fail("no training preview within a minute")
