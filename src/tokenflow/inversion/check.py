"""The reconstruction check: sample the inverted latents back and compare the decoded frames with the VAE round
trip (a bad reconstruction predicts a bad edit)."""

from __future__ import annotations

import logging
import math

import torch

from ..events import CancelToken, ProgressCallback, Tracker, as_progress
from ..backbones import Backbone, TextConditioning
from .ddim import _reconstruct_batch
from .source import SourceLatents

logger = logging.getLogger("tokenflow.inversion")

__all__ = ["psnr", "reconstruction_psnr"]


def _squared_error(a: torch.Tensor, b: torch.Tensor) -> int:
    """Sum of squared differences of two uint8 stacks, exact (int64)."""
    return int((a.to(torch.int64) - b.to(torch.int64)).pow(2).sum())


@torch.no_grad()
def _reconstruction_error(
    model: Backbone,
    source: SourceLatents,
    cond: TextConditioning,
    start: int,
    stop: int,
) -> tuple[int, int]:
    """(squared error, values) of frames ``start:stop`` decoded after reconstruction vs the VAE round trip."""
    path = sorted(source.noisy, reverse=True)
    recon = _reconstruct_batch(model, source.noisy[path[0]][start:stop], cond, path)
    decoded = model.decode_latents(recon)
    reference = model.decode_latents(source.clean[start:stop])
    return _squared_error(decoded, reference), reference.numel()


def _psnr_from_error(squared_error: int, count: int) -> float:
    if squared_error == 0:
        return float("inf")
    return 10 * math.log10(255.0**2 * count / squared_error)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 frame stacks (the mean squared error over all frames)."""
    return _psnr_from_error(_squared_error(a, b), a.numel())


def reconstruction_psnr(
    model: Backbone,
    source: SourceLatents,
    cond: TextConditioning,
    batch_size: int = 8,
    progress: bool | ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> float:
    """PSNR of the frames sampled back from the noisiest latents against the VAE round trip, a batch at a time."""
    n = source.clean.shape[0]
    bar = Tracker("reconstruction", n, as_progress(progress), cancel)
    error = count = 0
    for start in range(0, n, batch_size):
        e, c = _reconstruction_error(model, source, cond, start, min(start + batch_size, n))
        error, count = error + e, count + c
        bar.update(min(batch_size, n - start))
    return _psnr_from_error(error, count)


def _log_psnr(value: float) -> None:
    logger.info("inversion reconstruction PSNR %.2f dB (against the VAE round trip)", value)
