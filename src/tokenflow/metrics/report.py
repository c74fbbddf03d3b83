"""The evaluation report: per-frame numbers, their summary, a table, JSON and a plot."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger('tokenflow.metrics')


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: np.ndarray | None) -> float | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def _list(values: np.ndarray | None) -> list[float | None] | None:
    if values is None:
        return None
    return [_finite_or_none(v) for v in np.asarray(values, dtype=np.float64).ravel()]


@dataclass
class EvalReport:
    """Metrics of one edit. Per-frame arrays plus the settings they were measured with.

    ``warp_error`` and ``warp_error_source`` have one value per frame pair ``(i, i + gap)``;
    ``psnr``, ``ssim`` and ``clip_text`` one per frame; ``clip_consistency`` one per consecutive pair.
    Lower warp error is better and ``warp_error_source`` is the floor an edit can reach.
    """

    frames: int
    gap: int
    flow: str
    warp_error: np.ndarray
    warp_error_source: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    clip_text: np.ndarray | None = None
    clip_consistency: np.ndarray | None = None
    inversion_psnr: float | None = None
    prompt: str | None = None
    clip_model: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Means and settings; JSON-serialisable (NaN/inf become None)."""
        return {
            "frames": int(self.frames),
            "gap": int(self.gap),
            "flow": self.flow,
            "warp_error": _mean(self.warp_error),
            "warp_error_source": _mean(self.warp_error_source),
            "psnr": _mean(self.psnr),
            "ssim": _mean(self.ssim),
            "clip_text": _mean(self.clip_text),
            "clip_consistency": _mean(self.clip_consistency),
            "inversion_psnr": _finite_or_none(self.inversion_psnr),
            "prompt": self.prompt,
            "clip_model": self.clip_model,
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`summary` plus ``"per_frame"`` lists; JSON-serialisable."""
        out = self.summary()
        out["per_frame"] = {
            "warp_error": _list(self.warp_error),
            "warp_error_source": _list(self.warp_error_source),
            "psnr": _list(self.psnr),
            "ssim": _list(self.ssim),
            "clip_text": _list(self.clip_text),
            "clip_consistency": _list(self.clip_consistency),
        }
        return out

    def format_table(self) -> str:
        """A small aligned text table (mean / min / max per metric) for the terminal."""
        rows: list[tuple[str, np.ndarray | float | None, str]] = [
            ("warp error, edited", self.warp_error, "lower is better"),
            ("warp error, source (floor)", self.warp_error_source, "flow noise floor"),
            ("PSNR vs source (dB)", self.psnr, "structure"),
            ("SSIM vs source", self.ssim, "structure"),
        ]
        if self.clip_text is not None:
            rows.append(("CLIP text similarity", self.clip_text, "higher is better"))
        if self.clip_consistency is not None:
            rows.append(("CLIP frame consistency", self.clip_consistency, "higher is better"))
        if self.inversion_psnr is not None:
            rows.append(("inversion PSNR (dB)", self.inversion_psnr, "reconstruction"))

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        table = [("metric", "mean", "min", "max", "note")]
        for label, values, note in rows:
            if values is None or np.isscalar(values):
                table.append((label, fmt(_finite_or_none(values)), "-", "-", note))
                continue
            arr = np.asarray(values, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            lo = float(arr.min()) if arr.size else None
            hi = float(arr.max()) if arr.size else None
            table.append((label, fmt(_mean(arr)), fmt(lo), fmt(hi), note))
        widths = [max(len(r[c]) for r in table) for c in range(5)]
        lines = []
        for r, row in enumerate(table):
            cells = [row[0].ljust(widths[0])] + [row[c].rjust(widths[c]) for c in (1, 2, 3)] + [row[4]]
            lines.append("  ".join(cells).rstrip())
            if r == 0:
                lines.append("-" * len(lines[0]))
        lines.append(f"frames: {self.frames}  gap: {self.gap}  flow: {self.flow}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        """Write a PNG: per-pair warp error of the edit against the source floor, and the per-frame
        CLIP text score when present."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        with_clip = self.clip_text is not None
        fig = Figure(figsize=(8, 6 if with_clip else 3.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2 if with_clip else 1, 1, squeeze=False)[:, 0]
        ax = axes[0]
        x = np.arange(len(self.warp_error))
        ax.plot(x, self.warp_error, label="edited", color="tab:red")
        ax.plot(x, self.warp_error_source, label="source (floor)", color="tab:gray", linestyle="--")
        ax.set_xlabel(f"frame pair (i, i+{self.gap})")
        ax.set_ylabel("warp error (0-255)")
        ax.set_title(f"Temporal consistency ({self.flow} flow)")
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
        if with_clip:
            ax = axes[1]
            ax.plot(np.arange(len(self.clip_text)), self.clip_text, color="tab:blue")
            ax.set_xlabel("frame")
            ax.set_ylabel("CLIP cos sim")
            ax.set_title("Edit fidelity" + (f": {self.prompt}" if self.prompt else ""))
            ax.grid(alpha=0.3)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        logger.info("metrics plot written to %s", path)
