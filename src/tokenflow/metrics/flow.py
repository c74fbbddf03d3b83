"""Optical flow on the source (DIS, Farneback, RAFT), warping, the forward-backward consistency mask and the warp error (Pix2Video's protocol)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tokenflow.errors import InputError

from .frames import _check_flow, _check_frames, _check_image, _to_gray_u8

logger = logging.getLogger('tokenflow.metrics')


FLOW_METHODS = ("dis", "farneback", "raft")


def optical_flow(prev: np.ndarray, nxt: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense optical flow from ``prev`` to ``nxt`` as an ``HxWx2`` float32 array ``(dx, dy)``.

    The convention is ``prev[y, x] ~= nxt[y + dy, x + dx]``, so ``warp(nxt, flow)`` approximates
    ``prev``. Identical images get an exactly zero flow.

    ``method``: ``"dis"`` (OpenCV DIS, preset MEDIUM; default), ``"farneback"`` (OpenCV Farneback)
    or ``"raft"`` (torchvision RAFT-large; only when torchvision is installed and its weights are
    already in the local torch hub cache -- nothing is downloaded).
    """
    if method not in FLOW_METHODS:
        raise InputError(f"`flow` {method}: unknown optical-flow method; use one of {', '.join(FLOW_METHODS)}")
    prev = _check_image(prev, "prev frame")
    nxt = _check_image(nxt, "next frame")
    if prev.shape[:2] != nxt.shape[:2]:
        raise InputError(
            f"optical flow: frames differ in size ({prev.shape[1]}x{prev.shape[0]} vs {nxt.shape[1]}x{nxt.shape[0]}); "
            "resize them to one size first"
        )
    h, w = prev.shape[:2]
    if prev.shape == nxt.shape and np.array_equal(prev, nxt):
        return np.zeros((h, w, 2), np.float32)
    if method == "raft":
        return _raft_flow(prev, nxt)
    g0, g1 = _to_gray_u8(prev), _to_gray_u8(nxt)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        flow = dis.calc(g0, g1, None)
    else:
        flow = cv2.calcOpticalFlowFarneback(
            g0, g1, None, pyr_scale=0.5, levels=4, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
        )
    return np.asarray(flow, np.float32)


def _raft_weights_path() -> tuple[Any, Path] | None:
    """Return ``(weights enum, cached file)`` for the first torchvision RAFT checkpoint in the hub cache."""
    try:
        from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights
    except Exception:  # torchvision missing or too old
        return None
    import torch

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for weights in (Raft_Large_Weights.DEFAULT, Raft_Small_Weights.DEFAULT):
        path = checkpoints / os.path.basename(weights.url)
        if path.is_file():
            return weights, path
    return None


@functools.lru_cache(maxsize=1)
def _raft_model() -> tuple[Any, Any, str]:
    found = _raft_weights_path()
    if found is None:
        raise InputError("`flow` raft: torchvision RAFT weights are not available offline; use `flow` dis")
    weights, path = found
    import torch
    from torchvision.models.optical_flow import Raft_Large_Weights, raft_large, raft_small

    builder = raft_large if isinstance(weights, Raft_Large_Weights) else raft_small
    model = builder(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.eval().to(device)
    logger.info("RAFT optical flow loaded from %s on %s", path, device)
    return model, weights.transforms(), device


def _raft_flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    model, transforms, device = _raft_model()

    def to_tensor(img: np.ndarray) -> torch.Tensor:
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        img = np.ascontiguousarray(img[..., :3])
        if img.dtype != np.uint8:
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return torch.from_numpy(img).permute(2, 0, 1)[None]

    a, b = transforms(to_tensor(prev), to_tensor(nxt))
    h, w = a.shape[-2:]
    pad_h, pad_w = (-h) % 8, (-w) % 8  # RAFT needs sides divisible by 8
    if pad_h or pad_w:
        a = F.pad(a, (0, pad_w, 0, pad_h), mode="replicate")
        b = F.pad(b, (0, pad_w, 0, pad_h), mode="replicate")
    with torch.inference_mode():
        flows = model(a.to(device), b.to(device))
    flow = flows[-1][0, :, :h, :w].permute(1, 2, 0).float().cpu().numpy()
    return np.ascontiguousarray(flow, dtype=np.float32)


def _sample_maps(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return xs + flow[..., 0], ys + flow[..., 1]


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward-warp ``image`` by ``flow``: ``out[y, x] = image[y + dy, x + dx]`` (bilinear, cv2.remap).

    With ``flow = optical_flow(a, b)``, ``warp(b, flow)`` brings ``b`` onto ``a``. Samples falling
    outside the image repeat the border (mask them with :func:`consistency_mask`). Integer images are
    warped in float32 and returned as float32 so no precision is lost to rounding; float images keep
    their dtype.
    """
    image = np.asarray(image)
    flow = _check_flow(flow)
    if image.ndim not in (2, 3) or image.shape[:2] != flow.shape[:2]:
        raise InputError(
            f"warp: image shape {tuple(image.shape)} does not match flow shape {tuple(flow.shape)}; "
            "use a flow computed on frames of the same size"
        )
    src = image if np.issubdtype(image.dtype, np.floating) else image.astype(np.float32)
    map_x, map_y = _sample_maps(flow)
    out = cv2.remap(
        np.ascontiguousarray(src), map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    if out.ndim == 2 and image.ndim == 3:  # cv2 drops a trailing singleton channel
        out = out[..., None]
    return out


def consistency_mask(
    flow_fw: np.ndarray, flow_bw: np.ndarray, alpha: float = 0.01, beta: float = 0.5
) -> np.ndarray:
    """Forward-backward consistency check (Sundaram, Brox & Keutzer, ECCV 2010) as an HxW bool mask.

    ``flow_fw`` goes from frame A to frame B, ``flow_bw`` from B to A, both on A's and B's own pixel
    grids. A pixel of A is kept when following the forward flow and then the backward flow returns
    close to where it started::

        |fw + bw_w|^2 < alpha * (|fw|^2 + |bw_w|^2) + beta,   bw_w = warp(bw, fw)

    and when its forward target lies inside B (content leaving the frame has no correspondence).
    """
    fw = _check_flow(flow_fw, "forward flow")
    bw = _check_flow(flow_bw, "backward flow")
    if fw.shape != bw.shape:
        raise InputError(f"consistency mask: forward flow {fw.shape} and backward flow {bw.shape} differ in shape")
    h, w = fw.shape[:2]
    bw_w = warp(bw, fw)
    sq = lambda v: v[..., 0] ** 2 + v[..., 1] ** 2  # noqa: E731
    mask = sq(fw + bw_w) < alpha * (sq(fw) + sq(bw_w)) + beta
    tx, ty = _sample_maps(fw)
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    return mask & inside


def _warp_errors_many(
    source: np.ndarray, videos: list[np.ndarray], gap: int, method: str
) -> list[np.ndarray]:
    """Warp errors of several videos sharing the flow of ``source`` (flow is computed once per pair)."""
    n = source.shape[0]
    out = [np.full(n - gap, np.nan, dtype=np.float64) for _ in videos]
    empty = 0
    for i in range(n - gap):
        j = i + gap
        fw = optical_flow(source[i], source[j], method)
        bw = optical_flow(source[j], source[i], method)
        mask = consistency_mask(fw, bw)
        if not mask.any():
            empty += 1
            continue
        for k, video in enumerate(videos):
            warped = warp(video[j], fw)
            diff = np.abs(warped - video[i].astype(np.float32)).mean(axis=-1)
            out[k][i] = float(diff[mask].mean(dtype=np.float64))
    if empty:
        logger.warning("warp error: %d of %d frame pairs had no consistent flow and are left out (NaN)", empty, n - gap)
    return out


def _check_gap(gap: Any, n: int) -> int:
    if isinstance(gap, bool) or not isinstance(gap, (int, np.integer)) or gap < 1:
        raise InputError(f"`gap` {gap}: the frame gap must be a whole number >= 1")
    if gap >= n:
        raise InputError(f"`gap` {gap}: the video has only {n} frame(s); use a gap smaller than the frame count")
    return int(gap)


def warp_errors(source: np.ndarray, edited: np.ndarray, gap: int = 1, method: str = "dis") -> np.ndarray:
    """Per-pair warp error of ``edited`` (length ``N - gap``), on the 0-255 scale.

    For each ``i``: the optical flow between source frames ``i`` and ``i + gap`` (both directions),
    edited frame ``i + gap`` warped onto edited frame ``i`` with the forward flow, and the absolute
    difference averaged over channels and over the pixels passing :func:`consistency_mask`. Pairs
    with no consistent pixel are NaN. Pass ``edited=source`` for the floor of the video itself.
    """
    source = _check_frames(source, "source")
    edited = _check_frames(edited, "edited")
    if source.shape != edited.shape:
        raise InputError(
            f"warp error: source {source.shape} and edited {edited.shape} differ in shape; "
            "use tokenflow.metrics.evaluate, which aligns them"
        )
    gap = _check_gap(gap, source.shape[0])
    if method not in FLOW_METHODS:
        raise InputError(f"`flow` {method}: unknown optical-flow method; use one of {', '.join(FLOW_METHODS)}")
    return _warp_errors_many(source, [edited], gap, method)[0]
