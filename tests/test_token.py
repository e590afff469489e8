"""The API token stays out of URLs and logs (issue 11, item 9), and the API docs work offline
behind it (item 10): real servers on loopback, and the page in headless Chromium."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect
from test_web_page import api_upload, browser, open_page, row  # noqa: F401 (fixtures)

from conftest import OFFICE_VIDEO, ServerProcess, wait_status

TOKEN = "s3cret-token-for-the-log-test"


def everything_written(server: ServerProcess) -> str:
    """The server's whole output and every file under its logs folder."""
    texts = [server.output()]
    logs = server.root / "logs"
    if logs.is_dir():
        texts += [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()]
    return "\n".join(texts)


def test_a_token_in_the_url_is_refused_and_never_logged(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(api_token=TOKEN)
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        for path in ("/health", "/tasks", "/events"):
            refused = anonymous.get(path, params={"token": TOKEN})
            assert refused.status_code == 401, path
    with server.client() as client:
        assert client.get("/health").status_code == 200  # the bearer header still works
    assert TOKEN not in everything_written(server)
    assert "token=[redacted]" in server.output()  # the access log line is still there


def test_login_sets_a_strict_http_only_cookie_that_is_not_the_token(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(api_token=TOKEN)
    with httpx.Client(base_url=server.url, timeout=10) as browserlike:
        wrong = browserlike.post("/login", json={"token": "wrong"})
        assert wrong.status_code == 401
        assert "set-cookie" not in wrong.headers
        assert browserlike.get("/tasks").status_code == 401

        answer = browserlike.post("/login", json={"token": TOKEN})
        assert answer.status_code == 204
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert "Secure" not in cookie  # plain http on loopback
        assert TOKEN not in cookie
        assert browserlike.get("/tasks").status_code == 200  # the cookie is enough
        assert browserlike.get("/health").json()["auth_required"] is True

        unknown = "00000000-0000-4000-8000-000000000000"
        here = {"Origin": server.url}
        elsewhere = {"Origin": "https://evil.example"}
        # A state-changing request with the cookie must come from this server's page.
        assert browserlike.delete(f"/tasks/{unknown}", headers=elsewhere).status_code == 403
        assert browserlike.delete(f"/tasks/{unknown}", headers=here).status_code == 404
        assert (
            browserlike.post("/login", json={"token": TOKEN}, headers=elsewhere).status_code == 403
        )

        assert browserlike.post("/logout").status_code == 204
        browserlike.cookies.clear()
        assert browserlike.get("/tasks").status_code == 401
    assert TOKEN not in everything_written(server)


def test_docs_are_served_offline_and_behind_the_token(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(api_token=TOKEN)
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        assert anonymous.get("/docs").status_code == 401
        assert anonymous.get("/openapi.json").status_code == 401
    with server.client() as client:
        docs = client.get("/docs")
        assert docs.status_code == 200
        assert docs.headers["content-type"].startswith("text/html")
        assert "cdn" not in docs.text.lower() and "https://" not in docs.text
        assert "/upload" in docs.text or "/openapi.json" in docs.text
        spec = client.get("/openapi.json")
        assert spec.status_code == 200 and "/upload" in spec.json()["paths"]
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            if f"/vendor/swagger-ui/{asset}" in docs.text:
                assert client.get(f"/vendor/swagger-ui/{asset}").status_code == 200


def test_docs_without_a_token_are_open(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        assert anonymous.get("/docs").status_code == 200
        assert anonymous.get("/openapi.json").status_code == 200


@pytest.mark.browser
def test_the_page_with_a_token_never_puts_it_in_a_url_or_a_log(  # type: ignore[no-untyped-def]
    start_server,
    monkeypatch,
    open_page,  # noqa: F811 (the fixture)
) -> None:
    monkeypatch.setenv("FAKE_PIPELINE_SECONDS", "0.3")
    server = start_server(api_token=TOKEN)
    task = api_upload(server, start_training="false")
    with server.client() as client:
        wait_status(client, task, "preprocessing_completed", timeout=30)
    page = open_page(server, f"/#task={task}", wait_ready=False)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    page.fill("#token-input", "wrong")
    page.get_by_role("button", name="Save token").click()
    expect(page.locator("#token-error")).to_contain_text("refused")
    page.fill("#token-input", TOKEN)
    page.get_by_role("button", name="Save token").click()
    expect(dialog).to_be_hidden()

    # The live stream, images and downloads all work with the cookie alone.
    expect(row(page, task)).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#detail-title")).to_have_text(OFFICE_VIDEO.name)
    page.get_by_role("tab", name="Frames").click()
    page.wait_for_function(
        "document.querySelectorAll('#panel-frames img').length > 0 && "
        "[...document.querySelectorAll('#panel-frames img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    zip_link = page.get_by_role("link", name="Download dataset (ZIP)")
    href = zip_link.get_attribute("href") or ""
    assert "token" not in href
    assert page.request.get(href).status == 200

    # After a reload the saved token logs in again, without asking.
    page.reload()
    page.wait_for_selector("html[data-ready=true]", state="attached")
    expect(row(page, task)).to_be_visible()
    expect(dialog).to_be_hidden()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    assert urls, "the page made no requests"
    assert not [u for u in urls if TOKEN in u or "token=" in u]
    written = everything_written(server)
    assert TOKEN not in written
    assert Path(server.log_path).is_file()
