"""Editing modes as small objects: which timesteps run, when Plug-and-Play injects, what extra conditioning a UNet
call gets. A new mode is one class here (and its name in :data:`MODES`); the editing loop only asks the mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import Injection
from .backbones import Backbone, TextConditioning
from .control import to_control_tensor
from .errors import InputError

__all__ = ["StepPlan", "Mode", "PnPMode", "SDEditMode", "ControlNetMode", "ControlNetConditioner", "MODES", "get_mode"]


@dataclass(frozen=True)
class StepPlan:
    """The timesteps an edit runs (noisiest first) and the PnP injection of each."""

    timesteps: list[int]
    injections: dict[int, Injection]


class Mode:
    """Plug-and-Play over the whole schedule, the paper's main mode (``pnp``)."""

    name = "pnp"
    default_strength = 1.0
    pnp_by_default = True

    def plan(self, schedule: list[int], strength: float, pnp: bool, pnp_attn_t: float, pnp_f_t: float) -> StepPlan:
        """The last ``round(strength * steps)`` timesteps of ``schedule`` (the full DDIM schedule, noisiest
        first); with ``pnp``, q/k injection during the first ``int(steps * pnp_attn_t)`` timesteps of the full
        schedule and residual injection during the first ``int(steps * pnp_f_t)`` (truncation, as the reference)."""
        steps = len(schedule)
        run = round(strength * steps)
        timesteps = schedule[steps - run :] if run else []
        qk = set(schedule[: int(steps * pnp_attn_t)]) if pnp else set()
        residual = set(schedule[: int(steps * pnp_f_t)]) if pnp else set()
        return StepPlan(timesteps, {t: Injection(qk=t in qk, residual=t in residual) for t in timesteps})

    def conditioner(self, model: Backbone, control, scale: float, source_shape: tuple[int, ...]):
        """Extra conditioning for every UNet call (``None``: none); see :class:`ControlNetConditioner`."""
        if control is not None:
            raise InputError(f"control images are only used with `mode` controlnet (got `mode` {self.name})")
        return None


PnPMode = Mode


class SDEditMode(Mode):
    """SDEdit (Meng et al., 2022): the source re-noised to ``strength`` and denoised, without PnP injection."""

    name = "sdedit"
    default_strength = 0.9
    pnp_by_default = False


class ControlNetMode(Mode):
    """A ControlNet's residuals added to the edited branches (canny, depth or your own maps)."""

    name = "controlnet"
    pnp_by_default = False

    def conditioner(self, model: Backbone, control, scale: float, source_shape: tuple[int, ...]):
        controlnet = getattr(model, "controlnet", None)
        if controlnet is None:
            raise InputError("`mode` controlnet needs a ControlNet: pass `controlnet` ID_OR_PATH")
        if control is None:
            raise InputError("`mode` controlnet needs control images (`control` canny|depth|FOLDER)")
        n, _, h, w = source_shape
        factor = model.vae_scale_factor
        size = tuple(control.shape[2:]) if isinstance(control, torch.Tensor) else tuple(control.shape[1:3])
        if control.shape[0] != n or size != (h * factor, w * factor):
            raise InputError(
                f"control maps {tuple(control.shape)} do not match the {n} frames of {w * factor}x{h * factor}"
            )
        return ControlNetConditioner(model, controlnet, control, scale)


class ControlNetConditioner:
    """ControlNet residuals for the edited branches (uncond, cond) of a UNet call; zeros for the source branch,
    which must stay the source's own."""

    def __init__(self, model: Backbone, controlnet, control, scale: float):
        self.model, self.controlnet, self.control, self.scale = model, controlnet, control, scale

    def __call__(self, latents: torch.Tensor, text: TextConditioning, frames: list[int], t: int) -> dict:
        n = len(frames)
        image = self.control[frames]
        if not isinstance(image, torch.Tensor):  # uint8 maps [n, H, W, 3] (a FrameStore)
            image = to_control_tensor(image)
        branches = latents.shape[0] // n
        image = image.to(self.model.device, self.controlnet.dtype).repeat(branches - 1, 1, 1, 1)
        edited = text.rows(list(range(n, branches * n)))
        down, mid = self.controlnet(
            latents[n:].to(self.controlnet.dtype),
            t,
            controlnet_cond=image,
            conditioning_scale=self.scale,
            return_dict=False,
            **edited.unet_kwargs(),
        )

        def with_source(r: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(r[:n]), r]).to(latents.dtype)

        return dict(
            down_block_additional_residuals=[with_source(r) for r in down],
            mid_block_additional_residual=with_source(mid),
        )


MODES: dict[str, Mode] = {m.name: m for m in (PnPMode(), SDEditMode(), ControlNetMode())}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise InputError(f"`mode` {name!r}: unknown; use {', '.join(MODES)}")
    return MODES[name]
