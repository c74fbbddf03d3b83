"""Previews: side-by-side frames and the contact sheet."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from PIL import Image

from .size import resize_frames

log = logging.getLogger('tokenflow.io')


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two ``HxWx3`` frames next to each other; ``right`` is resized to ``left``'s height if needed."""
    left = np.asarray(left)
    right = np.asarray(right)
    if right.shape[0] != left.shape[0]:
        new_w = max(1, round(right.shape[1] * left.shape[0] / right.shape[0]))
        right = np.asarray(Image.fromarray(right).resize((new_w, left.shape[0]), Image.LANCZOS))
    return np.concatenate([left, right], axis=1)


def _evenly_spaced(frames: Sequence[np.ndarray], count: int) -> list[np.ndarray]:
    n = len(frames)
    if n == 0:
        raise ValueError("contact_sheet needs at least one frame in each row")
    count = min(count, n)
    picks = np.linspace(0, n - 1, count).round().astype(int)
    return [np.asarray(frames[i]) for i in picks]


def contact_sheet(
    top: Sequence[np.ndarray], bottom: Sequence[np.ndarray], columns: int = 4, gap: int = 4
) -> Image.Image:
    """Two-row overview: ``columns`` evenly spaced source frames on top, edited frames below.

    Every cell has the size of the first edited frame; cells are separated by
    ``gap`` white pixels.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = [_evenly_spaced(top, columns), _evenly_spaced(bottom, columns)]
    cell_h, cell_w = rows[1][0].shape[:2]
    ncols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (ncols * cell_w + (ncols - 1) * gap, 2 * cell_h + gap), "white")
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            cell = Image.fromarray(resize_frames(np.ascontiguousarray(frame), cell_w, cell_h))
            sheet.paste(cell, (c * (cell_w + gap), r * (cell_h + gap)))
    return sheet
