"""Deterministic DDIM inversion of every frame (the "preprocess") and its on-disk cache.

The source latents x_t^src it produces depend only on (frames, size, model, inversion prompt, steps, dtype), so
they are cached under a hash of those: a second edit of the same video with a new prompt costs no inversion.

Long videos: through a cache, the inversion streams. Each batch of frames is encoded, inverted and written as one
safetensors shard (clean latents and every saved timestep's) into ``<key>.partial/``; host memory holds one
batch, not frames x timesteps. An interrupted inversion resumes from its last finished batch (or checkpoint). The
finished entry is a checksummed latents store (:mod:`.storage`, the format ``--save-latents`` writes too), opened
lazily: the editor's ``source.noisy[t][frames]`` reads just those frames from disk.
"""


from .cache import InversionCache
from .check import psnr, reconstruction_psnr
from .ddim import (
    ddim_invert,
    ddim_reconstruct,
    ddim_transition,
    implied_noise,
    inversion_grid,
    noised,
    predicted_noise,
)
from .invert import invert_frames
from .source import SourceLatents
from .strided import StridedTimesteps, stored_timesteps
from .storage import CorruptLatents, LatentColumn, LatentStore, load_latents, write_latents

__all__ = [
    "SourceLatents",
    "LatentColumn",
    "LatentStore",
    "CorruptLatents",
    "InversionCache",
    "write_latents",
    "load_latents",
    "inversion_grid",
    "ddim_invert",
    "ddim_reconstruct",
    "ddim_transition",
    "predicted_noise",
    "noised",
    "implied_noise",
    "invert_frames",
    "psnr",
    "reconstruction_psnr",
    "StridedTimesteps",
    "stored_timesteps",
]
