"""A video's frames at the working size on disk, written once as they are decoded, read back a few at a time.

A 1000-frame clip at 910x512 is 1.4 GB of uint8 RGB and 2.8 GB at 720p: more than a run should hold in memory
for the few frames each step touches. :class:`FrameStore` keeps them in one raw file and indexes like a
``[N, H, W, 3]`` uint8 array, reading just the rows asked for (through a numpy memory map opened per read, so
nothing stays resident), and keeps the SHA-256 of their bytes for the inversion cache's key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["FrameStore"]


class FrameStore:
    """uint8 RGB frames ``[N, H, W, 3]`` in the raw file ``path``; ``store[i]``, ``store[a:b]`` and
    ``store[[i, j]]`` read those frames as numpy arrays. Made by :meth:`write`."""

    def __init__(self, path: str | Path, shape: tuple[int, int, int, int], sha256: hashlib._Hash):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(np.uint8)
        self._sha256 = sha256
        #: Each frame's presentation time in seconds from the source's start when the source has a variable frame
        #: rate (:meth:`FrameReader.variable_times`), else None: frame ``i`` is at ``i / fps``.
        self.times: list[float] | None = None
        if self.path.stat().st_size != int(np.prod(self.shape)):
            raise OSError(f"{self.path}: not the size of {self.shape[0]} frames of {self.shape[2]}x{self.shape[1]}")

    @classmethod
    def write(cls, path: str | Path, frames: Iterable[np.ndarray], source: str = "the video") -> "FrameStore":
        """Stream ``frames`` (``HxWx3`` uint8, all one size) into ``path``; raises :class:`InputError` when the
        size changes or there are none."""
        path = Path(path)
        digest = hashlib.sha256()
        count, first = 0, None
        with open(path, "wb") as handle:
            for frame in frames:
                frame = np.ascontiguousarray(frame, dtype=np.uint8)
                if first is None:
                    first = frame.shape
                elif frame.shape != first:
                    raise InputError(
                        f"{source}: frame size changes mid-video ({first[1]}x{first[0]} then "
                        f"{frame.shape[1]}x{frame.shape[0]}); re-encode it at one size"
                    )
                data = memoryview(frame).cast("B")
                digest.update(data)
                handle.write(data)
                count += 1
        if first is None:
            raise InputError(f"{source}: no frames selected")
        return cls(path, (count, *first), digest)

    # -- array-like reading ----------------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def frame_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.shape[3]

    def __getitem__(self, index) -> np.ndarray:
        """Those frames, copied out of a memory map opened for this read only (so no page of the file stays
        resident between reads); numpy's indexing rules."""
        if self.shape[0] == 0:
            return np.empty(self.shape, np.uint8)[index]
        frames = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        try:
            return np.array(frames[index])
        finally:
            del frames  # unmapped here, not whenever the collector runs

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def sha256(self) -> hashlib._Hash:
        """The running SHA-256 of the frames' bytes (a copy to extend): equal to hashing the stacked array."""
        return self._sha256.copy()

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can release stores uniformly."""

    def __repr__(self) -> str:
        return f"FrameStore({str(self.path)!r}, shape={self.shape})"
