"""Decide by content whether a file is a usable video, and describe it.

Run as `python -m pipeline.probe FILE`: prints one JSON object and exits 0 when the file is a
decodable video, or prints `{"error": "..."}` and exits 3 when it is not. The server runs it
as a subprocess so that a hostile file can at worst crash this process, not the server.

The container is recognised from its first bytes and opened with that demuxer forced, so
FFmpeg never guesses a format such as a playlist that would make it open other files.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import Any

import av

HEAD_BYTES = 4096  # what sniff_container needs to see of a file's start
# The one table of video container signatures, for the upload check and the pipeline.
MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
TS_PACKET = 188


class NotAVideoError(Exception):
    """The file cannot be used as a video; the message says why in plain words."""


def sniff_container(head: bytes) -> tuple[str, str] | None:
    """(FFmpeg demuxer name, file extension) for a known video container signature in a
    file's first bytes (HEAD_BYTES of them suffice), or None."""
    if len(head) >= 8 and head[4:8] in MP4_BOXES:
        is_quicktime = head[8:12] == b"qt  "
        return "mov", ".mov" if is_quicktime else ".mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska", ".webm" if b"webm" in head[:64] else ".mkv"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi", ".avi"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg", ".mpg"
    if head.startswith(b"FLV"):
        return "flv", ".flv"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "asf", ".wmv"
    if len(head) > TS_PACKET * 2 and head[0] == head[TS_PACKET] == head[2 * TS_PACKET] == 0x47:
        return "mpegts", ".ts"
    return None


def _describe_head(head: bytes) -> str:
    text = head[:512].lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<svg", b"<")):
        return "it looks like an HTML or XML document"
    if text.startswith(b"#!") or text.startswith(b"#extm3u"):
        return "it looks like a script or a playlist"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return "it looks like a still image"
    if head.startswith(b"PK\x03\x04"):
        return "it looks like a ZIP archive"
    if head.startswith(b"%PDF"):
        return "it looks like a PDF document"
    if not head:
        return "it is empty"
    return "its content is not a known video container (MP4, MOV, MKV, WebM, AVI, MPEG, FLV)"


def _ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's own words for a failure, without the file path."""
    reason = getattr(exc, "strerror", None) or str(exc)
    log = getattr(exc, "log", None)
    if log and isinstance(log, tuple) and len(log) >= 3 and log[2]:
        reason = f"{reason} ({str(log[2]).strip()})"
    return reason


def _decode_one(container: av.container.InputContainer, stream: av.VideoStream) -> Any:
    for frame in container.decode(stream):
        return frame
    return None


def probe(path: Path) -> dict[str, Any]:
    """Describe the video at `path`; raise NotAVideoError with a readable reason otherwise."""
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
    found = sniff_container(head)
    if found is None:
        raise NotAVideoError(f"The file is not a video: {_describe_head(head)}.")
    demuxer, extension = found
    try:
        container = av.open(str(path), format=demuxer, options={"protocol_whitelist": "file"})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise NotAVideoError(
            f"The video could not be opened: {_ffmpeg_reason(exc)}. "
            "The file may be damaged or incomplete."
        ) from exc
    with container:
        if not container.streams.video:
            raise NotAVideoError("The file has no video stream (is it audio only?).")
        stream = container.streams.video[0]
        try:
            first = _decode_one(container, stream)
        except av.FFmpegError as exc:
            raise NotAVideoError(
                f"The video stream cannot be decoded: {_ffmpeg_reason(exc)}."
            ) from exc
        if first is None:
            raise NotAVideoError("The video stream holds no decodable frame.")
        duration = None
        if container.duration:
            duration = container.duration / 1_000_000
        elif stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        if duration and duration > 1.0:
            # A file cut short keeps its index but loses the data at the end: decode there too.
            try:
                container.seek(int(duration * 0.9 * 1_000_000), backward=True)
                last = _decode_one(container, stream)
            except av.FFmpegError as exc:
                raise NotAVideoError(
                    f"The video is damaged or cut short near its end: {_ffmpeg_reason(exc)}."
                ) from exc
            if last is None:
                raise NotAVideoError("The video is cut short: its last part cannot be decoded.")
        rotation = int(getattr(first, "rotation", 0) or 0) % 360
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation in (90, 270):
            width, height = height, width
        rate = stream.average_rate or stream.guessed_rate
        return {
            "container": demuxer,
            "extension": extension,
            "codec": stream.codec_context.name,
            "pixel_format": stream.codec_context.pix_fmt,
            "width": width,
            "height": height,
            "rotation": rotation,
            "fps": round(float(rate), 3) if rate else None,
            "frames": stream.frames or None,
            "duration": round(duration, 3) if duration else None,
            "has_audio": bool(container.streams.audio),
        }


def main(argv: list[str]) -> int:
    """CLI entry: probe one file, print JSON, exit 0 (video) or 3 (not usable).

    `--timeout S` ends the probe after S seconds of wall time even if nobody waits for it
    (the server may have died)."""
    if len(argv) == 3 and argv[0] == "--timeout":
        signal.alarm(max(1, math.ceil(float(argv[1]))))
        argv = argv[2:]
    if len(argv) != 1:
        print(json.dumps({"error": "usage: python -m pipeline.probe [--timeout S] FILE"}))
        return 2
    av.logging.set_level(av.logging.PANIC)
    try:
        info = probe(Path(argv[0]))
    except NotAVideoError as exc:
        print(json.dumps({"error": str(exc)}))
        return 3
    except OSError as exc:
        print(json.dumps({"error": f"The file cannot be read: {exc.strerror}"}))
        return 3
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
