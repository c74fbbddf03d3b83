"""Nearest-neighbour token correspondences and keyframe blending weights (pure tensor functions).

TokenFlow (Geyer et al., ICLR 2024, section 4.2) propagates edited keyframe features to every frame along
the nearest-neighbour field of the *source* video's self-attention input tokens.
"""

from __future__ import annotations

import bisect

import torch

__all__ = [
    "consecutive_runs",
    "nearest_neighbors",
    "cosine_similarity",
    "unit_rows",
    "first_argmax",
    "linear_neighbors",
    "reference_neighbors",
]


def nearest_neighbors(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index of each query token's most cosine-similar key token.

    ``queries`` ``[n, L, C]``, ``keys`` ``[n, M, C]`` (one key frame per query frame) -> ``[n, L]`` long.
    Rows are divided by their L2 norm (no epsilon) and compared in float32, as the reference does; ties go to
    the first index.
    """
    return cosine_similarity(queries, keys).argmax(dim=-1)


def unit_rows(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` in float32, each divided by its L2 norm (no epsilon, as the reference)."""
    x = tokens.float()
    return x / x.norm(dim=-1, keepdim=True)


def first_argmax(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``x.argmax(-1)`` (the first index on ties, NaN counting as the largest), found faster on the CPU.

    The CPU's argmax kernel tracks an index per element and is several times slower than its vectorised ``amax``,
    which made the nearest-neighbour search the largest cost TokenFlow adds to a small model's editing loop. So
    the last axis is cut into blocks of ``block`` values: the first block holding the row's maximum is the argmax
    of the blocks' maxima (a block before it holds only smaller values), and the index is the first maximum inside
    that block (blocks of 32 measured fastest on AVX-512: 0.5x argmax's time at 384 values a row, 0.8x at 96).
    Other devices, and rows not made of at least two blocks, use ``argmax`` itself.
    """
    *lead, width = x.shape
    if x.device.type != "cpu" or width % block or width < 2 * block:
        return x.argmax(dim=-1)
    count = width // block
    blocks = x.reshape(-1, count, block)
    first = blocks.amax(dim=-1).argmax(dim=-1)
    rows = torch.arange(len(blocks), device=x.device) * count + first  # each row's winning block, as whole rows
    inside = blocks.reshape(-1, block).index_select(0, rows).argmax(dim=-1)
    return (first * block + inside).view(lead)


def cosine_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[n, L, M]`` float32 cosine similarity of every query token with every key token of its frame (the measure
    :func:`nearest_neighbors` maximises): ``queries`` ``[n, L, C]``, ``keys`` ``[n, M, C]``."""
    return torch.bmm(unit_rows(queries), unit_rows(keys).transpose(1, 2))


def linear_neighbors(frames: list[int], keyframes: list[int]) -> tuple[list[int], list[int], list[float]]:
    """This project's blending: for each frame, the sampled keyframes just before and after it in time.

    Returns (previous keyframe position, next keyframe position, weight of the next one), positions indexing
    ``keyframes`` (sorted). The weight is linear in temporal distance; a frame before the first (after the last)
    keyframe takes that keyframe alone, and a keyframe is its own neighbour with weight 1.
    """
    prev, nxt, weights = [], [], []
    last = len(keyframes) - 1
    for f in frames:
        first_after = bisect.bisect_left(keyframes, f)  # first keyframe >= f
        last_before = bisect.bisect_right(keyframes, f) - 1  # last keyframe <= f
        j_next = first_after if first_after <= last else last_before
        j_prev = last_before if last_before >= 0 else j_next
        k_prev, k_next = keyframes[j_prev], keyframes[j_next]
        w = 1.0 if k_next == k_prev else (f - k_prev) / (k_next - k_prev)
        prev.append(j_prev)
        nxt.append(j_next)
        weights.append(w)
    return prev, nxt, weights


def reference_neighbors(frames: list[int], batch_size: int) -> tuple[list[int], list[int], list[float]]:
    """The public reference's blending (reference-exact.md, item 22), for reproducing its numbers.

    Frame ``s`` of chunk ``i`` mixes keyframe ``i`` (weight ``w1``) with keyframe ``i - 1``, where
    ``w1 = sigmoid(d2 / (d1 + d2))`` with distances to the nominal chunk centres; the first chunk takes keyframe 0
    alone and the next keyframe is never used. Same return layout as :func:`linear_neighbors`
    (``prev``, ``next`` = own chunk's keyframe, weight of ``next``).
    """
    prev, nxt, weights = [], [], []
    for s in frames:
        i = s // batch_size
        if i == 0:
            prev.append(0)
            nxt.append(0)
            weights.append(1.0)
            continue
        p1 = i * batch_size + batch_size // 2
        p2 = (i - 1) * batch_size + batch_size // 2
        d1, d2 = abs(s - p1), abs(s - p2)
        w1 = torch.sigmoid(torch.tensor(d2 / (d1 + d2), dtype=torch.float32)).item()
        prev.append(i - 1)
        nxt.append(i)
        weights.append(w1)
    return prev, nxt, weights


def consecutive_runs(positions: list[int]) -> list[tuple[int, int]]:
    """Positions, in the given order, as maximal ``[start, stop)`` runs of consecutive increasing values."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs
