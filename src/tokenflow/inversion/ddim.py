"""DDIM inversion and sampling (Song et al., 2021, eq. 12 with eta = 0) as small functions: the noise maths
shared by the inversion and the editing loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..errors import InputError
from ..events import CancelToken, ProgressCallback, Tracker, as_progress
from ..backbones import Backbone, TextConditioning
from ..backbones.base import check_finite
from .storage import LatentColumn

__all__ = ["inversion_grid", "ddim_invert", "ddim_reconstruct", "predicted_noise", "ddim_transition", "noised",
           "implied_noise", "next_alphas", "PREDICTION_TYPES"]


def _timesteps(model: Backbone, steps: int, latent_size: tuple[int, int] | None = None) -> list[int]:
    scheduler = model.make_scheduler(latent_size)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def inversion_grid(model: Backbone, steps: int, inversion_steps: int,
                   latent_size: tuple[int, int] | None = None) -> tuple[list[int], list[int]]:
    """(ascending timesteps the inversion visits, timesteps whose latents are saved).

    The grid is the inversion schedule joined with the editing schedule, so any ``steps``/``inversion_steps`` pair
    works (the reference crashes late when they do not nest); when they nest it equals the reference's grid.
    Saved: every editing timestep and the noisiest one. A flow-matching model inverts on the editing grid itself
    (the ODE's Euler steps, :class:`~tokenflow.inversion.flow.FlowMatchSchedule`); ``latent_size``: the latents'
    (h, w), for schedules that shift with the image size.
    """
    train = model.make_scheduler(latent_size).config.num_train_timesteps
    for flag, value in (("`steps`", steps), ("`inversion_steps`", inversion_steps)):
        if not 1 <= value <= train:  # diffusers would raise its own ValueError deep inside
            raise InputError(f"{flag} {value}: must be between 1 and {train} (the model's training timesteps)")
    if getattr(model, "flow_matching", False):
        if inversion_steps != steps:
            raise InputError(
                f"`inversion_steps` {inversion_steps} (`inversion` ddim means 500): a flow-matching model (SD3, FLUX) "
                f"inverts on the editing grid of {steps} `steps`; use `inversion` fixed-point "
                "(`inversion_refinements` 0 for plain Euler inversion) and leave `inversion_steps` unset")
        grid = sorted(_timesteps(model, steps, latent_size))
        return grid, grid
    edit = set(_timesteps(model, steps))
    inverted = set(_timesteps(model, inversion_steps))
    for flag, value, ts in (("`steps`", steps, edit), ("`inversion_steps`", inversion_steps, inverted)):
        if max(ts) >= train:  # e.g. 1000 "leading" steps with steps_offset 1 reach timestep 1000
            raise InputError(f"{flag} {value}: the model's schedule then reaches timestep {max(ts)}, past its last "
                             f"({train - 1}); use fewer steps")
    grid = sorted(inverted | edit)
    return grid, sorted(edit | {grid[-1]})


PREDICTION_TYPES = ("epsilon", "v_prediction")


def predicted_noise(prediction_type: str, output: torch.Tensor, x: torch.Tensor, alpha) -> torch.Tensor:
    """A denoiser's output at noise level ``alpha`` (cumulative) as predicted noise: epsilon models predict it,
    v-prediction models predict ``v = sqrt(a) eps - sqrt(1-a) x0`` (Salimans & Ho, 2022), so
    ``eps = sqrt(a) v + sqrt(1-a) x``."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha**0.5 * output + (1 - alpha) ** 0.5 * x
    raise ValueError(f"prediction type {prediction_type!r} is not supported; use an epsilon or v model")


def ddim_transition(x: torch.Tensor, eps: torch.Tensor, alpha_from, alpha_to) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from noise level ``alpha_from`` to ``alpha_to`` (Song et al., 2021, eq. 12):
    ``x0 = (x - sqrt(1-a_from) eps) / sqrt(a_from)``, then ``sqrt(a_to) x0 + sqrt(1-a_to) eps``. Sampling goes to a
    larger alpha, inversion to a smaller one (with ``eps`` predicted at the target level)."""
    x0 = (x - (1 - alpha_from) ** 0.5 * eps) / alpha_from**0.5
    return alpha_to**0.5 * x0 + (1 - alpha_to) ** 0.5 * eps


def next_alphas(scheduler, levels=None, final=None) -> dict:
    """Timestep -> the noise level a sampling step from it goes to, for a scheduler whose ``set_timesteps`` was
    called: the next timestep of its schedule, the last one to the final level. ``levels``/``final``: the
    backbone's :meth:`~tokenflow.backbones.base.Backbone.noise_levels` (default: DDIM's alphas)."""
    schedule = [int(t) for t in scheduler.timesteps]
    alphas = scheduler.alphas_cumprod if levels is None else levels
    out = {t: alphas[u] for t, u in zip(schedule, schedule[1:])}
    out[schedule[-1]] = scheduler.final_alpha_cumprod if final is None else final
    return out


def noised(x0: torch.Tensor, eps: torch.Tensor, alpha) -> torch.Tensor:
    """``x0`` at noise level ``alpha`` with noise ``eps``: ``sqrt(a) x0 + sqrt(1-a) eps`` (the forward process)."""
    return alpha**0.5 * x0 + (1 - alpha) ** 0.5 * eps


def implied_noise(x: torch.Tensor, x0: torch.Tensor, alpha) -> torch.Tensor:
    """The noise that takes ``x0`` to ``x`` at level ``alpha`` (inverse of :func:`noised`)."""
    return (x - alpha**0.5 * x0) / (1 - alpha) ** 0.5


@torch.no_grad()
def _invert_batch(
    model: Backbone,
    latents: torch.Tensor,
    cond: TextConditioning,
    grid: list[int],
    save: list[int],
    on_saved: Callable[[int, torch.Tensor], None],
    on_step: Callable[[int], None] | None = None,
    resume: tuple[int, torch.Tensor] | None = None,
    refinements: int = 0,
) -> None:
    """DDIM-invert one batch of latents along ``grid``; ``on_saved(t, x)`` receives each saved timestep's latents
    (CPU, float32) as soon as they exist. ``resume=(t, x_t)``: continue from the latents at grid timestep ``t``
    (a deterministic chain: the same numbers as an uninterrupted run).

    ``refinements``: fixed-point iterations per step (0: plain DDIM inversion, the reference's). Plain inversion
    predicts the noise at the *previous* latents, an approximation; the DDIM sampling step it should undo uses the
    noise predicted at the new ones, so ``x_t`` solves ``x_t = T(x_prev, eps(x_t, t))``. Each iteration evaluates
    ``eps`` at the current estimate and redoes the step (AIDI, Pan et al., ICCV 2023; ReNoise, Garibi et al., ECCV
    2024): one UNet call more per step, and the sampler then retraces the inverted path closely."""
    scheduler = model.make_scheduler()
    alphas, final = model.noise_levels(scheduler)
    saved = set(save)
    first = 0 if resume is None else grid.index(resume[0]) + 1
    x = (latents if resume is None else resume[1]).to(model.device, torch.float32)
    text = cond.rows([0] * x.shape[0])
    for i in range(first, len(grid)):
        t = grid[i]
        a_t = alphas[t].to(model.device)
        a_prev = (alphas[grid[i - 1]] if i > 0 else final).to(model.device)
        eps = model.predicted_noise(model.predict(x, t, text), x, a_t)  # predicted at the target level t
        start = x
        x = model.transition(start, eps, a_prev, a_t)
        for _ in range(refinements):
            eps = model.predicted_noise(model.predict(x, t, text), x, a_t)  # at the current estimate of x_t
            x = model.transition(start, eps, a_prev, a_t)
        if t in saved:
            check_finite(x, f"the inverted latents at timestep {t}", model.dtype)  # before they reach the cache
            on_saved(t, x.cpu())
        if on_step is not None:
            on_step(x.shape[0])


def _inversion_bar(frames: int, steps: int, initial: int, progress, cancel=None) -> Tracker:
    """Progress counted per frame and inversion step, reported in frames (frames/s, ETA); cancellable per step."""
    return Tracker("inversion", frames * steps, as_progress(progress), cancel, initial=initial, divisor=steps)


@torch.no_grad()
def ddim_invert(
    model: Backbone,
    latents: torch.Tensor,
    cond: TextConditioning,
    grid: list[int],
    save: list[int],
    batch_size: int = 8,
    progress: bool | ProgressCallback | None = True,
    cancel: CancelToken | None = None,
    refinements: int = 0,
) -> dict[int, torch.Tensor]:
    """DDIM inversion (Song et al., 2021, eq. 13 run backwards), each frame independently, guidance 1.

    For t ascending: ``x0 = (x - sqrt(1-a_prev) eps) / sqrt(a_prev)``, ``x = sqrt(a_t) x0 + sqrt(1-a_t) eps``
    with ``eps = unet(x, t, cond)`` and ``a_prev`` the previous grid point's (``final_alpha_cumprod`` first).
    Frames are streamed through the device a batch at a time; results come back to the CPU in float32, all in
    memory (:func:`invert_frames` with a cache streams them to disk instead).
    """
    saved: dict[int, list[torch.Tensor]] = {t: [] for t in save}
    bar = _inversion_bar(latents.shape[0], len(grid), 0, progress, cancel)
    for start in range(0, latents.shape[0], batch_size):
        batch = latents[start : start + batch_size]
        _invert_batch(model, batch, cond, grid, save, lambda t, x: saved[t].append(x), bar.update,
                      refinements=refinements)
    return {t: torch.cat(v) for t, v in saved.items()}


@torch.no_grad()
def _reconstruct_batch(
    model: Backbone, top: torch.Tensor, cond: TextConditioning, path: list[int]
) -> torch.Tensor:
    """DDIM sampling of one batch from its noisiest latents ``top`` down ``path`` (descending) to t=0."""
    scheduler = model.make_scheduler()
    alphas, final = model.noise_levels(scheduler)
    x = top.to(model.device, torch.float32)
    text = cond.rows([0] * x.shape[0])
    for i, t in enumerate(path):
        a_t = alphas[t].to(model.device)
        a_next = (alphas[path[i + 1]] if i + 1 < len(path) else final).to(model.device)
        eps = model.predicted_noise(model.predict(x, t, text), x, a_t)
        x = model.transition(x, eps, a_t, a_next)
    return x.cpu()


@torch.no_grad()
def ddim_reconstruct(
    model: Backbone,
    noisy: Mapping[int, torch.Tensor | LatentColumn],
    cond: TextConditioning,
    batch_size: int = 8,
) -> torch.Tensor:
    """Deterministic DDIM sampling from the noisiest saved latent down the saved timesteps to t=0, guidance 1."""
    path = sorted(noisy, reverse=True)
    top = noisy[path[0]]
    out = [
        _reconstruct_batch(model, top[start : start + batch_size], cond, path)
        for start in range(0, top.shape[0], batch_size)
    ]
    return torch.cat(out)
