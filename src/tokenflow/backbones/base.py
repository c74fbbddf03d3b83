"""The model adapter: everything the editing loop, the inversion and the runner need to know about a backbone.

:class:`Backbone` is the one interface they use; :class:`~tokenflow.backbones.sd.StableDiffusionModel` (SD 1.x/2.x)
and :class:`~tokenflow.backbones.sdxl.StableDiffusionXLModel` implement it. Nothing outside ``backbones/`` reads
``unet.config`` or asks which family a model is.

What a backbone provides:

- geometry: ``vae_scale_factor``, ``min_side`` (the smallest frame side its deepest level still takes),
  ``default_size`` (the short side it was trained at) and ``attention_tokens(h, w)`` (tokens per frame at its largest
  self-attention level, which sizes the keyframe pass);
- layers by role: ``layers(selection)`` -> the self-attention processors TokenFlow replaces, the decoder
  self-attentions PnP injects queries/keys into, and the block whose residual features PnP injects;
- conditioning and prediction: ``condition(prompts, height, width)`` and ``predict(latents, t, cond)``, the raw
  denoiser output;
- the noise maths: ``prediction_type`` and ``predicted_noise(output, x, alpha)`` (epsilon / v conversions); the
  transition itself is one pure function shared by inversion and editing
  (:func:`tokenflow.inversion.ddim.ddim_transition`);
- the VAE: ``encode_frames`` / ``decode_latents``; the schedule: ``make_scheduler()`` (timesteps and alphas).

The diffusion-transformer families (SD3's ``SD3Transformer2DModel``, FLUX's ``FluxTransformer2DModel``,
:mod:`tokenflow.backbones.dit`) implement the same interface with flow matching's noise maths (``transition``,
``noised``, ``implied_noise``, ``noise_levels``: Euler steps on sigmas keyed as integers), joint-attention
processors (``Layers.processor``) that act on image tokens only, and no residual-feature role.
"""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

__all__ = ["Backbone", "TextConditioning", "Layers"]


@dataclass
class TextConditioning:
    """Per-prompt UNet conditioning: text embeddings and, for SDXL, the added pooled-text/time-id embeddings."""

    embeds: torch.Tensor  # [P, L, D]
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds [P, 1280], time_ids [P, 6]

    def rows(self, index: list[int] | torch.Tensor) -> "TextConditioning":
        """The conditioning of the given prompt rows, in that order (rows may repeat)."""
        index = torch.as_tensor(index, device=self.embeds.device)
        added = None if self.added is None else {k: v[index.to(v.device)] for k, v in self.added.items()}
        return TextConditioning(self.embeds[index], added)

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


@dataclass(frozen=True)
class Layers:
    """The layers an edit touches, by role (names as in ``unet.attn_processors`` / ``unet.named_modules()``)."""

    self_attention: tuple[str, ...]  # processors TokenFlow replaces (keyframe attention, propagation)
    qk: tuple[str, ...]  # PnP: processors whose edited branches take the source's queries and keys
    residual: tuple[str, ...]  # PnP: blocks whose edited branches take the source's residual features
    # ``processor(state, name, inject_qk=, fallback=, tokenflow=)``: the family's attention processor (None: the
    # UNet's)
    processor: object = field(default=None, compare=False)
    # the self-attention layers TokenFlow acts in (None: all); the others attend per frame in every call
    tokenflow: tuple[str, ...] | None = None

    def __iter__(self):  # unpacks as (self_attention, qk, residual) lists
        return iter((list(self.self_attention), list(self.qk), list(self.residual)))


_UNET_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


class Backbone(ABC):
    """The model adapter (see the module docstring). Implementations also carry ``device``, ``dtype``,
    ``model_id``, ``revision``, ``loras``, ``controlnet`` and the modules themselves."""

    family: str = ""
    flow_matching: bool = False  # rectified-flow noise maths (SD3, FLUX) instead of DDIM's
    unet: torch.nn.Module  # the denoiser: a UNet, or a diffusion transformer
    device: torch.device
    dtype: torch.dtype

    @property
    def lock(self) -> threading.RLock:
        """Held by every edit and inversion: processors installed on a denoiser belong to one edit at a time, so
        every adapter wrapping the same module (an editor's, a pipeline's) shares one lock."""
        with _LOCKS_GUARD:
            return _UNET_LOCKS.setdefault(self.unet, threading.RLock())

    @property
    @abstractmethod
    def vae_scale_factor(self) -> int: ...

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the denoiser takes."""
        return int(self.unet.config.in_channels)

    @property
    @abstractmethod
    def min_side(self) -> int:
        """The smallest frame side in pixels the denoiser's deepest level still takes."""

    @property
    def size_multiple(self) -> int:
        """Frame sides must be multiples of this (pixels): the VAE factor, times a transformer's patch size."""
        return self.vae_scale_factor * getattr(self, "patch", 1)

    @property
    @abstractmethod
    def default_size(self) -> int:
        """The short side in pixels the checkpoint was trained at."""

    @abstractmethod
    def attention_tokens(self, latent_height: int, latent_width: int) -> int:
        """Tokens per frame at the largest self-attention level, for latents of that size."""

    @abstractmethod
    def layers(self, selection=None) -> Layers:
        """The layers of each role for ``selection`` (a :class:`~tokenflow.backbones.unet_layers.LayerSelection`
        or ``None`` for the defaults); an empty role is an error naming the model and the selection."""

    @property
    @abstractmethod
    def prediction_type(self) -> str: ...

    def predicted_noise(self, output: torch.Tensor, x: torch.Tensor, alpha) -> torch.Tensor:
        """The raw output at noise level ``alpha`` as predicted noise (the family's parametrisation)."""
        from ..inversion.ddim import predicted_noise

        return predicted_noise(self.prediction_type, output, x, alpha)

    # -- the noise maths: DDIM's (Song et al., 2021) by default; flow-matching families override these -----------

    def noise_levels(self, scheduler) -> tuple:
        """(timestep -> noise level, the level sampling ends at) of a scheduler from :meth:`make_scheduler`: the
        cumulative alphas and the final alpha for DDIM; the flow families' sigmas and 0."""
        return scheduler.alphas_cumprod, scheduler.final_alpha_cumprod

    def transition(self, x: torch.Tensor, direction: torch.Tensor, level_from, level_to) -> torch.Tensor:
        """One deterministic step from noise level ``level_from`` to ``level_to``, given the denoiser's prediction
        as :meth:`predicted_noise` returns it (DDIM's eq. 12 with eta 0: sampling and inversion alike)."""
        from ..inversion.ddim import ddim_transition

        return ddim_transition(x, direction, level_from, level_to)

    def noised(self, x0: torch.Tensor, eps: torch.Tensor, level) -> torch.Tensor:
        """``x0`` at noise level ``level`` with noise ``eps`` (the forward process)."""
        from ..inversion.ddim import noised

        return noised(x0, eps, level)

    def implied_noise(self, x: torch.Tensor, x0: torch.Tensor, level) -> torch.Tensor:
        """The noise that takes ``x0`` to ``x`` at ``level`` (inverse of :meth:`noised`)."""
        from ..inversion.ddim import implied_noise

        return implied_noise(x, x0, level)

    def branch_kwargs(self, guidance: float, frames: int) -> dict:
        """Extra denoiser inputs of an editing call of :attr:`branches` blocks of ``frames`` frames (FLUX's
        guidance embedding); none for classifier-free-guided families."""
        return {}

    #: fraction of the editing steps (noisiest first) run with TokenFlow when the user does not say (the rest per
    #: frame): all of them for the UNet families, as in the paper
    default_propagation_t: float = 1.0

    #: the guidance scale an edit uses when the user gives none (the family's usual one)
    default_guidance: float = 7.5

    #: whether the edit mixes an unconditional and a conditional prediction (classifier-free guidance); a
    #: guidance-distilled family (FLUX.1) takes the scale as an input instead and its conditional branch is used
    classifier_free_guidance: bool = True

    @property
    def branches(self) -> int:
        """Row blocks of an editing call, ``n`` frames each: the source, then the unconditional and conditional
        edits (classifier-free guidance), or the conditional edit alone (guidance-distilled: an unconditional
        branch would be computed and never used)."""
        return 3 if self.classifier_free_guidance else 2

    @abstractmethod
    def make_scheduler(self, latent_size: tuple[int, int] | None = None):
        """A fresh scheduler with the checkpoint's noise schedule (timesteps and noise levels); ``latent_size``:
        the latents' (h, w), for schedules that shift with the image size (FLUX's)."""

    @abstractmethod
    def condition(self, prompts: list[str], height: int, width: int) -> TextConditioning: ...

    @abstractmethod
    def predict(self, latents: torch.Tensor, t, cond: TextConditioning, **extra) -> torch.Tensor: ...

    @abstractmethod
    def encode_frames(self, frames, batch_size: int = 8) -> torch.Tensor: ...

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor: ...


def check_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Raise :class:`~tokenflow.errors.NumericalError` when ``tensor`` holds NaN or inf: computed in ``dtype``, it
    overflowed (float16's range ends at 65504), and clamping would turn it into black frames."""
    if bool(torch.isfinite(tensor).all()):
        return
    from ..errors import NumericalError

    name = str(dtype).replace("torch.", "")
    if dtype in (torch.float16, torch.bfloat16):
        raise NumericalError(f"{what} hold NaN or inf: {name} overflowed; rerun with `dtype` float32")
    raise NumericalError(f"{what} hold NaN or inf in {name}; the model's weights may be broken, check `model`")
