"""A compact inversion cache: every ``stride``-th saved timestep on disk, the ones between recomputed when read.

An edit reads the source latents of every editing timestep, and keeping all of them costs 50 latent arrays a frame
(3.3 MB at 512 px in float32). Storing them in float16 would halve that but moves the edit by more than the
reference-equality tolerances (measured: 2e-4 on the latents, 1.9e-3 on TokenFlow's median frame against 1e-3).
So a strided entry keeps the timesteps exactly, at every ``stride``-th one (and the noisiest), and recomputes the
others from the stored one below them with the inversion's own step function, on the inversion's own batches of
frames (the entry's shards): the same operations on the same numbers, so the same latents, bit for bit. The price
is those inversion steps again, once per edit: ``(stride - 1) / stride`` of the inversion's UNet evaluations.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ..backbones import Backbone, TextConditioning
from ..errors import InputError
from ..io.disktensor import DiskTensor
from ..io.owner import dead_owner, write_owner
from .ddim import _invert_batch
from .storage import LatentColumn, timestep_name

logger = logging.getLogger("tokenflow.inversion")

SCRATCH_PREFIX = ".recomputed-"  # a compact entry's recomputed timesteps, under the cache root while an edit runs


def _remove_dead_scratch(root: Path) -> None:
    """Remove the recomputed-timestep folders under ``root`` of edits on this machine whose process is gone
    (killed without a chance to clean up: a block of latents for every frame each), one log line each."""
    for folder in root.glob(SCRATCH_PREFIX + "*"):
        pid = dead_owner(folder)
        if pid is not None:
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("removed %s: recomputed timesteps of an earlier edit that did not finish (process %d is "
                           "gone)", folder, pid)

__all__ = ["stored_timesteps", "auto_cache_stride", "resolve_cache_stride", "StridedTimesteps",
           "AUTO_FULL_CACHE_BYTES", "COMPACT_ARRAYS_PER_FRAME"]

# ``cache_stride="auto"`` keeps every timestep while the whole entry stays under this (fast re-edits of the clips
# most people edit; 4 GiB is ~1300 frames at 512 px and 50 steps) and goes compact beyond it, where a long clip's
# cache would otherwise take tens of GB (30 GB for 5 minutes at 30 fps).
AUTO_FULL_CACHE_BYTES = 4 * 1024**3
# A compact entry keeps at most this many latent arrays a frame, the clean ones included: 1 MiB at 512 px (64 KiB
# a latent array).
COMPACT_ARRAYS_PER_FRAME = 16


def stored_timesteps(save: Sequence[int], stride: int) -> list[int]:
    """The saved timesteps a ``stride`` entry keeps: every ``stride``-th from the least noisy, and the noisiest
    (the start latent's noise comes from it)."""
    save = sorted(save)
    return sorted(set(save[::stride]) | {save[-1]})


def auto_cache_stride(frames: int, latent_shape: Sequence[int], save: Sequence[int]) -> int:
    """The stride ``auto`` picks: 1 while every timestep of ``frames`` frames fits :data:`AUTO_FULL_CACHE_BYTES`,
    else the smallest that keeps :data:`COMPACT_ARRAYS_PER_FRAME` arrays a frame (or fewer)."""
    array = math.prod(latent_shape) * 4
    if frames * (len(save) + 1) * array <= AUTO_FULL_CACHE_BYTES:
        return 1
    for stride in range(1, len(save) + 1):
        if len(stored_timesteps(save, stride)) + 1 <= COMPACT_ARRAYS_PER_FRAME:
            return stride
    return len(save)


def resolve_cache_stride(value: int | str | None, frames: int, latent_shape: Sequence[int],
                         save: Sequence[int]) -> int:
    """``cache_stride`` as given (``auto``/None, or a number >= 1) -> the stride to use."""
    if value in (None, "auto"):
        return auto_cache_stride(frames, latent_shape, save)
    try:
        stride = int(value)
    except (TypeError, ValueError):
        stride = 0
    if stride < 1:
        raise InputError(f"`cache_stride` {value!r}: use auto or a number >= 1 (1 keeps every timestep)")
    return stride


class _RecomputedColumn(LatentColumn):
    """One recomputed timestep: reading any frames of it recomputes its block (all frames, once)."""

    def __init__(self, owner: "StridedTimesteps", t: int, shape, like: LatentColumn):
        super().__init__(timestep_name(t), [], shape, torch.float32)
        self._owner, self._t = owner, t
        self.shards = like.shards  # where it comes from (repr, and the frames' batches)

    def _read(self, positions: list[int]) -> torch.Tensor:
        return self._owner.read(self._t, positions)


class StridedTimesteps(Mapping):
    """``timestep -> latents`` of a strided cache entry, for :class:`~tokenflow.inversion.SourceLatents.noisy`.

    Stored timesteps are the entry's own columns; the others are :class:`LatentColumn` s whose first read recomputes
    their block (the timesteps between two stored ones) for every frame, into files of a scratch folder under
    ``scratch`` (only the current block is kept; host memory holds one batch). ``stored``: the entry's columns;
    ``save``: every saved timestep; ``grid``: the inversion's timesteps; ``cond``/``refinements``: its conditioning
    and scheme; ``batches``: the inversion's batches of frames, ``[start, stop)`` (default: the entry's shards).
    """

    def __init__(self, stored: Mapping[int, LatentColumn], save: Sequence[int], model: Backbone,
                 cond: TextConditioning, grid: Sequence[int], refinements: int, scratch: str | Path | None = None,
                 batches: Sequence[Sequence[int]] | None = None):
        self.stored = dict(stored)
        self.save = sorted(save)
        missing = [t for t in self.stored if t not in self.save]
        if missing or self.save[-1] not in self.stored or self.save[0] not in self.stored:
            raise ValueError(f"stored timesteps {sorted(self.stored)} do not fit the saved ones {self.save}")
        self.model, self.cond, self.grid, self.refinements = model, cond, list(grid), refinements
        first = self.stored[self.save[-1]]
        self._shape = tuple(first.shape)
        self._columns = {t: self.stored[t] if t in self.stored else _RecomputedColumn(self, t, self._shape, first)
                         for t in self.save}
        self._scratch_root = Path(scratch) if scratch is not None else None
        self._folder: Path | None = None
        self._block: dict[int, DiskTensor] = {}
        self._batches = [tuple(b) for b in batches] if batches else None
        self.recomputed_evaluations = 0  # UNet frame evaluations spent recomputing (for reports)

    def __getitem__(self, t: int):
        return self._columns[t]

    def __iter__(self) -> Iterator[int]:
        return iter(self.save)

    def __len__(self) -> int:
        return len(self.save)

    def _scratch(self) -> Path:
        if self._folder is None:
            root = self._scratch_root
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
                _remove_dead_scratch(root)
            self._folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=root))
            write_owner(self._folder)
            weakref.finalize(self, shutil.rmtree, str(self._folder), True)  # also at exit
        return self._folder

    def close(self) -> None:
        """Remove the scratch files now (they also go when this object does)."""
        self._block = {}
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def read(self, t: int, positions: list[int]) -> torch.Tensor:
        if t not in self._block:
            self._recompute_block(t)
        return self._block[t][positions]

    def _recompute_block(self, t: int) -> None:
        """Recompute every timestep between the stored one below ``t`` and the stored one above it."""
        base = max(s for s in self.stored if s < t)
        above = min(s for s in self.stored if s > t)
        targets = [s for s in self.save if base < s < above]
        for old in self._block.values():
            old.path.unlink(missing_ok=True)
        folder = self._scratch()
        self._block = {s: DiskTensor(folder / f"t{s}.f32", self._shape) for s in targets}
        grid = self.grid[: self.grid.index(targets[-1]) + 1]
        column = self.stored[base]
        logger.debug("recomputing the source latents of timesteps %s from %d", targets, base)
        # the inversion's own batches (one shard each): the same chain on the same numbers as when it ran
        spans = self._batches or [(s.start, s.stop) for s in column.shards] or [(0, self._shape[0])]
        for a, z in spans:
            def on_saved(s: int, x: torch.Tensor, a=a, z=z) -> None:
                if s in self._block:
                    self._block[s][a:z] = x

            _invert_batch(self.model, None, self.cond, grid, targets, on_saved, resume=(base, column[a:z]),
                          refinements=self.refinements)
            self.recomputed_evaluations += (z - a) * (len(grid) - grid.index(base) - 1) * (1 + self.refinements)
