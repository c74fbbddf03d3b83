"""Deterministic DDIM inversion of every frame (the "preprocess") and its on-disk cache.

The source latents x_t^src it produces depend only on (frames, size, model, inversion prompt, steps, dtype), so
they are cached under a hash of those: a second edit of the same video with a new prompt costs no inversion.

Long videos: through a cache, the inversion streams. Each batch of frames is encoded, inverted and written into a
preallocated safetensors file (``<key>.partial``) at its place in every saved timestep's tensor, and recorded as
done in ``<key>.progress.json``; host memory holds one batch, not frames x timesteps. An interrupted inversion
resumes from its last finished batch. The finished entry is opened lazily (:class:`LazyLatents`): the editor's
``source.noisy[t][frames]`` reads just those frames from disk.
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
from .storage import LazyLatents, SafetensorsWriter, write_safetensors

__all__ = [
    "SourceLatents",
    "LazyLatents",
    "InversionCache",
    "SafetensorsWriter",
    "write_safetensors",
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
]
