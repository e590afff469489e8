"""Photos on the web page, in headless Chromium against a real server with the stand-in
pipeline: several photos chosen at once go as one upload, the drop zone names them, the task's
summary says what came from each source, and a refused ZIP shows the server's reason."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect
from test_photo_sources import jpeg, make_zip, office_photos
from test_web_page import browser, open_page  # noqa: F401 - the page fixtures

from conftest import wait_status

pytestmark = pytest.mark.browser


def test_several_photos_are_one_upload_and_a_bad_zip_says_why(start_server, open_page, tmp_path):  # noqa: F811
    server = start_server()
    paths = []
    for k, image in enumerate(office_photos(12)):
        path = tmp_path / f"IMG_{k:04d}.jpg"
        path.write_bytes(jpeg(image))
        paths.append(path)
    page = open_page(server)
    expect(page.locator("#file-title")).to_have_text("Choose a video, photos or a ZIP")
    page.set_input_files("#file-input", paths)
    expect(page.locator("#file-title")).to_have_text("12 photos of one scene")
    page.uncheck("#auto-training")
    page.get_by_role("button", name="Upload and start").click()
    title = page.locator("#detail-title")
    expect(title).to_have_text("IMG_0000.jpg and 11 more", timeout=30_000)
    task_id = page.evaluate("location.hash").removeprefix("#task=")
    with server.client() as client:
        status = wait_status(client, task_id, "preprocessing_completed")
    assert status["metadata"]["video"]["photos"] == 12
    expect(page.locator("body")).to_contain_text("photos: 12 photos, 12 placed")

    # A ZIP with a file that is not a photo: refused, the file named, nothing made.
    bad = tmp_path / "desk.zip"
    bad.write_bytes(
        make_zip([("desk/a.jpg", jpeg(office_photos(1)[0])), ("desk/notes.txt", b"hi")])
    )
    page.set_input_files("#file-input", bad)
    expect(page.locator("#file-title")).to_have_text("desk.zip")
    page.get_by_role("button", name="Upload and start").click()
    error = page.locator("#upload-error")
    expect(error).to_contain_text("A file cannot be used.", timeout=30_000)
    expect(error).to_contain_text("desk/notes.txt")
    with server.client() as client:
        assert client.get("/tasks").json()["total"] == 1
