"""A float32 tensor of frames kept in a file: the editing loop's full-length arrays for long videos.

Rows are read and written through a memory map opened for that access and closed right after, so none of the array
stays mapped into the process: its pages live in the kernel's page cache (evictable, written back when memory is
short), not in the process's memory. The values are the same float32 numbers an in-memory tensor would hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["DiskTensor"]


def _index(index):
    if isinstance(index, torch.Tensor):
        return index.tolist()
    if isinstance(index, range):
        return list(index)
    return index


class DiskTensor:
    """``[N, ...]`` float32 rows in the file ``path`` (created, zero-filled). Index the first axis with an int, a
    slice or a list of ints: reading gives a tensor, assigning writes through."""

    dtype = torch.float32

    def __init__(self, path: str | Path, shape: tuple[int, ...]):
        self.path = Path(path)
        self.shape = torch.Size(shape)
        with open(self.path, "wb") as handle:
            handle.truncate(int(np.prod(self.shape)) * 4)

    @classmethod
    def like(cls, path: str | Path, other) -> "DiskTensor":
        return cls(path, tuple(other.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _map(self, mode: str) -> np.memmap:
        return np.memmap(self.path, dtype=np.float32, mode=mode, shape=tuple(self.shape))

    def __getitem__(self, index) -> torch.Tensor:
        rows = self._map("r")
        try:
            return torch.from_numpy(np.array(rows[_index(index)]))
        finally:
            del rows

    def __setitem__(self, index, value) -> None:
        rows = self._map("r+")
        try:
            rows[_index(index)] = torch.as_tensor(value).detach().to("cpu", torch.float32).numpy()
        finally:
            del rows

    def load(self) -> torch.Tensor:
        """The whole array in memory."""
        return self[:]

    def __repr__(self) -> str:
        return f"DiskTensor({str(self.path)!r}, shape={tuple(self.shape)})"
