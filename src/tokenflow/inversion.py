"""Deterministic DDIM inversion of every frame (the "preprocess") and its on-disk cache.

The source latents x_t^src it produces depend only on (frames, size, model, inversion prompt, steps, dtype), so
they are cached under a hash of those: a second edit of the same video with a new prompt costs no inversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .models import StableDiffusionModel, TextConditioning

logger = logging.getLogger(__name__)

__all__ = ["SourceLatents", "InversionCache", "inversion_grid", "ddim_invert", "ddim_reconstruct", "invert_frames"]


@dataclass
class SourceLatents:
    """Clean latents of the frames and their DDIM-inverted latents at each saved timestep (CPU, float32)."""

    clean: torch.Tensor  # [N, C, h, w]
    noisy: dict[int, torch.Tensor]  # t -> [N, C, h, w]
    reconstruction_psnr: float | None = None
    info: dict = field(default_factory=dict)

    @property
    def noisiest(self) -> int:
        return max(self.noisy)

    @classmethod
    def from_file(cls, path: str | Path) -> "SourceLatents":
        """Load ``clean`` and ``source_t<T>`` tensors from a ``latents.safetensors`` written by ``--save-latents``."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        noisy = {int(k[len("source_t") :]): v for k, v in tensors.items() if k.startswith("source_t")}
        if "clean" not in tensors or not noisy:
            raise ValueError(f"{path}: expected 'clean' and 'source_t<T>' tensors (tokenflow edit --save-latents)")
        return cls(clean=tensors["clean"], noisy=noisy)

    def __post_init__(self):
        shapes = {tuple(v.shape) for v in self.noisy.values()} | {tuple(self.clean.shape)}
        if len(shapes) != 1:
            raise ValueError(f"source latents must all have one shape, got {sorted(shapes)}")


def _timesteps(model: StableDiffusionModel, steps: int) -> list[int]:
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def inversion_grid(model: StableDiffusionModel, steps: int, inversion_steps: int) -> tuple[list[int], list[int]]:
    """(ascending timesteps the inversion visits, timesteps whose latents are saved).

    The grid is the inversion schedule joined with the editing schedule, so any ``steps``/``inversion_steps`` pair
    works (the reference crashes late when they do not nest); when they nest it equals the reference's grid.
    Saved: every editing timestep and the noisiest one.
    """
    edit = set(_timesteps(model, steps))
    grid = sorted(set(_timesteps(model, inversion_steps)) | edit)
    return grid, sorted(edit | {grid[-1]})


def _epsilon(model: StableDiffusionModel, output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The model output as predicted noise (v-prediction models predict ``sqrt(a) eps - sqrt(1-a) x0``)."""
    if model.prediction_type == "epsilon":
        return output
    if model.prediction_type == "v_prediction":
        return alpha**0.5 * output + (1 - alpha) ** 0.5 * x
    raise ValueError(f"prediction type {model.prediction_type!r} is not supported; use an epsilon or v model")


@torch.no_grad()
def ddim_invert(
    model: StableDiffusionModel,
    latents: torch.Tensor,
    cond: TextConditioning,
    grid: list[int],
    save: list[int],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """DDIM inversion (Song et al., 2021, eq. 13 run backwards), each frame independently, guidance 1.

    For t ascending: ``x0 = (x - sqrt(1-a_prev) eps) / sqrt(a_prev)``, ``x = sqrt(a_t) x0 + sqrt(1-a_t) eps``
    with ``eps = unet(x, t, cond)`` and ``a_prev`` the previous grid point's (``final_alpha_cumprod`` first).
    Frames are streamed through the device a batch at a time; results come back to the CPU in float32.
    """
    scheduler = model.make_scheduler()
    alphas = scheduler.alphas_cumprod
    saved: dict[int, list[torch.Tensor]] = {t: [] for t in save}
    bar = tqdm(total=latents.shape[0] * len(grid), desc="inversion", unit="frame-step", disable=not progress)
    for start in range(0, latents.shape[0], batch_size):
        x = latents[start : start + batch_size].to(model.device, torch.float32)
        text = cond.rows([0] * x.shape[0])
        for i, t in enumerate(grid):
            a_t = alphas[t].to(model.device)
            a_prev = (alphas[grid[i - 1]] if i > 0 else scheduler.final_alpha_cumprod).to(model.device)
            out = model.predict(x, t, text)
            eps = _epsilon(model, out, x, a_t)
            pred_x0 = (x - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
            x = a_t**0.5 * pred_x0 + (1 - a_t) ** 0.5 * eps
            if t in saved:
                saved[t].append(x.cpu())
            bar.update(x.shape[0])
    bar.close()
    return {t: torch.cat(v) for t, v in saved.items()}


@torch.no_grad()
def ddim_reconstruct(
    model: StableDiffusionModel, noisy: dict[int, torch.Tensor], cond: TextConditioning, batch_size: int = 8
) -> torch.Tensor:
    """Deterministic DDIM sampling from the noisiest saved latent down the saved timesteps to t=0, guidance 1."""
    scheduler = model.make_scheduler()
    alphas = scheduler.alphas_cumprod
    path = sorted(noisy, reverse=True)
    top = noisy[path[0]]
    out = []
    for start in range(0, top.shape[0], batch_size):
        x = top[start : start + batch_size].to(model.device, torch.float32)
        text = cond.rows([0] * x.shape[0])
        for i, t in enumerate(path):
            a_t = alphas[t].to(model.device)
            a_next = (alphas[path[i + 1]] if i + 1 < len(path) else scheduler.final_alpha_cumprod).to(model.device)
            pred = model.predict(x, t, text)
            eps = _epsilon(model, pred, x, a_t)
            pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
            x = a_next**0.5 * pred_x0 + (1 - a_next) ** 0.5 * eps
        out.append(x.cpu())
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 frame stacks (the mean squared error over all frames)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


class InversionCache:
    """Inverted latents on disk as safetensors, keyed by a content hash; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from platformdirs import user_cache_dir

            root = Path(user_cache_dir("tokenflow")) / "inversions"
        self.root = Path(root)

    @staticmethod
    def key(frames: torch.Tensor, model: StableDiffusionModel, prompt: str, grid: list[int], save: list[int]) -> str:
        digest = hashlib.sha256()
        digest.update(frames.contiguous().numpy().tobytes())
        digest.update(str(tuple(frames.shape)).encode())
        digest.update(
            json.dumps(
                dict(
                    model=model.model_id,
                    fingerprint=_model_fingerprint(model.model_id),
                    revision=model.revision,
                    loras=[(str(p), s, _model_fingerprint(str(p))) for p, s in model.loras],
                    dtype=str(model.dtype),
                    scheduler={k: v for k, v in model.scheduler_config.items() if not k.startswith("_")},
                    prompt=prompt,
                    grid=grid,
                    save=save,
                    version=1,
                ),
                sort_keys=True,
                default=str,
            ).encode()
        )
        return digest.hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> SourceLatents | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                clean = f.get_tensor("clean")
                noisy = {int(k[1:]): f.get_tensor(k) for k in f.keys() if k.startswith("t")}
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is recomputed, never fatal
            logger.warning("ignoring unreadable inversion cache entry %s (%s)", path, exc)
            return None
        info = json.loads(meta.get("info", "{}"))
        psnr_value = info.get("reconstruction_psnr")
        return SourceLatents(clean=clean, noisy=noisy, reconstruction_psnr=psnr_value, info=info)

    def store(self, key: str, source: SourceLatents) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        tensors = {"clean": source.clean.contiguous()}
        tensors.update({f"t{t}": v.contiguous() for t, v in source.noisy.items()})
        info = dict(source.info, reconstruction_psnr=source.reconstruction_psnr)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"info": json.dumps(info, default=str)})
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.path(key)


def _model_fingerprint(model_id: str) -> str:
    """Sizes and modification times of a local model's files, so an overwritten local model misses the cache."""
    path = Path(model_id)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return ";".join(f"{p.relative_to(path.parent)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def invert_frames(
    model: StableDiffusionModel,
    frames: torch.Tensor,
    *,
    prompt: str = "",
    steps: int = 50,
    inversion_steps: int = 500,
    batch_size: int = 8,
    cache: InversionCache | None = None,
    reconstruct: bool = True,
    progress: bool = True,
    on_cache_hit: Callable[[Path], None] | None = None,
) -> SourceLatents:
    """Encode uint8 frames ``[N,H,W,3]`` and DDIM-invert them, through ``cache`` when given.

    With ``reconstruct`` the latents are sampled back and decoded, and the PSNR against the VAE round trip is kept
    (a bad reconstruction predicts a bad edit).
    """
    grid, save = inversion_grid(model, steps, inversion_steps)
    key = InversionCache.key(frames, model, prompt, grid, save) if cache is not None else None
    if cache is not None:
        hit = cache.load(key)
        if hit is not None and (hit.reconstruction_psnr is not None or not reconstruct):
            logger.info("inversion cache hit: %s", cache.path(key))
            if on_cache_hit is not None:
                on_cache_hit(cache.path(key))
            return hit
    clean = model.encode_frames(frames, batch_size)
    cond = model.condition([prompt], height=frames.shape[1], width=frames.shape[2])
    noisy = ddim_invert(model, clean, cond, grid, save, batch_size, progress)
    source = SourceLatents(
        clean=clean,
        noisy=noisy,
        info=dict(prompt=prompt, steps=steps, inversion_steps=inversion_steps, grid=grid, model=model.model_id),
    )
    if reconstruct:
        recon = ddim_reconstruct(model, noisy, cond, batch_size)
        decoded = torch.cat([model.decode_latents(recon[i : i + batch_size]) for i in range(0, len(recon), batch_size)])
        reference = torch.cat(
            [model.decode_latents(clean[i : i + batch_size]) for i in range(0, len(clean), batch_size)]
        )
        source.reconstruction_psnr = psnr(decoded, reference)
        logger.info("inversion reconstruction PSNR %.2f dB (against the VAE round trip)", source.reconstruction_psnr)
    if cache is not None:
        cache.store(key, source)
    return source
