"""The compact inversion cache (``cache_stride``): every N-th timestep on disk, the others recomputed exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokenflow.cli import main
from tokenflow.events import Cancelled
from tokenflow.inversion import InversionCache, LatentStore, StridedTimesteps, invert_frames, load_latents
from tokenflow.inversion.strided import (
    AUTO_FULL_CACHE_BYTES,
    COMPACT_ARRAYS_PER_FRAME,
    auto_cache_stride,
    resolve_cache_stride,
    stored_timesteps,
)
from tokenflow.errors import InputError


@pytest.fixture(scope="module")
def frames():
    """Seven frames: batches of 3 leave a short last batch (3, 3, 1)."""
    from tokenflow.testing import pan_frames

    return torch.from_numpy(pan_frames(num_frames=7, width=96, height=64, shift=4))


def _timestep_columns(entry) -> list[int]:
    return sorted(int(name[1:]) for name in LatentStore.open(entry).columns if name.startswith("t"))


@pytest.mark.parametrize("scheme", [dict(steps=10, inversion_steps=10, refinements=1),  # fixed-point, editing grid
                                    dict(steps=5, inversion_steps=20, refinements=0)])  # plain DDIM, finer grid
def test_a_strided_entry_gives_every_timestep_bit_for_bit(tiny_model, frames, tmp_path, scheme):
    kwargs = dict(scheme, batch_size=3, progress=False, check_frames=2)
    full = invert_frames(tiny_model, frames, cache=InversionCache(tmp_path / "full"), cache_stride=1, **kwargs)
    compact = invert_frames(tiny_model, frames, cache=InversionCache(tmp_path / "compact"), cache_stride=3,
                            **kwargs)
    save = sorted(full.noisy)
    assert isinstance(compact.noisy, StridedTimesteps) and sorted(compact.noisy) == save
    # on disk: every third timestep from the least noisy, and the noisiest
    (entry,) = InversionCache(tmp_path / "compact").entries()
    assert _timestep_columns(entry) == sorted(set(save[::3]) | {save[-1]}) == sorted(compact.noisy.stored)
    assert len(_timestep_columns(entry)) < len(save)
    # the reconstruction check walked the whole editing path, not only the stored timesteps
    assert compact.reconstruction_psnr == full.reconstruction_psnr
    for t in reversed(save):  # the editing loop's order
        for rows in ([0, 3, 6], slice(None)):
            assert torch.equal(compact.noisy[t][rows], full.noisy[t][rows]), t
    recomputed = [t for t in save if t not in compact.noisy.stored]
    assert compact.noisy.recomputed_evaluations > 0 and recomputed


def test_an_edit_from_a_strided_cache_equals_one_from_a_full_cache(pan_clip, tiny_model_dir, tmp_path):
    def edit(stride: str, out: str) -> dict:
        code = main(["edit", str(pan_clip), "-p", "a watercolor painting", "--model", str(tiny_model_dir),
                     "--size", "64", "--steps", "4", "--batch-size", "2", "--max-frames", "5", "--device", "cpu",
                     "--cache-dir", str(tmp_path / f"cache-{stride}"), "--cache-stride", stride, "--save-latents",
                     "--out", str(tmp_path / out), "--quiet"])
        assert code == 0
        report = json.loads((tmp_path / out / "run.json").read_text())
        assert (report["recomputed_source_evaluations"] > 0) == (stride != "1")  # paid on every edit
        return load_latents(tmp_path / out / "latents")

    full, compact = edit("1", "full"), edit("3", "compact")
    assert torch.equal(full["final"], compact["final"])
    assert sorted(full) == sorted(compact)  # --save-latents writes every timestep either way
    for name in full:
        assert torch.equal(full[name], compact[name]), name
    (entry,) = InversionCache(tmp_path / "cache-3").entries()
    assert len(_timestep_columns(entry)) < len([n for n in full if n.startswith("t")])
    again = edit("3", "again")  # a second edit hits the compact entry
    assert torch.equal(again["final"], full["final"])
    assert len(InversionCache(tmp_path / "cache-3").entries()) == 1
    assert not list((tmp_path / "cache-3").glob(".recomputed-*"))  # the scratch files went with the run


def test_a_strided_inversion_interrupted_inside_a_batch_resumes_bit_identical(tiny_model, frames, tmp_path,
                                                                              monkeypatch):
    """The checkpoint of a compact entry also holds the last (unstored) timestep, and the next run resumes from it."""
    kwargs = dict(steps=8, inversion_steps=8, refinements=1, batch_size=7, reconstruct=False, progress=False,
                  cache_stride=3)  # stored: the 1st, 4th, 7th and 8th saved timesteps
    monkeypatch.setattr(InversionCache, "checkpoint_seconds", 0.0)  # a checkpoint at every saved timestep
    calls, stop_at = [0], [11]  # in the 6th step (2 UNet calls a step): the last finished one, the 5th, not stored

    def count_and_stop(module, args):
        calls[0] += 1
        if calls[0] == stop_at[0]:
            raise Cancelled("stop")

    handle = tiny_model.unet.register_forward_pre_hook(count_and_stop)
    try:
        with pytest.raises(Cancelled):
            invert_frames(tiny_model, frames, cache=InversionCache(tmp_path / "a"), **kwargs)
        calls[0], stop_at[0] = 0, -1
        resumed = invert_frames(tiny_model, frames, cache=InversionCache(tmp_path / "a"), **kwargs)
        assert calls[0] == 2 * 3  # the 6th to 8th steps, not all 8
    finally:
        handle.remove()
    straight = invert_frames(tiny_model, frames, cache=InversionCache(tmp_path / "b"), **kwargs)
    assert _timestep_columns(InversionCache(tmp_path / "a").entries()[0]) == sorted(straight.noisy.stored)
    for t in straight.noisy:
        assert torch.equal(resumed.noisy[t][:], straight.noisy[t][:]), t


def test_auto_keeps_every_timestep_for_short_clips_and_at_most_1_mib_a_frame_for_long_ones():
    save = list(range(1, 1000, 20))  # 50 editing timesteps
    latent = (4, 64, 64)  # 512x512 SD: 64 KiB a latent array in float32
    assert auto_cache_stride(64, latent, save) == 1
    full_frames = AUTO_FULL_CACHE_BYTES // ((len(save) + 1) * math.prod(latent) * 4)
    assert auto_cache_stride(full_frames, latent, save) == 1
    stride = auto_cache_stride(full_frames + 1, latent, save)
    kept = len(stored_timesteps(save, stride)) + 1  # and the clean latents
    assert kept <= COMPACT_ARRAYS_PER_FRAME and kept * math.prod(latent) * 4 <= 1024**2
    assert len(stored_timesteps(save, stride - 1)) + 1 > COMPACT_ARRAYS_PER_FRAME  # the smallest such stride
    assert auto_cache_stride(9000, latent, save) == stride  # a 5-minute clip at 30 fps
    assert resolve_cache_stride("2", 10, latent, save) == 2 and resolve_cache_stride("auto", 10, latent, save) == 1
    for bad in ("0", "-1", "every"):
        with pytest.raises(InputError, match="cache_stride"):
            resolve_cache_stride(bad, 10, latent, save)


def test_stored_timesteps_keep_the_least_and_the_most_noisy():
    save = [1, 101, 201, 301, 401, 501, 601, 701, 801, 901, 951]
    assert stored_timesteps(save, 1) == save
    assert stored_timesteps(save, 4) == [1, 401, 801, 951]
    assert stored_timesteps(save, 5) == [1, 501, 951]
    assert stored_timesteps(save, 100) == [1, 951]


def test_recomputed_timesteps_left_by_a_killed_edit_are_removed_by_the_next(pan_clip, tiny_model_dir, tmp_path,
                                                                            caplog):
    """The scratch files of an edit killed without cleaning up (SIGKILL, OOM: a block of latents for every frame)
    go at the next compact-cache edit; a live process's and an unmarked folder stay."""
    import logging
    import os
    import socket
    import subprocess
    import sys

    cache = tmp_path / "cache"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    folders = {}
    for name, owner in (("dead", {"pid": dead, "host": socket.gethostname()}),
                        ("live", {"pid": os.getpid(), "host": socket.gethostname()}), ("unmarked", None)):
        folders[name] = cache / f".recomputed-{name}"
        folders[name].mkdir(parents=True)
        (folders[name] / "t000500.bin").write_bytes(b"\0" * 1024)
        if owner is not None:
            (folders[name] / "owner.json").write_text(json.dumps(owner))
    with caplog.at_level(logging.WARNING, logger="tokenflow"):
        code = main(["edit", str(pan_clip), "-p", "a watercolor painting", "--model", str(tiny_model_dir), "--size",
                     "64", "--steps", "4", "--batch-size", "2", "--max-frames", "3", "--device", "cpu", "--cache-dir",
                     str(cache), "--cache-stride", "3", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    assert not folders["dead"].exists() and folders["live"].exists() and folders["unmarked"].exists()
    assert f"process {dead} is gone" in caplog.text and str(folders["dead"]) in caplog.text
    assert sorted(p.name for p in cache.glob(".recomputed-*")) == [".recomputed-live", ".recomputed-unmarked"]
