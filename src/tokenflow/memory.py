"""Host memory measurement for long-video runs: resident set size now, at its peak, and over a block of code.

Linux exposes the peak resident set size (``VmHWM``) and lets a process reset it (``/proc/self/clear_refs``, value
5), so the peak of one stage can be measured inside a long-lived process. Elsewhere the peak falls back to
``getrusage``'s ``ru_maxrss``, which cannot be reset (measure in a fresh process there).
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["current_rss", "peak_rss", "reset_peak_rss", "PeakMemory"]

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process now, in bytes (0 where it cannot be read)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001 - informative only
        return 0


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes (since start or the last :func:`reset_peak_rss`)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """``with PeakMemory() as m: ...`` -> ``m.baseline`` (RSS at entry), ``m.peak`` (peak RSS inside the block),
    ``m.growth`` (``peak - baseline``), all in bytes; ``m.exact`` tells whether the peak could be reset at entry
    (otherwise it may include an earlier, higher peak of the process)."""

    baseline: int = 0
    peak: int = 0
    exact: bool = False

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)

    def __enter__(self) -> "PeakMemory":
        self.exact = reset_peak_rss()
        self.baseline = current_rss()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = peak_rss()
