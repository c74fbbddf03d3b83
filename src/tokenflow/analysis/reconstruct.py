"""Rebuilding a frame from another frame's features (the paper's figure 2): by token replacement and by warping.

``tokens``: frame J is denoised from its inverted latent while every self-attention output, in every layer and at
every step, is replaced by its nearest neighbour among frame I's tokens, matched on frame J's own source tokens:
the editing loop's propagation pass (:class:`~tokenflow.attention.PropagationCall`) with I as the only keyframe,
run by the editing loop's own step (:class:`tokenflow.editor._StepRunner`). Frame I itself is denoised alongside
(a :class:`~tokenflow.attention.KeyframeCall` of one frame: plain attention), and so is frame J without any
replacement, the ceiling a replacement can reach. ``warp``: frame I's pixels moved by the nearest-neighbour field
of one layer's source tokens (:func:`~tokenflow.analysis.features.warp_by_field`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..attention import FrameCall, KeyframeCall, PropagationCall, TokenFlowState, tokenflow_attention
from ..backbones import Backbone
from ..errors import InputError
from ..events import CancelToken, ProgressCallback, Tracker
from ..inversion import SourceLatents
from ..inversion.ddim import next_alphas
from .features import nearest_neighbor_field, warp_by_field
from .tokens import LayerTokens

__all__ = ["TokenReconstruction", "reconstruct_from_tokens", "warp_from", "check_frames"]


@dataclass
class TokenReconstruction:
    """Latents ``[T, C, h, w]`` (CPU, float32) of the target frames denoised with the source frame's tokens
    (``tokens``) and on their own (``plain``), and of the source frame itself (``source``, ``[1, C, h, w]``)."""

    tokens: torch.Tensor
    plain: torch.Tensor
    source: torch.Tensor


def check_frames(n: int, source: int, targets: Sequence[int]) -> None:
    """One line for a frame index outside the clip."""
    for name, value in [("from_frame", source)] + [("to_frame", t) for t in targets]:
        if not 0 <= value < n:
            raise InputError(f"`{name}` {value}: outside the clip's {n} frames; use 0..{n - 1}")


@torch.no_grad()
def reconstruct_from_tokens(
    model: Backbone,
    source: SourceLatents,
    from_frame: int,
    to_frames: Sequence[int],
    steps: int,
    prompt: str = "",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> TokenReconstruction:
    """Denoise ``to_frames`` from their inverted latents along the ``steps``-step editing schedule, every
    self-attention output replaced by its nearest neighbour among ``from_frame``'s tokens (see the module
    docstring), and each also without replacement. ``prompt``: the inversion prompt (the source branch's text).

    Progress stage ``denoising``, in frames x steps. One call per step for the source frame, then one for all
    targets with replacement and one for all without."""
    from ..editor import _StepRunner

    n = source.clean.shape[0]
    targets = list(to_frames)
    check_frames(n, from_frame, targets)
    scheduler = model.make_scheduler(tuple(source.clean.shape[2:]))
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    missing = [t for t in timesteps if t not in source.noisy]
    if missing:
        raise InputError(f"the source latents lack timesteps {missing[:5]} of the {steps}-step schedule; invert "
                         "with the same `steps`")
    # rows: the source frame, the targets with replacement, the targets on their own
    frames = [from_frame] + targets + targets
    rows_source, rows_tokens = [0], list(range(1, 1 + len(targets)))
    rows_plain = list(range(1 + len(targets), len(frames)))
    x = source.noisy[timesteps[0]][frames].float()
    factor = model.vae_scale_factor
    h, w = source.clean.shape[2:]
    with model.lock:
        # guidance 0 keeps the unconditional branch alone: every branch is the inversion prompt's plain denoising
        texts = model.condition([prompt] * 3, height=h * factor, width=w * factor)
        state = TokenFlowState(branches=model.branches)
        levels, final = model.noise_levels(scheduler)
        run = _StepRunner(model, levels, next_alphas(scheduler, levels, final), texts, 0.0, state)
        bar = Tracker("denoising", len(timesteps) * len(frames), progress, cancel)
        run.on_frames = bar.update
        keyframe = KeyframeCall.all(1)
        spread = PropagationCall((0,) * len(targets), (0,) * len(targets), (1.0,) * len(targets))
        with tokenflow_attention(model.unet, state, model.layers()):
            for step, t in enumerate(timesteps):
                bar.detail = f"step {step + 1}/{len(timesteps)}"
                run.step = step
                src_t = source.noisy[t][frames].float()
                nxt = torch.empty_like(x)
                nxt[rows_source] = run(rows_source, x, src_t, t, keyframe)
                nxt[rows_tokens] = run(rows_tokens, x, src_t, t, spread)
                nxt[rows_plain] = run(rows_plain, x, src_t, t, FrameCall())
                state.cache.clear()
                x = nxt
        bar.close()
    return TokenReconstruction(tokens=x[rows_tokens], plain=x[rows_plain], source=x[rows_source])


def warp_from(frames, tokens: LayerTokens, from_frame: int, to_frame: int) -> torch.Tensor:
    """Frame ``from_frame``'s pixels (``frames``: ``[N, H, W, 3]``, anything indexable) moved onto frame
    ``to_frame`` by the nearest-neighbour field of ``tokens``' input tokens (TokenFlow's correspondences)."""
    check_frames(tokens.inputs.shape[0], from_frame, [to_frame])
    field = nearest_neighbor_field(tokens.inputs[to_frame], tokens.inputs[from_frame], tokens.grid)
    return warp_by_field(frames[from_frame], field)
