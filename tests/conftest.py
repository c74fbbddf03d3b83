"""Shared, session-scoped fixtures: a tiny random-weight Stable Diffusion model and a small clip with audio."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# One intra-op thread by default: the tiny models gain nothing from more, and on a loaded 2-core machine OpenMP
# threads oversubscribe badly (a tiny UNet call went from 0.02 s to 2.8 s). TOKENFLOW_TEST_THREADS=2 runs the suite
# with two (other GEMM splits, other rounding): every test must hold either way.
THREADS = int(os.environ.get("TOKENFLOW_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)

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
    from tokenflow.testing import make_pan_clip

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
    from tokenflow.testing import pan_frames

    return torch.from_numpy(pan_frames(num_frames=6, width=96, height=64, shift=4))


# -- a variable-frame-rate clip

VFR_TIMES = [0.0, 0.083, 0.167, 0.333, 0.4, 0.6, 0.65, 0.7, 1.0, 1.1, 1.25, 1.3]  # seconds


def write_vfr_clip(path: Path, times=VFR_TIMES, width: int = 192, height: int = 128, audio: bool = False) -> None:
    """A pan whose frame i is shown at times[i] (pts set explicitly, millisecond time base); H.264 in mp4, FFV1
    in mkv; with ``audio`` an AAC tone as long as the clip (last frame shown 0.1 s)."""
    from fractions import Fraction

    import av
    import numpy as np

    from tokenflow.testing import pan_frames

    frames = pan_frames(num_frames=len(times), width=width, height=height)
    lossless = path.suffix == ".mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1" if lossless else "libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0" if lossless else "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if audio:
            rate = 44100
            sound = container.add_stream("aac", rate=rate, layout="mono")
            t = np.arange(round((times[-1] + 0.1) * rate)) / rate
            tone = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                              format="fltp", layout="mono")
            tone.sample_rate, tone.pts, tone.time_base = rate, 0, Fraction(1, rate)
            container.mux(sound.encode(tone))
            container.mux(sound.encode(None))
        for frame, t in zip(frames, times):
            image = av.VideoFrame.from_ndarray(frame, format="rgb24")
            image.pts, image.time_base = round(t * 1000), Fraction(1, 1000)
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))


def write_rotated_clip(path: Path, ccw: int, num_frames: int = 3, width: int = 192, height: int = 128):
    """A pan stored ``width`` x ``height`` with a display matrix turning it ``ccw`` degrees counter-clockwise, as a
    phone stores portrait footage; returns the stored frames (``uint8 [n, height, width, 3]``)."""
    import av

    from tokenflow.testing import pan_frames

    frames = pan_frames(num_frames=num_frames, width=width, height=height)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.set_display_rotation(ccw)
        for i, frame in enumerate(frames):
            image = av.VideoFrame.from_ndarray(frame, format="rgb24")
            image.pts = i
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))
    return frames


def audio_only(clip: Path, path: Path) -> Path:
    """``clip``'s audio stream alone (its packets copied) into ``path``: a file with no video stream."""
    import av

    with av.open(str(clip)) as inp, av.open(str(path), "w") as out:
        stream = inp.streams.audio[0]
        copy = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.size:
                packet.stream = copy
                out.mux(packet)
    return path


def frame_times(path: Path) -> tuple[list[float], float]:
    """Presentation times (seconds) of every decoded frame of ``path``, and its video time base."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [float(frame.time) for frame in container.decode(stream)], float(stream.time_base)


def assert_real_edit(out: Path, frames: int, size: tuple[int, int], other: Path | None = None) -> None:
    """``out`` holds an edit, not just files: ``edited.mp4`` has ``frames`` frames of ``size`` (w, h) like
    ``source.mp4``, and differs from it and from ``other``'s edit (another prompt's) by far more than H.264's
    re-encoding noise (a few grey levels on average). On a random-weight model the VAE round trip alone moves the
    frames (measured ~57 levels), so it is the comparison with ``other`` (measured 12-25) that shows the prompt
    reached the UNet."""
    import numpy as np

    from tokenflow.io import load_frames

    edited, source = load_frames(out / "edited.mp4")[0], load_frames(out / "source.mp4")[0]
    assert edited.shape == source.shape == (frames, size[1], size[0], 3), (edited.shape, source.shape)
    assert np.abs(edited.astype(np.int16) - source).mean() > 5
    if other is not None:
        assert np.abs(edited.astype(np.int16) - load_frames(other / "edited.mp4")[0]).mean() > 5


@pytest.fixture
def record_difference(request):
    """``record(value, what)``: a numerically sensitive test's measured difference, appended as one JSON line to
    ``$TOKENFLOW_NUMERICS_LOG`` when that is set (``scripts/numerics_sweep.sh`` collects the worst per test over
    kernel variants and thread counts); returns ``value``."""

    def record(value, what: str = "max abs difference"):
        path = os.environ.get("TOKENFLOW_NUMERICS_LOG")
        if path:
            variant = {k: os.environ.get(k, "") for k in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
            entry = {"test": request.node.nodeid, "what": what, "value": float(value), "threads": THREADS,
                     "capability": torch.backends.cpu.get_cpu_capability(), **variant}
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        return value

    return record


FP32_UNIT_ROUNDOFF = 2.0**-24
TINY_UNET_CONTRACTION = 576  # the longest sum in the tiny UNet: a 3x3 convolution over 64 channels (skip concat)


def reordering_tolerance(
    reference: torch.Tensor, unet_evaluations: int = 1, guidance: float = 0.0, contraction: int = TINY_UNET_CONTRACTION
) -> float:
    """Absolute tolerance between two float32 runs of the same maths whose sums are ordered differently (another
    batch size, CPU kernel or thread split), at the scale of ``reference``.

    A sum of K float32 terms rounds to about sqrt(K) * u of its magnitude when the roundings are independent
    (u = 2^-24); one UNet evaluation carries that relative difference to its output (its gain is about 1).
    Classifier-free guidance ``uncond + g * (cond - uncond)`` adds the branches' differences with weight up to
    1 + 2g, and the differences of successive denoising steps add up. Anything that really changes the computation
    (frames that leak into each other, another layer, another keyframe) moves the latents by 1e-3 or more.
    """
    per_evaluation = contraction**0.5 * FP32_UNIT_ROUNDOFF
    return float(reference.abs().max()) * per_evaluation * (1 + 2 * guidance) * unet_evaluations
