"""The working size (aspect kept, sides a multiple of the VAE factor) and resizing to it."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from tokenflow.errors import InputError

log = logging.getLogger('tokenflow.io')


def working_size(width: int, height: int, size: int, multiple: int = 8) -> tuple[int, int]:
    """Size to process a ``width x height`` video at: short side ``size``, both sides multiples of ``multiple``.

    Each side is scaled by ``size / min(width, height)``, rounded, then rounded down
    to a multiple of ``multiple`` (:func:`resize_frames` center-crops the remainder).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if size < multiple:
        raise InputError(f"`size` {size} is smaller than {multiple}; choose `size` {multiple} or more")
    if width < 1 or height < 1:
        raise InputError(f"video size {width}x{height} is empty; check the input video")
    scale = size / min(width, height)
    out_w = (round(width * scale) // multiple) * multiple
    out_h = (round(height * scale) // multiple) * multiple
    return int(out_w), int(out_h)


def _resize_cover(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if (w, h) == (width, height):
        return frame
    scale = max(width / w, height / h)
    new_w = max(width, round(w * scale))
    new_h = max(height, round(h * scale))
    img = Image.fromarray(frame)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.LANCZOS)
    left = (new_w - width) // 2
    top = (new_h - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize frames (``[N,H,W,3]`` or one ``HxWx3``) to cover ``width x height``, then center-crop.

    The aspect ratio is kept (no stretching).  Frames that already have the target
    size are returned unchanged, bit for bit.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    if frames.ndim == 3:
        return _resize_cover(frames, width, height)
    if frames.ndim != 4:
        raise ValueError(f"frames must be [N,H,W,3] or [H,W,3], got shape {frames.shape}")
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = _resize_cover(frame, width, height)
    return out
