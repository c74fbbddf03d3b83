"""Backbones: the model adapter interface, its SD 1.x/2.x and SDXL implementations, and loading."""

from .base import Backbone, Layers, TextConditioning
from .loading import (
    DEFAULT_MODEL,
    SINGLE_FILE_SUFFIXES,
    backbone_for,
    load_model,
    parse_lora,
    resolve_device,
    resolve_dtype,
)
from .sd import StableDiffusionModel
from .sdxl import StableDiffusionXLModel
from .unet_layers import LayerSelection, LayerSelectionError, select_layers

__all__ = [
    "Backbone",
    "Layers",
    "TextConditioning",
    "StableDiffusionModel",
    "StableDiffusionXLModel",
    "LayerSelection",
    "LayerSelectionError",
    "select_layers",
    "DEFAULT_MODEL",
    "SINGLE_FILE_SUFFIXES",
    "backbone_for",
    "load_model",
    "parse_lora",
    "resolve_device",
    "resolve_dtype",
]
