"""Shared, session-scoped fixtures: a tiny random-weight Stable Diffusion model and a small clip with audio."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One intra-op thread: the tiny models gain nothing from more, and on a loaded 2-core machine OpenMP threads
# oversubscribe badly (a tiny UNet call went from 0.02 s to 2.8 s).
torch.set_num_threads(1)

# A 144x96 source gives a non-square 96x64 working size at --size 64.
PAN_FRAMES, PAN_WIDTH, PAN_HEIGHT, PAN_SHIFT, PAN_FPS = 10, 144, 96, 4, 12


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD 2.x-shaped diffusers folder (random weights); pass it as ``--model``."""
    from tokenflow.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def pan_clip(tmp_path_factory) -> Path:
    """A 10-frame, 144x96, 12 fps H.264 mp4 of a camera pan, with an AAC tone as long as the clip."""
    from tokenflow.video import make_pan_clip

    path = tmp_path_factory.mktemp("pan-clip") / "pan.mp4"
    make_pan_clip(path, num_frames=PAN_FRAMES, width=PAN_WIDTH, height=PAN_HEIGHT, shift=PAN_SHIFT, fps=PAN_FPS,
                  audio=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model loaded once on the CPU in float32 (tests restore any processors they install)."""
    from tokenflow.models import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def pan6() -> torch.Tensor:
    """Six 96x64 uint8 frames of a 4 px/frame camera pan (a real photo), as the editor takes them."""
    from tokenflow.video import pan_frames

    return torch.from_numpy(pan_frames(num_frames=6, width=96, height=64, shift=4))
