"""Keyframe schedules: which frames are edited jointly at each denoising step.

TokenFlow samples one random keyframe per chunk of ``batch_size`` frames, anew at every step (the paper's ablation
shows fixed keyframes flicker). A schedule is a callable ``(step, num_frames) -> sorted list of frame indices``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import InputError

__all__ = ["KeyframeSchedule", "RandomKeyframes", "FixedKeyframes", "ExplicitKeyframes", "make_schedule"]

KeyframeSchedule = Callable[[int, int], list[int]]


class RandomKeyframes:
    """One uniformly random frame per chunk of ``batch_size``, redrawn each step from a seeded generator.

    With a frame count that is a multiple of ``batch_size`` the draws equal the reference code's
    ``torch.randint(batch_size, (K,)) + arange(0, N, batch_size)`` after ``torch.manual_seed(seed)``.
    Steps must be asked for in order (each call draws the next step's keyframes).
    """

    def __init__(self, batch_size: int, seed: int = 0):
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, step: int, num_frames: int) -> list[int]:
        bs = self.batch_size
        full = num_frames // bs
        offsets = torch.randint(bs, (full,), generator=self.generator).tolist() if full else []
        rest = num_frames - full * bs
        if rest:
            offsets.append(int(torch.randint(rest, (1,), generator=self.generator)))
        return [i * bs + o for i, o in enumerate(offsets)]


class FixedKeyframes:
    """Evenly spaced keyframes, the same at every step (the paper's ablation): the middle frame of each chunk."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, step: int, num_frames: int) -> list[int]:
        bs = self.batch_size
        return [min(start + bs // 2, num_frames - 1) for start in range(0, num_frames, bs)]


class ExplicitKeyframes:
    """Keyframes given per step (e.g. from another implementation's run), in step order."""

    def __init__(self, per_step: Sequence[Sequence[int]]):
        self.per_step = [sorted(int(i) for i in step) for step in per_step]

    @classmethod
    def from_file(cls, path: str | Path) -> "ExplicitKeyframes":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"`keyframes` {path}: no such file; pass a JSON file with one list of frames per step")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"`keyframes` {path}: not valid JSON; expected one list of frame indices per step")
        if not isinstance(data, list) or not all(isinstance(s, list) and s for s in data):
            raise InputError(f"`keyframes` {path}: expected a JSON list with one non-empty list of frames per step")
        return cls(data)

    def __call__(self, step: int, num_frames: int) -> list[int]:
        if step >= len(self.per_step):
            raise InputError(
                f"keyframe schedule has {len(self.per_step)} steps but step {step + 1} was asked for; "
                "give one list per denoising step"
            )
        frames = self.per_step[step]
        if frames[0] < 0 or frames[-1] >= num_frames:
            raise InputError(f"keyframes {frames} of step {step} are outside the video's {num_frames} frames")
        return frames


def make_schedule(kind: str | KeyframeSchedule | Sequence, batch_size: int, seed: int = 0) -> KeyframeSchedule:
    """``"random"`` (default), ``"fixed"``, a path to a JSON file, explicit per-step lists or any callable."""
    if callable(kind):
        return kind
    if isinstance(kind, (list, tuple)):
        return ExplicitKeyframes(kind)
    if kind == "random":
        return RandomKeyframes(batch_size, seed)
    if kind == "fixed":
        return FixedKeyframes(batch_size)
    return ExplicitKeyframes.from_file(kind)
