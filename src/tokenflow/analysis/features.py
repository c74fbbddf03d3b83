"""What the tokens show: a joint PCA as colours, their consistency across frames, and their nearest-neighbour field.

All pure tensor functions over :class:`~tokenflow.analysis.tokens.LayerTokens`-shaped tensors (``[N, L, C]`` tokens
on a ``(rows, columns)`` grid), for notebooks as much as for ``tokenflow features`` / ``tokenflow reconstruct``.
The nearest neighbours are TokenFlow's own (:func:`tokenflow.correspondence.nearest_neighbors`, cosine similarity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..correspondence import cosine_similarity, nearest_neighbors

__all__ = ["PCABasis", "fit_pca", "pca_rgb", "frame_consistency", "feature_consistency",
           "frame_consistency_along", "nearest_neighbor_field",
           "field_displacement", "warp_by_field", "upsample_nearest", "time_slice"]

_QUANTILE_SAMPLE = 1 << 20  # torch.quantile's input limit is 2**24 values; a strided sample of this many is plenty


@dataclass
class PCABasis:
    """A PCA of token sets and the colour range of its components: ``mean`` ``[C]``, ``components`` ``[C, k]``
    (columns by decreasing variance, each signed so its largest loading is positive: the same tokens always get
    the same colours), ``low``/``high`` ``[k]`` the 1st and 99th percentiles of the projections (mapped to 0 and 1)."""

    mean: torch.Tensor
    components: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    explained: torch.Tensor  # [k] fraction of the variance each component explains

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., C]`` tokens -> ``[..., k]`` components."""
        return (tokens.double() - self.mean) @ self.components


def fit_pca(token_sets: Sequence[torch.Tensor], components: int = 3) -> PCABasis:
    """One PCA over the tokens of every set (``[N, L, C]`` each: the source video's and every edited video's), so
    one basis and one colour range serve them all and their colours can be compared.

    Exact, deterministic PCA: the eigenvectors of the tokens' covariance (``torch.linalg.eigh`` in float64) over
    all tokens, never a random subsample or randomized solver."""
    flat = [t.reshape(-1, t.shape[-1]).double() for t in token_sets]
    count = sum(f.shape[0] for f in flat)
    if count < 2:
        raise ValueError("a PCA needs at least two tokens")
    mean = sum(f.sum(0) for f in flat) / count
    cov = sum((f - mean).T @ (f - mean) for f in flat) / (count - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(values, descending=True)[:components]
    basis = vectors[:, order]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    basis = basis * torch.where(signs == 0, 1.0, signs)
    explained = values[order] / values.sum().clamp_min(1e-30)
    projected = torch.cat([(f - mean) @ basis for f in flat])
    step = max(1, projected.shape[0] // _QUANTILE_SAMPLE)
    sample = projected[::step]
    low = torch.quantile(sample, 0.01, dim=0)
    high = torch.quantile(sample, 0.99, dim=0)
    return PCABasis(mean, basis, low, high, explained.float())


def pca_rgb(tokens: torch.Tensor, grid: tuple[int, int], basis: PCABasis) -> torch.Tensor:
    """``[N, L, C]`` tokens -> ``[N, rows, columns, 3]`` float32 in [0, 1]: the first three components as RGB, in
    ``basis``'s colour range. Token by token, so a shifted frame's image is the shifted image."""
    projected = basis.project(tokens)[..., :3]
    scaled = (projected - basis.low[:3]) / (basis.high[:3] - basis.low[:3]).clamp_min(1e-12)
    return scaled.clamp(0, 1).float().reshape(tokens.shape[0], grid[0], grid[1], -1)


def frame_consistency(tokens: torch.Tensor) -> torch.Tensor:
    """``[N - 1]``: for each frame, the mean over its tokens of the cosine similarity with their nearest neighbour
    among the next frame's tokens (1: every token has an identical counterpart in the next frame)."""
    if tokens.shape[0] < 2:
        return torch.zeros(0)
    return torch.stack([cosine_similarity(tokens[f : f + 1], tokens[f + 1 : f + 2]).amax(-1).mean()
                        for f in range(tokens.shape[0] - 1)])


def feature_consistency(tokens: torch.Tensor) -> float | None:
    """The mean of :func:`frame_consistency` (``None`` for a single frame)."""
    per_frame = frame_consistency(tokens)
    return None if per_frame.numel() == 0 else float(per_frame.mean())


def frame_consistency_along(tokens: torch.Tensor, correspondence: torch.Tensor) -> torch.Tensor:
    """``[N - 1]``: for each frame, the mean cosine similarity of the next frame's tokens with the tokens of this
    frame that ``correspondence`` (``[N, L, C]``: the source video's input tokens, TokenFlow's correspondences)
    matches them to. Unlike :func:`frame_consistency`, which lets every token find its best match anywhere, this
    asks whether the tokens move the way the source moves: an edit that re-invents a texture in every frame keeps
    its nearest-neighbour similarity but loses this one."""
    if tokens.shape[0] != correspondence.shape[0] or tokens.shape[1] != correspondence.shape[1]:
        raise ValueError(f"tokens {tuple(tokens.shape)} and correspondences {tuple(correspondence.shape)} differ")
    out = []
    for f in range(tokens.shape[0] - 1):
        index = nearest_neighbors(correspondence[f + 1 : f + 2], correspondence[f : f + 1])[0]
        out.append(torch.nn.functional.cosine_similarity(tokens[f + 1].float(), tokens[f][index].float(), dim=-1).mean())
    return torch.stack(out) if out else torch.zeros(0)


def nearest_neighbor_field(target: torch.Tensor, source: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """For each token of the target frame (``[L, C]``), the grid position ``(row, column)`` of its nearest
    neighbour among the source frame's tokens (``[L, C]``): ``[rows, columns, 2]`` long."""
    index = nearest_neighbors(target[None], source[None])[0]
    return torch.stack([index // grid[1], index % grid[1]], dim=-1).reshape(grid[0], grid[1], 2)


def field_displacement(field: torch.Tensor) -> torch.Tensor:
    """``[rows, columns, 2]``: how many tokens (rows, columns) each target token's match lies from it."""
    rows, columns = field.shape[:2]
    own = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), dim=-1)
    return field - own


def warp_by_field(frame: np.ndarray | torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """The source frame's pixels (``[H, W, 3]``) moved by a nearest-neighbour field (:func:`nearest_neighbor_field`)
    upsampled to pixels by nearest neighbour: pixel ``p`` of the target, in token cell ``c``, takes the source's
    pixel at ``p`` plus the displacement of ``c``'s match (scaled to pixels, clipped to the frame)."""
    frame = torch.as_tensor(np.asarray(frame))
    height, width = frame.shape[:2]
    rows, columns = field.shape[:2]
    ys, xs = torch.arange(height), torch.arange(width)
    cy, cx = ys * rows // height, xs * columns // width  # the token cell of each pixel row / column
    move = field_displacement(field).double()
    dy = (move[cy][:, cx, 0] * height / rows).round().long()
    dx = (move[cy][:, cx, 1] * width / columns).round().long()
    sy = (ys[:, None] + dy).clamp(0, height - 1)
    sx = (xs[None, :] + dx).clamp(0, width - 1)
    return frame[sy, sx]


def upsample_nearest(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[N, rows, columns, 3]`` -> ``[N, height, width, 3]``, each token a block of pixels (same cells as
    :func:`warp_by_field`)."""
    rows, columns = images.shape[1:3]
    cy = torch.arange(height) * rows // height
    cx = torch.arange(width) * columns // width
    return images[:, cy][:, :, cx]


def time_slice(frames: torch.Tensor, row: int) -> torch.Tensor:
    """One image row followed over time: ``[N, H, W, ...]`` -> ``[N, W, ...]`` (time downwards)."""
    return frames[:, row]
