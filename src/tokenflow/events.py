"""Progress events and cancellation, shared by every long-running call (inversion, editing, decoding, a whole run).

A caller passes ``progress=`` (a callable receiving one :class:`ProgressEvent` at a time) and ``cancel=`` (a
``threading.Event``, or anything with ``is_set()``). The work checks ``cancel`` between UNet calls and raises
:class:`Cancelled`; a run that is cancelled leaves no output folder (and a cache that the next run resumes from).
Progress bars are one subscriber of the same events (:class:`TqdmProgress`), so the CLI, the web UI and batch runs
all see the same numbers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Cancelled", "CancelToken", "ProgressEvent", "ProgressCallback", "Tracker", "TqdmProgress", "as_progress",
           "check_cancelled"]


class Cancelled(Exception):
    """The run was cancelled through its ``cancel`` token; nothing was written (an inversion cache resumes)."""


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class ProgressEvent:
    """Where one stage of a run stands: ``done`` of ``total`` ``unit`` (frames), ``eta_s`` seconds left in this
    stage (``None`` until a rate is known), ``detail`` a short note (``"step 3/50"``). Stages: ``"inversion"``,
    ``"reconstruction"``, ``"editing"``, ``"decoding"``."""

    stage: str
    done: float
    total: float
    unit: str = "frame"
    eta_s: float | None = None
    detail: str = ""

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


ProgressCallback = Callable[[ProgressEvent], None]


def check_cancelled(cancel: CancelToken | None) -> None:
    """Raise :class:`Cancelled` when ``cancel`` is set (called between UNet calls)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


class Tracker:
    """Counts one stage's work and sends an event per update (and one at the start), with an ETA from the rate so
    far; checks the cancel token on every update."""

    def __init__(self, stage: str, total: int, progress: ProgressCallback | None, cancel: CancelToken | None = None,
                 initial: int = 0, unit: str = "frame", divisor: int = 1):
        """``total``/``initial`` and every update count whole pieces of work; events report them divided by
        ``divisor`` (an inversion counts frame-steps and reports frames), so the last event is exactly total."""
        self.stage, self.unit, self._divisor = stage, unit, divisor
        self.count, self.total_count, self._initial = initial, total, initial
        self._progress, self._cancel = progress, cancel
        self.detail = ""
        self._started = time.monotonic()
        check_cancelled(cancel)
        self._emit()

    def update(self, amount: int = 1) -> None:
        self.count += amount
        self._emit()
        check_cancelled(self._cancel)

    def close(self) -> None:
        """Nothing to release: the last update already reported the end (kept so a tracker stands in for a bar)."""

    def _emit(self) -> None:
        if self._progress is None:
            return
        eta = None
        elapsed = time.monotonic() - self._started
        if self.count > self._initial and elapsed > 0:
            eta = max(0.0, (self.total_count - self.count) * elapsed / (self.count - self._initial))
        d = self._divisor
        self._progress(ProgressEvent(self.stage, self.count / d, self.total_count / d, self.unit, eta, self.detail))


class TqdmProgress:
    """A progress callback drawing one tqdm bar per stage (the command line's bars), frames shown as whole numbers
    even when a stage counts fractions of a frame (an inversion step of a batch)."""

    def __init__(self, **tqdm_kwargs):
        self._bars: dict[str, object] = {}
        self._kwargs = tqdm_kwargs
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        with self._lock:
            bar = self._bars.get(event.stage)
            if bar is None:
                bar = tqdm(total=event.total, initial=event.done, desc=event.stage, unit=event.unit,
                           bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} " + event.unit
                           + "s [{elapsed}<{remaining}, {rate_fmt}{postfix}]", **self._kwargs)
                self._bars[event.stage] = bar
            else:
                if event.detail:
                    bar.set_postfix_str(event.detail, refresh=False)
                bar.update(event.done - bar.n)
            if event.done >= event.total:
                bar.close()
                del self._bars[event.stage]


def as_progress(progress: bool | ProgressCallback | None) -> ProgressCallback | None:
    """``True``: progress bars; ``False``/``None``: silence; a callable: itself."""
    if progress is True:
        return TqdmProgress()
    if progress is False or progress is None:
        return None
    if not callable(progress):
        raise TypeError(f"progress={progress!r}: pass True, False or a callable taking a ProgressEvent")
    return progress
