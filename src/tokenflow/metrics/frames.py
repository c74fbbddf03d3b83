"""Checks and lazy views of the frame stacks the metrics take."""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np

from tokenflow.errors import InputError

logger = logging.getLogger('tokenflow.metrics')


def _check_frames(frames: Any, name: str) -> Any:
    """Return ``frames`` as an ``[N, H, W, 3]`` uint8 array or raise :class:`InputError`.

    Frames read on demand (a :class:`~tokenflow.io.FrameStore`, anything with ``shape``, ``dtype`` and
    slicing) are checked by their shape and returned as they are, so long videos are never loaded whole."""
    arr = frames if _is_lazy(frames) else np.asarray(frames)
    if len(arr.shape) != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise InputError(
            f"{name}: expected frames shaped [N, H, W, 3] (RGB), got shape {tuple(arr.shape)}; "
            "pass a video read with tokenflow.io.load_frames"
        )
    if arr.dtype != np.uint8:
        raise InputError(f"{name}: expected uint8 frames (0-255), got dtype {arr.dtype}; convert with .astype(np.uint8)")
    return arr


def _is_lazy(frames: Any) -> bool:
    return not isinstance(frames, np.ndarray) and all(hasattr(frames, a) for a in ("shape", "dtype", "__getitem__"))


class _FrameView:
    """The first ``count`` frames of ``base``, optionally resized to ``width x height``, read on demand."""

    def __init__(self, base: Any, count: int, size: tuple[int, int] | None = None, interpolation: int = 0):
        self.base, self.size, self.interpolation = base, size, interpolation
        height, width = (base.shape[1], base.shape[2]) if size is None else (size[1], size[0])
        self.shape = (count, height, width, base.shape[3])
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            index = slice(*index.indices(self.shape[0]))
        elif isinstance(index, (int, np.integer)) and not -self.shape[0] <= index < self.shape[0]:
            raise IndexError(f"frame {index} out of range for {self.shape[0]} frames")
        frames = np.asarray(self.base[index])
        if self.size is None:
            return frames
        if frames.ndim == 3:
            return cv2.resize(frames, self.size, interpolation=self.interpolation)
        return np.stack([cv2.resize(f, self.size, interpolation=self.interpolation) for f in frames])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0 : self.shape[0]]
        return whole if dtype is None else whole.astype(dtype)


def _check_image(image: Any, name: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise InputError(f"{name}: expected an HxW or HxWx3 image, got shape {tuple(arr.shape)}")
    if arr.ndim not in (2, 3) or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InputError(f"{name}: expected an HxW or HxWx3 image of at least 2x2 pixels, got shape {tuple(arr.shape)}")
    return arr


def _check_flow(flow: Any, name: str = "flow") -> np.ndarray:
    arr = np.asarray(flow)
    if arr.ndim != 3 or arr.shape[-1] != 2:
        raise InputError(f"{name}: expected an HxWx2 optical-flow field, got shape {tuple(arr.shape)}")
    return arr.astype(np.float32, copy=False)


def _to_gray_u8(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        gray = image
    elif image.shape[-1] == 4:
        gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGBA2GRAY)
    else:
        gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if gray.dtype != np.uint8:
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(gray)
