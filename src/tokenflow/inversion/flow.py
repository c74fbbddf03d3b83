"""Rectified-flow noise maths (SD3, FLUX.1): ``x_s = (1 - s) x0 + s eps`` at noise level ``s`` (sigma), and the
denoiser predicts the velocity ``v = eps - x0``. Sampling and inversion are Euler steps of the ODE
``dx/ds = v`` on the editing grid; inversion evaluates ``v`` at the target level (optionally refined by fixed-point
iterations, :func:`~tokenflow.inversion.ddim._invert_batch`), as DDIM inversion does.

Timesteps are integer keys, like DDIM's, so the cache, the source latents and the schedule of an edit stay as they
are: a key is the level in millionths (:data:`FLOW_KEY_SCALE`; the model's own timestep is ``1000 * s``), and the
level is read back from the key, so every stage computes with the same sigmas.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import InputError

__all__ = ["FLOW_KEY_SCALE", "FlowMatchSchedule", "euler_transition", "flow_noised", "flow_implied_noise"]

FLOW_KEY_SCALE = 1_000_000


class _Levels(Mapping):
    """Key -> sigma (a float32 scalar tensor): any key, read from the key itself."""

    def __getitem__(self, key):
        return torch.tensor(int(key) / FLOW_KEY_SCALE, dtype=torch.float32)

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


class FlowMatchSchedule:
    """The sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler`` for a checkpoint (its shift, and FLUX's
    resolution-dependent shift for ``image_tokens`` tokens a frame), as integer timestep keys, noisiest first."""

    def __init__(self, config: Mapping, image_tokens: int | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self._scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
        self.config = self._scheduler.config
        self.image_tokens = image_tokens
        self.timesteps: list[int] = []
        self.levels = _Levels()
        self.final_level = torch.tensor(0.0)

    def set_timesteps(self, steps: int) -> None:
        config = self.config
        if config.get("use_dynamic_shifting", False):
            # FLUX's pipeline: sigmas 1 .. 1/steps, shifted by mu (a linear function of the image's token count)
            tokens = self.image_tokens or config.get("base_image_seq_len", 256)
            lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            mu = base + (top - base) * (tokens - lo) / (hi - lo)
            self._scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
        else:
            self._scheduler.set_timesteps(steps)
        keys = [round(float(s) * FLOW_KEY_SCALE) for s in self._scheduler.sigmas[:-1]]
        if len(set(keys)) != len(keys) or min(keys) <= 0:
            raise InputError(f"`steps` {steps}: too many for this model's flow schedule (levels collide); use fewer")
        self.timesteps = keys


def euler_transition(x: torch.Tensor, velocity: torch.Tensor, level_from, level_to) -> torch.Tensor:
    """One Euler step of ``dx/ds = v`` from ``level_from`` to ``level_to`` (down for sampling, up for inversion)."""
    return x + (level_to - level_from) * velocity


def flow_noised(x0: torch.Tensor, eps: torch.Tensor, level) -> torch.Tensor:
    """``(1 - s) x0 + s eps``."""
    return (1 - level) * x0 + level * eps


def flow_implied_noise(x: torch.Tensor, x0: torch.Tensor, level) -> torch.Tensor:
    """The noise that takes ``x0`` to ``x`` at level ``s > 0`` (inverse of :func:`flow_noised`)."""
    return (x - (1 - level) * x0) / level
