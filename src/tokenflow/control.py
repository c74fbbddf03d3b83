"""ControlNet conditioning maps: canny edges (OpenCV), depth (a transformers estimator) or precomputed images."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from .errors import InputError, ModelLoadError

logger = logging.getLogger(__name__)

__all__ = [
    "canny_maps",
    "depth_maps",
    "folder_maps",
    "control_maps",
    "stream_control_maps",
    "to_control_tensor",
    "check_control_fits",
]


def canny_maps(frames: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of each uint8 ``[N,H,W,3]`` frame as white-on-black RGB, same size as the frames."""
    if not 0 <= low <= high:
        raise InputError(f"`canny_low` {low} / `canny_high` {high}: need 0 <= low <= high")
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        edges = cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), low, high)
        out[i] = edges[:, :, None]
    return out


def _depth_estimator(model: str | None):
    if not model:
        raise InputError("`control` depth needs a depth estimator: pass `depth_model` ID_OR_PATH (e.g. a DPT model)")
    from transformers import pipeline

    try:
        return pipeline("depth-estimation", model=model)
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors all mean "cannot load"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelLoadError(f"`depth_model` {model}: could not be loaded ({reason}); pass a local folder") from exc


def _estimate_depth(estimator, frames: np.ndarray) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        depth = np.asarray(estimator(Image.fromarray(frame))["depth"], dtype=np.float32)
        depth = cv2.resize(depth, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_CUBIC)
        span = float(depth.max() - depth.min()) or 1.0
        out[i] = ((depth - depth.min()) / span * 255).astype(np.uint8)[:, :, None]
    return out


def depth_maps(frames: np.ndarray, model: str | None) -> np.ndarray:
    """Relative depth of each frame from a ``transformers`` depth-estimation model, normalised per frame."""
    return _estimate_depth(_depth_estimator(model), frames)


def folder_maps(folder: Path, start: int, stride: int, count: int, width: int, height: int) -> np.ndarray:
    """Precomputed maps, one image per source frame (sorted by name), selected like the frames and resized."""
    return np.stack(list(_iter_folder_maps(folder, start, stride, count, width, height)))


def _iter_folder_maps(folder: Path, start: int, stride: int, count: int, width: int, height: int) -> Iterator[np.ndarray]:
    from .io import read_frames, resize_frames

    found = 0
    for image in read_frames(folder, start=start, stride=stride, max_frames=count):
        found += 1
        yield resize_frames(image, width, height)
    if found < count:
        raise InputError(f"`control` {folder}: has {found} maps for the {count} selected frames; add the missing ones")


def stream_control_maps(
    kind: str, frames, *, start=0, stride=1, low=100, high=200, depth_model=None, batch_size: int = 8
) -> Iterator[np.ndarray]:
    """Maps for ``kind`` = ``canny``, ``depth`` or a folder of images, one ``HxWx3`` uint8 map per frame of
    ``frames`` (an array or a :class:`~tokenflow.io.FrameStore`, read ``batch_size`` frames at a time)."""
    n, height, width = frames.shape[:3]
    if kind == "canny":
        compute = lambda batch: canny_maps(batch, low, high)  # noqa: E731
    elif kind == "depth":
        estimator = _depth_estimator(depth_model)
        compute = lambda batch: _estimate_depth(estimator, batch)  # noqa: E731
    else:
        folder = Path(kind)
        if not folder.is_dir():
            raise InputError(f"`control` {kind}: use canny, depth or a folder of precomputed maps")
        yield from _iter_folder_maps(folder, start, stride, n, width, height)
        return
    for a in range(0, n, max(1, batch_size)):
        yield from compute(np.asarray(frames[a : a + batch_size]))


def control_maps(kind: str, frames: np.ndarray, *, start=0, stride=1, low=100, high=200, depth_model=None) -> np.ndarray:
    """Maps for ``kind`` = ``canny``, ``depth`` or a folder of images, at the frames' size, as one array."""
    maps = stream_control_maps(kind, frames, start=start, stride=stride, low=low, high=high, depth_model=depth_model)
    return np.stack(list(maps))


def to_control_tensor(maps: np.ndarray) -> torch.Tensor:
    """uint8 ``[N,H,W,3]`` -> float ``[N,3,H,W]`` in [0, 1], as diffusers' ControlNet pipelines feed it."""
    return torch.from_numpy(maps).permute(0, 3, 1, 2).float() / 255.0


def check_control_fits(controlnet_id: str | None, kind: str) -> None:
    """Refuse the obvious mismatches before heavy work: a depth ControlNet with canny maps and the reverse."""
    name = (controlnet_id or "").lower()
    for model_kind, other in (("depth", "canny"), ("canny", "depth")):
        if model_kind in name and kind == other:
            raise InputError(f"`controlnet` {controlnet_id} is a {model_kind} ControlNet but `control` is {kind}; "
                             f"use `control` {model_kind}")
