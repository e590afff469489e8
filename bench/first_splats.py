"""First splats benchmark: the time from opening a finished task in the web page (headless
Chromium through Playwright) to the first frame with its splats drawn, when the page loads
the model's SPZ (its default) and when it loads the `.ply`, for a 1,000,000-Gaussian
degree-3 model over loopback.

    python bench/first_splats.py [--repeats 3] [--gaussians 1000000] [--quick]

Setup, through the server's real routes: a real `training_server.py` with the test stand-ins
trains one task on tests/data/tum_office_orbit.mp4; then the task's final `.ply` is replaced
by a made-up 1,000,000-Gaussian one (bench/spz.py's `plausible_gaussians`) and its
`model.spz` by the SPZ `training_server_spz.ply_to_spz` writes of that `.ply` (the server's
own converter). Nothing else of the task changes, so `metadata.training` still holds the
stand-in's small sizes (used by the page only for the "ask first" limit, which the real
sizes also stay under: 248 MB < 300 MiB). For the `.ply` runs the task is shown to the page
as one without an SPZ (a task trained before SPZ export, or whose export failed): the page's
requests for the task (`/tasks/{id}` and the `/tasks` list) are answered with the server's
own answer, `metadata.training.spz_path` set to null. In the SPZ runs the same requests pass
through the same interception unchanged, so both pay its cost. The model files themselves
come straight from `/download/{id}/spz` and `/download/{id}/ply`.

Each run opens a fresh browser context (cold HTTP cache) at `/#task={id}` and waits for the
viewer's `splats-drawn` performance mark (set by static/viewer3d.js after the first frame in
which Spark drew the new mesh's splats, its sort done); times are the marks' `startTime`, from
the navigation's start. Chromium renders with SwiftShader (WebGL 2 on the CPU), as in the
tests; SPZ and `.ply` runs interleave.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    MIB,
    OFFICE_VIDEO,
    Section,
    Table,
    log,
    median,
    ratios,
    runs_text,
    settle,
    start_training_server,
    stat,
    stop_server,
    wait_until,
)
from playwright.sync_api import Browser, Page, Route, sync_playwright
from spz import plausible_gaussians, write_ply

import training_server_spz as spz

VIEWPORT = {"width": 1280, "height": 900}
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [  # as tests/test_web_page.py
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]
MARKS = ("splats-bytes", "splats-decoded", "splats-drawn")
DRAWN_TIMEOUT_MS = 300_000


def trained_task(server: Any) -> dict[str, Any]:
    """Upload the office video to `server` and wait until its (stand-in) training is done."""
    with server.client() as client, OFFICE_VIDEO.open("rb") as video:
        answer = client.post(
            "/upload",
            files={"file": (OFFICE_VIDEO.name, video, "video/mp4")},
            params={"min_frames": "10", "max_frames": "30"},
        )
        answer.raise_for_status()
        task_id = answer.json()["task_id"]

        def done() -> bool:
            status = client.get(f"/tasks/{task_id}").json()["status"]
            if status in {"failed", "cancelled"}:
                raise RuntimeError(f"the stand-in task ended as {status}")
            return status == "training_completed"

        wait_until(done, 180, 0.5, "the stand-in training")
        return client.get(f"/tasks/{task_id}").json()


def replace_model(output_dir: Path, task: dict[str, Any], gaussians: int) -> dict[str, int]:
    """Put a `gaussians`-Gaussian .ply and its SPZ where the task's final model files are."""
    training = task["metadata"]["training"]
    ply = output_dir / training["ply_path"]
    model_spz = output_dir / training["spz_path"]
    if not (ply.is_file() and model_spz.is_file()):
        raise RuntimeError(f"the task's model files are not where expected: {ply}, {model_spz}")
    log(f"first_splats: writing a {gaussians:,}-Gaussian .ply and its SPZ")
    write_ply(ply, plausible_gaussians(gaussians))
    done = spz.ply_to_spz(ply, model_spz)
    if done.count != gaussians:
        raise RuntimeError(f"the SPZ holds {done.count} Gaussians, not {gaussians}")
    return {"ply_bytes": ply.stat().st_size, "spz_bytes": model_spz.stat().st_size}


def without_spz(body: bytes, task_id: str) -> bytes:
    """A /tasks or /tasks/{id} answer with the task's SPZ left out (spz_path null)."""
    data = json.loads(body)
    tasks = data.get("items", [data]) if isinstance(data, dict) else []
    for task in tasks:
        if isinstance(task, dict) and task.get("task_id") == task_id:
            training = (task.get("metadata") or {}).get("training")
            if training:
                training["spz_path"] = None
    return json.dumps(data).encode()


def one_run(browser: Browser, url: str, task_id: str, kind: str) -> dict[str, float]:
    """Open the task in a fresh context; the performance marks and the model's transfer (ms)."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page: Page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))

        def task_answer(route: Route) -> None:
            answer = route.fetch()
            body = answer.body()
            if kind == "ply" and answer.ok:
                body = without_spz(body, task_id)
            route.fulfill(response=answer, body=body)

        page.route(re.compile(rf"/tasks(/{task_id})?(\?[^/]*)?$"), task_answer)
        page.goto(f"{url}/#task={task_id}")
        page.wait_for_function(
            "performance.getEntriesByName('splats-drawn').length > 0",
            timeout=DRAWN_TIMEOUT_MS,
            polling=50,
        )
        if errors:
            raise RuntimeError(f"the page threw: {errors}")
        found = page.evaluate(
            """([marks, path]) => {
              const out = {};
              for (const name of marks) {
                const entry = performance.getEntriesByName(name)[0];
                if (entry) out[name] = entry.startTime;
              }
              const drawn = performance.getEntriesByName('splats-drawn')[0];
              out.count = drawn.detail?.count ?? 0;
              out.type = drawn.detail?.type ?? '';
              const file = performance.getEntriesByType('resource')
                .filter((e) => e.name.includes(path))[0];
              if (file) {
                out.file_start = file.startTime;
                out.file_end = file.responseEnd;
                out.file_bytes = file.transferSize || file.encodedBodySize;
              }
              return out;
            }""",
            [list(MARKS), f"/download/{task_id}/{kind}"],
        )
        legend = page.locator("#panel-model .viewer-legend").inner_text()
    finally:
        context.close()
    if found.get("type") != kind:
        raise RuntimeError(f"the page drew a {found.get('type')!r}, not the {kind}: {legend}")
    return {
        "drawn_ms": found["splats-drawn"],
        "request_ms": found.get("file_start", float("nan")),
        "transfer_ms": found.get("file_end", float("nan")) - found.get("file_start", float("nan")),
        "bytes_ms": found.get("splats-bytes", float("nan")),
        "decoded_ms": found.get("splats-decoded", float("nan")),
        "count": found.get("count", 0),
        "legend": legend,
    }


def run(repeats: int = 3, gaussians: int = 1_000_000) -> Section:
    """Run the benchmark; returns its section of BENCHMARKS.md."""
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"spz": [], "ply": []}
    with tempfile.TemporaryDirectory(prefix="bench-first-splats-") as folder:
        root = Path(folder)
        server = start_training_server(root, env={"FAKE_PIPELINE_SECONDS": "0.3"})
        try:
            task = trained_task(server)
            task_id = task["task_id"]
            sizes = replace_model(
                root / "temp_workspace" / "checkpoints" / task_id, task, gaussians
            )
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    one_run(browser, server.url, task_id, "spz")  # warm-up: server, page cache
                    for r in range(repeats):
                        for kind in ("spz", "ply") if r % 2 == 0 else ("ply", "spz"):
                            settle()
                            result = one_run(browser, server.url, task_id, kind)
                            if result["count"] != gaussians:
                                raise RuntimeError(f"drew {result['count']} Gaussians")
                            runs[kind].append(result)
                            log(
                                f"first_splats run {r + 1}/{repeats} {kind}: "
                                f"{result['drawn_ms'] / 1000:.2f} s"
                            )
                finally:
                    browser.close()
        finally:
            stop_server(server)
    section = report(runs, repeats, gaussians, sizes)
    section.seconds = time.perf_counter() - start
    return section


def saved(sizes: dict[str, int], bits_per_second: float) -> float:
    """Seconds the SPZ's fewer bytes save over a link of `bits_per_second`."""
    return (sizes["ply_bytes"] - sizes["spz_bytes"]) * 8 / bits_per_second


def report(
    runs: dict[str, list[dict[str, Any]]], repeats: int, gaussians: int, sizes: dict[str, int]
) -> Section:
    """The first-splats table."""
    section = Section(
        "first_splats",
        f"First splats in the page: SPZ against .ply, {gaussians:,} Gaussians",
        intro=(
            "Opening a finished task at `/#task={id}` in headless Chromium (SwiftShader, fresh "
            "context each run) until the first frame with the splats drawn (the viewer's "
            "`splats-drawn` performance mark), over loopback through the server's download "
            f"routes; a {sizes['ply_bytes'] / MIB:.0f} MiB degree-3 `.ply` and its "
            f"{sizes['spz_bytes'] / MIB:.1f} MiB SPZ (made-up values, bench/spz.py), put in "
            "place of a stand-in task's model. For the `.ply` the page is told the task has no "
            f"SPZ (see bench/first_splats.py). {runs_text(repeats)}"
        ),
    )
    table = Table(
        [
            "file",
            "size MiB",
            "first splats s",
            "download starts s",
            "download s",
            "then waits s",
            "decode s",
            "to first frame s",
        ]
    )
    titles = {"spz": "SPZ (model.spz)", "ply": ".ply (point_cloud.ply)"}
    for kind, title in titles.items():
        rows = runs[kind]
        table.add(
            title,
            f"{sizes[f'{kind}_bytes'] / MIB:.1f}",
            stat([r["drawn_ms"] / 1000 for r in rows]),
            stat([r["request_ms"] / 1000 for r in rows]),
            stat([r["transfer_ms"] / 1000 for r in rows]),
            stat([(r["bytes_ms"] - r["request_ms"] - r["transfer_ms"]) / 1000 for r in rows]),
            stat([(r["decoded_ms"] - r["bytes_ms"]) / 1000 for r in rows]),
            stat([(r["drawn_ms"] - r["decoded_ms"]) / 1000 for r in rows]),
        )
    section.tables = [table]
    speed = ratios([r["drawn_ms"] for r in runs["ply"]], [r["drawn_ms"] for r in runs["spz"]])
    spz_s = median([r["drawn_ms"] for r in runs["spz"]]) / 1000
    ply_s = median([r["drawn_ms"] for r in runs["ply"]]) / 1000
    section.notes += [
        f"The SPZ shows its first splats in {spz_s:.2f} s, the .ply in {ply_s:.2f} s: the "
        f".ply takes {stat(speed)}× as long (per-run ratios, .ply ÷ SPZ).",
        "Columns: download starts = the model request's start from the navigation's start "
        "(page, scripts, task and viewer libraries before it); download = the model's transfer "
        "(resource timing); then waits = from its last byte to the viewer getting the bytes "
        "(for the .ply the page first fetches /sparse, the cameras it starts the view from); "
        "decode = bytes in hand to Spark's mesh ready (`splats-bytes` to `splats-decoded`); "
        "to first frame = from there to `splats-drawn` (sort and first render, SwiftShader).",
        "Loopback hides the network: over a real link the smaller file saves its transfer on "
        f"top, {saved(sizes, 100e6):.1f} s at 100 Mbit/s and {saved(sizes, 500e6):.1f} s at "
        "500 Mbit/s for these files (their size difference over the link's rate).",
    ]
    section.raw = {
        "runs": runs,
        "repeats": repeats,
        "gaussians": gaussians,
        "sizes": sizes,
        "cpus": os.cpu_count(),
    }
    return section


def render(raw: dict[str, Any]) -> Section:
    """The section again from its saved raw numbers."""
    return report(raw["runs"], raw["repeats"], raw["gaussians"], raw["sizes"])


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="200,000 Gaussians, one run")
    args = parser.parse_args()
    section = run(1, 200_000) if args.quick else run(args.repeats, args.gaussians)
    section.save()
    print(section.text())


if __name__ == "__main__":
    main()
