"""The source latents an edit starts from: clean latents and their DDIM-inverted latents per timestep."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .storage import LazyLatents, lazy_tensors

__all__ = ["SourceLatents"]


@dataclass
class SourceLatents:
    """Clean latents of the frames and their DDIM-inverted latents at each saved timestep (CPU, float32).

    ``noisy`` maps a timestep to its ``[N, C, h, w]`` latents: tensors in memory, or :class:`LazyLatents` read
    from disk on demand (:meth:`InversionCache.load`, ``from_file(..., lazy=True)``). Either way
    ``noisy[t][frames]`` gives those frames' latents as a tensor.
    """

    clean: torch.Tensor  # [N, C, h, w]
    noisy: Mapping[int, torch.Tensor | LazyLatents]  # t -> [N, C, h, w]
    reconstruction_psnr: float | None = None
    info: dict = field(default_factory=dict)

    @property
    def noisiest(self) -> int:
        return max(self.noisy)

    @property
    def lazy(self) -> bool:
        """Whether the noisy latents are read from disk on demand."""
        return any(isinstance(v, LazyLatents) for v in self.noisy.values())

    @classmethod
    def from_file(cls, path: str | Path, lazy: bool = False) -> "SourceLatents":
        """Load ``clean`` and ``source_t<T>`` tensors from a ``latents.safetensors`` written by ``--save-latents``.

        ``lazy``: keep the noisy latents on disk and read them frame by frame on demand (long videos).
        """
        from safetensors.torch import load_file

        try:
            if lazy:
                tensors, _ = lazy_tensors(path, lambda k: k.startswith("source_t") or k == "clean")
                if "clean" in tensors:
                    tensors["clean"] = tensors["clean"].load()
            else:
                tensors = load_file(str(path))
            noisy = {int(k[len("source_t") :]): v for k, v in tensors.items() if k.startswith("source_t")}
        except ValueError as exc:
            raise ValueError(f"{path}: not a latents file ({exc})") from exc
        if "clean" not in tensors or not noisy:
            raise ValueError(f"{path}: expected 'clean' and 'source_t<T>' tensors (tokenflow edit --save-latents)")
        return cls(clean=tensors["clean"], noisy=noisy)

    def __post_init__(self):
        shapes = {tuple(v.shape) for v in self.noisy.values()} | {tuple(self.clean.shape)}
        if len(shapes) != 1:
            raise ValueError(f"source latents must all have one shape, got {sorted(shapes)}")
