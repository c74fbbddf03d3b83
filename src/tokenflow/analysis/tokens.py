"""Self-attention tokens of a video's source latents, captured through the editing loop's own attention processors.

The paper's analysis (Geyer et al., ICLR 2024, section 3 and figures 2-3) looks at the self-attention tokens of the
inverted source video at one timestep: their *inputs* (after the transformer block's norm) are what TokenFlow's
correspondences match, their *outputs* (after ``to_out``) what it propagates. :func:`capture_tokens` runs the
denoiser once per batch of frames with :class:`~tokenflow.attention.TokenFlowState`'s observer set, inside a plain
:class:`~tokenflow.attention.FrameCall`, so the model computes exactly what it computes without the analysis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..attention import FrameCall, TokenFlowState, tokenflow_attention
from ..backbones import Backbone
from ..errors import InputError
from ..events import CancelToken, ProgressCallback, Tracker, check_cancelled

__all__ = ["AttentionLayer", "LayerTokens", "capture_tokens", "list_layers", "default_layer", "resolve_layer",
           "token_grid", "editing_timesteps", "resolve_timestep"]

_PROCESSOR = ".processor"


@dataclass(frozen=True)
class AttentionLayer:
    """One self-attention layer of a denoiser: its name (as in ``named_modules``), its token grid for a given latent
    size (rows, columns) and its channels."""

    name: str
    grid: tuple[int, int]
    channels: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class LayerTokens:
    """The tokens of one layer for every frame at one timestep, on the CPU in float32."""

    layer: str
    timestep: int
    grid: tuple[int, int]  # token rows, columns
    inputs: torch.Tensor  # [N, L, C] the attention's input tokens: what correspondences match
    outputs: torch.Tensor  # [N, L, C] its output tokens: what TokenFlow propagates, what the PCA shows

    def __post_init__(self):
        if self.inputs.shape[:2] != self.outputs.shape[:2] or self.inputs.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"tokens {tuple(self.inputs.shape)} / {tuple(self.outputs.shape)} do not fit grid {self.grid}")


def token_grid(tokens: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """The (rows, columns) of a level with ``tokens`` tokens: the latent size halved (rounding up, as a stride-2
    convolution with padding 1 does) until it has that many."""
    h, w = latent_height, latent_width
    for _ in range(12):
        if h * w == tokens:
            return h, w
        if h * w < tokens:
            break
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"{tokens} tokens are no halving of a {latent_height}x{latent_width} latent")


def _layer_name(processor: str) -> str:
    return processor.removesuffix(_PROCESSOR)


def _self_attention(model: Backbone) -> list[str]:
    return [_layer_name(p) for p in model.layers().self_attention]


def resolve_layer(model: Backbone, name: str | None) -> str:
    """``name`` (with or without ``.processor``) if it is a self-attention layer TokenFlow replaces, else one line
    naming a few; ``None``: :func:`default_layer` needs a latent size, so this only checks given names."""
    names = _self_attention(model)
    wanted = _layer_name(name)
    if wanted not in names:
        model_name = type(model.unet).__name__
        shown = ", ".join(names[-3:])
        raise InputError(f"`layer` {name!r}: {model_name} has no self-attention layer of that name; list them with "
                         f"`list_layers` (e.g. {shown})")
    return wanted


@torch.no_grad()
def capture_tokens(
    model: Backbone,
    latents,
    timestep: int,
    layers: Sequence[str],
    prompt: str = "",
    batch_size: int = 8,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, LayerTokens]:
    """The input and output tokens of ``layers`` (names from :func:`list_layers`) for every frame of ``latents``
    (``[N, C, h, w]``: a tensor or a :class:`~tokenflow.inversion.LatentColumn`, read a batch at a time) denoised at
    ``timestep`` with ``prompt``; one denoiser call per batch (progress stage ``features``)."""
    wanted = {_layer_name(n) for n in layers}
    unknown = wanted - set(_self_attention(model))
    if unknown:
        resolve_layer(model, sorted(unknown)[0])
    n, _, h, w = latents.shape
    got: dict[str, tuple[list, list]] = {name: ([], []) for name in wanted}

    def observe(processor: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        name = _layer_name(processor)
        if name in got:
            got[name][0].append(inputs.float().cpu())
            got[name][1].append(outputs.float().cpu())

    state = TokenFlowState(observe=observe)
    factor = model.vae_scale_factor
    bar = Tracker("features", n, progress, cancel)
    with model.lock:
        text = model.condition([prompt], height=h * factor, width=w * factor)
        with tokenflow_attention(model.unet, state, model.layers()):
            for start in range(0, n, max(1, batch_size)):
                rows = latents[start : start + batch_size]
                batch = torch.as_tensor(rows).to(model.device, model.dtype)
                with state.calling(FrameCall()):
                    model.predict(batch, timestep, text.rows([0] * len(batch)))
                bar.update(len(batch))
                check_cancelled(cancel)
    bar.close()
    out = {}
    for name, (inputs, outputs) in got.items():
        inputs_t, outputs_t = torch.cat(inputs), torch.cat(outputs)
        grid = token_grid(inputs_t.shape[1], h, w)
        out[name] = LayerTokens(name, int(timestep), grid, inputs_t, outputs_t)
    return out


def list_layers(model: Backbone, latent_height: int, latent_width: int, timestep: int = 500) -> list[AttentionLayer]:
    """Every self-attention layer TokenFlow replaces, in the denoiser's order, with its token grid for latents of
    that size (measured: one denoiser call on a zero latent)."""
    zeros = torch.zeros(1, model.latent_channels, latent_height, latent_width)
    names = _self_attention(model)
    tokens = capture_tokens(model, zeros, timestep, names)
    return [AttentionLayer(name, tokens[name].grid, tokens[name].outputs.shape[-1]) for name in names]


def default_layer(model: Backbone, layers: Sequence[AttentionLayer]) -> str:
    """The paper's choice: the highest-resolution decoder self-attention (the first at that resolution: on the micro
    trained model its nearest neighbours follow a known shift best, docs/features.md). The
    decoder's layers are those Plug-and-Play injects queries and keys into (the backbone's ``qk`` role)."""
    decoder = {_layer_name(p) for p in model.layers().qk}
    candidates = [layer for layer in layers if layer.name in decoder] or list(layers)
    best = max(layer.tokens for layer in candidates)
    return next(layer.name for layer in candidates if layer.tokens == best)


def editing_timesteps(model: Backbone, steps: int, latent_size: tuple[int, int] | None = None) -> list[int]:
    """The editing schedule of ``steps`` steps, noisiest first (the timesteps an inversion saves); ``latent_size``:
    the latents' (h, w), which FLUX's schedule shifts with."""
    scheduler = model.make_scheduler(latent_size)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def resolve_timestep(model: Backbone, steps: int, timestep: int | None,
                     latent_size: tuple[int, int] | None = None) -> int:
    """``timestep`` if the ``steps``-step editing schedule (at ``latent_size``, see :func:`editing_timesteps`) has
    it, else one line listing some that it has; ``None``: the schedule's middle one."""
    schedule = editing_timesteps(model, steps, latent_size)
    if timestep is None:
        return schedule[len(schedule) // 2]
    if timestep not in schedule:
        near = sorted(schedule, key=lambda t: abs(t - timestep))[:3]
        raise InputError(f"`timestep` {timestep}: not a timestep of the {steps}-step editing schedule; use one it "
                         f"has (nearest: {', '.join(map(str, sorted(near)))}) or change `steps`")
    return timestep
