"""CLIP scores: text fidelity to the prompt and frame-to-frame consistency."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow.errors import InputError, ModelLoadError

from .frames import _check_frames

logger = logging.getLogger('tokenflow.metrics')


class ClipLoadError(InputError, ModelLoadError):
    """The CLIP model given for scoring cannot be loaded (bad id, missing files, no network)."""


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
        raise ClipLoadError(f"`clip_model` {source}: not an existing folder; give a CLIP model folder or a hub id")
    source = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    try:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        model = _from_pretrained(CLIPModel, source)
        image_processor = _from_pretrained(CLIPImageProcessor, source)
        tokenizer = _from_pretrained(AutoTokenizer, source)
        model = model.eval().to(device)
    except Exception as exc:  # noqa: BLE001 -- any failure means "cannot score with this model"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClipLoadError(
            f"`clip_model` {source}: cannot load a CLIP model ({reason[:200]}); "
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
