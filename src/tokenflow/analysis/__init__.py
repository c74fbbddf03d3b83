"""The paper's diffusion-feature analysis (Geyer et al., ICLR 2024, section 3): what the model's self-attention
tokens of a video look like (a joint PCA), how consistent they are from frame to frame, and how well one frame can be
rebuilt from another's (token replacement, warping by their nearest neighbours).

Python API (tensors in, tensors out): :func:`capture_tokens` / :func:`list_layers` / :func:`default_layer`,
:func:`fit_pca` / :func:`pca_rgb`, :func:`feature_consistency`, :func:`nearest_neighbor_field` /
:func:`warp_by_field` / :func:`warp_from`, :func:`reconstruct_from_tokens`. The commands ``tokenflow features`` and
``tokenflow reconstruct`` are :func:`features_video` and :func:`reconstruct_video` (module :mod:`.run`).
"""

from .features import (
    PCABasis,
    feature_consistency,
    field_displacement,
    fit_pca,
    frame_consistency,
    frame_consistency_along,
    nearest_neighbor_field,
    pca_rgb,
    upsample_nearest,
    warp_by_field,
)
from .reconstruct import TokenReconstruction, reconstruct_from_tokens, warp_from
from .tokens import (
    AttentionLayer,
    LayerTokens,
    capture_tokens,
    default_layer,
    editing_timesteps,
    list_layers,
    resolve_layer,
    resolve_timestep,
)

__all__ = [
    "AttentionLayer",
    "LayerTokens",
    "PCABasis",
    "TokenReconstruction",
    "capture_tokens",
    "list_layers",
    "default_layer",
    "resolve_layer",
    "resolve_timestep",
    "editing_timesteps",
    "fit_pca",
    "pca_rgb",
    "frame_consistency",
    "frame_consistency_along",
    "feature_consistency",
    "nearest_neighbor_field",
    "field_displacement",
    "warp_by_field",
    "upsample_nearest",
    "warp_from",
    "reconstruct_from_tokens",
]
