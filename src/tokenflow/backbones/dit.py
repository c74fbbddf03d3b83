"""Diffusion transformers trained with flow matching behind the :class:`~tokenflow.backbones.base.Backbone`
interface: Stable Diffusion 3/3.5 (``SD3Transformer2DModel``) and FLUX.1 (``FluxTransformer2DModel``).

What differs from the UNet families, and where it lives:

- the noise maths are rectified flow's (:mod:`tokenflow.inversion.flow`): the denoiser predicts a velocity, sampling
  and inversion are Euler steps on the editing grid, and timesteps are integer keys of the sigmas;
- attention is joint over text and image tokens, so the layers get
  :class:`~tokenflow.joint_attention.JointTokenFlowProcessor` (image tokens only: text stays per frame);
- Plug-and-Play injects image queries and keys; there is no residual-feature layer (no ResNets), so its
  feature injection (``pnp_f_t``) has nothing to act on;
- latents carry the VAE's shift as well as its scale; FLUX packs 2x2 latent patches into tokens and takes the
  guidance scale as an input (guidance-distilled), SD3 uses classifier-free guidance.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from dataclasses import dataclass

import torch

from .base import Layers, TextConditioning
from .sd import StableDiffusionModel
from .unet_layers import LayerSelection, LayerSelectionError, _summary, tokenflow_layers

logger = logging.getLogger("tokenflow")

__all__ = ["FlowTransformerModel", "SD3Model", "FluxModel", "INVERSION_GUIDANCE"]

#: FLUX's embedded guidance for the source branch and the inversion (the plain, unguided velocity field)
INVERSION_GUIDANCE = 1.0


@dataclass
class FlowTransformerModel(StableDiffusionModel):
    """What SD3 and FLUX share (``unet`` holds the transformer: the denoiser, whatever its kind)."""

    flow_matching = True
    # TokenFlow on the first tenth of the steps only: on the micro trained DiT, running it longer trades the
    # rebuild of the source for flatness (docs/dit.md, measured with benchmarks/bench_dit.py)
    default_propagation_t = 0.1
    patch = 2  # latent pixels a token covers along each side
    _t5_tokens = 256  # the pipeline's default max_sequence_length
    _t5_tokenizer = "tokenizer_3"

    @property
    def text_length(self) -> int:
        """T5 tokens a prompt is padded to: the pipeline's default, or fewer when its tokenizer reads fewer."""
        tokenizer = getattr(self.pipeline, self._t5_tokenizer, None)
        limit = getattr(tokenizer, "model_max_length", None)
        return min(self._t5_tokens, limit) if isinstance(limit, int) else self._t5_tokens

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def min_side(self) -> int:
        return self.vae_scale_factor * self.patch

    @property
    def default_size(self) -> int:
        size = self.unet.config.get("sample_size")
        return int(size) * self.vae_scale_factor if size else 1024

    def attention_tokens(self, latent_height: int, latent_width: int) -> int:
        return max(1, (latent_height // self.patch) * (latent_width // self.patch))

    @property
    def prediction_type(self) -> str:
        return "flow"

    def make_scheduler(self, latent_size: tuple[int, int] | None = None):
        from ..inversion.flow import FlowMatchSchedule

        tokens = None if latent_size is None else self.attention_tokens(*latent_size)
        return FlowMatchSchedule(self.scheduler_config, tokens)

    def noise_levels(self, scheduler) -> tuple:
        return scheduler.levels, scheduler.final_level

    def predicted_noise(self, output: torch.Tensor, x: torch.Tensor, alpha) -> torch.Tensor:
        return output  # the velocity is what the Euler step takes

    def transition(self, x, direction, level_from, level_to):
        from ..inversion.flow import euler_transition

        return euler_transition(x, direction, level_from, level_to)

    def noised(self, x0, eps, level):
        from ..inversion.flow import flow_noised

        return flow_noised(x0, eps, level)

    def implied_noise(self, x, x0, level):
        from ..inversion.flow import flow_implied_noise

        return flow_implied_noise(x, x0, level)

    # -- layers ---------------------------------------------------------------------------------------------

    def _block_layers(self) -> list[tuple[str, str]]:
        """(processor name, layout) of every joint-attention layer, in the transformer's order."""
        raise NotImplementedError

    def layers(self, selection: LayerSelection | None = None) -> Layers:
        """Every joint-attention layer takes TokenFlow and, by default, PnP q/k injection (chosen by measurement on
        the micro trained DiT, docs/dit.md; ``qk_patterns`` chooses by name: ``transformer_blocks.1*``...).
        The ResNet role (``conv_patterns``) does not exist in a transformer."""
        selection = selection or LayerSelection()
        blocks = self._block_layers()
        names = [name for name, _ in blocks]
        model = type(self.unet).__name__
        if selection.qk_patterns is not None:
            qk = [n for n in names if any(fnmatch.fnmatch(n, p) for p in selection.qk_patterns)]
            if not qk:
                raise LayerSelectionError(f"PnP q/k layer selection qk_patterns {list(selection.qk_patterns)} "
                                          f"matches no attention layer of {model}; choose among {_summary(names)}")
        else:  # every block: on the micro DiT the first half alone changes nothing, the later blocks hold the layout
            qk = names
        if selection.conv_patterns is not None:
            raise LayerSelectionError(f"{model} has no ResNet blocks: PnP residual features (conv_patterns) apply to "
                                      "UNet models only")
        layouts = dict(blocks)
        factory = functools.partial(_make_processor, layouts=layouts, text_tokens=self.text_length)
        return Layers(tuple(names), tuple(qk), (), processor=factory,
                      tokenflow=tokenflow_layers(names, selection, model))


def _make_processor(state, name, inject_qk=False, fallback=None, tokenflow=True, *, layouts, text_tokens):
    from ..joint_attention import JointTokenFlowProcessor

    return JointTokenFlowProcessor(state, name, inject_qk, fallback, tokenflow=tokenflow, layout=layouts[name],
                                   text_tokens=text_tokens)


@dataclass
class SD3Model(FlowTransformerModel):
    """Stable Diffusion 3 / 3.5: an MMDiT over 2x2 latent patches, three text encoders (two CLIP, optional T5),
    classifier-free guidance."""

    family = "sd3"
    default_guidance = 7.0  # diffusers' StableDiffusion3Pipeline default

    def _block_layers(self):
        return [(f"transformer_blocks.{i}.attn.processor", "sd3") for i in range(len(self.unet.transformer_blocks))]

    @torch.no_grad()
    def condition(self, prompts: list[str], height: int, width: int) -> TextConditioning:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.text_length,
        )
        return TextConditioning(embeds.to(self.dtype), {"pooled_projections": pooled.to(self.dtype)})

    def predict(self, latents: torch.Tensor, t, cond: TextConditioning, **extra) -> torch.Tensor:
        from ..inversion.flow import FLOW_KEY_SCALE

        x = latents.to(self.device, self.dtype)
        timestep = torch.full((x.shape[0],), 1000.0 * int(t) / FLOW_KEY_SCALE, device=self.device, dtype=self.dtype)
        out = self.unet(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.embeds,
                        pooled_projections=cond.added["pooled_projections"], return_dict=False, **extra)[0]
        return out.float()

    @staticmethod
    def fits(denoiser) -> bool:
        return type(denoiser).__name__ == "SD3Transformer2DModel"


@dataclass
class FluxModel(FlowTransformerModel):
    """FLUX.1: double-stream then single-stream blocks with rotary positions over 2x2-packed latents, CLIP pooled +
    T5 text. Guidance-distilled (dev): the scale is an embedded input and no unconditional branch is mixed in;
    timestep-distilled (schnell, no guidance embedding): the scale is not used at all."""

    family = "flux"
    default_guidance = 3.5  # FLUX.1-dev's embedded guidance, diffusers' FluxPipeline default
    _t5_tokens = 512
    _t5_tokenizer = "tokenizer_2"
    classifier_free_guidance = False

    def _block_layers(self):
        double = [(f"transformer_blocks.{i}.attn.processor", "flux-double")
                  for i in range(len(self.unet.transformer_blocks))]
        single = [(f"single_transformer_blocks.{i}.attn.processor", "flux-single")
                  for i in range(len(self.unet.single_transformer_blocks))]
        return double + single

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.unet.config.get("guidance_embeds", False))

    @torch.no_grad()
    def condition(self, prompts: list[str], height: int, width: int) -> TextConditioning:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.text_length,
        )
        return TextConditioning(embeds.to(self.dtype), {"pooled_projections": pooled.to(self.dtype)})

    def branch_kwargs(self, guidance: float, frames: int) -> dict:
        """The embedded guidance of each row: the source branch's is the inversion's, the edited branches' the
        user's scale."""
        if not self.guidance_embedded:
            return {}
        scale = [INVERSION_GUIDANCE] * frames + [float(guidance)] * ((self.branches - 1) * frames)
        return {"guidance": torch.tensor(scale)}

    def predict(self, latents: torch.Tensor, t, cond: TextConditioning, guidance=None, **extra) -> torch.Tensor:
        from ..inversion.flow import FLOW_KEY_SCALE

        x = latents.to(self.device, self.dtype)
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        timestep = torch.full((b,), int(t) / FLOW_KEY_SCALE, device=self.device, dtype=self.dtype)
        if self.guidance_embedded:
            guidance = torch.full((b,), INVERSION_GUIDANCE) if guidance is None else torch.as_tensor(guidance)
            extra["guidance"] = guidance.to(self.device, torch.float32)
        out = self.unet(
            hidden_states=packed, timestep=timestep, encoder_hidden_states=cond.embeds,
            pooled_projections=cond.added["pooled_projections"],
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=ids.reshape(-1, 3).to(self.device, self.dtype), return_dict=False, **extra,
        )[0]
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return out.float()

    @staticmethod
    def fits(denoiser) -> bool:
        return type(denoiser).__name__ == "FluxTransformer2DModel"
