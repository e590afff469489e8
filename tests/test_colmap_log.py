"""Progress of one pycolmap call read from COLMAP's log (pipeline.colmap_log), against real
pycolmap runs on frames of the office sample."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import pycolmap
import pytest

from pipeline import colmap_log, sfm

OFFICE = Path(__file__).parent / "data" / "tum_office_orbit.mp4"


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("frames")
    video = cv2.VideoCapture(str(OFFICE))
    names = []
    for k in range(4):
        ok, image = video.read()
        assert ok
        names.append(f"frame_{k:02d}.jpg")
        cv2.imwrite(str(folder / names[-1]), image)
    video.release()
    return folder, names


@pytest.fixture
def quiet_log() -> None:
    sfm.configure_logging(verbose=False)


def test_progress_lines_are_counted_and_kept_out_of_the_log(
    frames: tuple[Path, list[str]],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    quiet_log: None,
) -> None:
    folder, names = frames
    db = tmp_path / "db.db"
    with colmap_log.progress_from_log() as features:
        pycolmap.extract_features(db, folder, image_names=names)
        os.write(2, b"a line of our own\n")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{a} {b}\n" for a in names for b in names if a < b))
    imported = pycolmap.ImportedPairingOptions()
    imported.match_list_path = str(pairs)
    imported.block_size = 2
    with colmap_log.progress_from_log() as matching:
        pycolmap.match_image_pairs(db, pairing_options=imported)
    err = capfd.readouterr().err
    assert (features.count(), features.total, features.lines) == (4, 4, 4)  # a line per frame
    # A line per block of 2 of the 6 pairs, written as the block starts: 2 blocks done.
    assert (matching.count(), matching.lines) == (2, 3)
    assert "a line of our own" in err  # everything else still reaches stderr
    assert "Processed file" not in err and "Processing block" not in err
    assert "Feature extraction" not in err  # COLMAP's informational lines stay out, as before
    assert pycolmap.logging.minloglevel == 1  # the level is back where configure_logging left it


def test_a_verbose_log_keeps_every_line(
    frames: tuple[Path, list[str]], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    folder, names = frames
    sfm.configure_logging(verbose=True)
    try:
        with colmap_log.progress_from_log() as log:
            pycolmap.extract_features(tmp_path / "db.db", folder, image_names=names[:2])
    finally:
        sfm.configure_logging(verbose=False)
    assert log.count() == 2
    assert capfd.readouterr().err.count("Processed file [") == 2


def test_stderr_is_restored_when_the_call_fails(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], quiet_log: None
) -> None:
    with pytest.raises(RuntimeError), colmap_log.progress_from_log():
        os.write(2, b"before the failure\n")
        raise RuntimeError("pycolmap failed")
    os.write(2, b"after the failure\n")
    err = capfd.readouterr().err
    assert "before the failure" in err and "after the failure" in err


def test_block_lines_count_the_blocks_before_them() -> None:
    log = colmap_log.LogProgress()
    assert not log.feed(b"I20261201 16:45:57.461805 1 pairing.cc:905] Importing image pairs...\n")
    assert log.feed(b"I20261201 16:45:57.461915 1 pairing.cc:938] Processing block [3/5]\n")
    assert (log.count(), log.total) == (2, 5)
    assert log.feed(b"I20261201 16:45:57.2 1 feature_extraction.cc:270] Processed file [7/9]\n")
    assert (log.count(), log.total) == (7, 9)
    assert not log.feed(b"Processed file [8/9] without COLMAP's prefix\n")
