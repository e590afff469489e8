"""Download benchmark: `GET /download/{id}` of a 2 GiB result, against `zip -0 -r` of the
same files to a file and against reading them once (`cat > /dev/null`).

    python bench/download.py [--repeats 3] [--size-gib 2] [--quick]

A real task runs to `training_completed` on a server with the test stand-ins for the
pipeline and the trainer; then its final `point_cloud.ply` is replaced by a large file (random
bytes behind the stand-in's PLY header) so that the files the ZIP holds — exactly the list
`training_server_trainer_output.result_files` gives the download route — add up to the size. The
same files, hard-linked under their names in the archive, are what `zip` and `cat` read.
The download is fetched by curl, to a file on the same disk (vs `zip`) and to /dev/null (vs
`cat`). All reads come from the page cache (the files are read once before the runs); the
disk is synced before every run; runs are interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

from common import (
    GIB,
    MIB,
    RESULTS,
    AppProcess,
    ProcessMeter,
    Section,
    Table,
    completed_task,
    log,
    median,
    ratios,
    remove,
    require_tools,
    runs_text,
    settle,
    start_training_server,
    stat,
    stop_server,
    timed,
)

import training_server_trainer_output as trainer_output

BLOCK = 64 * MIB
METHODS = {
    "ours_file": "GET /download/{id} → file (curl)",
    "zip": "`zip -0 -r` → file",
    "ours_null": "GET /download/{id} → /dev/null (curl)",
    "cat": "`cat` → /dev/null (read once)",
    "batched_null": "same ZIP, 1 MiB chunks per thread hop (throwaway app) → /dev/null",
}


def grow_result(output_dir: Path, total: int) -> list[tuple[Path, str]]:
    """Enlarge the final .ply so the ZIP's files add up to `total` bytes; returns them."""
    files = trainer_output.result_files(output_dir, keep_checkpoint=False)
    ply = next(p for p, name in files if name.endswith("point_cloud.ply"))
    others = sum(p.stat().st_size for p, _ in files if p != ply)
    header = ply.read_bytes().split(b"end_header\n", 1)[0] + b"end_header\n"
    remaining = total - others - len(header)
    block = os.urandom(BLOCK)
    with ply.open("wb") as out:
        out.write(header)
        while remaining > 0:
            remaining -= out.write(block[: min(BLOCK, remaining)])
    return trainer_output.result_files(output_dir, keep_checkpoint=False)


def stage(files: list[tuple[Path, str]], folder: Path) -> list[Path]:
    """Hard-link the files under their archive names into `folder`."""
    remove(folder)
    linked = []
    for path, name in files:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        linked.append(target)
    return linked


def run(repeats: int = 3, size_gib: float = 2.0) -> Section:
    """Run the download benchmark; returns its section of BENCHMARKS.md."""
    require_tools("curl", "zip", "cat")
    start = time.perf_counter()
    work = RESULTS / "download_work"
    remove(work)
    work.mkdir(parents=True)
    total = int(size_gib * GIB)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in METHODS}
    server = start_training_server(work / "server", min_free_bytes=0)
    app: AppProcess | None = None
    try:
        task_id = completed_task(server)["task_id"]
        output_dir = work / "server" / "temp_workspace" / "checkpoints" / task_id
        files = grow_result(output_dir, total)
        folder = work / "stage"
        linked = stage(files, folder)
        size = sum(p.stat().st_size for p in linked)
        log(f"download: {len(files)} files, {size / GIB:.3f} GiB; warming the page cache")
        subprocess.run(["cat", *map(str, linked)], stdout=subprocess.DEVNULL, check=True)
        url = f"{server.url}/download/{task_id}"
        listing = work / "files.json"
        listing.write_text(json.dumps([[str(p), name] for p, name in files]))
        app = AppProcess(work / "batched", ["zip-download", "--files", str(listing)])
        batched_url = f"{app.url}/download/{task_id}"
        downloaded = work / "download.zip"
        reference = work / "reference.zip"
        check_download(url, downloaded, files)
        check_download(batched_url, downloaded, files)
        order = list(METHODS)
        for r in range(repeats):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                settle()
                result: dict[str, float] = {}
                if name.startswith(("ours", "batched")):
                    sink = str(downloaded) if name == "ours_file" else "/dev/null"
                    pid = app.pid if name.startswith("batched") else server.proc.pid
                    source = batched_url if name.startswith("batched") else url
                    with ProcessMeter(pid) as meter:
                        result["s"] = timed(["curl", "-sf", "-o", sink, source])
                    result["rss_mb"] = meter.peak_growth_mb
                    result["cpu_s"] = meter.cpu_seconds
                    result["bytes"] = downloaded.stat().st_size if name == "ours_file" else 0
                    remove(downloaded)
                elif name == "zip":
                    result["s"] = timed(["zip", "-0", "-r", "-q", str(reference), "."], cwd=folder)
                    result["bytes"] = reference.stat().st_size
                    remove(reference)
                else:
                    result["s"] = timed(["cat", *map(str, linked)], stdout=subprocess.DEVNULL)
                runs[name].append(result)
                log(f"download run {r + 1}/{repeats} {name}: {result['s']:.2f} s")
    finally:
        stop_server(server)
        if app is not None:
            app.stop()
        remove(work)
    section = report(runs, repeats, size, len(files))
    section.seconds = time.perf_counter() - start
    return section


def check_download(url: str, path: Path, files: list[tuple[Path, str]]) -> None:
    """Fetch the ZIP once and check that it holds exactly the result files, intact."""
    subprocess.run(["curl", "-sf", "-o", str(path), url], check=True)
    with zipfile.ZipFile(path) as archive:
        names = sorted(archive.namelist())
        if names != sorted(name for _, name in files):
            raise RuntimeError(f"the ZIP holds {names}, expected {[n for _, n in files]}")
        bad = archive.testzip()
        if bad is not None:
            raise RuntimeError(f"{bad} is corrupt in the downloaded ZIP")
    remove(path)


def report(runs: dict[str, list[dict[str, float]]], repeats: int, size: int, count: int) -> Section:
    """The download table."""
    section = Section(
        "download",
        f"3. Download: GET /download/{{id}} of a {round(size / GIB, 1):g} GiB result",
        intro=(
            f"A `training_completed` task whose ZIP holds {count} files, {size / GIB:.2f} GiB "
            "in all (a large final `point_cloud.ply` plus the stand-in trainer's cameras.json, "
            "cfg_args and lightning_logs files). The server streams a stored (uncompressed) "
            "ZIP with zipstream-ng; curl fetches it over loopback. `zip -0 -r` archives the "
            "same files to a file; `cat` reads them once. The last row is a throwaway app "
            "streaming the same ZIP with one change (below). Page cache warm for all; `sync` "
            f"before every run; runs interleaved. {runs_text(repeats)}"
        ),
    )
    table = Table(
        ["method", "time s", "MB/s", "time ÷ reference", "peak RSS growth MiB", "server CPU s"],
    )
    pairs = {"ours_file": "zip", "ours_null": "cat", "batched_null": "cat"}
    for name, title in METHODS.items():
        seconds = [r["s"] for r in runs[name]]
        if name in pairs:
            reference = [r["s"] for r in runs[pairs[name]]]
            versus = f"{stat(ratios(seconds, reference))} (vs {pairs[name]})"
        else:
            versus = "1"
        table.add(
            title,
            stat(seconds),
            stat([size / s / 1e6 for s in seconds], 0),
            versus,
            stat([r["rss_mb"] for r in runs[name]], 0) if name in pairs else "–",
            stat([r["cpu_s"] for r in runs[name]]) if name in pairs else "–",
        )
    section.tables = [table]
    ours = median([r["s"] for r in runs["ours_null"]])
    batched = median([r["s"] for r in runs["batched_null"]])
    ours_cpu = median([r["cpu_s"] for r in runs["ours_null"]])
    batched_cpu = median([r["cpu_s"] for r in runs["batched_null"]])
    section.notes += [
        "The issue sets no numeric goal for downloads; a time ratio of 1 means as fast as the "
        "reference, above 1 slower. Memory stays flat: the ZIP is streamed.",
        "What limits it: the server streams zipstream-ng's archive through Starlette, which "
        "runs each step of a plain iterator in its thread pool; `_iterate` joins the 64 KiB "
        "pieces into about 1 MiB per step (as the throwaway app does: "
        f"{ours / batched:.2f}× its time, {ours_cpu / batched_cpu:.2f}× its CPU here). What "
        "is left over `cat` is the CRC-32 every ZIP entry needs (stored entries included), "
        "one pass of the data through Python and the ASGI server, and curl on the same two "
        "cores. What would move it: sendfile-style streaming of the stored entries with "
        "precomputed CRCs (kept beside the results when training ends).",
    ]
    section.raw = {"runs": runs, "size_bytes": size, "files": count, "repeats": repeats}
    return section


def render(raw: dict[str, Any]) -> Section:
    """The section again from its saved raw numbers."""
    return report(raw["runs"], raw["repeats"], raw["size_bytes"], raw["files"])


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="0.5 GiB, one run")
    args = parser.parse_args()
    section = run(1, 0.5) if args.quick else run(args.repeats, args.size_gib)
    section.save()
    print(section.text())


if __name__ == "__main__":
    main()
