"""The web page's files: served by the app itself, nothing fetched from elsewhere (no CDN, no
external fonts), the 3D libraries from node_modules through the /vendor mounts."""

from __future__ import annotations

import re

import httpx

from conftest import REPO
from training_server import create_app
from training_server_models import ServerConfig

VIEWER_INSTALLED = (REPO / "node_modules" / "@sparkjsdev" / "spark" / "dist").is_dir()


async def test_the_page_and_its_assets_are_served_offline(tmp_path):
    """Everything the page loads comes from this server: no CDN, no external fonts. (The
    app's static routes need no running task manager: no lifespan here.)"""
    settings = ServerConfig(
        temp_dir=tmp_path / "temp_workspace",
        logs_dir=tmp_path / "logs",
        db_path=tmp_path / "training_server.db",
    )
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await check_assets(client)


async def check_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    html = page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert '"three": "./vendor/three/build/three.module.js"' in html
    assets = [f"static/{path.name}" for path in sorted((REPO / "static").glob("*.js"))]
    assert "static/main.js" in assets
    assert (await client.get("/static/favicon.svg")).status_code == 200
    for asset in [*assets, "static/style.css"]:
        answer = await client.get(f"/{asset}")
        assert answer.status_code == 200, asset
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", answer.text), asset
    module_import = re.compile(r"""from ["']([^"']+)["']|import\(["']([^"']+)["']\)""")
    for asset in assets:
        for pair in module_import.findall((await client.get(f"/{asset}")).text):
            name = pair[0] or pair[1]
            local = name.startswith("./") or name.startswith("three/addons/")
            assert local or name in {"three", "@sparkjsdev/spark"}, (asset, name)
    if VIEWER_INSTALLED:
        for path in (
            "vendor/three/build/three.module.js",
            "vendor/three/build/three.core.js",
            "vendor/three/addons/controls/OrbitControls.js",
            "vendor/three/addons/postprocessing/Pass.js",
            "vendor/spark/spark.module.js",
        ):
            assert (await client.get(f"/{path}")).status_code == 200, path
    assert (await client.get("/vendor/three/package.json")).status_code == 404
