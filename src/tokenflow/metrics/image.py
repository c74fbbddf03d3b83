"""Per-frame image metrics against the source: PSNR and SSIM (scikit-image)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tokenflow.errors import InputError

logger = logging.getLogger('tokenflow.metrics')


#: PSNR assigned to identical frames inside an :class:`EvalReport` so that means stay finite and the
#: report stays valid JSON. :func:`psnr` itself returns ``inf`` for identical frames unless given a cap.
PSNR_CAP_DB = 100.0


def _pair_frames(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 3:
        a = a[None]
    if b.ndim == 3:
        b = b[None]
    if a.shape != b.shape or a.ndim != 4:
        raise InputError(
            f"frames to compare differ in shape ({tuple(a.shape)} vs {tuple(b.shape)}); give two [N, H, W, C] arrays of one shape"
        )
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, cap: float | None = None) -> np.ndarray:
    """Per-frame PSNR in dB of two ``[N, H, W, C]`` arrays (a single ``[H, W, C]`` frame also works).

    Identical frames give ``inf``, or ``cap`` when one is given (:class:`EvalReport` uses
    :data:`PSNR_CAP_DB` = 100 dB so its means stay finite and JSON-able).
    """
    a, b = _pair_frames(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = (diff * diff).reshape(diff.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10((data_range**2) / mse)
    if cap is not None:
        out = np.minimum(out, cap)
    return out


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-frame SSIM (skimage ``structural_similarity`` over the colour channels); identical frames give 1."""
    from skimage.metrics import structural_similarity

    a, b = _pair_frames(a, b)
    h, w = a.shape[1:3]
    win = min(7, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if win < 3:
        raise InputError(f"SSIM: frames of {w}x{h} pixels are too small; use frames of at least 3x3 pixels")
    out = np.empty(a.shape[0], dtype=np.float64)
    for i in range(a.shape[0]):
        out[i] = structural_similarity(a[i], b[i], channel_axis=-1, data_range=data_range, win_size=win)
    return out
