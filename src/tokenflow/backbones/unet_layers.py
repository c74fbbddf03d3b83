"""Layers of a diffusers ``UNet2DConditionModel`` by role, so SD 1.x, 2.x and SDXL layouts all fit."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError
from .base import Layers

__all__ = ["LayerSelection", "LayerSelectionError", "select_layers"]


class LayerSelectionError(InputError):
    """A :class:`LayerSelection` that matches no layer of the UNet it is applied to."""


@dataclass
class LayerSelection:
    """Which layers the features touch, chosen by role so SD 1.x, 2.x and SDXL layouts all fit.

    ``tokenflow``: every transformer self-attention (``*.attn1``) processor. ``qk``: PnP q/k injection in the decoder
    self-attention, skipping the first ``skip_first_decoder_attention`` attention modules (the coarsest ones, as
    the reference does). ``conv``: the ResNet whose residual features PnP injects (second ResNet of the second
    decoder block). Explicit ``fnmatch`` patterns override the role-based choice.

    ``tokenflow_patterns``: the self-attention layers TokenFlow acts in (keyframe attention, propagation); in the
    others every frame attends to itself in every call, as in per-frame editing. ``None``: all of them (the paper's).
    """

    skip_first_decoder_attention: int = 1
    conv_block: int = 1
    conv_resnet: int = 1
    qk_patterns: Sequence[str] | None = None
    conv_patterns: Sequence[str] | None = None
    tokenflow_patterns: Sequence[str] | None = None


def tokenflow_layers(names: list[str], selection: LayerSelection, model: str) -> tuple[str, ...] | None:
    """The layers of ``names`` that ``selection.tokenflow_patterns`` picks (``None``: every one); an error when it
    picks none, which would silently make the edit per-frame."""
    if selection.tokenflow_patterns is None:
        return None
    picked = tuple(n for n in names if any(fnmatch.fnmatch(n, p) for p in selection.tokenflow_patterns))
    if not picked:
        raise LayerSelectionError(f"TokenFlow layer selection tokenflow_patterns {list(selection.tokenflow_patterns)} "
                                  f"matches no self-attention layer of {model}; choose among {_summary(names)}")
    return picked


def _attention_module(name: str) -> str:
    match = re.match(r"(.*\.attentions\.\d+)\.", name)
    return match.group(1) if match else name


def select_layers(unet, selection: LayerSelection | None = None) -> Layers:
    """The self-attention processors, PnP q/k processors and PnP residual blocks of ``unet`` (unpacks as three
    lists)."""
    selection = selection or LayerSelection()
    self_attn = [name for name in unet.attn_processors if name.endswith("attn1.processor")]
    if selection.qk_patterns is not None:
        qk = [n for n in self_attn if any(fnmatch.fnmatch(n, p) for p in selection.qk_patterns)]
    else:
        decoder = [n for n in self_attn if n.startswith("up_blocks.")]
        modules = list(dict.fromkeys(_attention_module(n) for n in decoder))
        kept = set(modules[selection.skip_first_decoder_attention :])
        qk = [n for n in decoder if _attention_module(n) in kept]
    resnets = [name for name, module in unet.named_modules() if type(module).__name__ == "ResnetBlock2D"]
    if selection.conv_patterns is not None:
        conv = [n for n in resnets if any(fnmatch.fnmatch(n, p) for p in selection.conv_patterns)]
    else:
        target = f"up_blocks.{selection.conv_block}.resnets.{selection.conv_resnet}"
        conv = [n for n in resnets if n == target]
    # an empty selection would silently turn the edit into plain image editing (or PnP without its features)
    model = type(unet).__name__
    if not self_attn:
        raise LayerSelectionError(f"{model} has no self-attention layer (*.attn1) for TokenFlow to replace")
    if not qk:
        what = (f"qk_patterns {list(selection.qk_patterns)}" if selection.qk_patterns is not None
                else f"skip_first_decoder_attention={selection.skip_first_decoder_attention}")
        raise LayerSelectionError(
            f"PnP q/k layer selection {what} matches no decoder self-attention layer of {model}; "
            f"choose among {_summary(self_attn)}"
        )
    if not conv:
        what = (f"conv_patterns {list(selection.conv_patterns)}" if selection.conv_patterns is not None
                else f"up_blocks.{selection.conv_block}.resnets.{selection.conv_resnet}")
        raise LayerSelectionError(
            f"PnP residual-feature layer {what} matches no ResNet block of {model}; choose among {_summary(resnets)}"
        )
    return Layers(tuple(self_attn), tuple(qk), tuple(conv), tokenflow=tokenflow_layers(self_attn, selection, model))


def _summary(names: list[str], shown: int = 6) -> str:
    kept = [n.removesuffix(".processor") for n in names[:shown]]
    return ", ".join(kept) + (f" ... ({len(names)} in all)" if len(names) > shown else "")


