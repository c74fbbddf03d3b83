"""A video's frames at the working size on disk, written once as they are decoded, read back a few at a time.

A 1000-frame clip at 910x512 is 1.4 GB of uint8 RGB and 2.8 GB at 720p: more than a run should hold in memory
for the few frames each step touches. :class:`FrameStore` keeps them in one raw file and indexes like a
``[N, H, W, 3]`` uint8 array, reading just the rows asked for (no memory map, so nothing stays resident), and keeps the SHA-256 of their bytes for the inversion cache's key.
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
        self._file = open(self.path, "rb", buffering=0)  # unbuffered: rows go straight into the output array

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

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), *self.shape[1:]), dtype=np.uint8)
        if out.size == 0:
            return out
        view = memoryview(out.reshape(-1))
        self._file.seek(start * self.frame_bytes)
        done = 0
        while done < len(view):  # an unbuffered read may return less than asked
            got = self._file.readinto(view[done:])
            if not got:
                raise OSError(f"{self.path}: shorter than its {self.shape[0]} frames (changed while in use?)")
            done += got
        return out

    def __getitem__(self, index) -> np.ndarray:
        n = self.shape[0]
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"frame {index} out of range for {n} frames")
            return self._read(i, i + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._read(start, stop)
            index = range(start, stop, step)
        rows = np.asarray(list(index) if isinstance(index, range) else index).reshape(-1).astype(np.int64)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"frames {rows.tolist()} out of range for {n} frames")
        rows = np.where(rows < 0, rows + n, rows)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        for i, row in enumerate(rows.tolist()):
            out[i] = self._read(row, row + 1)[0]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._read(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype)

    def sha256(self) -> hashlib._Hash:
        """The running SHA-256 of the frames' bytes (a copy to extend): equal to hashing the stacked array."""
        return self._sha256.copy()

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"FrameStore({str(self.path)!r}, shape={self.shape})"
