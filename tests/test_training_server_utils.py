"""Small pure helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training_server_utils import (
    content_disposition,
    download_name,
    parse_bool,
    parse_stage_line,
    pipeline_progress,
    safe_files,
    sanitize_filename,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("video.mp4", "video.mp4"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\clip.MOV", "clip.MOV"),
        ("a\x00b\r\nc.mp4", "abc.mp4"),
        ("..", None),
        ("", None),
        (None, None),
        ("   ", None),
        ("Straße ☃.mp4", "Straße ☃.mp4"),
    ],
)
def test_sanitize_filename(raw: str | None, clean: str | None) -> None:
    assert sanitize_filename(raw) == clean


def test_sanitize_filename_bounds_the_length_in_bytes_and_keeps_the_extension() -> None:
    name = sanitize_filename("東" * 300 + ".mp4")
    assert name is not None and name.endswith(".mp4")
    assert len(name.encode()) <= 200


def test_content_disposition_is_one_safe_header_line() -> None:
    value = content_disposition('évil"\r\nSet-Cookie: a=b.zip')
    assert "\r" not in value and "\n" not in value
    fallback = value.split('filename="', 1)[1].split('"', 1)[0]
    assert '"' not in fallback and fallback.isascii()
    assert "filename*=UTF-8''%C3%A9vil%22%0D%0ASet-Cookie%3A%20a%3Db.zip" in value


def test_download_name() -> None:
    assert download_name("clip.mp4", "id", ".zip") == "clip.zip"
    assert download_name(None, "id", ".zip") == "id.zip"
    assert download_name("../..", "id", ".ply") == "id.ply"


def test_parse_bool() -> None:
    assert parse_bool("Yes") is True
    assert parse_bool("0") is False
    with pytest.raises(ValueError):
        parse_bool("perhaps")


def test_stage_protocol_lines() -> None:
    assert parse_stage_line('@progress {"stage": "features", "current": 3, "total": 10}') == (
        "progress",
        {"stage": "features", "current": 3, "total": 10},
    )
    assert parse_stage_line("@error not json") is None
    assert parse_stage_line("@other {}") is None
    assert parse_stage_line("plain text") is None
    assert parse_stage_line("@progress [1, 2]") is None


def test_pipeline_progress_adds_up_across_steps() -> None:
    first = pipeline_progress({"stage": "decode", "current": 0, "total": 10})
    middle = pipeline_progress({"stage": "features", "current": 5, "total": 10})
    last = pipeline_progress({"stage": "undistort", "current": 10, "total": 10})
    assert first is not None and middle is not None and last is not None
    assert first["percent"] == 0
    assert 0 < middle["percent"] < 50
    assert last["percent"] == 100
    assert middle["label"] == "Feature extraction"
    assert pipeline_progress({"stage": "unknown"}) is None
    assert pipeline_progress({"stage": "mapping", "current": -1, "total": "x"})["current"] is None


def test_pipeline_lines_parse_back_with_the_one_label_table() -> None:
    """What the pipeline writes is what the server reads: same stages, same labels."""
    import io

    from pipeline.protocol import STAGES, error_line, progress_line, write_line

    stream = io.StringIO()
    for stage in STAGES:
        write_line(stream, progress_line(stage, 2, 4))
    write_line(stream, error_line("too_few_frames", "Record a longer video."))
    parsed = [parse_stage_line(line) for line in stream.getvalue().splitlines()]
    assert all(p is not None for p in parsed)
    progress = [pipeline_progress(data) for tag, data in parsed[:-1] if tag == "progress"]
    assert [p["step"] for p in progress] == list(STAGES)
    assert [p["label"] for p in progress] == [stage.label for stage in STAGES.values()]
    percents = [p["percent"] for p in progress]
    assert percents == sorted(percents) and percents[0] > 0 and percents[-1] < 100
    assert parsed[-1] == ("error", {"code": "too_few_frames", "message": "Record a longer video."})
    # Without a label on the line, the server shows the same label the pipeline would.
    assert pipeline_progress({"stage": "decode", "current": 1})["label"] == STAGES["decode"].label
    with pytest.raises(ValueError):
        progress_line("training", 0, None)


def test_safe_files_never_follow_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.txt").write_text("b")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key").write_text("k")
    os.symlink(outside / "key", root / "link.txt")
    os.symlink(outside, root / "linkdir")
    files = safe_files(root, "data")
    assert [arc for _, arc in files] == ["data/a.txt", "data/sub/b.txt"]
    assert safe_files(root / "linkdir", "x") == []
