"""The source latents an edit starts from: clean latents and their DDIM-inverted latents per timestep."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .storage import CorruptLatents, LatentColumn, LatentStore

__all__ = ["SourceLatents"]


@dataclass
class SourceLatents:
    """Clean latents of the frames and their DDIM-inverted latents at each saved timestep (CPU, float32).

    ``noisy`` maps a timestep to its ``[N, C, h, w]`` latents: tensors in memory, or
    :class:`~tokenflow.inversion.storage.LatentColumn` read from disk on demand (:meth:`InversionCache.load`,
    ``from_file(..., lazy=True)``). Either way ``noisy[t][frames]`` gives those frames' latents as a tensor.
    """

    clean: torch.Tensor  # [N, C, h, w]
    noisy: Mapping[int, torch.Tensor | LatentColumn]  # t -> [N, C, h, w]
    reconstruction_psnr: float | None = None
    info: dict = field(default_factory=dict)

    @property
    def noisiest(self) -> int:
        return max(self.noisy)

    @property
    def lazy(self) -> bool:
        """Whether the noisy latents are read from disk on demand."""
        return any(isinstance(v, LatentColumn) for v in self.noisy.values())

    @classmethod
    def from_file(cls, path: str | Path, lazy: bool = False) -> "SourceLatents":
        """The ``clean`` and ``t<T>`` latents of a store: the ``latents`` folder of ``tokenflow edit
        --save-latents``, an inversion cache entry, or a single safetensors file of an older release.

        ``lazy``: keep the noisy latents on disk and read them frame by frame on demand (long videos).
        """
        try:
            store = LatentStore.open(path)
            store.verify()
        except CorruptLatents as exc:
            raise ValueError(f"not a latents store: {exc}") from None
        noisy = store.timesteps()
        if "clean" not in store.columns or not noisy:
            raise ValueError(f"{path}: expected 'clean' and 't<T>' latents (tokenflow edit --save-latents)")
        if not lazy:
            noisy = {t: c.load() for t, c in noisy.items()}
        return cls(clean=store.columns["clean"].load(), noisy=noisy, info=store.info)

    def __post_init__(self):
        shapes = {tuple(v.shape) for v in self.noisy.values()} | {tuple(self.clean.shape)}
        if len(shapes) != 1:
            raise ValueError(f"source latents must all have one shape, got {sorted(shapes)}")
