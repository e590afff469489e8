"""pipeline/probe.py: uploads are judged by content."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import OFFICE_VIDEO, REPO, STATIC_VIDEO
from pipeline.probe import NotAVideoError, probe, sniff_container


def write_video(
    path: Path,
    *,
    frames: int = 30,
    rotation: int = 0,
    audio_only: bool = False,
    faststart: bool = False,
) -> Path:
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        if audio_only:
            stream = out.add_stream("aac", rate=44100)
            for index in range(20):
                frame = av.AudioFrame.from_ndarray(
                    np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
                )
                frame.sample_rate = 44100
                frame.pts = index * 1024
                for packet in stream.encode(frame):
                    out.mux(packet)
        else:
            stream = out.add_stream("libx264", rate=10)
            stream.width, stream.height = 64, 48
            stream.pix_fmt = "yuv420p"
            if rotation:
                stream.set_display_rotation(rotation)
            rng = np.random.default_rng(1)
            for _ in range(frames):
                image = rng.integers(0, 255, (48, 64, 3), np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_real_videos_are_described() -> None:
    info = probe(OFFICE_VIDEO)
    assert (info["width"], info["height"], info["frames"]) == (640, 480, 17)
    assert info["extension"] == ".mp4"
    assert info["duration"] == pytest.approx(8.5, abs=0.1)
    static = probe(STATIC_VIDEO)
    assert static["pixel_format"] == "yuv444p"
    assert static["has_audio"] is True


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"<!DOCTYPE html><html></html>", "HTML"),
        (b"#!/bin/sh\nrm -rf /\n", "script"),
        (b"#EXTM3U\n#EXT-X-TARGETDURATION:1\nfile:///etc/passwd\n", "playlist"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image"),
        (b"", "empty"),
    ],
)
def test_non_videos_are_named_for_what_they_are(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(content)
    with pytest.raises(NotAVideoError, match=reason):
        probe(path)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = write_video(tmp_path / "a.mp4", audio_only=True)
    with pytest.raises(NotAVideoError, match="no video stream"):
        probe(path)


def test_truncated_videos_are_refused(tmp_path: Path) -> None:
    # Index at the end: cutting the file loses it.
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(OFFICE_VIDEO.read_bytes()[:300_000])
    with pytest.raises(NotAVideoError, match="damaged or incomplete"):
        probe(cut)
    # Index at the front (faststart): the index survives, the end of the data does not.
    whole = write_video(tmp_path / "fast.mp4", frames=300, faststart=True)
    assert probe(whole)["frames"] == 300
    data = whole.read_bytes()
    cut_fast = tmp_path / "cut_fast.mp4"
    cut_fast.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(NotAVideoError, match="cut short"):
        probe(cut_fast)


def test_rotation_metadata_swaps_the_shown_size(tmp_path: Path) -> None:
    info = probe(write_video(tmp_path / "r.mp4", rotation=90))
    assert info["rotation"] in {90, 270}
    assert (info["width"], info["height"]) == (48, 64)


def test_sniff_container() -> None:
    assert sniff_container(OFFICE_VIDEO.read_bytes()[:64]) == ("mov", ".mp4")
    assert sniff_container(b"\x1a\x45\xdf\xa3" + b"\0" * 60)[0] == "matroska"
    assert sniff_container(b"RIFF\0\0\0\0AVI LIST") == ("avi", ".avi")
    assert sniff_container(b"hello") is None


def test_cli_prints_json_and_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "pipeline.probe", str(OFFICE_VIDEO)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0
    assert json.loads(ok.stdout)["codec"] == "h264"
    bad = tmp_path / "bad.mp4"
    bad.write_text("hello")
    refused = subprocess.run(
        [sys.executable, "-m", "pipeline.probe", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 3
    assert "not a video" in json.loads(refused.stdout)["error"]


@pytest.mark.parametrize(
    ("head", "code"),
    [
        (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, "corrupt_video"),
        (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11" + b"\x07" * 200, "corrupt_video"),
        (b"<!doctype html><html><body>not a video</body></html>", "not_a_video"),
    ],
)
def test_pipeline_tells_damaged_from_foreign_files_by_the_same_table(
    tmp_path: Path, head: bytes, code: str
) -> None:
    """The pipeline calls a file that FFmpeg cannot open damaged exactly when the upload
    check recognises its container."""
    from pipeline.frames import PipelineError, open_video

    path = tmp_path / "upload.mp4"
    path.write_bytes(head)
    with pytest.raises(PipelineError) as caught:
        open_video(path)
    assert caught.value.code == code
    assert (sniff_container(head) is not None) == (code == "corrupt_video")
