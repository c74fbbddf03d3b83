"""SDXL behind the :class:`~tokenflow.backbones.base.Backbone` interface: two text encoders, pooled-text and
size conditioning, the first UNet level without attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TextConditioning
from .sd import StableDiffusionModel, warn_if_truncated

__all__ = ["StableDiffusionXLModel"]


@dataclass
class StableDiffusionXLModel(StableDiffusionModel):
    """SDXL-family checkpoints (``addition_embed_type == "text_time"``); prompts are encoded by the diffusers
    pipeline the components came from (``pipeline``), which knows both encoders."""

    family = "sdxl"

    @torch.no_grad()
    def condition(self, prompts: list[str], height: int, width: int) -> TextConditioning:
        """Both encoders' hidden states, the pooled embedding and the size micro-conditioning for frames of
        ``height x width`` (original size, crop top-left, target size: the frames as they are)."""
        warn_if_truncated(self.tokenizer, prompts)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
        added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.repeat(len(prompts), 1)}
        return TextConditioning(embeds.to(self.dtype), added)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.condition(prompts, self.default_size, self.default_size).embeds

    @staticmethod
    def fits(unet) -> bool:
        """Whether ``unet`` is an SDXL-family UNet (added text/time conditioning)."""
        return unet.config.get("addition_embed_type") == "text_time"
