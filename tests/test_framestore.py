"""Frames staged on disk (FrameStore): array-like reads, the same cache key as in memory, one-line errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from tokenflow.errors import InputError
from tokenflow.io import FrameStore
from tokenflow.inversion import InversionCache
from tokenflow.testing import pan_frames


@pytest.fixture()
def frames() -> np.ndarray:
    return pan_frames(num_frames=7, width=24, height=16, shift=2)


@pytest.fixture()
def store(frames, tmp_path) -> FrameStore:
    return FrameStore.write(tmp_path / "f.rgb", iter(frames))


def test_reads_like_the_array_it_was_written_from(frames, store):
    assert store.shape == frames.shape and len(store) == 7 and store.ndim == 4
    for index in (0, 6, -1, slice(2, 5), slice(None), slice(5, 2), slice(1, None, 3), [6, 0, 0, 3], np.array([2, -2]),
                  range(4, 6)):
        got = store[index]
        assert got.dtype == np.uint8 and np.array_equal(got, frames[index]), index
    assert np.array_equal(np.asarray(store), frames)
    assert torch.equal(torch.as_tensor(store[1:3]), torch.from_numpy(frames[1:3]))
    for bad in (7, -8, [0, 7]):
        with pytest.raises(IndexError):
            store[bad]


def test_its_hash_is_the_hash_of_the_stacked_bytes_so_the_cache_key_is_the_same(frames, store, tiny_model):
    assert store.sha256().hexdigest() == hashlib.sha256(frames.tobytes()).hexdigest()
    assert store.sha256().hexdigest() == store.sha256().hexdigest()  # reading the hash does not consume it
    key = InversionCache.key(store, tiny_model, "p", [1, 2], [2])
    assert key == InversionCache.key(torch.from_numpy(frames), tiny_model, "p", [1, 2], [2])
    assert key != InversionCache.key(torch.from_numpy(frames[::-1].copy()), tiny_model, "p", [1, 2], [2])


def test_frames_of_two_sizes_or_none_are_one_line_errors(frames, tmp_path):
    other = np.zeros((16, 20, 3), np.uint8)
    with pytest.raises(InputError, match=r"clip.mp4: frame size changes mid-video \(24x16 then 20x16\)"):
        FrameStore.write(tmp_path / "a.rgb", [frames[0], other], source="clip.mp4")
    with pytest.raises(InputError, match="no frames"):
        FrameStore.write(tmp_path / "b.rgb", [], source="clip.mp4")
