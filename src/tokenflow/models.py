"""The public loading API, kept under its first name: everything here lives in :mod:`tokenflow.backbones`."""

from .backbones import (
    DEFAULT_MODEL,
    Backbone,
    StableDiffusionModel,
    StableDiffusionXLModel,
    TextConditioning,
    load_model,
    parse_lora,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "DEFAULT_MODEL",
    "Backbone",
    "StableDiffusionModel",
    "StableDiffusionXLModel",
    "TextConditioning",
    "load_model",
    "parse_lora",
    "resolve_device",
    "resolve_dtype",
]
