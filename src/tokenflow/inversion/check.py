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

__all__ = ["psnr", "reconstruction_psnr", "check_sample", "LOW_PSNR"]

# Below this the reconstruction check warns: on the micro trained model plain 50-step DDIM inversion reconstructs at
# 39.5 dB, the reference's 500 steps at 41.6 dB and one fixed-point refinement at 55.5 dB (benchmarks/README.md);
# a source that comes back under 25 dB differs from its frames at a glance (a heuristic: not yet measured on full
# SD checkpoints, which no session here could download), and so will the edit's structure.
LOW_PSNR = 25.0


def check_sample(n: int, count: int | None) -> list[int]:
    """The frames the reconstruction check samples: ``count`` evenly spaced over ``n`` (first and last included;
    ``None`` or ``count >= n``: all of them; ``0``: none)."""
    if count is None or count >= n:
        return list(range(n))
    if count <= 0:
        return []
    if count == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def _squared_error(a: torch.Tensor, b: torch.Tensor) -> int:
    """Sum of squared differences of two uint8 stacks, exact (int64)."""
    return int((a.to(torch.int64) - b.to(torch.int64)).pow(2).sum())


@torch.no_grad()
def _reconstruction_error(
    model: Backbone,
    source: SourceLatents,
    cond: TextConditioning,
    frames: list[int],
    path: list[int] | None = None,
) -> tuple[int, int]:
    """(squared error, values) of ``frames`` decoded after reconstruction vs the VAE round trip, sampled down
    ``path`` (descending; default: the source's timesteps)."""
    path = sorted(source.noisy, reverse=True) if path is None else path
    recon = _reconstruct_batch(model, source.noisy[path[0]][frames], cond, path)
    decoded = model.decode_latents(recon)
    reference = model.decode_latents(source.clean[frames])
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
    frames: list[int] | None = None,
) -> float:
    """PSNR of the frames sampled back from the noisiest latents against the VAE round trip, a batch at a time;
    ``frames``: only these (default: all)."""
    frames = list(range(source.clean.shape[0])) if frames is None else list(frames)
    bar = Tracker("reconstruction", len(frames), as_progress(progress), cancel)
    error = count = 0
    for start in range(0, len(frames), batch_size):
        batch = frames[start : start + batch_size]
        e, c = _reconstruction_error(model, source, cond, batch)
        error, count = error + e, count + c
        bar.update(len(batch))
    return _psnr_from_error(error, count)


def _log_psnr(value: float, frames: int | None = None) -> None:
    sampled = f" on {frames} sampled frames" if frames is not None else ""
    if value < LOW_PSNR:
        logger.warning("inversion reconstruction PSNR %.2f dB%s, below %.0f dB: the inverted source does not come "
                       "back as the frames, and edits will lose its structure; use --inversion fixed-point (with "
                       "more --inversion-refinements) or float32", value, sampled, LOW_PSNR)
    else:
        logger.info("inversion reconstruction PSNR %.2f dB%s (against the VAE round trip)", value, sampled)
