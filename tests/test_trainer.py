"""Tests for training_server_trainer and the stand-in trainer (tests/fake_trainer/main.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from plyfile import PlyData

from training_server_trainer import (
    DEFAULT_ITERATIONS,
    ITERATIONS_MAX,
    ITERATIONS_MIN,
    PRESETS,
    TrainerSetup,
    build_fit_command,
    check_if_stale,
    check_training_available,
    checkpoint_steps,
    config_problem,
    explain_trainer_failure,
    find_trainer_checkout,
    read_validation_csv,
    resolve_iterations,
    save_iterations_for,
    trainer_environment,
    training_quality,
    write_probe_dataset,
)
from training_server_trainer_output import (
    ResumePlan,
    TrainingResultError,
    choose_down_sample_factor,
    collect_results,
    dataset_image_size,
    down_sampled_size,
    latest_checkpoint,
    prepare_downsampled_images,
    prepare_output_dir,
    prune_snapshots,
    read_ply_header,
    result_files,
)
from training_server_trainer_progress import (
    TrainingProgressParser,
    is_progress_output,
    parse_tqdm_line,
)

FAKE_CHECKOUT = Path(__file__).parent / "fake_trainer"

# stdout of `main.py fit` for 3 images and --max_steps 7, recorded from the real tqdm driven by
# the call sequence of Lightning 2.3's TQDMProgressBar and the trainer's ProgressBar callback
# (internal/callbacks.py): sanity check, `Training` bars at line offsets 2 and 1, `Epoch E`
# redraws with train metrics, a validation bar after each epoch, messages printed over bars.
CAPTURED_FIT_STDOUT = (
    "output path: /srv/gs/temp_workspace/checkpoints/5b1e0f7c\n\n\n\rSanity Checking: |      "
    "    | 0/? [00:00<?, ?it/s]\x1b[A\x1b[A\n\n\rSanity Checking:   0%|          | 0/1 [00:00"
    "<?, ?it/s]\x1b[A\x1b[A\n\n\rSanity Checking DataLoader 0:   0%|          | 0/1 [00:00<?,"
    " ?it/s]\x1b[A\x1b[A\n\n\rSanity Checking DataLoader 0: 100%|██████████| 1/1 [00:00<00:00"
    ", 5667.98it/s]\x1b[A\x1b[A\n\n\r                                                        "
    "                     \x1b[A\x1b[A\n\n\rTraining: |          | 0/? [00:00<?, ?it/s]\x1b[A"
    "\x1b[A\n\rTraining:   0%|          | 0/7 [00:00<?, ?it/s]\x1b[A\n\n\rTraining:   0%|    "
    "      | 0/3 [00:00<?, ?it/s]\x1b[A\x1b[A\n\n\rEpoch 0:   0%|          | 0/3 [00:00<?, ?i"
    "t/s] \x1b[A\x1b[A\n\n\rEpoch 0:  33%|███▎      | 1/3 [00:00<00:00,  8.30it/s]\x1b[A\x1b["
    "A\n\n\rEpoch 0:  33%|███▎      | 1/3 [00:00<00:00,  8.28it/s, train/loss=0.273, train/rg"
    "b_diff=0.218, train/ssim=0.454]\x1b[A\x1b[A\n\n\rEpoch 0:  67%|██████▋   | 2/3 [00:00<00"
    ":00,  8.26it/s, train/loss=0.273, train/rgb_diff=0.218, train/ssim=0.454]\x1b[A\x1b[A"
    "\n\n\rEpoch 0:  67%|██████▋   | 2/3 [00:00<00:00,  8.24it/s, train/loss=0.241, train/rgb"
    "_diff=0.193, train/ssim=0.518]\x1b[A\x1b[A\n\n\rEpoch 0: 100%|██████████| 3/3 [00:00<00:"
    "00,  8.25it/s, train/loss=0.241, train/rgb_diff=0.193, train/ssim=0.518]\x1b[A\x1b[A\n"
    "\n\rEpoch 0: 100%|██████████| 3/3 [00:00<00:00,  8.25it/s, train/loss=0.220, train/rgb_d"
    "iff=0.176, train/ssim=0.559]\x1b[A\x1b[A\n\n\n\rValidation: |          | 0/? [00:00<?, ?"
    "it/s]\x1b[A\x1b[A\x1b[A\n\n\n\rValidation:   0%|          | 0/1 [00:00<?, ?it/s]\x1b[A"
    "\x1b[A\x1b[A\n\n\n\rValidation DataLoader 0:   0%|          | 0/1 [00:00<?, ?it/s]\x1b[A"
    "\x1b[A\x1b[A\n\n\n\rValidation DataLoader 0: 100%|██████████| 1/1 [00:00<00:00, 4573.94i"
    "t/s]\x1b[A\x1b[A\x1b[A\n\n\rEpoch 0: 100%|██████████| 3/3 [00:00<00:00,  8.23it/s, val/l"
    "oss=0.200, val/rgb_diff=0.150, val/ssim=0.620, val/psnr=14.50, val/lpips=0.600]\x1b[A"
    "\x1b[A\n\n\n\r                                                                        "
    "\x1b[A\x1b[A\x1b[A\n\n\rEpoch 0: 100%|██████████| 3/3 [00:00<00:00,  8.22it/s, train/los"
    "s=0.220, train/rgb_diff=0.176, train/ssim=0.559]                           \x1b[A\x1b[A"
    "\n\rTraining:   0%|          | 0/7 [00:00<?, ?it/s, val/loss=0.200, val/rgb_diff=0.150, "
    "val/ssim=0.620, val/psnr=14.50, val/lpips=0.600, train/loss=0.220, train/rgb_diff=0.176,"
    " train/ssim=0.559]\x1b[A\n\rTraining:  43%|████▎     | 3/7 [00:00<00:00,  8.22it/s, val/"
    "loss=0.200, val/rgb_diff=0.150, val/ssim=0.620, val/psnr=14.50, val/lpips=0.600, train/l"
    "oss=0.220, train/rgb_diff=0.176, train/ssim=0.559]\x1b[A\n\n\rEpoch 0:   0%|          | "
    "0/3 [00:00<?, ?it/s, train/loss=0.220, train/rgb_diff=0.176, train/ssim=0.559]        "
    "\x1b[A\x1b[A\n\n\rEpoch 1:   0%|          | 0/3 [00:00<?, ?it/s, train/loss=0.220, train"
    "/rgb_diff=0.176, train/ssim=0.559]\x1b[A\x1b[A\n\n\rEpoch 1:  33%|███▎      | 1/3 [00:00"
    "<00:00,  8.09it/s, train/loss=0.220, train/rgb_diff=0.176, train/ssim=0.559]\x1b[A\x1b[A"
    "\n\n\rEpoch 1:  33%|███▎      | 1/3 [00:00<00:00,  8.07it/s, train/loss=0.199, train/rgb"
    "_diff=0.159, train/ssim=0.603]\x1b[A\x1b[A\n\n\rEpoch 1:  67%|██████▋   | 2/3 [00:00<00:"
    "00,  8.18it/s, train/loss=0.199, train/rgb_diff=0.159, train/ssim=0.603]\x1b[A\x1b[A\n"
    "\n\rEpoch 1:  67%|██████▋   | 2/3 [00:00<00:00,  8.17it/s, train/loss=0.188, train/rgb_d"
    "iff=0.150, train/ssim=0.625]\x1b[A\x1b[A\n\n\rEpoch 1: 100%|██████████| 3/3 [00:00<00:00"
    ",  8.21it/s, train/loss=0.188, train/rgb_diff=0.150, train/ssim=0.625]\x1b[A\x1b[A\n\n"
    "\rEpoch 1: 100%|██████████| 3/3 [00:00<00:00,  8.21it/s, train/loss=0.170, train/rgb_dif"
    "f=0.136, train/ssim=0.660]\x1b[A\x1b[A\n\n\n\rValidation: |          | 0/? [00:00<?, ?it"
    "/s]\x1b[A\x1b[A\x1b[A\n\n\n\rValidation:   0%|          | 0/1 [00:00<?, ?it/s]\x1b[A\x1b"
    "[A\x1b[A\n\n\n\rValidation DataLoader 0:   0%|          | 0/1 [00:00<?, ?it/s]\x1b[A\x1b"
    "[A\x1b[A\n\n\n\rValidation DataLoader 0: 100%|██████████| 1/1 [00:00<00:00, 3880.02it/s]"
    "\x1b[A\x1b[A\x1b[A\n\n\rEpoch 1: 100%|██████████| 3/3 [00:00<00:00,  8.19it/s, val/loss="
    "0.200, val/rgb_diff=0.150, val/ssim=0.620, val/psnr=15.80, val/lpips=0.600]\x1b[A\x1b[A"
    "\n\n\n\r                                                                        \x1b[A"
    "\x1b[A\x1b[A\n\n\rEpoch 1: 100%|██████████| 3/3 [00:00<00:00,  8.18it/s, train/loss=0.17"
    "0, train/rgb_diff=0.136, train/ssim=0.660]                           \x1b[A\x1b[A\n\rTra"
    "ining:  43%|████▎     | 3/7 [00:00<00:00,  8.22it/s, val/loss=0.200, val/rgb_diff=0.150,"
    " val/ssim=0.620, val/psnr=15.80, val/lpips=0.600, train/loss=0.170, train/rgb_diff=0.136"
    ", train/ssim=0.660]\x1b[A\n\rTraining:  86%|████████▌ | 6/7 [00:00<00:00,  8.19it/s, val"
    "/loss=0.200, val/rgb_diff=0.150, val/ssim=0.620, val/psnr=15.80, val/lpips=0.600, train/"
    "loss=0.170, train/rgb_diff=0.136, train/ssim=0.660]\x1b[A\n\n\rEpoch 1:   0%|          |"
    " 0/3 [00:00<?, ?it/s, train/loss=0.170, train/rgb_diff=0.136, train/ssim=0.660]        "
    "\x1b[A\x1b[A\n\n\rEpoch 2:   0%|          | 0/3 [00:00<?, ?it/s, train/loss=0.170, train"
    "/rgb_diff=0.136, train/ssim=0.660]\x1b[A\x1b[A\n\n\rEpoch 2:  33%|███▎      | 1/3 [00:00"
    "<00:00,  8.28it/s, train/loss=0.170, train/rgb_diff=0.136, train/ssim=0.660]\x1b[A\x1b[A"
    "\n\n\rEpoch 2:  33%|███▎      | 1/3 [00:00<00:00,  8.26it/s, train/loss=0.166, train/rgb"
    "_diff=0.132, train/ssim=0.669]\x1b[A\x1b[A\n\n\rEpoch 2:  33%|███▎      | 1/3 [00:00<00:"
    "00,  8.25it/s, train/loss=0.166, train/rgb_diff=0.132, train/ssim=0.669]\x1b[A\x1b[A\n"
    "\rTraining:  86%|████████▌ | 6/7 [00:00<00:00,  8.19it/s, val/loss=0.200, val/rgb_diff=0"
    ".150, val/ssim=0.620, val/psnr=15.80, val/lpips=0.600, train/loss=0.166, train/rgb_diff="
    "0.132, train/ssim=0.669]\x1b[A\n\rTraining: 9it [00:00, 11.78it/s, val/loss=0.200, val/r"
    "gb_diff=0.150, val/ssim=0.620, val/psnr=15.80, val/lpips=0.600, train/loss=0.166, train/"
    "rgb_diff=0.132, train/ssim=0.669]                       \x1b[A\n\n\r                    "
    "                                                                                        "
    "    \r\x1b[A\x1b[A\n\r                                                                  "
    "                                                                                        "
    "                     \r\x1b[AGaussians saved to /srv/gs/temp_workspace/checkpoints/5b1e0"
    "f7c/point_cloud/iteration_7/point_cloud.ply\n\n\n\rEpoch 2:  33%|███▎      | 1/3 [00:00<"
    "00:00,  8.20it/s, train/loss=0.166, train/rgb_diff=0.132, train/ssim=0.669]\x1b[A\x1b[A"
    "\n\rTraining: 9it [00:00, 11.78it/s, val/loss=0.200, val/rgb_diff=0.150, val/ssim=0.620,"
    " val/psnr=15.80, val/lpips=0.600, train/loss=0.166, train/rgb_diff=0.132, train/ssim=0.6"
    "69]\x1b[A\n\n\r                                                                         "
    "                                       \r\x1b[A\x1b[A\n\r                               "
    "                                                                                        "
    "                                                        \r\x1b[ACheckpoint saved to /srv"
    "/gs/temp_workspace/checkpoints/5b1e0f7c/checkpoints/epoch=3-step=7.ckpt\n\n\n\rEpoch 2: "
    " 33%|███▎      | 1/3 [00:00<00:00,  8.19it/s, train/loss=0.166, train/rgb_diff=0.132, tr"
    "ain/ssim=0.669]\x1b[A\x1b[A\n\rTraining: 9it [00:00, 11.78it/s, val/loss=0.200, val/rgb_"
    "diff=0.150, val/ssim=0.620, val/psnr=15.80, val/lpips=0.600, train/loss=0.166, train/rgb"
    "_diff=0.132, train/ssim=0.669]\x1b[A\n\n\n\rValidation: |          | 0/? [00:00<?, ?it/s"
    "]\x1b[A\x1b[A\x1b[A\n\n\n\rValidation:   0%|          | 0/1 [00:00<?, ?it/s]\x1b[A\x1b[A"
    "\x1b[A\n\n\n\rValidation DataLoader 0:   0%|          | 0/1 [00:00<?, ?it/s]\x1b[A\x1b[A"
    "\x1b[A\n\n\n\rValidation DataLoader 0: 100%|██████████| 1/1 [00:00<00:00, 4096.00it/s]"
    "\x1b[A\x1b[A\x1b[A\n\n\n\r                                                              "
    "          \x1b[A\x1b[A\x1b[A\rEpoch 2:  33%|███▎      | 1/3 [00:00<00:00,  8.13it/s, tra"
    "in/loss=0.166, train/rgb_diff=0.132, train/ssim=0.669]\n"
)

EPOCH_LINE = (
    "Epoch 57:  43%|████▎     | 52/120 [00:01<00:01, 34.90it/s, "
    "train/loss=0.0612, train/rgb_diff=0.0431, train/ssim=0.862]"
)


# ------------------------------------------------------------------------------ tqdm lines


def test_parse_epoch_bar_line():
    bar = parse_tqdm_line(EPOCH_LINE)
    assert bar is not None
    assert (bar.description, bar.current, bar.total) == ("Epoch 57", 52, 120)
    assert (bar.elapsed_seconds, bar.remaining_seconds, bar.rate) == (1.0, 1.0, 34.9)
    assert bar.postfix == {
        "train/loss": "0.0612",
        "train/rgb_diff": "0.0431",
        "train/ssim": "0.862",
    }


def test_parse_seconds_per_iteration_and_hours():
    bar = parse_tqdm_line(
        "Training:   0%|          | 120/30000 [02:40<11:04:00,  1.33s/it, val/psnr=24.90, "
        "train/loss=0.0612]"
    )
    assert bar is not None
    assert bar.rate == pytest.approx(1 / 1.33)
    assert (bar.elapsed_seconds, bar.remaining_seconds) == (160.0, 11 * 3600 + 4 * 60)
    assert bar.postfix["val/psnr"] == "24.90"


def test_parse_unknown_rate_and_eta():
    bar = parse_tqdm_line("Epoch 0:   0%|          | 0/120 [00:00<?, ?it/s]")
    assert bar is not None
    assert (bar.current, bar.rate, bar.remaining_seconds, bar.postfix) == (0, None, None, {})


def test_parse_bars_without_a_total():
    # tqdm drops the total once n passes it (the trainer's bar adds whole epochs) ...
    over = parse_tqdm_line("Training: 30120it [15:00, 33.47it/s, val/psnr=24.90]")
    assert over is not None
    assert (over.current, over.total, over.rate, over.elapsed_seconds) == (30120, None, 33.47, 900)
    # ... and Lightning's bar format keeps its frame.
    resumed = parse_tqdm_line(
        "Epoch 8: |          | 25/? [00:01<00:00, 25.00it/s, train/loss=0.06]"
    )
    assert resumed is not None
    assert (resumed.description, resumed.current, resumed.total) == ("Epoch 8", 25, None)


def test_parse_keeps_only_complete_metrics_of_a_cut_off_line():
    bar = parse_tqdm_line(
        "Epoch 57:  43%|▍| 52/120 [00:01<00:01, 34.90it/s, train/loss=0.0612, train/rgb_"
    )
    assert bar is not None
    assert bar.postfix == {"train/loss": "0.0612"}


def test_parse_ascii_bar_and_scientific_metric():
    bar = parse_tqdm_line(
        "Epoch 0:  50%|#####     | 1/2 [00:00<00:00,  1.25it/s, train/loss=1.2e-5, train/ssim=1]"
    )
    assert bar is not None
    assert bar.postfix == {"train/loss": "1.2e-5", "train/ssim": "1"}


@pytest.mark.parametrize(
    "line",
    [
        "output path: /srv/gs/temp_workspace/checkpoints/5b1e0f7c",
        "Gaussians saved to /x/point_cloud/iteration_7/point_cloud.ply",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
        "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]",
    ],
)
def test_other_output_is_not_a_bar(line):
    assert parse_tqdm_line(line) is None
    assert not is_progress_output(line)


def test_bar_redraws_and_clears_are_progress_output():
    assert is_progress_output("\x1b[A\x1b[A" + EPOCH_LINE + "   ")
    assert is_progress_output("\r" + " " * 80 + "\x1b[A\x1b[A")


# ------------------------------------------------------------------------------ progress parser


def steps_seen(chunks, **kwargs):
    parser = TrainingProgressParser(**kwargs)
    seen = [p for p in (parser.feed(chunk) for chunk in chunks) if p is not None]
    return parser, seen


def test_progress_from_the_captured_stream():
    parser, seen = steps_seen([CAPTURED_FIT_STDOUT])
    last = parser.latest
    assert last is not None and seen[-1] == last
    assert (last.step, last.total, last.percent, last.epoch) == (7, 7, 100.0, 2)
    assert last.eta_seconds == 0.0
    assert last.loss == pytest.approx(0.166)
    assert last.psnr == pytest.approx(15.8)  # the second epoch's validation
    assert last.rate == pytest.approx(8.13)
    assert last.as_progress()["stage"] == "training"
    assert last.as_progress()["current"] == 7


def test_progress_is_the_same_however_the_stream_is_split():
    data = CAPTURED_FIT_STDOUT.encode()  # UTF-8: the bar glyphs are 3 bytes each
    whole, _ = steps_seen([data])
    rnd = random.Random(7)
    for _ in range(20):
        cuts = sorted(rnd.sample(range(1, len(data)), 60))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        parser, seen = steps_seen(pieces)
        assert parser.latest == whole.latest
        steps = [p.step for p in seen]
        assert steps == sorted(steps)
    byte_by_byte, seen = steps_seen([data[i : i + 1] for i in range(len(data))])
    assert byte_by_byte.latest == whole.latest
    # every step of the run was reported on the way, never the per-epoch count as the total
    assert sorted({p.step for p in seen}) == list(range(8))
    assert {p.total for p in seen} <= {None, 7}


def test_progress_counts_epochs_and_takes_metrics_as_they_come():
    parser = TrainingProgressParser(total_steps=30_000)
    first = parser.feed("\n\n\r" + EPOCH_LINE.replace("Epoch 57", "Epoch 0") + "\x1b[A\x1b[A")
    assert first is not None
    assert (first.step, first.total, first.rate, first.loss, first.psnr) == (
        52, 30_000, 34.9, 0.0612, None,
    )  # fmt: skip
    assert first.eta_seconds == pytest.approx((30_000 - 52) / 34.9, abs=0.1)
    assert parser.feed("\n\n\rEpoch 0: 100%|██████████| 120/120 [00:03<00:00, 35.00it/s, ") is None
    done = parser.feed("val/psnr=21.30]\x1b[A\x1b[A")  # the rest of that redraw
    assert done is not None and (done.step, done.psnr, done.loss) == (120, 21.3, 0.0612)
    nxt = parser.feed("\n\n\rEpoch 1:  10%|█         | 12/120 [00:00<00:03, 35.10it/s]\x1b[A\x1b[A")
    assert nxt is not None and (nxt.step, nxt.epoch) == (132, 1)
    assert parser.feed("Gaussians saved to /x/point_cloud/iteration_6999/point_cloud.ply\n") is None


def test_a_bar_at_the_end_of_a_chunk_counts_before_the_next_redraw():
    parser = TrainingProgressParser(total_steps=300)
    progress = parser.feed("\r" + EPOCH_LINE.replace("Epoch 57", "Epoch 0"))
    assert progress is not None and progress.step == 52


def test_progress_after_a_resume_starts_at_the_checkpoint_step():
    parser = TrainingProgressParser(total_steps=500, initial_step=300)
    line = "\rEpoch 25:  50%|█████     | 6/12 [00:00<00:00, 60.00it/s, train/loss=0.2]\n"
    progress = parser.feed_line(line.strip())
    assert progress is not None and (progress.step, progress.percent) == (306, 61.2)


# ------------------------------------------------------------------------------ settings


def test_presets_and_iteration_bounds():
    assert PRESETS == {"fast": 7_000, "full": 30_000}
    assert resolve_iterations() == DEFAULT_ITERATIONS == 30_000
    assert resolve_iterations(preset="fast") == 7_000
    assert resolve_iterations(iterations=300) == 300
    for bad in (ITERATIONS_MIN - 1, ITERATIONS_MAX + 1):
        with pytest.raises(ValueError, match="between 100 and 100000"):
            resolve_iterations(iterations=bad)
    with pytest.raises(ValueError, match="unknown training preset 'slow'; choose one of fast"):
        resolve_iterations(preset="slow")
    with pytest.raises(ValueError, match="not both"):
        resolve_iterations(iterations=300, preset="fast")


def test_find_trainer_checkout(tmp_path):
    assert find_trainer_checkout(Path("/opt/gspl"), tmp_path) == Path("/opt/gspl")
    assert find_trainer_checkout(Path("gspl"), tmp_path) == tmp_path / "gspl"
    assert find_trainer_checkout(None, tmp_path) is None
    (tmp_path / "main.py").write_text("print('some other project')\n")
    assert find_trainer_checkout(None, tmp_path) is None
    (tmp_path / "internal").mkdir()
    (tmp_path / "internal" / "cli.py").write_text("")
    (tmp_path / "main.py").write_text("from internal.entrypoints.gspl import cli\n\ncli()\n")
    assert find_trainer_checkout(None, tmp_path) == tmp_path


def test_fit_command_has_every_flag(tmp_path):
    argv = build_fit_command(
        python="/venv/bin/python",
        checkout=Path("/opt/gspl"),
        dataset_path=Path("/srv/ws/abc/images_undistorted"),
        output_root=Path("/srv/ws/checkpoints"),
        name="abc",
        iterations=7000,
        down_sample_factor=2,
        config=Path("configs/gsplat.yaml"),
        extra_args=["--trainer.check_val_every_n_epoch", "10"],
    )
    assert argv == [
        "/venv/bin/python", "-u", "/opt/gspl/main.py", "fit",
        "--data.parser", "Colmap",
        "--config", "/opt/gspl/configs/gsplat.yaml",
        "--data.path", "/srv/ws/abc/images_undistorted",
        "--data.parser.down_sample_factor", "2",
        "--data.parser.split_mode", "experiment",
        "--data.parser.eval_step", "8",
        "-n", "abc",
        "--output", "/srv/ws/checkpoints",
        "--max_steps", "7000",
        "--save_iterations", "[2001,4001,6001]",
        "--model.save_ply", "true",
        "--model.save_val_metrics", "true",
        "--trainer.check_val_every_n_epoch", "10",
    ]  # fmt: skip


def test_checkpoints_every_interval_before_the_last_step():
    assert checkpoint_steps(7000, 2000) == [2000, 4000, 6000]
    assert checkpoint_steps(6000, 2000) == [2000, 4000]  # the last step always saves
    assert checkpoint_steps(300, 2000) == []
    # The trainer saves at the start of step s, named after the s - 1 steps done.
    assert save_iterations_for([2000, 4000]) == [2001, 4001]
    common = {"python": "p", "checkout": Path("/c"), "dataset_path": Path("/d"),
              "output_root": Path("/o"), "name": "n"}  # fmt: skip
    argv = build_fit_command(**common, iterations=300, checkpoint_every=100, hold_out=False)
    assert argv[argv.index("--save_iterations") + 1] == "[101,201]"
    assert argv[argv.index("--data.parser.split_mode") + 1] == "reconstruction"
    assert build_fit_command(**common, iterations=300, print_config=True)[-1] == "--print_config"


def test_fit_command_resume_and_mistakes():
    common = {
        "python": "python",
        "checkout": Path("/opt/gspl"),
        "dataset_path": Path("/d"),
        "output_root": Path("/o"),
        "name": "abc",
        "iterations": 300,
    }
    argv = build_fit_command(**common, resume=True)
    assert argv[-2:] == ["--ckpt_path", "last"]
    assert "--config" not in argv
    assert "--ckpt_path" not in build_fit_command(**common)
    with pytest.raises(TypeError):
        build_fit_command(**common, extra_args="--logger none")
    with pytest.raises(ValueError, match="single path component"):
        build_fit_command(**{**common, "name": "../etc"})
    with pytest.raises(ValueError, match="iterations"):
        build_fit_command(**{**common, "iterations": 10})
    with pytest.raises(ValueError, match="down_sample_factor must be between 1 and 64"):
        build_fit_command(**common, down_sample_factor=0)
    assert "3" in build_fit_command(**common, down_sample_factor=3)
    with pytest.raises(ValueError, match="eval_step"):
        build_fit_command(**common, eval_step=1)


def test_trainer_environment():
    env = trainer_environment({"PATH": "/bin", "COLUMNS": "80", "LINES": "24"})
    assert env == {
        "PATH": "/bin",
        "PYTHONUNBUFFERED": "1",
        "TQDM_MINITERS": "10",
        "WANDB_MODE": "offline",  # a wandb config must not wait for a login
    }
    assert trainer_environment({"WANDB_MODE": "online"})["WANDB_MODE"] == "online"
    assert "WANDB_MODE" not in trainer_environment({"WANDB_API_KEY": "k"})


# ------------------------------------------------------------------------------ availability


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once `pid` has exited (a zombie waiting for its reaper counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


async def test_training_unavailable_without_a_checkout(tmp_path):
    ok, why = await check_training_available(sys.executable, None, True, 10)
    assert not ok
    assert why == (
        "no gaussian-splatting-lightning checkout configured: set TRAINING_SERVER_TRAINER_PATH"
    )
    ok, why = await check_training_available(sys.executable, tmp_path / "nope", True, 10)
    assert not ok and why.endswith("nope does not exist")
    ok, why = await check_training_available(sys.executable, tmp_path, False, 10)
    assert not ok and why.endswith("has no main.py")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
async def test_training_unavailable_without_torch():
    ok, why = await check_training_available(sys.executable, FAKE_CHECKOUT, True, 60)
    assert not ok
    assert why.startswith(f"python {sys.executable} cannot import torch: ModuleNotFoundError")


async def test_training_available_without_cuda_check():
    ok, why = await check_training_available(sys.executable, FAKE_CHECKOUT, False, 60)
    assert ok, why
    ok, why = await check_training_available("/no/such/python", FAKE_CHECKOUT, False, 60)
    assert not ok and why.startswith("python /no/such/python cannot be started")


async def test_a_hanging_interpreter_is_killed_with_its_children(tmp_path):
    python = tmp_path / "python"
    pid_file = tmp_path / "child.pid"
    python.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pid_file}\nwait\n")
    python.chmod(0o755)
    started = time.monotonic()
    ok, why = await check_training_available(str(python), FAKE_CHECKOUT, True, 1.0)
    assert not ok and why == f"python {python} did not answer within 1 s (killed)"
    assert time.monotonic() - started < 10
    assert wait_gone(int(pid_file.read_text()))


# ------------------------------------------------------------------------------ output folder


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def checkpoint(folder: Path, epoch: int, step: int) -> Path:
    path = folder / "checkpoints" / f"epoch={epoch}-step={step}.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"state")
    return path


def test_new_output_folder(tmp_path):
    plan = prepare_output_dir(tmp_path / "t", 300)
    assert plan == ResumePlan("fresh", "Starting training in a new output folder")
    assert not plan.resume


def test_results_without_a_checkpoint_are_cleared(tmp_path):
    out = tmp_path / "t"
    touch(out / "point_cloud" / "iteration_6999" / "point_cloud.ply")
    touch(out / "cameras.json")
    plan = prepare_output_dir(out, 30_000)
    assert plan.action == "fresh" and plan.start_step == 0
    assert plan.message == "No checkpoint found; starting over in a clean output folder"
    assert not out.exists()


def test_resume_from_the_highest_step(tmp_path):
    out = tmp_path / "t"
    checkpoint(out, 83, 999)
    best = checkpoint(out, 84, 1000)
    touch(out / "checkpoints" / "epoch=84-step=1000-xyz_rgb.ply")
    plan = prepare_output_dir(out, 30_000)
    assert plan == ResumePlan(
        "resume",
        "Training resumed from step 1000 of 30000 (checkpoint checkpoints/epoch=84-step=1000.ckpt)",
        best,
        1000,
    )
    assert plan.resume and latest_checkpoint(out) == best


def test_cut_off_checkpoint_is_set_aside(tmp_path):
    out = tmp_path / "t"
    good = checkpoint(out, 8, 100)
    cut = checkpoint(out, 16, 200)
    cut.write_bytes(cut.read_bytes()[:-30])
    plan = prepare_output_dir(out, 300)
    assert (plan.action, plan.checkpoint, plan.start_step) == ("resume", good, 100)
    assert not cut.exists() and cut.with_name(cut.name + ".corrupt").exists()


def test_checkpoint_at_the_target_without_a_ply_starts_over(tmp_path):
    out = tmp_path / "t"
    checkpoint(out, 25, 300)
    plan = prepare_output_dir(out, 300)
    assert plan.action == "fresh" and not out.exists()
    assert plan.message.startswith("Checkpoint epoch=25-step=300.ckpt is at or past step 300")


def test_resume_without_a_target_takes_any_usable_checkpoint(tmp_path):
    out = tmp_path / "t"
    best = checkpoint(out, 25, 300)
    plan = prepare_output_dir(out)
    assert plan == ResumePlan(
        "resume",
        "Training resumed from step 300 (checkpoint checkpoints/epoch=25-step=300.ckpt)",
        best,
        300,
    )


def test_resume_can_be_turned_off(tmp_path):
    out = tmp_path / "t"
    checkpoint(out, 8, 100)
    plan = prepare_output_dir(out, 300, allow_resume=False)
    assert plan.action == "fresh" and not out.exists()


def test_symlinked_output_folder_is_replaced_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    checkpoint(target, 8, 100)
    (tmp_path / "t").symlink_to(target)
    assert prepare_output_dir(tmp_path / "t", 300).action == "fresh"
    assert not (tmp_path / "t").exists() and latest_checkpoint(target) is not None


# ------------------------------------------------------------------------------ stand-in trainer


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A COLMAP dataset as run_pipeline.py leaves it: 12 frames, a PINHOLE camera, 50 points."""
    root = tmp_path / "task" / "images_undistorted"
    (root / "images").mkdir(parents=True)
    (root / "sparse" / "0").mkdir(parents=True)
    rnd = np.random.default_rng(0)
    for i in range(12):
        frame = rnd.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"frame_{i:04d}.jpg"), frame)
    (root / "sparse" / "0" / "cameras.bin").write_bytes(
        struct.pack("<QiiQQ4d", 1, 1, 1, 64, 48, 50.0, 50.0, 32.0, 24.0)
    )
    points = b"".join(
        struct.pack("<QdddBBBdQ", i, *rnd.random(3), 200, 120, 40, 0.5, 2)
        + struct.pack("<iiii", 1, i, 2, i)
        for i in range(50)
    )
    (root / "sparse" / "0" / "points3D.bin").write_bytes(struct.pack("<Q", 50) + points)
    return root


def run_trainer(
    dataset, output_root, iterations=300, env=None, extra=(), resume=False, factor=1, **options
):
    argv = build_fit_command(
        python=sys.executable,
        checkout=FAKE_CHECKOUT,
        dataset_path=dataset,
        output_root=output_root,
        name="task",
        iterations=iterations,
        down_sample_factor=factor,
        extra_args=list(extra),
        resume=resume,
        **options,
    )
    return subprocess.run(
        argv,
        cwd=FAKE_CHECKOUT,
        env=trainer_environment(
            {**os.environ, "FAKE_TRAINER_STEP_SECONDS": "0.001", **(env or {})}
        ),
        capture_output=True,
        timeout=60,
        check=False,
    )


STANDARD_PROPERTIES = [
    "x", "y", "z", "nx", "ny", "nz",
    *(f"f_dc_{i}" for i in range(3)),
    *(f"f_rest_{i}" for i in range(45)),
    "opacity",
    *(f"scale_{i}" for i in range(3)),
    *(f"rot_{i}" for i in range(4)),
]  # fmt: skip


def test_stand_in_trains_and_leaves_the_real_layout(dataset, tmp_path):
    out_root = tmp_path / "checkpoints"
    done = run_trainer(dataset, out_root, checkpoint_every=100)
    assert done.returncode == 0, done.stderr.decode()
    parser = TrainingProgressParser(total_steps=300)
    rnd = random.Random(1)
    data, i = done.stdout, 0
    while i < len(data):
        step = rnd.randint(1, 300)
        parser.feed(data[i : i + step])
        i += step
    last = parser.latest
    assert last is not None and (last.step, last.total, last.percent) == (300, 300, 100.0)
    assert last.rate and last.rate > 10 and last.loss is not None and last.psnr is not None

    out = out_root / "task"
    results = collect_results(out)
    ply = out / "point_cloud" / "iteration_300" / "point_cloud.ply"
    assert results["ply_path"] == "point_cloud/iteration_300/point_cloud.ply"
    assert results["ply_size_bytes"] == ply.stat().st_size
    assert results["iterations"] == 300
    # 12 images, every 8th held out: 10 steps an epoch; saved after 100, 200 and 300 steps.
    assert results["checkpoints"] == [
        "checkpoints/epoch=10-step=100.ckpt",
        "checkpoints/epoch=20-step=200.ckpt",
        "checkpoints/epoch=30-step=300.ckpt",
    ]
    assert sorted(p.name for p in (out / "point_cloud").iterdir()) == [
        "iteration_100",
        "iteration_200",
        "iteration_300",
    ]
    version = out / "lightning_logs" / "version_0"
    events = next(version.glob("events.out.tfevents.*")).name
    assert [n for n in results["other_files"] if not n.startswith("metrics/")] == [
        "cameras.json",
        "cfg_args",
        "lightning_logs/version_0/config.yaml",
        "lightning_logs/version_0/hparams.yaml",
        f"lightning_logs/version_0/{events}",
    ]
    assert "metrics/val-step=300.csv" in results["other_files"]
    vertices = PlyData.read(str(ply))["vertex"]
    assert [p.name for p in vertices.properties] == STANDARD_PROPERTIES
    assert read_ply_header(ply).properties == tuple(STANDARD_PROPERTIES)
    assert results["gaussian_count"] == vertices.count == 3000
    rotations = np.stack([vertices[f"rot_{i}"] for i in range(4)], axis=1)
    assert np.allclose(np.linalg.norm(rotations, axis=1), 1.0, atol=1e-5)
    assert all(np.isfinite(vertices[name]).all() for name in STANDARD_PROPERTIES)
    # seeded from the dataset's points3D.bin: its colour (200, 120, 40) as degree-0 SH
    assert np.allclose(vertices["f_dc_0"], (200 / 255 - 0.5) / 0.28209479177387814, atol=1e-5)


def test_download_files_skip_links_and_checkpoints_unless_asked(dataset, tmp_path):
    assert run_trainer(dataset, tmp_path / "c").returncode == 0
    out = tmp_path / "c" / "task"
    secret = touch(tmp_path / "secret.csv", b"do not ship")
    (out / "metrics" / "leak.csv").symlink_to(secret)
    (out / "cameras.json").unlink()
    (out / "cameras.json").symlink_to(secret)
    names = [name for _, name in result_files(out, keep_checkpoint=False)]
    assert "metrics/val-step=300.csv" in names
    assert "cameras.json" not in names and "metrics/leak.csv" not in names
    assert not any(name.endswith(".ckpt") for name in names)
    with_ckpt = [name for _, name in result_files(out, keep_checkpoint=True)]
    assert [n for n in with_ckpt if n.endswith(".ckpt")] == ["checkpoints/epoch=30-step=300.ckpt"]
    for path, name in result_files(out, keep_checkpoint=True):
        assert path == out / name and not path.is_symlink()


def test_stand_in_refuses_old_results_and_resumes_from_the_last_checkpoint(dataset, tmp_path):
    out_root = tmp_path / "c"
    assert run_trainer(dataset, out_root).returncode == 0
    refused = run_trainer(dataset, out_root, iterations=400)
    assert refused.returncode == 1
    assert (
        "AssertionError: checkpoint or point cloud output already exists" in refused.stderr.decode()
    )

    plan = prepare_output_dir(out_root / "task", 400)
    assert (plan.action, plan.start_step) == ("resume", 300)
    resumed = run_trainer(dataset, out_root, iterations=400, resume=plan.resume)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert "Restoring states from the checkpoint path at" in resumed.stderr.decode()
    parser = TrainingProgressParser(total_steps=400, initial_step=plan.start_step)
    first = None
    for line in resumed.stdout.decode().replace("\r", "\n").splitlines():
        progress = parser.feed_line(line)
        first = first or (progress if progress and progress.step > 300 else None)
    assert first is not None and first.step <= 310  # within the first epoch of 10 images
    assert parser.latest is not None and parser.latest.step == 400
    results = collect_results(out_root / "task")
    assert results["iterations"] == 400
    assert sorted(p.name for p in (out_root / "task" / "lightning_logs").iterdir()) == [
        "version_0",
        "version_1",
    ]


def test_stand_in_rejects_unknown_flags(dataset, tmp_path):
    done = run_trainer(dataset, tmp_path / "c", extra=["--no-such.flag", "1"])
    assert done.returncode == 2
    assert (
        done.stderr.decode().splitlines()[-1] == "error: unrecognized arguments: --no-such.flag 1"
    )
    assert not (tmp_path / "c").exists()


def test_stand_in_crash_ends_with_a_traceback(dataset, tmp_path):
    env = {"FAKE_TRAINER_MODE": "crash", "FAKE_TRAINER_CRASH_AT": "40", "TQDM_MINITERS": "1"}
    done = run_trainer(dataset, tmp_path / "c", env=env)
    assert done.returncode == 1
    err = done.stderr.decode().splitlines()
    assert "Traceback (most recent call last):" in err
    assert err[-1].startswith("torch.OutOfMemoryError: CUDA out of memory.")
    parser = TrainingProgressParser(total_steps=300)
    parser.feed(done.stdout)
    assert parser.latest is not None and parser.latest.step == 39
    with pytest.raises(ValueError, match="no point_cloud/iteration_") as raised:
        collect_results(tmp_path / "c" / "task")
    assert isinstance(raised.value, TrainingResultError)


def test_stand_in_hang_leaves_a_child_that_ignores_sigterm(dataset, tmp_path):
    argv = build_fit_command(
        python=sys.executable,
        checkout=FAKE_CHECKOUT,
        dataset_path=dataset,
        output_root=tmp_path / "c",
        name="task",
        iterations=300,
    )
    env = {**os.environ, "FAKE_TRAINER_MODE": "hang", "FAKE_TRAINER_HANG_AT": "20"}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    pid_file = tmp_path / "c" / "task" / "fake_trainer_child.pid"
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = psutil.Process(int(pid_file.read_text()))
        time.sleep(0.3)  # let the child install its SIGTERM handler
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
        time.sleep(0.3)
        assert child.is_running() and child.status() != "zombie"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert wait_gone(child.pid)


def test_down_sampled_images_for_the_stand_in(dataset, tmp_path):
    missing = run_trainer(dataset, tmp_path / "c", factor=2)
    assert missing.returncode == 1 and "images_2" in missing.stderr.decode()
    shutil.rmtree(tmp_path / "c")
    folder = prepare_downsampled_images(dataset, 2)
    assert folder == dataset / "images_2"
    image = cv2.imread(str(folder / "frame_0000.jpg"))
    assert image.shape == (24, 32, 3)
    assert len(list(folder.iterdir())) == 12
    assert prepare_downsampled_images(dataset, 1) == dataset / "images"
    assert run_trainer(dataset, tmp_path / "c", factor=2).returncode == 0
    cameras = (tmp_path / "c" / "task" / "cameras.json").read_text()
    assert '"width": 32' in cameras and '"height": 24' in cameras


# ------------------------------------------------------------------------------ dry run


def copy_checkout(tmp_path: Path) -> Path:
    checkout = tmp_path / "gspl"
    checkout.mkdir()
    shutil.copy(FAKE_CHECKOUT / "main.py", checkout / "main.py")
    return checkout


async def test_dry_run_names_a_missing_trainer_module(monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_MISSING_MODULE", "plyfile")
    ok, why = await check_training_available(sys.executable, FAKE_CHECKOUT, False, 60)
    assert not ok
    assert why == "the trainer's Python cannot import plyfile: install the trainer's requirements"


async def test_dry_run_passes_the_real_flags_and_catches_bad_ones(tmp_path):
    setup = TrainerSetup(sys.executable, FAKE_CHECKOUT, require_cuda=False, timeout_s=60)
    ok, why = await check_training_available(sys.executable, FAKE_CHECKOUT, False, 60, setup=setup)
    assert ok and "passed a dry run" in why
    bad = TrainerSetup(**{**setup.__dict__, "extra_args": ("--model.no_such_option", "1")})
    ok, why = await check_training_available(sys.executable, FAKE_CHECKOUT, False, 60, setup=bad)
    assert not ok
    assert why == (
        "the trainer rejects the server's command line or config: "
        "unrecognized arguments: --model.no_such_option 1"
    )
    missing = TrainerSetup(**{**setup.__dict__, "config": tmp_path / "nope.yaml"})
    ok, why = await check_training_available(
        sys.executable, FAKE_CHECKOUT, False, 60, setup=missing
    )
    assert not ok and "Unable to load config" in why


async def test_dry_run_catches_configs_that_would_hang(tmp_path):
    viewer = tmp_path / "viewer.yaml"
    viewer.write_text("viewer: true\n")
    wandb = tmp_path / "colmap_exp.yaml"  # what configs/colmap_exp.yaml does to the logger
    wandb.write_text("logger: wandb\n")
    base = TrainerSetup(sys.executable, FAKE_CHECKOUT, require_cuda=False, timeout_s=60)
    ok, why = await check_training_available(
        sys.executable,
        FAKE_CHECKOUT,
        False,
        60,
        setup=TrainerSetup(**{**base.__dict__, "config": viewer}),
    )
    assert not ok and "web viewer" in why
    # wandb runs offline in the trainer's environment unless configured: that works.
    with_wandb = TrainerSetup(**{**base.__dict__, "config": wandb})
    ok, why = await check_training_available(
        sys.executable, FAKE_CHECKOUT, False, 60, setup=with_wandb
    )
    assert ok, why
    online = TrainerSetup(**{**with_wandb.__dict__, "env": (("WANDB_MODE", "online"),)})
    ok, why = await check_training_available(sys.executable, FAKE_CHECKOUT, False, 60, setup=online)
    assert not ok and "WANDB_API_KEY" in why


def test_failure_sentences():
    traceback = (
        'Traceback (most recent call last):\n  File "main.py", line 1, in <module>\n'
        "ModuleNotFoundError: No module named 'viser.infra'\n"
    )
    assert explain_trainer_failure(traceback, 1) == (
        "the trainer's Python cannot import viser: install the trainer's requirements"
    )
    assert "cannot import its own `internal` package" in explain_trainer_failure(
        "ModuleNotFoundError: No module named 'internal'", 1
    )
    assert explain_trainer_failure("Segmentation fault", -11) == (
        "the trainer's dry run failed (exit status -11): Segmentation fault"
    )
    assert config_problem("logger: tensorboard\nviewer: false\n", {}) is None
    assert config_problem("logger: wandb\n", {"WANDB_MODE": "offline"}) is None


async def test_a_stale_check_runs_again(tmp_path):
    checkout = copy_checkout(tmp_path)
    setup = TrainerSetup(sys.executable, checkout, require_cuda=False, timeout_s=60)
    assert (await check_if_stale(setup, 300))[0]
    (checkout / "main.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\")\n")
    assert (await check_if_stale(setup, 300))[0]  # younger than 300 s: the last answer
    ok, why = await check_if_stale(setup, 0)
    assert not ok and "cannot import wandb" in why


def test_probe_dataset_is_a_readable_colmap_dataset(tmp_path):
    dataset = write_probe_dataset(tmp_path / "d")
    assert dataset_image_size(dataset) == (32, 24)
    for image in (dataset / "images").iterdir():
        assert cv2.imread(str(image)).shape == (24, 32, 3)


# ------------------------------------------------------------------------------ resolution


def test_down_sample_factor_for_the_longest_side(tmp_path):
    assert choose_down_sample_factor((3840, 2160), 1600) == 3
    assert down_sampled_size((3840, 2160), 3) == (1280, 720)
    assert choose_down_sample_factor((2160, 3840), 1600) == 3  # portrait
    assert choose_down_sample_factor((1600, 900), 1600) == 1
    assert choose_down_sample_factor((1601, 900), 1600) == 2
    assert down_sampled_size((4032, 3024), choose_down_sample_factor((4032, 3024), 1600)) == (
        1344,
        1008,
    )
    sparse = tmp_path / "d" / "sparse" / "0"
    sparse.mkdir(parents=True)
    (sparse / "cameras.txt").write_text("# c\n1 PINHOLE 3840 2160 3000 3000 1920 1080\n")
    assert dataset_image_size(tmp_path / "d") == (3840, 2160)


# ------------------------------------------------------------------------------ snapshots


def ply(folder: Path, vertices: int = 2, cut: bool = False) -> Path:
    header = f"ply\nformat binary_little_endian 1.0\nelement vertex {vertices}\n"
    header += "property float x\nend_header\n"
    body = b"\0" * (4 * vertices - (4 if cut else 0))
    return touch(folder / "point_cloud.ply", header.encode() + body)


def test_pruning_keeps_the_newest_snapshot_and_the_final(tmp_path):
    out = tmp_path / "t"
    for epoch, step in ((10, 100), (20, 200), (30, 300)):
        checkpoint(out, epoch, step)
        touch(out / "checkpoints" / f"epoch={epoch}-step={step}-xyz_rgb.ply")
    writing = touch(out / "checkpoints" / "epoch=40-step=400.ckpt", b"half a zip")
    touch(out / "checkpoints" / "epoch=5-step=50.ckpt.corrupt")
    for step in (100, 200):
        ply(out / "point_cloud" / f"iteration_{step}")
    ply(out / "point_cloud" / "iteration_300", cut=True)  # being written
    removed = prune_snapshots(out, final_step=1000)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch=30-step=300-xyz_rgb.ply",
        "epoch=30-step=300.ckpt",
        "epoch=40-step=400.ckpt",
    ]
    assert writing.exists()
    assert sorted(p.name for p in (out / "point_cloud").iterdir()) == [
        "iteration_200",
        "iteration_300",
    ]
    assert "point_cloud/iteration_100" in removed
    ply(out / "point_cloud" / "iteration_1000")
    ply(out / "point_cloud" / "iteration_300")
    prune_snapshots(out, final_step=1000)
    assert sorted(p.name for p in (out / "point_cloud").iterdir()) == ["iteration_1000"]


# ------------------------------------------------------------------------------ quality


def test_validation_figures_from_the_progress_bar():
    parser = TrainingProgressParser(total_steps=7)
    parser.feed(
        "[colmap dataparser] train set images: 3, val set images: 1, loaded mask: 0\n"
        + CAPTURED_FIT_STDOUT
    )
    assert parser.image_counts == (3, 1)
    assert parser.validation == {
        "loss": 0.2, "rgb_diff": 0.15, "ssim": 0.62, "psnr": 15.8, "lpips": 0.6
    }  # fmt: skip
    assert parser.validation_step == 6


def test_quality_prefers_the_metrics_csv_of_the_last_step(dataset, tmp_path):
    done = run_trainer(dataset, tmp_path / "c", iterations=305, hold_out=True)
    assert done.returncode == 0, done.stderr.decode()
    out = tmp_path / "c" / "task"
    parser = TrainingProgressParser(total_steps=305)
    parser.feed(done.stdout)
    quality = training_quality(out, 305, parser, hold_out=True)
    figures, images = read_validation_csv(out / "metrics" / "val-step=305.csv")
    assert images == 2  # frames 0 and 8 of 12
    assert quality is not None
    assert (quality["psnr"], quality["ssim"], quality["lpips"]) == (
        figures["psnr"], figures["ssim"], figures["lpips"]
    )  # fmt: skip
    assert (quality["eval_images"], quality["split"], quality["step"]) == (2, "held_out", 305)
    assert quality["note"] == "PSNR and SSIM on 2 held-out frames the model never saw"
    # Without the CSV: the bar's figures, rounded as the bar shows them (3 digits).
    shutil.rmtree(out / "metrics")
    from_bar = training_quality(out, 305, parser, hold_out=True)
    assert from_bar is not None and from_bar["source"] == "progress_bar"
    assert from_bar["psnr"] == float(f"{figures['psnr']:.3g}")
    assert from_bar["eval_images"] == 2


def test_quality_on_training_views_says_so_and_lpips_may_be_skipped(tmp_path):
    out = tmp_path / "t"
    touch(
        out / "metrics" / "val-step=300.csv",
        b"name,loss,ssim,psnr\r\na.jpg,0.1,0.9,30.5\r\n,,,\r\nMEAN,0.1,0.9,30.5\r\n",
    )
    quality = training_quality(out, 300, TrainingProgressParser(300), hold_out=False)
    assert quality is not None
    assert (quality["psnr"], quality["lpips"], quality["split"]) == (30.5, None, "training_views")
    assert "training views (no frames held out)" in quality["note"]
    assert quality["note"].endswith("LPIPS skipped (the trainer reported none)")
    assert training_quality(tmp_path / "none", 300, TrainingProgressParser(300), True) is None
