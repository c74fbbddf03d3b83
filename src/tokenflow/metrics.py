"""Numbers for judging a video edit.

The TokenFlow paper judges an edit by

* **edit fidelity** -- CLIP cosine similarity between each edited frame and the target prompt
  (:func:`clip_scores`), and
* **temporal consistency** -- the warp error of Pix2Video's protocol (:func:`warp_errors`): optical
  flow is computed on the *source* video between frame ``i`` and ``i + gap``, the *edited* frame
  ``i + gap`` is warped back onto edited frame ``i``, and the mean absolute difference is taken over
  the pixels that pass a forward-backward consistency check (occlusions and pixels that leave the
  frame are excluded).

The same warp error measured on the source video itself is reported as the *floor*: flow is never
perfect, so even an untouched video has a small warp error, and an edit cannot be expected to beat
it. Structure preservation is reported as per-frame PSNR and SSIM of the edit against the source.

All frame arguments are ``[N, H, W, 3]`` ``uint8`` RGB numpy arrays (or frames read on demand, e.g. a
:class:`~tokenflow.framestore.FrameStore`). :func:`evaluate` ties the
metrics together into an :class:`EvalReport`; :func:`evaluate_files` reads two videos (or a run
folder) first.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tokenflow.errors import InputError, ModelLoadError

logger = logging.getLogger(__name__)

__all__ = [
    "ClipLoadError",
    "EvalReport",
    "FLOW_METHODS",
    "PSNR_CAP_DB",
    "clip_scores",
    "consistency_mask",
    "evaluate",
    "evaluate_files",
    "optical_flow",
    "psnr",
    "ssim",
    "warp",
    "warp_errors",
]

FLOW_METHODS = ("dis", "farneback", "raft")

#: Frames :func:`evaluate` reads and measures at a time.
EVAL_WINDOW = 64

#: PSNR assigned to identical frames inside an :class:`EvalReport` so that means stay finite and the
#: report stays valid JSON. :func:`psnr` itself returns ``inf`` for identical frames unless given a cap.
PSNR_CAP_DB = 100.0

#: Aspect ratios of the source and the edit may differ by this much (relative) and the edit is still
#: resized to the source size; beyond it the inputs are refused.
ASPECT_TOLERANCE = 0.02

RUN_FILE = "run.json"
RUN_SOURCE = "source.mp4"
RUN_EDITED = "edited.mp4"


class ClipLoadError(InputError, ModelLoadError):
    """The CLIP model given for scoring cannot be loaded (bad id, missing files, no network)."""


# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------


def _check_frames(frames: Any, name: str) -> Any:
    """Return ``frames`` as an ``[N, H, W, 3]`` uint8 array or raise :class:`InputError`.

    Frames read on demand (a :class:`~tokenflow.framestore.FrameStore`, anything with ``shape``, ``dtype`` and
    slicing) are checked by their shape and returned as they are, so long videos are never loaded whole."""
    arr = frames if _is_lazy(frames) else np.asarray(frames)
    if len(arr.shape) != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise InputError(
            f"{name}: expected frames shaped [N, H, W, 3] (RGB), got shape {tuple(arr.shape)}; "
            "pass a video read with tokenflow.video.load_frames"
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


# --------------------------------------------------------------------------------------------------
# optical flow and warping
# --------------------------------------------------------------------------------------------------


def optical_flow(prev: np.ndarray, nxt: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense optical flow from ``prev`` to ``nxt`` as an ``HxWx2`` float32 array ``(dx, dy)``.

    The convention is ``prev[y, x] ~= nxt[y + dy, x + dx]``, so ``warp(nxt, flow)`` approximates
    ``prev``. Identical images get an exactly zero flow.

    ``method``: ``"dis"`` (OpenCV DIS, preset MEDIUM; default), ``"farneback"`` (OpenCV Farneback)
    or ``"raft"`` (torchvision RAFT-large; only when torchvision is installed and its weights are
    already in the local torch hub cache -- nothing is downloaded).
    """
    if method not in FLOW_METHODS:
        raise InputError(f"--flow {method}: unknown optical-flow method; use one of {', '.join(FLOW_METHODS)}")
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
        raise InputError("--flow raft: torchvision RAFT weights are not available offline; use --flow dis")
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
        raise InputError(f"--gap {gap}: the frame gap must be a whole number >= 1")
    if gap >= n:
        raise InputError(f"--gap {gap}: the video has only {n} frame(s); use a gap smaller than the frame count")
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
        raise InputError(f"--flow {method}: unknown optical-flow method; use one of {', '.join(FLOW_METHODS)}")
    return _warp_errors_many(source, [edited], gap, method)[0]


# --------------------------------------------------------------------------------------------------
# PSNR / SSIM
# --------------------------------------------------------------------------------------------------


def _pair_frames(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 3:
        a = a[None]
    if b.ndim == 3:
        b = b[None]
    if a.shape != b.shape or a.ndim != 4:
        raise InputError(
            f"frames to compare differ in shape ({tuple(a.shape)} vs {tuple(b.shape)}); give two [N, H, W, C] arrays of one shape"
        )
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, cap: float | None = None) -> np.ndarray:
    """Per-frame PSNR in dB of two ``[N, H, W, C]`` arrays (a single ``[H, W, C]`` frame also works).

    Identical frames give ``inf``, or ``cap`` when one is given (:class:`EvalReport` uses
    :data:`PSNR_CAP_DB` = 100 dB so its means stay finite and JSON-able).
    """
    a, b = _pair_frames(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = (diff * diff).reshape(diff.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10((data_range**2) / mse)
    if cap is not None:
        out = np.minimum(out, cap)
    return out


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-frame SSIM (skimage ``structural_similarity`` over the colour channels); identical frames give 1."""
    from skimage.metrics import structural_similarity

    a, b = _pair_frames(a, b)
    h, w = a.shape[1:3]
    win = min(7, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if win < 3:
        raise InputError(f"SSIM: frames of {w}x{h} pixels are too small; use frames of at least 3x3 pixels")
    out = np.empty(a.shape[0], dtype=np.float64)
    for i in range(a.shape[0]):
        out[i] = structural_similarity(a[i], b[i], channel_axis=-1, data_range=data_range, win_size=win)
    return out


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------


def _from_pretrained(cls: Any, source: str) -> Any:
    """Load from a folder, else from the local hub cache, else from the hub."""
    if Path(source).is_dir():
        return cls.from_pretrained(source, local_files_only=True)
    try:
        return cls.from_pretrained(source, local_files_only=True)
    except Exception:
        return cls.from_pretrained(source)


def _looks_like_path(source: str) -> bool:
    """True for a string that can only be a folder (a hub id is ``name`` or ``owner/name``)."""
    return source.startswith((".", "~", "/", os.sep)) or source.count("/") > 1 or Path(source).exists()


@functools.lru_cache(maxsize=2)
def _load_clip(source: str, device: str) -> tuple[Any, Any, Any]:
    if _looks_like_path(source) and not Path(source).expanduser().is_dir():
        raise ClipLoadError(f"--clip-model {source}: not an existing folder; give a CLIP model folder or a hub id")
    source = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    try:
        import torch  # noqa: F401
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        model = _from_pretrained(CLIPModel, source)
        image_processor = _from_pretrained(CLIPImageProcessor, source)
        tokenizer = _from_pretrained(AutoTokenizer, source)
        model = model.eval().to(device)
    except Exception as exc:  # noqa: BLE001 -- any failure means "cannot score with this model"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClipLoadError(
            f"--clip-model {source}: cannot load a CLIP model ({reason[:200]}); "
            "give a local CLIP folder or a cached hub id such as openai/clip-vit-large-patch14"
        ) from exc
    logger.info("CLIP model %s loaded on %s", source, device)
    return model, image_processor, tokenizer


def _features(out: Any) -> Any:
    """transformers 4 returns a tensor from get_*_features, transformers 5 a model output."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out[0]


def clip_scores(
    frames: np.ndarray,
    prompt: str | None,
    model: str | Path,
    device: str = "cpu",
    batch_size: int = 16,
) -> dict[str, Any]:
    """CLIP scores of a video.

    Returns ``{"text": [cos sim of each frame to prompt], "text_mean": float, "consistency": mean cos
    sim of consecutive frames' image embeddings, "consistency_per_pair": [...]}``. ``text`` and
    ``text_mean`` are None without a prompt; ``consistency`` is None for a one-frame video.

    ``model`` is a hub id or a folder readable by ``CLIPModel`` / ``CLIPImageProcessor`` /
    ``AutoTokenizer``; a cached hub copy is preferred to the network. Raises :class:`ClipLoadError`
    (an :class:`InputError`) when the model cannot be loaded.
    """
    import torch
    from PIL import Image

    frames = _check_frames(frames, "frames")
    clip, image_processor, tokenizer = _load_clip(str(model), str(device))

    embeds = []
    with torch.inference_mode():
        for start in range(0, frames.shape[0], batch_size):
            images = [Image.fromarray(f) for f in frames[start : start + batch_size]]
            pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
            emb = _features(clip.get_image_features(pixel_values=pixels.to(device))).float()
            embeds.append(emb)
        img = torch.cat(embeds)
        img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)

        result: dict[str, Any] = {"text": None, "text_mean": None}
        if prompt is not None:
            max_len = getattr(getattr(clip.config, "text_config", None), "max_position_embeddings", 77)
            tokens = tokenizer([prompt], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            txt = _features(
                clip.get_text_features(
                    input_ids=tokens["input_ids"].to(device),
                    attention_mask=tokens["attention_mask"].to(device) if "attention_mask" in tokens else None,
                )
            ).float()
            txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            text = (img @ txt[0]).clamp(-1.0, 1.0).cpu().numpy().astype(np.float64)
            result["text"] = text.tolist()
            result["text_mean"] = float(text.mean())

        pairs = (img[:-1] * img[1:]).sum(dim=-1).clamp(-1.0, 1.0).cpu().numpy().astype(np.float64)
    result["consistency_per_pair"] = pairs.tolist()
    result["consistency"] = float(pairs.mean()) if pairs.size else None
    return result


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: np.ndarray | None) -> float | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def _list(values: np.ndarray | None) -> list[float | None] | None:
    if values is None:
        return None
    return [_finite_or_none(v) for v in np.asarray(values, dtype=np.float64).ravel()]


@dataclass
class EvalReport:
    """Metrics of one edit. Per-frame arrays plus the settings they were measured with.

    ``warp_error`` and ``warp_error_source`` have one value per frame pair ``(i, i + gap)``;
    ``psnr``, ``ssim`` and ``clip_text`` one per frame; ``clip_consistency`` one per consecutive pair.
    Lower warp error is better and ``warp_error_source`` is the floor an edit can reach.
    """

    frames: int
    gap: int
    flow: str
    warp_error: np.ndarray
    warp_error_source: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    clip_text: np.ndarray | None = None
    clip_consistency: np.ndarray | None = None
    inversion_psnr: float | None = None
    prompt: str | None = None
    clip_model: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Means and settings; JSON-serialisable (NaN/inf become None)."""
        return {
            "frames": int(self.frames),
            "gap": int(self.gap),
            "flow": self.flow,
            "warp_error": _mean(self.warp_error),
            "warp_error_source": _mean(self.warp_error_source),
            "psnr": _mean(self.psnr),
            "ssim": _mean(self.ssim),
            "clip_text": _mean(self.clip_text),
            "clip_consistency": _mean(self.clip_consistency),
            "inversion_psnr": _finite_or_none(self.inversion_psnr),
            "prompt": self.prompt,
            "clip_model": self.clip_model,
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`summary` plus ``"per_frame"`` lists; JSON-serialisable."""
        out = self.summary()
        out["per_frame"] = {
            "warp_error": _list(self.warp_error),
            "warp_error_source": _list(self.warp_error_source),
            "psnr": _list(self.psnr),
            "ssim": _list(self.ssim),
            "clip_text": _list(self.clip_text),
            "clip_consistency": _list(self.clip_consistency),
        }
        return out

    def format_table(self) -> str:
        """A small aligned text table (mean / min / max per metric) for the terminal."""
        rows: list[tuple[str, np.ndarray | float | None, str]] = [
            ("warp error, edited", self.warp_error, "lower is better"),
            ("warp error, source (floor)", self.warp_error_source, "flow noise floor"),
            ("PSNR vs source (dB)", self.psnr, "structure"),
            ("SSIM vs source", self.ssim, "structure"),
        ]
        if self.clip_text is not None:
            rows.append(("CLIP text similarity", self.clip_text, "higher is better"))
        if self.clip_consistency is not None:
            rows.append(("CLIP frame consistency", self.clip_consistency, "higher is better"))
        if self.inversion_psnr is not None:
            rows.append(("inversion PSNR (dB)", self.inversion_psnr, "reconstruction"))

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        table = [("metric", "mean", "min", "max", "note")]
        for label, values, note in rows:
            if values is None or np.isscalar(values):
                table.append((label, fmt(_finite_or_none(values)), "-", "-", note))
                continue
            arr = np.asarray(values, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            lo = float(arr.min()) if arr.size else None
            hi = float(arr.max()) if arr.size else None
            table.append((label, fmt(_mean(arr)), fmt(lo), fmt(hi), note))
        widths = [max(len(r[c]) for r in table) for c in range(5)]
        lines = []
        for r, row in enumerate(table):
            cells = [row[0].ljust(widths[0])] + [row[c].rjust(widths[c]) for c in (1, 2, 3)] + [row[4]]
            lines.append("  ".join(cells).rstrip())
            if r == 0:
                lines.append("-" * len(lines[0]))
        lines.append(f"frames: {self.frames}  gap: {self.gap}  flow: {self.flow}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        """Write a PNG: per-pair warp error of the edit against the source floor, and the per-frame
        CLIP text score when present."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        with_clip = self.clip_text is not None
        fig = Figure(figsize=(8, 6 if with_clip else 3.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2 if with_clip else 1, 1, squeeze=False)[:, 0]
        ax = axes[0]
        x = np.arange(len(self.warp_error))
        ax.plot(x, self.warp_error, label="edited", color="tab:red")
        ax.plot(x, self.warp_error_source, label="source (floor)", color="tab:gray", linestyle="--")
        ax.set_xlabel(f"frame pair (i, i+{self.gap})")
        ax.set_ylabel("warp error (0-255)")
        ax.set_title(f"Temporal consistency ({self.flow} flow)")
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
        if with_clip:
            ax = axes[1]
            ax.plot(np.arange(len(self.clip_text)), self.clip_text, color="tab:blue")
            ax.set_xlabel("frame")
            ax.set_ylabel("CLIP cos sim")
            ax.set_title("Edit fidelity" + (f": {self.prompt}" if self.prompt else ""))
            ax.grid(alpha=0.3)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        logger.info("metrics plot written to %s", path)


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


def _read_run_json(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("%s cannot be read (%s); its recorded values are ignored", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _align(source: Any, edited: Any, align: str, notes: list[str]) -> tuple[Any, Any]:
    if align not in ("refuse", "truncate"):
        raise InputError(f"--align {align}: unknown alignment; use refuse or truncate")
    ns, ne = source.shape[0], edited.shape[0]
    if ns != ne:
        if align == "refuse":
            raise InputError(
                f"source has {ns} frames but edited has {ne}; pass align='truncate' (--align truncate) to use the first {min(ns, ne)}"
            )
        n = min(ns, ne)
        msg = f"frame counts differ (source {ns}, edited {ne}); both truncated to {n}"
        logger.info(msg)
        notes.append(msg)
        source, edited = _FrameView(source, n), _FrameView(edited, n)
    hs, ws = source.shape[1:3]
    he, we = edited.shape[1:3]
    if (hs, ws) != (he, we):
        ratio = (we / he) / (ws / hs)
        if abs(ratio - 1.0) > ASPECT_TOLERANCE:
            raise InputError(
                f"edited video is {we}x{he} but source is {ws}x{hs} (different aspect ratio); "
                "evaluate an edit against the source it was made from"
            )
        interp = cv2.INTER_AREA if we * he > ws * hs else cv2.INTER_CUBIC
        edited = _FrameView(edited, edited.shape[0], (ws, hs), interp)  # resized as each window is read
        msg = f"edited frames resized from {we}x{he} to the source size {ws}x{hs}"
        logger.info(msg)
        notes.append(msg)
    return source, edited


def evaluate(
    source: np.ndarray,
    edited: np.ndarray,
    prompt: str | None = None,
    clip_model: str | Path | None = None,
    gap: int = 1,
    flow: str = "dis",
    run_dir: Path | None = None,
    align: str = "refuse",
    device: str = "cpu",
    inversion_psnr: float | None = None,
) -> EvalReport:
    """Measure an edit against its source video.

    Mismatched inputs: a different frame count raises :class:`InputError` unless ``align="truncate"``
    (the shorter length is used); a different frame size is resized to the source size when the aspect
    ratios agree within 2%, else refused. ``gap >= N`` is refused.

    CLIP scores are computed when ``clip_model`` is given (the text score also needs ``prompt``); a
    model that cannot be loaded is logged once and the CLIP fields stay None. ``run_dir`` with a
    ``run.json`` holding ``"inversion_psnr"`` fills :attr:`EvalReport.inversion_psnr`; an explicit
    ``inversion_psnr`` (the edit that is being written, before its ``run.json`` exists) takes precedence.
    """
    source = _check_frames(source, "source")
    edited = _check_frames(edited, "edited")
    if flow not in FLOW_METHODS:
        raise InputError(f"--flow {flow}: unknown optical-flow method; use one of {', '.join(FLOW_METHODS)}")
    notes: list[str] = []
    source, edited = _align(source, edited, align, notes)
    gap = _check_gap(gap, source.shape[0])
    if flow == "raft":
        _raft_model()  # fail early, before any work, when RAFT is not available offline

    n = source.shape[0]
    logger.info("warp error, PSNR / SSIM: %d frames, gap %d, %s flow", n, gap, flow)
    # ``EVAL_WINDOW`` frames at a time (plus ``gap`` for the pairs that reach past a window): memory does not grow
    # with the video, and every per-frame and per-pair number is the one a single pass would give
    err_edit, err_src, p, s = [], [], [], []
    for a in range(0, n, EVAL_WINDOW):
        b = min(a + EVAL_WINDOW, n)
        src, edt = np.asarray(source[a : min(b + gap, n)]), np.asarray(edited[a : min(b + gap, n)])
        if min(b + gap, n) - a > gap:
            e, f = _warp_errors_many(src, [edt, src], gap, flow)
            err_edit.append(e[: b - a])
            err_src.append(f[: b - a])
        p.append(psnr(src[: b - a], edt[: b - a], cap=PSNR_CAP_DB))
        s.append(ssim(src[: b - a], edt[: b - a]))
    empty = np.zeros(0, dtype=np.float64)
    err_edit = np.concatenate(err_edit) if err_edit else empty
    err_src = np.concatenate(err_src) if err_src else empty
    p, s = np.concatenate(p), np.concatenate(s)

    clip_text = clip_cons = None
    if clip_model is not None:
        try:
            scores = clip_scores(edited, prompt, clip_model, device=device)
        except ClipLoadError as exc:
            logger.warning("CLIP scores skipped: %s", exc)
            notes.append(f"CLIP scores skipped: {exc}")
        else:
            if scores["text"] is not None:
                clip_text = np.asarray(scores["text"], dtype=np.float64)
            clip_cons = np.asarray(scores["consistency_per_pair"], dtype=np.float64)

    if inversion_psnr is None and run_dir is not None:
        value = _read_run_json(Path(run_dir)).get("inversion_psnr")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            inversion_psnr = float(value)

    return EvalReport(
        frames=int(source.shape[0]),
        gap=gap,
        flow=flow,
        warp_error=err_edit,
        warp_error_source=err_src,
        psnr=p,
        ssim=s,
        clip_text=clip_text,
        clip_consistency=clip_cons,
        inversion_psnr=inversion_psnr,
        prompt=prompt,
        clip_model=str(clip_model) if clip_model is not None else None,
        notes=notes,
    )


def _is_run_dir(path: Path | None) -> bool:
    return path is not None and path.is_dir() and (path / RUN_FILE).is_file()


def evaluate_files(
    source_path: str | Path | None,
    edited_path: str | Path | None = None,
    max_frames: int | None = None,
    workdir: str | Path | None = None,
    **kwargs: Any,
) -> EvalReport:
    """Read two videos and :func:`evaluate` them; their frames are staged in a temporary folder inside ``workdir``
    (default: the system's temporary folder) and read a window at a time.

    A run folder (holding ``run.json``, ``source.mp4`` and ``edited.mp4``) is accepted as the edit:
    ``evaluate_files(None, run)`` or ``evaluate_files(run)`` uses its ``edited.mp4`` against its
    ``source.mp4``; ``evaluate_files(other_source, run)`` uses ``other_source`` instead. A run
    folder's ``run.json`` also supplies ``inversion_psnr`` and, when no ``prompt`` is passed, its
    ``"prompt"``. Other keyword arguments go to :func:`evaluate`.
    """
    from tokenflow.framestore import FrameStore
    from tokenflow.video import read_frames

    src = Path(source_path) if source_path is not None else None
    edt = Path(edited_path) if edited_path is not None else None
    if edt is None:
        if not _is_run_dir(src):
            raise InputError(
                f"{source_path}: not a run folder (no {RUN_FILE}); give SOURCE and EDITED videos, or a run folder"
            )
        src, edt = None, src

    run_dir = None
    if _is_run_dir(edt):
        run_dir = edt
        edt = run_dir / RUN_EDITED
        if src is None:
            src = run_dir / RUN_SOURCE
    elif _is_run_dir(src):
        src = src / RUN_SOURCE
    if src is None:
        raise InputError(f"{edited_path}: not a run folder, so a SOURCE video is needed too; give SOURCE and EDITED")

    for label, path in (("source", src), ("edited", edt)):
        if not path.is_file():
            raise InputError(f"{path}: {label} video not found; check the path")

    if run_dir is not None:
        kwargs.setdefault("run_dir", run_dir)
        if kwargs.get("prompt") is None:
            recorded = _read_run_json(run_dir).get("prompt")
            if isinstance(recorded, str) and recorded:
                kwargs["prompt"] = recorded

    logger.info("reading %s and %s", src, edt)
    # staged on disk and measured a window at a time: memory does not grow with the videos' length
    with tempfile.TemporaryDirectory(prefix=".tokenflow-eval-", dir=workdir) as tmp:
        stores = []
        try:
            for name, path in (("source", src), ("edited", edt)):
                frames = read_frames(path, max_frames=max_frames)
                stores.append(FrameStore.write(Path(tmp) / f"{name}.rgb", frames, source=str(path)))
            return evaluate(*stores, **kwargs)
        finally:
            for store in stores:
                store.close()
