"""Photo sets and ZIPs read safely (pipeline/sources.py), the frames of a capture with several
sources (pipeline/capture.py) and how they are paired for matching (pipeline/sfm.py): no entry
of a ZIP lands outside its folder, links and bombs are refused while extracting, a non-image
is named, one camera per source, EXIF orientation honoured."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from conftest import OFFICE_VIDEO
from pipeline import capture, sfm, sources


def office_photos(count: int = 17) -> list[Image.Image]:
    """Frames of the office sample as Pillow images (the photos of a real capture)."""
    with av.open(str(OFFICE_VIDEO)) as container:
        images = [frame.to_image() for frame in container.decode(video=0)]
    return images[:count]


def jpeg(image: Image.Image, *, model: str = "", orientation: int = 1) -> bytes:
    exif = Image.Exif()
    if model:
        exif[0x010F] = "TestCam"
        exif[0x0110] = model
    if orientation != 1:
        exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return out.getvalue()


def extract(tmp_path: Path, data: bytes, **kwargs: object) -> list[sources.ExtractedSet]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    archive = tmp_path / "upload.zip"
    archive.write_bytes(data)
    target = tmp_path / "task" / "inputs"
    return sources.extract_zip(
        archive,
        target,
        display_name="photos.zip",
        max_bytes=kwargs.pop("max_bytes", 1 << 30),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_a_zip_of_photos_becomes_one_set_per_folder(tmp_path):
    photos = [jpeg(im) for im in office_photos(6)]
    data = make_zip(
        [(f"scene/low/{k}.jpg", photos[k]) for k in range(3)]
        + [(f"scene/high/{k}.jpg", photos[k + 3]) for k in range(3)]
        + [("__MACOSX/scene/._0.jpg", b"\x00\x05\x16\x07"), ("scene/.DS_Store", b"x")]
    )
    sets = extract(tmp_path, data)
    assert [(s.label, len(s.images)) for s in sets] == [("scene/low", 3), ("scene/high", 3)]
    assert [s.folder.name for s in sets] == ["01_scene_low", "02_scene_high"]
    assert sets[0].images[0].name == "scene/low/0.jpg"
    assert sets[0].images[0].format == "JPEG"
    assert (sets[0].images[0].width, sets[0].images[0].height) == (640, 480)
    # Files are named by us; what the OS added is skipped, not refused.
    assert [p.name for p in files_under(sets[0].folder)] == [
        "0001_0.jpg",
        "0002_1.jpg",
        "0003_2.jpg",
    ]
    found = sources.discover([tmp_path / "task" / "inputs"])
    assert [(s.kind, s.label, len(s.images)) for s in found] == [
        ("photos", "scene_low", 3),
        ("photos", "scene_high", 3),
    ]


@pytest.mark.parametrize(
    "name", ["../evil.jpg", "a/../../evil.jpg", "/tmp/evil.jpg", "..\\evil.jpg", "C:/evil.jpg"]
)
def test_zip_path_traversal_is_refused_and_nothing_lands_outside(tmp_path, name):
    photo = jpeg(office_photos(1)[0])
    data = make_zip([("ok.jpg", photo), (name, photo)])
    with pytest.raises(sources.SourceError) as refused:
        extract(tmp_path, data)
    assert refused.value.kind == "unsupported"
    assert "unsafe path" in refused.value.message
    assert not (tmp_path / "evil.jpg").exists() and not Path("/tmp/evil.jpg").exists()
    assert all(p.is_relative_to(tmp_path / "task") for p in files_under(tmp_path / "task"))


def test_zip_symlinks_and_special_files_are_refused(tmp_path):
    link = zipfile.ZipInfo("photo.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(sources.SourceError) as refused:
        extract(tmp_path, make_zip([(link, b"/etc/passwd")]))
    assert "symbolic link" in refused.value.message
    fifo = zipfile.ZipInfo("pipe.jpg")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    with pytest.raises(sources.SourceError, match="not a regular file"):
        extract(tmp_path / "b", make_zip([(fifo, b"")]))


def test_a_non_image_in_the_zip_is_named(tmp_path):
    photos = [jpeg(im) for im in office_photos(2)]
    data = make_zip([("a.jpg", photos[0]), ("docs/notes.txt", b"hello"), ("b.jpg", photos[1])])
    with pytest.raises(sources.SourceError) as refused:
        extract(tmp_path, data)
    assert refused.value.kind == "unsupported"
    assert "docs/notes.txt" in refused.value.message
    assert "not a photo" in refused.value.message
    # A text file named .jpg is refused by its content too.
    with pytest.raises(sources.SourceError, match=r"fake\.jpg"):
        extract(tmp_path / "b", make_zip([("fake.jpg", b"#!/bin/sh\necho pwned\n")]))


def test_a_zip_bomb_stops_while_extracting(tmp_path):
    zeros = b"\xff\xd8\xff" + bytes(64 * 2**20)  # 64 MiB that deflate to about 64 KiB
    data = make_zip([("bomb.jpg", zeros)])
    assert len(data) < 2**20
    with pytest.raises(sources.SourceError) as refused:
        extract(tmp_path, data)
    assert refused.value.kind == "too_large"
    assert "ZIP bomb" in refused.value.message
    # Stopped once the allowance was spent: 4x its size plus 16 MiB, not 64 MiB.
    written = sum(p.stat().st_size for p in files_under(tmp_path / "task"))
    assert written <= sources.MAX_ZIP_RATIO * len(data) + sources.ZIP_RATIO_SLACK


def test_a_zip_whose_headers_lie_about_sizes_is_not_trusted(tmp_path):
    zeros = b"\xff\xd8\xff" + bytes(64 * 2**20)
    data = bytearray(make_zip([("bomb.jpg", zeros)]))
    # Claim 100 bytes uncompressed in the local and the central header.
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, 100)
    struct.pack_into("<I", data, central + 24, 100)
    with pytest.raises(sources.SourceError) as refused:
        extract(tmp_path, bytes(data))
    assert refused.value.kind in {"too_large", "unsupported"}
    written = sum(p.stat().st_size for p in files_under(tmp_path / "task"))
    assert written <= sources.MAX_ZIP_RATIO * len(data) + sources.ZIP_RATIO_SLACK


def test_too_many_zip_entries_and_the_upload_limit(tmp_path, monkeypatch):
    photo = jpeg(office_photos(1)[0])
    monkeypatch.setattr(sources, "MAX_ZIP_ENTRIES", 5)
    with pytest.raises(sources.SourceError, match="6 entries; at most 5"):
        extract(tmp_path, make_zip([(f"{k}.jpg", photo) for k in range(6)]))
    monkeypatch.setattr(sources, "MAX_ZIP_ENTRIES", 5000)
    with pytest.raises(sources.SourceError) as refused:
        extract(tmp_path / "b", make_zip([(f"{k}.jpg", photo) for k in range(3)]), max_bytes=1000)
    assert refused.value.kind == "too_large"


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` (its data is never decoded by the checks)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + body + end


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 MP (ours) and 400 MP (Pillow's own)
def test_decompression_bombs_are_refused_from_the_header(tmp_path, side):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(sources.SourceError) as refused:
        sources.inspect_image(path, "huge.png")
    assert refused.value.kind == "too_large"
    assert "huge.png" in refused.value.message


def test_total_pixels_count_and_too_few_photos(tmp_path, monkeypatch):
    def info(k: int, model: str = "A", size: tuple[int, int] = (640, 480)) -> sources.ImageInfo:
        return sources.ImageInfo(
            tmp_path / f"{k}.jpg", f"{k}.jpg", "JPEG", *size, camera=("TestCam", model, 4.2)
        )

    with pytest.raises(sources.SourceError) as refused:
        sources.check_capture({"photos": [info(k) for k in range(4)]}, videos=0)
    assert refused.value.kind == "unprocessable"
    assert "Only 4 photos" in refused.value.message and "at least 10" in refused.value.message
    sources.check_capture({"photos": [info(k) for k in range(4)]}, videos=1)  # with a video
    monkeypatch.setattr(sources, "MAX_TOTAL_PIXELS", 3_000_000)
    with pytest.raises(sources.SourceError, match="gigapixels") as refused:
        sources.check_capture({"photos": [info(k) for k in range(12)]}, videos=0)
    assert refused.value.kind == "too_large"


def test_mixed_cameras_in_one_source_are_refused_with_what_to_do(tmp_path):
    images = office_photos(10)
    folder = tmp_path / "set"
    folder.mkdir()
    infos = []
    for k, image in enumerate(images):
        path = folder / f"{k}.jpg"
        path.write_bytes(jpeg(image, model="One" if k < 6 else "Two"))
        infos.append(sources.inspect_image(path, path.name))
    assert infos[0].camera[:2] == ("TestCam", "One")
    with pytest.raises(sources.SourceError) as refused:
        sources.check_capture({"photos.zip": infos}, videos=0)
    message = refused.value.message
    assert refused.value.kind == "unprocessable"
    assert "2 different cameras" in message and "one camera per source" in message
    assert "6 x TestCam One" in message and "4 x TestCam Two" in message
    # The same cameras as two sources are fine.
    sources.check_capture({"a": infos[:6], "b": infos[6:]}, videos=1)
    # Portrait and landscape of one camera: said in those words.
    turned = [
        sources.ImageInfo(i.path, i.name, "JPEG", 480, 640, camera=i.camera) for i in infos[:3]
    ]
    with pytest.raises(sources.SourceError, match="portrait and some landscape"):
        sources.check_capture({"p": infos[:6] + turned}, videos=1)


def test_exif_orientation_is_honoured(tmp_path):
    # Left half red, right half blue, stored sideways: orientation 6 says "turn 90 degrees
    # clockwise to show it", so upright the red half is on top.
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    path = tmp_path / "sideways.jpg"
    path.write_bytes(jpeg(stored, orientation=6))
    info = sources.inspect_image(path, path.name)
    assert (info.orientation, info.width, info.height) == (6, 32, 64)
    out = tmp_path / "upright.jpg"
    assert sources.write_upright(path, out) == (32, 64)
    upright = np.asarray(Image.open(out))
    assert upright.shape == (64, 32, 3)
    top, bottom = upright[8, 16], upright[56, 16]
    assert top[0] > 200 and top[2] < 60, top  # red
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue


def test_png_with_alpha_and_heic_are_read(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (10, 200, 10, 0))
    png = tmp_path / "a.png"
    rgba.save(png)
    assert sources.inspect_image(png, "a.png").format == "PNG"
    assert sources.write_upright(png, tmp_path / "a.jpg") == (40, 30)
    assert sources.HEIC_SUPPORTED
    heic = tmp_path / "b.heic"
    Image.new("RGB", (48, 32), (200, 10, 10)).save(heic)
    info = sources.inspect_image(heic, "b.heic")
    assert (info.format, info.width, info.height) == ("HEIF", 48, 32)
    assert sources.write_upright(heic, tmp_path / "b.jpg") == (48, 32)


def test_a_photo_set_becomes_upright_frames_with_thumbnails(tmp_path):
    folder = tmp_path / "inputs" / "01_photos"
    folder.mkdir(parents=True)
    for k, image in enumerate(office_photos(12)):
        (folder / f"{k:04d}_p.jpg").write_bytes(
            jpeg(image.transpose(Image.Transpose.ROTATE_90), orientation=6)
        )
    found = sources.discover([tmp_path / "inputs"])
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    group = capture.gather_photos(found[0], frames_dir, 8, "s01_", lambda c, t: None)
    assert len(group.names) == 8  # thinned evenly to the limit
    assert group.names[0] == "s01_photo_0001.jpg"
    assert group.size == (640, 480)  # upright again
    assert group.thumbs is not None and len(group.thumbs) == 8
    assert group.photo_names["s01_photo_0001.jpg"] == "0000_p.jpg"


def test_frames_are_shared_fairly_between_sources():
    assert capture.share_frames([None, None], 100) == [50, 50]
    assert capture.share_frames([12, None, None], 100) == [12, 44, 44]
    assert capture.share_frames([200], 100) == [100]


def test_pairs_sequential_in_videos_exhaustive_in_small_photo_sets_spread_across():
    spans = [
        sfm.SourceSpan(0, 30, True),
        sfm.SourceSpan(30, 30, True),
        sfm.SourceSpan(60, 12, False),
    ]
    pairs = sfm.capture_pairs(spans, overlap=5, loop_closure=False)
    video = {p for p in pairs if p[0] < 30 and p[1] < 30}
    assert video == sfm.sequential_pairs(30, 5)
    photos = {p for p in pairs if p[0] >= 60}
    assert photos == {(60 + i, 60 + j) for i, j in sfm.all_pairs(12)}
    across = [p for p in pairs if p[0] < 30 <= p[1] < 60]
    assert len(across) <= sfm.CROSS_PAIRS_PER_FRAME * 60
    # Every frame of both videos meets the other video, all along it.
    assert {i for i, _ in across} == set(range(30))
    assert {j for _, j in across} == set(range(30, 60))
    # Small sources: every pair across.
    small = sfm.capture_pairs([sfm.SourceSpan(0, 4, True), sfm.SourceSpan(4, 4, False)], 5, False)
    assert {(i, j) for i in range(4) for j in range(4, 8)} <= small
