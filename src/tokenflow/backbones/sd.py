"""Stable Diffusion 1.x/2.x behind the :class:`~tokenflow.backbones.base.Backbone` interface."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .base import Backbone, Layers, TextConditioning, check_finite
from .unet_layers import LayerSelection, select_layers

logger = logging.getLogger("tokenflow")

__all__ = ["StableDiffusionModel"]


@dataclass
class StableDiffusionModel(Backbone):
    """Stable Diffusion 1.x/2.x (a ``UNet2DConditionModel`` with one CLIP text encoder): the components an edit
    needs, on one device and dtype. Loaded once, used for many videos and prompts."""

    family = "sd"

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    model_id: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    loras: list[tuple[str, float]] = field(default_factory=list)
    controlnet: torch.nn.Module | None = None
    controlnet_id: str | None = None
    pipeline: object | None = None  # the diffusers pipeline the components came from (SDXL prompt encoding)

    @property
    def default_size(self) -> int:
        """The short side the checkpoint was trained at (512 for SD 1.x/2.1-base, 1024 for SDXL)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def min_side(self) -> int:
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    def attention_tokens(self, latent_height: int, latent_width: int) -> int:
        """SD attends at full latent resolution; SDXL's first level has no attention (it starts one level down)."""
        blocks = list(self.unet.config.down_block_types)
        level = next((i for i, b in enumerate(blocks) if "Attn" in b), 0)
        return max(1, (latent_height >> level) * (latent_width >> level))

    def layers(self, selection: LayerSelection | None = None) -> Layers:
        return select_layers(self.unet, selection)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def make_scheduler(self, latent_size: tuple[int, int] | None = None):
        """A fresh DDIM scheduler with the checkpoint's own noise schedule and prediction type."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    @torch.no_grad()
    def condition(self, prompts: list[str], height: int, width: int) -> TextConditioning:
        """UNet conditioning for each prompt, for frames of ``height x width`` pixels."""
        warn_if_truncated(self.tokenizer, prompts)
        return TextConditioning(self.encode_text(prompts))

    def predict(self, latents: torch.Tensor, t, cond: TextConditioning, **extra) -> torch.Tensor:
        """The UNet's raw output for ``latents`` (moved to the model's device/dtype) under ``cond``, as float32."""
        out = self.unet(latents.to(self.device, self.dtype), t, **cond.unet_kwargs(), **extra).sample
        return out.float()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """CLIP last hidden states, padded to the tokenizer's max length: ``[len(prompts), 77, D]``."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return out.to(self.dtype)

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """uint8 ``[N,H,W,3]`` frames (a tensor, an array or a :class:`~tokenflow.io.FrameStore`, read a
        batch at a time) -> scaled VAE posterior means ``[N,4,H/f,W/f]`` on the CPU, float32."""
        out = []
        for i in range(0, frames.shape[0], batch_size):
            x = torch.as_tensor(frames[i : i + batch_size]).to(self.device).permute(0, 3, 1, 2).to(self.vae.dtype) / 255.0
            mean = self.vae.encode(2 * x - 1).latent_dist.mean
            shift = self.vae.config.get("shift_factor")  # SD3/FLUX's VAEs centre their latents too
            latent = (mean if shift is None else mean - shift) * self.vae.config.scaling_factor
            check_finite(latent, "the VAE's latents of the frames", self.vae.dtype)
            out.append(latent.float().cpu().contiguous())  # the permuted input leaves channels-last strides
        return torch.cat(out)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (any device) -> uint8 frames ``[n,H,W,3]`` on the CPU."""
        latents = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        shift = self.vae.config.get("shift_factor")
        if shift is not None:
            latents = latents + shift
        image = self.vae.decode(latents).sample
        check_finite(image, "the decoded frames", self.vae.dtype)  # clamped, NaN would be a black video
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


_warned: set[tuple[int, str]] = set()


def warn_if_truncated(tokenizer, prompts: list[str]) -> None:
    """Say, once per prompt and tokenizer, when a prompt is longer than the text encoder reads (CLIP: 77 tokens with
    the start and end tokens) and what is cut: the encoder never sees it, so the edit would ignore it silently."""
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
        return
    for prompt in prompts:
        if (id(tokenizer), prompt) in _warned or not prompt:
            continue
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            _warned.add((id(tokenizer), prompt))
            cut = tokenizer.decode(ids[limit - 1 : -1]).strip()
            logger.warning("prompt %r is %d tokens, more than the %d the text encoder reads; it ignores: %r",
                           prompt[:60] + ("..." if len(prompt) > 60 else ""), len(ids), limit, cut)
