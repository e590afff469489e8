"""The trainer's output turned into progress: gaussian-splatting-lightning draws tqdm bars (an
epoch bar and a `Training` bar with the global step, redrawn with carriage returns and cursor
moves); this module splits that byte stream into lines, parses each bar (step, total, rate,
time left, loss and PSNR from its postfix) and tells bar redraws apart from real messages."""

from __future__ import annotations

import codecs
import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_ESCAPE = r"\x1b\[[0-9;?]*[ -/]*[@-~]"
_SPLIT_RE = re.compile(rf"\r|\n|{_ESCAPE}")
_TIME = r"\d+(?::\d\d){1,2}"
_RATE = r",\s*(?P<rate>\?|\d+(?:\.\d+)?)(?P<unit>it/s|s/it)(?P<rest>.*)$"
_DESC = r"^(?:(?P<desc>[^|\[]*?):)?\s*"
_BAR_RE = re.compile(
    rf"{_DESC}(?:\d+%)?\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+|\?)\s*"
    rf"\[(?P<elapsed>{_TIME})<(?P<remaining>{_TIME}|\?){_RATE}"
)
_NO_TOTAL_RE = re.compile(rf"{_DESC}(?P<n>\d+)it\s*\[(?P<elapsed>{_TIME}){_RATE}")
_EPOCH_RE = re.compile(r"^Epoch (\d+)$")
_SPLIT_COUNTS = re.compile(r"train set images: (\d+), val set images: (\d+)")


def _seconds(text: str | None) -> float | None:
    if text is None or text == "?":
        return None
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return float(seconds)


@dataclass(frozen=True)
class TqdmLine:
    """One redraw of a tqdm bar."""

    description: str
    current: int
    total: int | None
    elapsed_seconds: float | None
    remaining_seconds: float | None  # of this bar only
    rate: float | None  # iterations per second (an `s/it` display is inverted)
    postfix: Mapping[str, str]


def parse_tqdm_line(line: str) -> TqdmLine | None:
    """Parse one tqdm redraw (escape sequences removed); None when it is not a bar."""
    match = _BAR_RE.match(line.strip()) or _NO_TOTAL_RE.match(line.strip())
    if match is None:
        return None
    g = match.groupdict()
    rate = None if g["rate"] == "?" else float(g["rate"])
    if rate is not None and g["unit"] == "s/it":
        rate = 1.0 / rate if rate > 0 else None
    postfix: dict[str, str] = {}
    rest = g["rest"].rstrip()
    if rest.startswith(","):
        pairs = rest[1:].removesuffix("]").split(", ")
        for pair in pairs if rest.endswith("]") else pairs[:-1]:  # cut off: last one partial
            key, sep, value = pair.strip().partition("=")
            if sep:
                postfix[key] = value
    total = g.get("total")
    return TqdmLine(
        description=(g["desc"] or "").strip(),
        current=int(g["n"]),
        total=int(total) if total and total != "?" else None,
        elapsed_seconds=_seconds(g["elapsed"]),
        remaining_seconds=_seconds(g.get("remaining")),
        rate=rate,
        postfix=postfix,
    )


def strip_terminal_controls(text: str) -> str:
    """Remove the cursor movements tqdm writes around bars drawn below the first line."""
    return re.sub(rf"{_ESCAPE}|\x1b", "", text)


def is_progress_output(line: str) -> bool:
    """True for a bar redraw or one of the blank clears tqdm writes (noise in a task log)."""
    text = strip_terminal_controls(line).strip()
    return not text or parse_tqdm_line(text) is not None


def _metric(postfix: Mapping[str, str], keys: Sequence[str]) -> float | None:
    for key in keys:
        with contextlib.suppress(KeyError, ValueError):
            return float(postfix[key])
    return None


@dataclass(frozen=True)
class TrainingProgress:
    """The trainer's progress as the server reports it."""

    step: int
    total: int | None
    percent: float | None
    rate: float | None  # training steps per second
    eta_seconds: float | None  # for the whole run, not counting validation pauses
    loss: float | None  # latest train/loss
    psnr: float | None  # latest val/psnr (validation runs after every epoch)
    epoch: int | None

    def as_progress(self) -> dict[str, Any]:
        """The `progress` object of `/status` during training."""
        return {"stage": "training", "percent": self.percent, "current": self.step,
                "total": self.total, "rate": self.rate, "eta_seconds": self.eta_seconds,
                "loss": self.loss, "psnr": self.psnr, "epoch": self.epoch}  # fmt: skip


class TrainingProgressParser:
    """Turns the trainer's stdout+stderr, in chunks split anywhere, into TrainingProgress.

    Lightning draws `Epoch E: ...| n/batches [elapsed<left, rate, metrics]` (a batch is a step)
    and the trainer its own `Training: ...| step/max_steps [...]`, redrawn only at epoch ends.
    The step is E * batches + n (after a resume Lightning goes on counting the batches of the
    epoch it stopped in), never below `initial_step`, until the `Training` bar passes its
    total; the total comes from that bar or `total_steps`, the ETA from the epoch bar's rate.
    The latest `val/...` figures on any bar and the data parser's image counts are kept.
    """

    def __init__(self, total_steps: int | None = None, initial_step: int = 0) -> None:
        """`total_steps`: iterations asked for; `initial_step`: the resumed checkpoint's step."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._total = total_steps
        self._initial = self._step = initial_step
        self._epoch: int | None = None
        self._epoch_steps = self._earlier_epochs_steps = 0
        self._rate: float | None = None
        self._loss: float | None = None
        self._psnr: float | None = None
        self.latest: TrainingProgress | None = None
        self.validation: dict[str, float] = {}  # the latest `val/...` figures on a bar
        self.validation_step: int | None = None  # the step they were shown at
        self.image_counts: tuple[int, int] | None = None  # (train, val) from the data parser

    def feed(self, chunk: str | bytes) -> TrainingProgress | None:
        """Take raw output; the latest progress when this chunk completed a redraw, else None."""
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        *parts, pending = _SPLIT_RE.split(self._pending + text)
        self._pending = pending[-65536:]
        seen = [self._consume(part) for part in parts]
        if pending.rstrip().endswith("]"):  # a bar with nothing after it yet
            seen.append(self._consume(pending))
        return self.latest if any(seen) else None

    def feed_line(self, line: str) -> TrainingProgress | None:
        """Take one line already split on \\r and \\n; like `feed`."""
        return self.latest if self._consume(line) else None

    def _consume(self, text: str) -> bool:
        if "val set images:" in text and (counts := _SPLIT_COUNTS.search(text)):
            self.image_counts = (int(counts[1]), int(counts[2]))
        if "[" not in text or "it" not in text:  # every bar shows `[... it/s]`: skip the rest
            return False
        bar = parse_tqdm_line(strip_terminal_controls(text))
        if bar is None:
            return False
        if epoch_match := _EPOCH_RE.match(bar.description):
            epoch = int(epoch_match[1])
            if self._epoch is not None and epoch < self._epoch:
                return False
            if epoch != self._epoch:
                self._earlier_epochs_steps += self._epoch_steps
                self._epoch, self._epoch_steps = epoch, 0
            self._epoch_steps = max(self._epoch_steps, bar.current)
            if bar.total:  # every epoch has `total` batches (a resumed one goes on counting)
                step = epoch * bar.total + bar.current
            else:
                step = self._initial + self._earlier_epochs_steps + self._epoch_steps
            self._rate = bar.rate or self._rate
        elif bar.description == "Training":
            if bar.total and (bar.current or self._total is None):
                self._total = bar.total  # Lightning's bar shows `Training 0/batches` once
            step = bar.current if self._epoch is None else self._step
            if self._total and bar.current >= self._total:  # it passes the total when done
                step = self._total
            if self._epoch is None:
                self._rate = bar.rate or self._rate
        else:
            return False
        if (loss := _metric(bar.postfix, ("train/loss", "loss"))) is not None:
            self._loss = loss
        if (psnr := _metric(bar.postfix, ("val/psnr", "psnr", "train/psnr"))) is not None:
            self._psnr = psnr
        total = self._total
        self._step = max(self._step, min(step, total) if total else step)
        validation = {}
        for key, value in bar.postfix.items():
            with contextlib.suppress(ValueError):
                if key.startswith("val/"):
                    validation[key[4:]] = float(value)
        if validation and validation != self.validation:  # the `Training` bar repeats them
            self.validation, self.validation_step = validation, self._step
        left = total - self._step if total else None
        self.latest = TrainingProgress(
            step=self._step,
            total=total,
            percent=round(100.0 * self._step / total, 2) if total else None,
            rate=self._rate,
            eta_seconds=round(left / self._rate, 1) if left is not None and self._rate else None,
            loss=self._loss,
            psnr=self._psnr,
            epoch=self._epoch,
        )
        return True
