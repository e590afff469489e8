"""What a capture's sources are, and reading photo sets safely.

A capture is one video (as always), or several sources of the same scene: videos, and sets of
photos (JPEG, PNG, HEIC) that each come from one camera. On disk the server lays several
sources out as one folder, `inputs/`, in upload order:

    inputs/01_orbit_low.mp4        a video (any name that is not a folder)
    inputs/02_orbit_high.mov       another video
    inputs/03_photos/0001_a.jpg    a photo set: one folder, one camera

`discover` reads such a folder back (run_pipeline.py --video_path inputs/). Photo sets come
from ZIP files (`extract_zip`: never outside the target folder, no links, bounded in size and
entry count while extracting, not trusting the headers) or from image files sent one by one;
`inspect_image` checks each image by content (format, pixels per image; Pillow's own
decompression-bomb limit) and reads its EXIF orientation and camera; `check_camera` refuses a
set that mixes cameras; `write_upright` writes an image upright (EXIF orientation applied) as
the JPEG frame the reconstruction reads.

Errors are `SourceError` with a `kind` the server maps to an HTTP status (`unsupported` 415,
`too_large` 413, `unprocessable` 422) and a message naming the file.
"""

from __future__ import annotations

import re
import shutil
import stat
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from PIL import Image, ImageOps, UnidentifiedImageError

try:  # HEIC/HEIF photos (iPhones): pillow-heif registers a Pillow opener
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIC_SUPPORTED = True
except ImportError:  # pragma: no cover - the requirements pin it
    HEIC_SUPPORTED = False

# -- limits -------------------------------------------------------------------------------

# Pixels per image: Pillow's own decompression-bomb limit (89.5 MP, about a 12,000 x 7,500
# photo; the largest phone sensors' full-resolution modes stay under it). Pillow refuses
# twice that on open; we refuse anything above it from the header, before decoding.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Pixels of all photos of a capture together: 600 photos of 12 MP. Decoding and writing them
# upright takes about 2 minutes on 2 cores; training uses at most 1.6 MP of each anyway.
MAX_TOTAL_PIXELS = 8_000_000_000
MAX_IMAGES = 2000  # photos in a capture (matching every pair of them would take days beyond)
MIN_IMAGES = 10  # photos needed when there is no video: the quality gate's --min_registered
MAX_ZIP_ENTRIES = 5000  # entries of one ZIP, folders and skipped files included
# Photos are compressed already, so a real ZIP of them inflates by about 1.0-1.1; a ZIP bomb
# by 1,000 or more. Extraction stops past this ratio (or the upload size limit), counting the
# bytes that come out, not what the headers claim.
MAX_ZIP_RATIO = 4.0
ZIP_RATIO_SLACK = 16 * 1024 * 1024  # small ZIPs (a few PNGs of flat colour) may inflate more
COPY_CHUNK = 1024 * 1024
JPEG_QUALITY = 95

IMAGE_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "HEIF": ".heic"}
VIDEO_NAME = re.compile(r"^\d+_")
# What operating systems add to ZIPs by themselves: skipped, not refused.
JUNK_PARTS = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}


class SourceError(Exception):
    """A capture's input cannot be used: `kind` is `unsupported` (415), `too_large` (413)
    or `unprocessable` (422); the message names the file and says what to do."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def sniff_image(head: bytes) -> str | None:
    """`JPEG`, `PNG` or `HEIF` from a file's first bytes (16 suffice), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[4:8] == b"ftyp" and head[8:12] in {b"heic", b"heix", b"heim", b"heis", b"mif1"}:
        return "HEIF"
    return None


def is_zip(head: bytes) -> bool:
    """Whether a file's first bytes are a ZIP archive's (an empty one included)."""
    return head.startswith((b"PK\x03\x04", b"PK\x05\x06"))


def read_head(path: Path, size: int = 64) -> bytes:
    """A file's first bytes."""
    with path.open("rb") as f:
        return f.read(size)


def safe_label(name: str, limit: int = 60) -> str:
    """A file or folder name reduced to letters, digits, `.`, `_` and `-` (never empty, never
    a dot name): what is written on disk for a client's name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:limit]
    return cleaned or "source"


# -- images -------------------------------------------------------------------------------


@dataclass
class ImageInfo:
    """One photo as checked: where it is, its name for the user, its format, its upright size
    and the camera that took it (from EXIF, where it says)."""

    path: Path
    name: str
    format: str
    width: int
    height: int
    orientation: int = 1  # EXIF orientation tag (1: already upright)
    camera: tuple[str, str, float | None] = ("", "", None)  # make, model, focal length (mm)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _exif_camera(exif: Image.Exif) -> tuple[str, str, float | None]:
    make = str(exif.get(0x010F, "") or "").strip("\x00 ")
    model = str(exif.get(0x0110, "") or "").strip("\x00 ")
    focal: Any = exif.get_ifd(0x8769).get(0x920A)
    try:
        focal_mm = round(float(focal), 2) if focal is not None else None
    except (TypeError, ValueError, ZeroDivisionError):
        focal_mm = None
    return make, model, focal_mm


def inspect_image(path: Path, name: str) -> ImageInfo:
    """Check by content that `path` is a JPEG, PNG or HEIC image of at most MAX_IMAGE_PIXELS
    (from its header: nothing is decoded), and read its upright size and camera."""
    kind = sniff_image(read_head(path))
    if kind is None or (kind == "HEIF" and not HEIC_SUPPORTED):
        raise SourceError(
            "unsupported",
            f"{name} is not a photo this server reads (JPEG, PNG"
            f"{' or HEIC' if HEIC_SUPPORTED else ''}): remove it and upload again.",
        )
    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise SourceError(
                    "too_large",
                    f"{name} has {width} x {height} pixels ({width * height / 1e6:.0f} MP); "
                    f"at most {MAX_IMAGE_PIXELS / 1e6:.0f} MP per photo are accepted.",
                )
            exif = image.getexif()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SourceError(
            "too_large",
            f"{name} claims more pixels than {MAX_IMAGE_PIXELS / 1e6:.0f} MP: it is refused.",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SourceError(
            "unsupported", f"{name} is a damaged {kind} image that cannot be read ({exc})."
        ) from None
    orientation = int(exif.get(0x0112, 1) or 1)
    if orientation in (5, 6, 7, 8):  # turned by 90 degrees: the upright image is transposed
        width, height = height, width
    return ImageInfo(path, name, kind, width, height, orientation, _exif_camera(exif))


def describe_camera(info: ImageInfo) -> str:
    """ "Apple iPhone 13, 5.1 mm, 3024 x 4032" (what is known of the camera)."""
    make, model = info.camera[:2]
    # Many makers repeat their name in the model ("Canon EOS R6"): say it once.
    brand = model if make and model.lower().startswith(make.lower()) else f"{make} {model}"
    parts = [brand.strip() or "no camera in EXIF"]
    if info.camera[2]:
        parts.append(f"{info.camera[2]:g} mm")
    parts.append(f"{info.width} x {info.height}")
    return ", ".join(parts)


def check_camera(label: str, images: list[ImageInfo]) -> None:
    """Refuse a photo set whose images come from more than one camera (EXIF make, model and
    focal length) or have different upright sizes: COLMAP estimates one lens per source."""
    kinds = Counter((im.camera, im.width, im.height) for im in images)
    if len(kinds) <= 1:
        return
    example = {
        key: next(im for im in images if (im.camera, im.width, im.height) == key) for key in kinds
    }
    listed = "; ".join(
        f"{count} x {describe_camera(example[key])} (e.g. {example[key].name})"
        for key, count in kinds.most_common(4)
    )
    sizes = {(im.width, im.height) for im in images}
    turned = len(sizes) == 2 and len({tuple(sorted(s)) for s in sizes}) == 1
    hint = (
        " Some photos are portrait and some landscape: the lens is estimated per source, so "
        "put each orientation in its own folder of the ZIP."
        if turned and len({im.camera for im in images}) == 1
        else " Put each camera's photos in its own folder of the ZIP (each folder is a "
        "source with its own lens), or upload them separately."
    )
    raise SourceError(
        "unprocessable",
        f"The photos of {label} come from {len(kinds)} different cameras or image sizes "
        f"({listed}); one camera per source.{hint}",
    )


def check_capture(photo_sets: dict[str, list[ImageInfo]], videos: int) -> None:
    """Checks of a whole capture's photos: enough of them (when there is no video), not too
    many, not too many pixels, one camera per set."""
    images = [im for ims in photo_sets.values() for im in ims]
    if not videos and len(images) < MIN_IMAGES:
        raise SourceError(
            "unprocessable",
            f"Only {len(images)} photo{'s' if len(images) != 1 else ''} in the upload; at least "
            f"{MIN_IMAGES} are needed, taken while walking around the subject (each photo "
            "overlapping the next).",
        )
    if len(images) > MAX_IMAGES:
        raise SourceError(
            "too_large", f"{len(images)} photos in the upload; at most {MAX_IMAGES} are accepted."
        )
    total = sum(im.pixels for im in images)
    if total > MAX_TOTAL_PIXELS:
        raise SourceError(
            "too_large",
            f"The photos hold {total / 1e9:.1f} gigapixels together; at most "
            f"{MAX_TOTAL_PIXELS / 1e9:.0f} are accepted. Send fewer or smaller photos.",
        )
    for label, ims in photo_sets.items():
        check_camera(label, ims)


def write_upright(source: Path, target: Path) -> tuple[int, int]:
    """Decode `source`, turn it upright as its EXIF orientation says, and write it to `target`
    as an RGB JPEG; returns the written (width, height)."""
    try:
        with Image.open(source) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise SourceError("too_large", f"{source.name} has too many pixels.")
            upright = ImageOps.exif_transpose(image)
            if upright.mode not in ("RGB", "L"):
                upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
                if upright.mode == "RGBA":  # transparent parts on white, as viewers show them
                    flat = Image.new("RGB", upright.size, (255, 255, 255))
                    flat.paste(upright, mask=upright.getchannel("A"))
                    upright = flat
            upright.convert("RGB").save(target, "JPEG", quality=JPEG_QUALITY)
            return upright.width, upright.height
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SourceError(
            "unsupported", f"The photo {source.name} is damaged and cannot be decoded ({exc})."
        ) from None


# -- ZIP archives -------------------------------------------------------------------------


@dataclass
class ExtractedSet:
    """Photos of one folder of a ZIP: `label` is the folder (or the ZIP's name for its top)."""

    label: str
    folder: Path
    images: list[ImageInfo] = field(default_factory=list)


def _member_parts(info: zipfile.ZipInfo, archive: str) -> tuple[str, ...] | None:
    """The entry's path parts, None for a folder or a file the OS added (skipped); refuses
    absolute paths, `..`, drive letters, links and other non-regular entries."""
    raw = info.filename
    unsafe = SourceError(
        "unsupported",
        f"{archive} holds an entry with an unsafe path ({raw!r}): ZIPs whose entries point "
        "outside their folder are refused.",
    )
    if "\x00" in raw:
        raise unsafe
    path = raw.replace("\\", "/")
    parts = PurePosixPath(path).parts
    if path.startswith("/") or ".." in parts or (parts and re.match(r"^[A-Za-z]:", parts[0])):
        raise unsafe
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise SourceError(
            "unsupported",
            f"{archive} holds a symbolic link ({raw}): ZIPs with links are refused.",
        )
    if info.is_dir():
        return None
    if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        raise SourceError(
            "unsupported", f"{archive} holds {raw}, which is not a regular file: refused."
        )
    parts = tuple(p for p in parts if p not in ("", "."))
    if not parts or any(p in JUNK_PARTS or p.startswith("._") for p in parts):
        return None
    if parts[-1].startswith("."):
        return None  # hidden files (.DS_Store and the like)
    return parts


def _copy_bounded(
    source: IO[bytes], target: Path, budget: list[int], too_large: SourceError
) -> int:
    written = 0
    with target.open("xb") as out:
        while chunk := source.read(COPY_CHUNK):
            written += len(chunk)
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise too_large
            out.write(chunk)
    return written


def extract_zip(
    archive: Path,
    target: Path,
    *,
    display_name: str,
    max_bytes: int,
    first_index: int = 1,
    check_disk: Callable[[], None] | None = None,
) -> list[ExtractedSet]:
    """Extract the photos of `archive` into numbered folders under `target`, one per folder of
    the ZIP (its top level is one set named after the ZIP), each file as
    `NNNN_<safe name>` in a folder we name: no entry's path is ever used as a path. Refuses
    unsafe paths, links, encrypted entries, more than MAX_ZIP_ENTRIES entries, and more than
    min(max_bytes, MAX_ZIP_RATIO x its size) bytes coming out (counted while extracting), and
    any entry that is not a photo (by content, with its name in the message)."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SourceError(
            "unsupported", f"{display_name} is not a ZIP archive that can be read ({exc})."
        ) from None
    allowed = min(max_bytes, int(MAX_ZIP_RATIO * archive.stat().st_size) + ZIP_RATIO_SLACK)
    too_large = SourceError(
        "too_large",
        f"{display_name} unpacks to more than {allowed / 2**20:.0f} MiB (at most "
        f"{MAX_ZIP_RATIO:g} times its own size, or the upload limit): refused as a ZIP bomb.",
    )
    budget = [allowed]
    sets: dict[str, ExtractedSet] = {}
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    with zf:
        entries = zf.infolist()
        if len(entries) > MAX_ZIP_ENTRIES:
            raise SourceError(
                "too_large",
                f"{display_name} holds {len(entries)} entries; at most {MAX_ZIP_ENTRIES}.",
            )
        for info in entries:
            parts = _member_parts(info, display_name)
            if parts is None:
                continue
            if info.flag_bits & 0x1:
                raise SourceError(
                    "unsupported",
                    f"{display_name} is encrypted ({info.filename}): send it without a password.",
                )
            label = "/".join(parts[:-1]) or Path(display_name).stem
            if label not in sets:
                folder = target / f"{first_index + len(sets):02d}_{safe_label(label)}"
                if folder.resolve().parent != root:  # cannot happen: we name the folder
                    raise SourceError("unsupported", f"{display_name}: unsafe folder {label!r}.")
                folder.mkdir()
                sets[label] = ExtractedSet(label, folder)
            photo_set = sets[label]
            shown = "/".join(parts)
            out = photo_set.folder / f"{len(photo_set.images) + 1:04d}_{safe_label(parts[-1])}"
            try:
                with zf.open(info) as member:
                    if sniff_image(member.read(16)) is None:
                        raise SourceError(
                            "unsupported",
                            f"{shown} in {display_name} is not a photo (JPEG, PNG or HEIC): "
                            "remove it from the ZIP and upload again.",
                        )
                with zf.open(info) as member:
                    _copy_bounded(member, out, budget, too_large)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, RuntimeError) as exc:
                raise SourceError(
                    "unsupported", f"{shown} in {display_name} is damaged ({exc})."
                ) from None
            except NotImplementedError as exc:  # a compression method zipfile lacks
                raise SourceError(
                    "unsupported", f"{shown} in {display_name} cannot be unpacked ({exc})."
                ) from None
            photo_set.images.append(inspect_image(out, shown))
            if check_disk is not None:
                check_disk()
    found = [s for s in sets.values() if s.images]
    if not found:
        raise SourceError("unprocessable", f"{display_name} holds no photos.")
    return found


# -- a capture's sources, as run_pipeline.py reads them -----------------------------------


@dataclass
class Source:
    """One source of a capture: a video file or a folder of photos (one camera)."""

    kind: str  # "video" or "photos"
    path: Path
    label: str
    images: list[Path] = field(default_factory=list)  # photos, in name order


def _label(path: Path) -> str:
    return VIDEO_NAME.sub("", path.name) or path.name


def discover(paths: list[Path]) -> list[Source]:
    """The sources named on the command line: a video file is one source; a folder holds
    sources (its video files, its subfolders of photos, and the photos directly in it as one
    more), in name order."""
    sources: list[Source] = []
    for path in paths:
        if not path.is_dir():
            sources.append(Source("video", path, path.name))
            continue
        loose = [p for p in sorted(path.iterdir()) if p.is_file() and _is_photo(p)]
        for entry in sorted(path.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                photos = [p for p in sorted(entry.iterdir()) if p.is_file() and _is_photo(p)]
                if photos:
                    sources.append(Source("photos", entry, _label(entry), photos))
            elif entry.is_file() and entry not in loose:
                sources.append(Source("video", entry, _label(entry)))
        if loose:
            sources.append(Source("photos", path, path.name, loose))
    return sources


def _is_photo(path: Path) -> bool:
    try:
        return sniff_image(read_head(path)) is not None
    except OSError:
        return False


def move_into(source: Path, target: Path) -> None:
    """Move a received file to its place in the capture's folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)
