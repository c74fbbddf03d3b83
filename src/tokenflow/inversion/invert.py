"""Invert a video's frames, through the cache when one is given."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..events import CancelToken, ProgressCallback, as_progress
from ..backbones import Backbone
from .cache import InversionCache
from .check import _log_psnr, check_sample, reconstruction_psnr
from ..errors import InputError
from .ddim import ddim_invert, inversion_grid
from .source import SourceLatents
from .strided import StridedTimesteps, resolve_cache_stride, stored_timesteps

logger = logging.getLogger("tokenflow.inversion")

__all__ = ["invert_frames"]


def invert_frames(
    model: Backbone,
    frames: torch.Tensor,
    *,
    prompt: str = "",
    steps: int = 50,
    inversion_steps: int = 500,
    batch_size: int = 8,
    cache: InversionCache | None = None,
    reconstruct: bool = True,
    progress: bool | ProgressCallback | None = True,
    on_cache_hit: Callable[[Path], None] | None = None,
    cancel: CancelToken | None = None,
    refinements: int = 0,
    check_frames: int | None = None,
    cache_stride: int | str | None = "auto",
) -> SourceLatents:
    """Encode uint8 frames ``[N,H,W,3]`` and DDIM-invert them, through ``cache`` when given.

    With a cache the inversion streams to disk, resumes after an interruption and comes back lazy (host memory
    does not grow with frames x timesteps); without one, everything stays in memory. With ``reconstruct`` the
    latents are sampled back and decoded, and the PSNR against the VAE round trip is kept (a bad reconstruction
    predicts a bad edit).

    ``progress``: ``True`` for progress bars, or a callable receiving :class:`~tokenflow.events.ProgressEvent` objects
    (stages ``inversion`` and ``reconstruction``); ``cancel``: checked after every UNet call, raises
    :class:`~tokenflow.events.Cancelled` (a cached inversion resumes from its last checkpoint next time).
    ``refinements``: fixed-point iterations per inversion step (0: plain DDIM inversion, the reference's scheme;
    see :func:`~tokenflow.inversion.ddim._invert_batch`); part of the cache key. ``check_frames``: the
    reconstruction check samples this many evenly spaced frames (default: all; it costs one sampling pass each).
    ``cache_stride``: with a cache, keep every this-many-th saved timestep on disk and recompute the others, exactly,
    when an edit reads them (:mod:`.strided`); ``auto``: 1 (all) unless the entry would pass 4 GiB, then at most
    16 latent arrays a frame (1 MiB at 512 px). Part of the cache key when above 1.
    """
    if refinements < 0:
        raise InputError(f"`inversion_refinements` {refinements}: must be 0 or more")
    progress = as_progress(progress)
    factor = model.vae_scale_factor
    grid, save = inversion_grid(model, steps, inversion_steps, (frames.shape[1] // factor, frames.shape[2] // factor))
    cond = model.condition([prompt], height=frames.shape[1], width=frames.shape[2])
    info = dict(prompt=prompt, steps=steps, inversion_steps=inversion_steps, refinements=refinements, grid=grid,
                model=model.model_id)
    if cache is None:
        clean = model.encode_frames(frames, batch_size)
        noisy = ddim_invert(model, clean, cond, grid, save, batch_size, progress, cancel, refinements)
        source = SourceLatents(clean=clean, noisy=noisy, info=info)
        sample = check_sample(frames.shape[0], check_frames) if reconstruct else []
        if sample:
            source.reconstruction_psnr = reconstruction_psnr(model, source, cond, batch_size, progress, cancel,
                                                             frames=sample)
            _log_psnr(source.reconstruction_psnr, len(sample) if len(sample) < frames.shape[0] else None)
        return source

    latent_shape = (model.latent_channels, frames.shape[1] // factor, frames.shape[2] // factor)
    stride = resolve_cache_stride(cache_stride, frames.shape[0], latent_shape, save)
    stored = stored_timesteps(save, stride)
    key = InversionCache.key(frames, model, prompt, grid, save, refinements, stored if stride > 1 else None)

    def strided(source: SourceLatents | None) -> SourceLatents | None:
        """A strided entry's missing timesteps, recomputed on demand."""
        if source is None or sorted(source.noisy) == sorted(save):
            return source
        source.noisy = StridedTimesteps(source.noisy, save, model, cond, grid, refinements, scratch=cache.root,
                                        batches=source.info.get("batches"))
        return source

    checked = reconstruct and check_frames != 0

    def usable(hit: SourceLatents | None) -> bool:
        return hit is not None and (hit.reconstruction_psnr is not None or not checked)

    info["cache_stride"] = stride
    hit = strided(cache.load(key))
    if not usable(hit):
        with cache.lock(key):
            hit = strided(cache.load(key))  # another process may have finished it meanwhile
            if hit is None:
                return strided(cache.invert(key, model, frames, cond, grid, save, batch_size=batch_size,
                                            reconstruct=reconstruct, info=info, progress=progress, cancel=cancel,
                                            refinements=refinements, check_frames=check_frames, stored=stored))
            if not usable(hit):  # inverted earlier without the reconstruction check: add it
                sample = check_sample(frames.shape[0], check_frames)
                hit.reconstruction_psnr = reconstruction_psnr(model, hit, cond, batch_size, progress, cancel,
                                                              frames=sample)
                hit.info["check_frames"] = len(sample)
                _log_psnr(hit.reconstruction_psnr, len(sample) if len(sample) < frames.shape[0] else None)
                cache.store(key, hit)
                return strided(cache.load(key))
    logger.info("inversion cache hit: %s", cache.location(key))
    if on_cache_hit is not None:
        on_cache_hit(cache.location(key))
    return hit
