"""Long videos in bounded memory: windowed keyframe attention, host-side keyframe cache, lazy and resumable inversion.

Run as a script (``python tests/test_long_video.py MODEL_DIR FRAMES SIZE STEPS KEYFRAMES``) it is the worker of
the host-memory test: one invert + edit in a fresh process, printing its peak memory growth as JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenflow.attention import (
    KeyframeCache,
    KeyframeCall,
    KeyframeTokens,
    PropagationCall,
    TokenFlowState,
    anchor_positions,
    attention_break_even,
    auto_keyframe_batch,
    auto_keyframe_window,
    extended_attention,
    keyframe_key_sets,
    tokenflow_attention,
    windowed_extended_attention,
)
from tokenflow.editor import EditConfig, TokenFlowEditor, _KeyframePlan
from tokenflow.events import Cancelled
from tokenflow.inversion import (
    CorruptLatents,
    InversionCache,
    LatentColumn,
    LatentStore,
    SourceLatents,
    inversion_grid,
    invert_frames,
    load_latents,
    write_latents,
)
from tokenflow.inversion.storage import shard_name
from tokenflow.models import load_model
from tokenflow.testing import pan_frames

from conftest import reordering_tolerance


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def frames(pan6) -> torch.Tensor:
    return pan6


@pytest.fixture(scope="module")
def source(model, frames) -> SourceLatents:
    return invert_frames(model, frames, steps=3, inversion_steps=6, reconstruct=False, progress=False)


def _config(**kw) -> EditConfig:
    base = dict(prompt="a robot", steps=3, batch_size=2, seed=0)
    base.update(kw)
    return EditConfig(**base)


def _long_config(monkeypatch, keyframe_window=None, anchors=0, offload_cache=False, **kw) -> EditConfig:
    """An EditConfig with the long-video options (``keyframe_window=None``: full attention)."""
    return _config(keyframe_window=keyframe_window, anchors=anchors, offload_cache=offload_cache, **kw)


# -- windowed extended attention ------------------------------------------------------------------------------


def _qkv(n, seed=0, dtype=torch.float64, b=2, heads=2, length=5, d=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads, length, d, generator=g, dtype=dtype) for _ in range(3)]


def _naive_windowed(q, k, v, window, anchors):
    b, n, heads, length, d = q.shape
    extra = set(anchor_positions(n, anchors))
    out = torch.empty_like(q)
    for j in range(n):
        keys = sorted(set(range(max(0, j - window), min(n - 1, j + window) + 1)) | extra)
        for bi in range(b):
            for h in range(heads):
                kk = torch.cat([k[bi, i, h] for i in keys])
                vv = torch.cat([v[bi, i, h] for i in keys])
                out[bi, j, h] = torch.softmax(q[bi, j, h] @ kk.T / math.sqrt(d), dim=-1) @ vv
    return out


@pytest.mark.parametrize("n", [1, 2, 5])
def test_a_window_covering_every_keyframe_is_full_extended_attention_exactly(n):
    q, k, v = _qkv(n, dtype=torch.float32)
    full = extended_attention(q, k, v)
    for window, anchors in [(None, 0), (None, 3), (n - 1, 0), (n + 5, 2)]:
        assert torch.equal(windowed_extended_attention(q, k, v, window, anchors), full)


@pytest.mark.parametrize("n, window, anchors", [(7, 1, 0), (7, 2, 0), (7, 1, 1), (9, 1, 2), (6, 0, 0), (8, 2, 3)])
def test_windowed_attention_equals_a_naive_loop(n, window, anchors):
    q, k, v = _qkv(n, seed=n + window + anchors)
    out = windowed_extended_attention(q, k, v, window, anchors)
    torch.testing.assert_close(out, _naive_windowed(q, k, v, window, anchors), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, extended_attention(q, k, v))


def test_key_sets_are_the_window_plus_anchors_and_cost_linear_in_keyframes():
    assert anchor_positions(8, 1) == [4] and anchor_positions(8, 2) == [2, 6] and anchor_positions(3, 9) == [0, 1, 2]
    groups = dict((tuple(q), k) for q, k in keyframe_key_sets(8, 1, anchors=1))
    assert groups[(0,)] == [0, 1, 4] and groups[(4,)] == [3, 4, 5] and groups[(7,)] == [4, 6, 7]
    # queries sharing a key set share one attention call
    assert keyframe_key_sets(5, 3) == [([0], [0, 1, 2, 3]), ([1, 2, 3], [0, 1, 2, 3, 4]), ([4], [1, 2, 3, 4])]
    for n in (16, 64, 256):  # keys attended per keyframe stay at most 2K + 1 + anchors: O(n K) in all
        total = sum(len(q) * len(k) for q, k in keyframe_key_sets(n, 2, anchors=2))
        assert total <= n * (2 * 2 + 1 + 2)


def test_auto_window_is_full_within_the_budget_and_a_window_beyond():
    assert auto_keyframe_window(4, 4096, budget_tokens=16 * 4096) is None
    assert auto_keyframe_window(16, 4096, budget_tokens=16 * 4096) is None
    # past 16 keyframes: calls of 16, half context (2 * 3 + 1 anchor) and half computed (9)
    assert auto_keyframe_window(17, 4096, budget_tokens=16 * 4096, anchors=1) == 3
    assert auto_keyframe_batch(3, 4096, budget_tokens=16 * 4096, anchors=1) == 9
    assert auto_keyframe_window(125, 4096, budget_tokens=16 * 4096, anchors=3) == 3
    assert auto_keyframe_window(500, 4096, budget_tokens=4096) == 1  # never below one neighbour on each side
    assert auto_keyframe_batch(1, 4096, budget_tokens=4096) == 1
    # the editor's defaults: SD at 512 px (64x64 latents), batch size 8: full up to 11 keyframes (compute), then a
    # window of 4 in one call while 16 keyframes fit, then the memory window (3) in calls of 9
    config = EditConfig(prompt="p")
    assert config.resolve_keyframe_window(88, 64 * 64) is None
    assert config.resolve_keyframe_window(89, 64 * 64) == 4
    assert config.resolve_keyframe_batch(4, 64 * 64, 128) is None
    assert config.resolve_keyframe_batch(None, 64 * 64) is None
    window = config.resolve_keyframe_window(1000, 64 * 64)
    assert (window, config.resolve_keyframe_batch(window, 64 * 64, 1000)) == (3, 9)
    assert EditConfig(prompt="p", keyframe_batch="all").resolve_keyframe_batch(3, 4096) is None


@pytest.mark.parametrize("batch_size", range(1, 17))
@pytest.mark.parametrize("anchors", [0, 1, 2])
def test_auto_window_keeps_keyframe_attention_within_the_per_frame_attention_it_replaces(batch_size, anchors):
    """Per step, per-frame editing attends 3 N times within a frame; TokenFlow attends once per keyframe within
    it (the source branch) and twice over the keyframes each keyframe sees (the edited branches), and not at all
    for the N - N / batch_size propagated frames. With the auto window (compute only: small frames) the keyframe
    pass's attention, counted in key frames over the groups it really runs, never passes the per-frame total."""
    tokens = 4  # tiny frames: the memory budget never binds
    for frames in range(batch_size, 400 * batch_size, 7 * batch_size):
        config = EditConfig(prompt="p", batch_size=batch_size, anchors=anchors)
        keyframes = -(-frames // batch_size)
        window = config.resolve_keyframe_window(frames, tokens)
        if 3 + anchors > attention_break_even(batch_size):  # no window can stay under it: memory rules alone
            assert window is None
            continue
        elif window is None:
            assert keyframes <= attention_break_even(batch_size)
        else:  # the widest window whose keyframes (away from the ends) stay under it
            assert 2 * (window + 1) + 1 + anchors > attention_break_even(batch_size)
        seen = sum(len(queries) * len(keys) for queries, keys in keyframe_key_sets(keyframes, window, anchors))
        assert keyframes + 2 * seen <= 3 * keyframes * batch_size, (frames, window)


def test_windowed_keyframe_pass_in_the_unet(model):
    g = torch.Generator().manual_seed(1)
    n = 5
    latents = torch.randn(3 * n, 4, 8, 12, generator=g)
    text = torch.randn(3 * n, 77, model.text_encoder.config.hidden_size, generator=g)

    def run(**options):
        state = TokenFlowState()
        with tokenflow_attention(model.unet, state), state.calling(KeyframeCall.all(n, store=False, **options)):
            return model.unet(latents, 501, encoder_hidden_states=text).sample

    full = run()
    assert torch.equal(run(window=n - 1, anchors=2), full)
    windowed = run(window=1)
    assert not torch.allclose(windowed, full, atol=1e-4)
    # the source branch never shares attention, so it is untouched by the window
    assert torch.equal(windowed[:n], full[:n])


def test_editing_with_a_covering_window_is_exactly_the_full_edit(model, source, monkeypatch):
    full = TokenFlowEditor(model).edit(source, _long_config(monkeypatch), progress=False)
    # 6 frames / batch 2: 3 keyframes, which a window of 2 covers
    covering = _long_config(monkeypatch, keyframe_window=2, anchors=1)
    assert torch.equal(TokenFlowEditor(model).edit(source, covering, progress=False).latents, full.latents)
    narrow = _long_config(monkeypatch, keyframe_window=0)
    assert not torch.equal(TokenFlowEditor(model).edit(source, narrow, progress=False).latents, full.latents)


# -- the keyframe pass in calls of a bounded size ------------------------------------------------------------------


@pytest.mark.parametrize("k, batch, window, anchors", [(5, 2, 1, 0), (13, 4, 2, 1), (40, 9, 3, 1), (40, 1, 1, 2)])
def test_keyframe_calls_compute_every_keyframe_once_with_its_whole_window(k, batch, window, anchors):
    plan = _KeyframePlan(window, anchors, batch)
    splits = []
    for step in range(6):
        calls = plan.calls(k, step)
        computed = [call.positions[r] for call in calls for r in call.rows]
        assert computed == list(range(k))  # each once, in time order
        done = 0
        for call in calls:
            rows = [call.positions[r] for r in call.rows]
            assert rows == list(range(done, call.computed))
            assert len(rows) <= batch and len(call.positions) <= batch + 2 * window + anchors
            needed = set(range(max(0, rows[0] - window), min(k, rows[-1] + window + 1))) | set(anchor_positions(k, anchors))
            assert set(call.positions) == needed and call.positions == sorted(needed)
            done = call.computed
        splits.append(tuple(call.computed for call in calls))
    assert len(set(splits)) > 1 or batch == 1  # the split points move between steps


def test_one_call_when_the_batch_covers_every_keyframe_or_attention_is_full():
    for plan in (_KeyframePlan(2, 1, 10), _KeyframePlan(None, 1, 3), _KeyframePlan(2, 1, None)):
        (call,) = plan.calls(10, step=3)
        assert call.positions == call.rows == list(range(10)) and call.computed == 10


def test_key_sets_of_a_call_holding_some_keyframes_follow_their_true_positions():
    positions = [3, 4, 5, 6, 7, 8, 12]  # a call's keyframes among 16, 12 being an anchor
    window, anchors = 1, 2
    assert anchor_positions(16, anchors) == [4, 12]
    groups = keyframe_key_sets(16, window, anchors, positions)
    keys_of = {row: keys for queries, keys in groups for row in queries}
    assert sorted(keys_of) == list(range(len(positions)))
    for row, j in enumerate(positions):
        expected = [r for r, p in enumerate(positions) if abs(p - j) <= window or p in (4, 12)]
        assert keys_of[row] == expected, (j, keys_of[row], expected)
    q, k, v = _qkv(len(positions), seed=3)
    out = windowed_extended_attention(q, k, v, window, anchors, positions, 16)
    for row in range(len(positions)):  # against plain attention over each row's key set
        keys = keys_of[row]
        for b in range(q.shape[0]):
            for h in range(q.shape[2]):
                kk, vv = torch.cat([k[b, i, h] for i in keys]), torch.cat([v[b, i, h] for i in keys])
                expected = torch.softmax(q[b, row, h] @ kk.T / math.sqrt(q.shape[-1]), dim=-1) @ vv
                torch.testing.assert_close(out[b, row, h], expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def source16(model) -> SourceLatents:
    clip = torch.from_numpy(pan_frames(num_frames=16, width=64, height=64, shift=3))
    return invert_frames(model, clip, steps=3, inversion_steps=6, reconstruct=False, progress=False)


@pytest.mark.numerics
@pytest.mark.parametrize("blending", ["linear", "reference"])
def test_keyframe_pass_in_calls_equals_one_call_when_keyframes_only_share_anchors(
    model, source16, blending, record_difference
):
    """Window 0 + one anchor: a keyframe attends to itself and the anchor, whose features every call computes
    the same way, so splitting the pass changes nothing but the order of work: the result must be the one-call
    result (up to batch-size-dependent float rounding), while the cache holds a few keyframes instead of all."""
    kw = dict(batch_size=2, keyframe_window=0, anchors=1, steps=3, seed=4, blending=blending)
    one = TokenFlowEditor(model).edit(source16, _config(keyframe_batch="all", **kw), progress=False)
    split = TokenFlowEditor(model).edit(source16, _config(keyframe_batch=2, **kw), progress=False)
    assert split.keyframes == one.keyframes and len(one.keyframes[0]) == 8
    # other batch sizes per call: fp32 reordering through guidance 7.5 and 3 steps (conftest.reordering_tolerance);
    # a wrong keyframe or token would differ by O(0.1)
    difference = record_difference((split.latents - one.latents).abs().max())
    assert difference <= reordering_tolerance(one.latents, unet_evaluations=3, guidance=7.5), difference
    assert one.max_cached_keyframes == 8 and one.max_keyframes_per_call == 8
    assert split.max_keyframes_per_call <= 2 + 1  # two computed + the anchor
    # the call's two plus what the pending batch of two frames still blends (at most three keyframes)
    assert split.max_cached_keyframes <= 2 + 3
    # and with a real window the split pass is an approximation, not a different edit
    windowed = dict(kw, keyframe_window=1)
    one = TokenFlowEditor(model).edit(source16, _config(keyframe_batch="all", **windowed), progress=False)
    split = TokenFlowEditor(model).edit(source16, _config(keyframe_batch=2, **windowed), progress=False)
    assert not torch.equal(split.latents, one.latents)
    assert (split.latents - one.latents).abs().max() < 0.1 * one.latents.abs().max()


def test_the_command_edits_with_a_split_keyframe_pass(tiny_model_dir, pan_clip, tmp_path):
    from tokenflow.cli import main
    from tokenflow.io import probe

    out = tmp_path / "out"
    rc = main(["edit", str(pan_clip), "--prompt", "a robot", "--model", str(tiny_model_dir), "--out", str(out),
               "--size", "64", "--steps", "2", "--inversion-steps", "2", "--batch-size", "2", "--keyframe-window", "1",
               "--keyframe-batch", "2", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    report = json.loads((out / "run.json").read_text())
    assert report["parameters"]["keyframe_batch"] == 2 and len(report["keyframes"][0]) == 5
    assert probe(out / "edited.mp4").num_frames == 10
    assert sorted(p.name for p in out.iterdir()) == ["edited.mp4", "preview.png", "run.json", "side_by_side.mp4",
                                                      "source.mp4"]  # the staged frames are gone


def test_editing_progress_counts_frames_with_a_rate_and_an_eta(model, source16, capsys):
    TokenFlowEditor(model).edit(source16, _config(batch_size=2, steps=3), progress=True)
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    # 3 steps x 16 frames, a rate in frames and elapsed<remaining
    assert final.startswith("editing: 100%") and "48/48" in final and "step 3/3" in final, final
    assert re.search(r"\d+:\d+<\d+:\d+, +[\d.]+(frame/s|s/frame)", final), final
    invert_frames(model, pan_frames(num_frames=5, width=64, height=64, shift=3), steps=3, inversion_steps=6,
                  reconstruct=False, progress=True)
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("inversion: 100%") and "| 5/5 frames [" in final, final
    assert re.search(r"\d+:\d+<\d+:\d+, +[\d.]+(frame/s|s/frame)", final), final


# -- keyframe token cache in host memory ------------------------------------------------------------------------


def test_offloaded_keyframe_cache_gives_identical_edits_and_moves_only_the_needed_keyframes(model, source, monkeypatch):
    kw = dict(batch_size=2, keyframes=[[0, 2, 5]] * 3)
    on_device = TokenFlowEditor(model).edit(source, _long_config(monkeypatch, **kw), progress=False)
    fetched, stored = [], []
    original_fetch, original_store = KeyframeCache.fetch, KeyframeCache.store

    def fetch(self, name, positions, device):
        fetched.append(list(positions))
        return original_fetch(self, name, positions, device)

    def store(self, name, positions, tokens, rows=None, offload=False):
        original_store(self, name, positions, tokens, rows, offload)
        kept = self._layers[name][positions[0]][1]
        stored.append(kept.untyped_storage().data_ptr() != tokens.outputs.untyped_storage().data_ptr())

    monkeypatch.setattr(KeyframeCache, "fetch", fetch)
    monkeypatch.setattr(KeyframeCache, "store", store)
    offloaded = TokenFlowEditor(model).edit(source, _long_config(monkeypatch, offload_cache=True, **kw), progress=False)
    assert torch.equal(offloaded.latents, on_device.latents)
    assert stored and all(stored)  # a copy of its own, not a view keeping the keyframe pass's tensors alive
    # propagated frames 1, 3, 4 in batches of 2: [1, 3] needs keyframes 0, 1, 2 (positions), [4] only 1 and 2
    assert {tuple(p) for p in fetched} == {(0, 1, 2), (1, 2)}


def test_the_host_copy_path_runs_on_the_cpu_and_gives_separate_identical_tensors(model, source, monkeypatch):
    """With ``offload_cache`` the keyframe tokens go through :func:`to_host` on every device, the CPU included."""
    from tokenflow import attention

    x = torch.arange(24.0).view(2, 3, 4)
    copy = attention.to_host(x)
    assert torch.equal(copy, x) and copy.device.type == "cpu"
    assert copy.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # a tensor of its own
    calls = []
    real = attention.to_host
    monkeypatch.setattr(attention, "to_host", lambda t: calls.append(t.shape) or real(t))
    kw = dict(batch_size=2, keyframes=[[0, 2, 5]] * 3)
    offloaded = TokenFlowEditor(model).edit(source, _long_config(monkeypatch, offload_cache=True, **kw), progress=False)
    assert calls  # the host path really ran
    count = len(calls)
    kept = TokenFlowEditor(model).edit(source, _long_config(monkeypatch, offload_cache=False, **kw), progress=False)
    assert len(calls) == count  # and only with offloading on
    assert torch.equal(offloaded.latents, kept.latents)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned, non-blocking CUDA host copy needs a CUDA GPU")
def test_offloaded_keyframe_tokens_are_pinned_host_copies_of_cuda_tensors():
    g = torch.Generator().manual_seed(0)
    tokens = KeyframeTokens(source_inputs=torch.randn(3, 5, 2, generator=g).cuda(),
                            outputs=torch.randn(3, 3, 5, 2, generator=g).cuda())
    cache = KeyframeCache()
    cache.store("a", [0, 1], tokens, rows=[0, 2], offload=True)
    held = cache._layers["a"][0][1]
    assert held.device.type == "cpu" and held.is_pinned()
    got = cache.fetch("a", [1, 0], "cuda")
    torch.cuda.synchronize()
    assert got.outputs.is_cuda and torch.equal(got.outputs, tokens.outputs[:, [2, 0]])
    assert torch.equal(got.source_inputs, tokens.source_inputs[[2, 0]])


def test_keyframe_cache_keeps_copies_per_position_and_drops_the_old_ones():
    cache = KeyframeCache()
    g = torch.Generator().manual_seed(0)
    tokens = KeyframeTokens(source_inputs=torch.randn(4, 3, 2, generator=g), outputs=torch.randn(3, 4, 3, 2, generator=g))
    cache.store("a", [7, 9], tokens, rows=[1, 3])
    got = cache.fetch("a", [9, 7, 9], "cpu")
    assert torch.equal(got.source_inputs, tokens.source_inputs[[3, 1, 3]])
    assert torch.equal(got.outputs, tokens.outputs[:, [3, 1, 3]])
    tokens.outputs.zero_()  # the cache holds copies
    assert not torch.equal(cache.fetch("a", [7], "cpu").outputs, tokens.outputs[:, [1]])
    cache.store("a", [10], tokens, rows=[0])
    assert cache.positions() == [7, 9, 10]
    cache.drop_before(9)
    assert cache.positions() == [9, 10]
    with pytest.raises(RuntimeError, match="position 7 .* not stored"):
        cache.fetch("a", [7], "cpu")


def test_offloaded_propagation_matches_on_device_propagation_with_real_neighbours(model):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(12, 4, 8, 8, generator=g)
    text = torch.randn(12, 77, model.text_encoder.config.hidden_size, generator=g)
    outs = []
    for offload in (False, True):
        state = TokenFlowState(offload_cache=offload)
        with tokenflow_attention(model.unet, state):
            with state.calling(KeyframeCall.all(4, window=1)):
                model.unet(latents, 301, encoder_hidden_states=text)
            assert state.cache.devices() == {"cpu"} and len(state.cache) > 0
            with state.calling(PropagationCall((0, 1, 3, 2), (1, 2, 3, 3), (0.25, 0.5, 1.0, 0.75))):
                outs.append(model.unet(latents, 301, encoder_hidden_states=text).sample)
    assert torch.equal(outs[0], outs[1])


# -- source latents on disk ------------------------------------------------------------------------------------


def test_lazy_source_latents_equal_the_in_memory_ones_and_edit_identically(
    model, frames, source, tmp_path, monkeypatch
):
    cache = InversionCache(tmp_path)
    lazy = invert_frames(model, frames, steps=3, inversion_steps=6, reconstruct=False, progress=False, cache=cache)
    assert lazy.lazy and not source.lazy
    # a cache entry is a latents store like --save-latents' folder: the same loader reads it
    (entry,) = cache.entries()
    assert all(torch.equal(SourceLatents.from_file(entry).noisy[t], source.noisy[t]) for t in source.noisy)
    assert all(isinstance(v, LatentColumn) for v in lazy.noisy.values())
    assert sorted(lazy.noisy) == sorted(source.noisy) and lazy.noisiest == source.noisiest
    assert torch.equal(lazy.clean, source.clean)
    for t in source.noisy:
        assert torch.equal(lazy.noisy[t][[4, 0, 1, 5]], source.noisy[t][[4, 0, 1, 5]])
        assert torch.equal(lazy.noisy[t].load(), source.noisy[t])
    reads = []
    original = LatentColumn._read
    monkeypatch.setattr(LatentColumn, "_read", lambda self, rows: reads.append(list(rows)) or original(self, rows))
    config = _config(keyframes=[[1, 4]] * 3)
    assert torch.equal(
        TokenFlowEditor(model).edit(lazy, config, progress=False).latents,
        TokenFlowEditor(model).edit(source, config, progress=False).latents,
    )
    # the editor read the noisiest latents whole once (start latent), then only the frames of each UNet call
    whole = [r for r in reads if r == list(range(6))]
    assert len(whole) == 1 and all(len(r) <= 2 for r in reads if r != list(range(6)))


def test_latent_columns_index_like_a_tensor_across_shards_and_are_no_tensor(tmp_path):
    data = torch.randn(7, 2, 3, 4)
    path = write_latents(tmp_path / "store", {"x": data, "y": -data}, info={"a": "b"}, frames_per_shard=3)
    store = LatentStore.open(path)
    lazy = store.columns["x"]
    assert len(lazy.shards) == 3 and store.info == {"a": "b"}  # frames 0-2, 3-5, 6
    assert len(lazy) == 7 and lazy.shape == data.shape and lazy.ndim == 4
    for index in (3, -1, slice(2, 5), slice(None, None, 2), slice(-3, None), [6, 0, 1, 2, 2], torch.tensor([5, 1]),
                  torch.tensor(4), torch.tensor([True, False] * 3 + [True]), (slice(1, 3), 0, slice(None), 2),
                  (2, 1), range(1, 4), slice(2, 2)):
        assert torch.equal(lazy[index], data[index]), index
    assert torch.equal(store.columns["y"][:], -data) and torch.equal(lazy.load(), data)
    with pytest.raises(TypeError):  # arithmetic needs an explicit read: no whole-video load by accident
        lazy - 1.5
    with pytest.raises(IndexError):
        lazy[[7]]
    read = lazy[[1, 2]]
    (path / shard_name(0, 3)).unlink()  # what was read stays valid; later reads say what happened
    assert torch.equal(read, data[[1, 2]])
    with pytest.raises(FileNotFoundError, match="removed while in use"):
        lazy[0]
    assert torch.equal(lazy[4:6], data[4:6])  # the other shards still read


def test_a_latents_store_is_plain_safetensors_shards_with_a_checksummed_index(tmp_path):
    from safetensors.torch import load_file, save_file

    data = {"clean": torch.randn(5, 4, 2, 2), "t21": torch.randn(5, 4, 2, 2), "t41": torch.randn(5, 4, 2, 2)}
    path = write_latents(tmp_path / "store", data, frames_per_shard=2)
    index = json.loads((path / "index.json").read_text())
    assert [(s["start"], s["stop"]) for s in index["shards"]] == [(0, 2), (2, 4), (4, 5)]
    for entry in index["shards"]:  # each shard is an ordinary safetensors file of those frames
        shard = load_file(str(path / entry["file"]))
        assert all(torch.equal(shard[k], v[entry["start"]:entry["stop"]]) for k, v in data.items())
    loaded = load_latents(path)
    assert loaded.keys() == data.keys() and all(torch.equal(loaded[k], v) for k, v in data.items())
    assert sorted(SourceLatents.from_file(path).noisy) == [21, 41]
    # damage is found before use: a changed byte (checksum), a truncated shard (size), a missing one
    shard = path / index["shards"][1]["file"]
    original = shard.read_bytes()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(CorruptLatents, match="checksum"):
        LatentStore.open(path).verify()
    shard.write_bytes(original[:-4])
    with pytest.raises(CorruptLatents, match="truncated"):
        LatentStore.open(path).verify()
    shard.unlink()
    with pytest.raises(CorruptLatents, match="missing"):
        LatentStore.open(path).verify()
    with pytest.raises(ValueError, match="not a latents store"):
        SourceLatents.from_file(path)
    # a single file of an older release (``source_t<T>`` names) opens as a one-shard store with today's names
    old = tmp_path / "latents.safetensors"
    save_file({"clean": data["clean"], "source_t21": data["t21"], "final": data["t41"]}, str(old))
    store = LatentStore.open(old)
    assert sorted(store.columns) == ["clean", "final", "t21"] and torch.equal(store.columns["t21"][1:3], data["t21"][1:3])
    lazy = SourceLatents.from_file(old, lazy=True)
    assert lazy.lazy and torch.equal(lazy.noisy[21][:], data["t21"]) and not SourceLatents.from_file(old).lazy
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(CorruptLatents, match="do not all hold frames"):  # no tensors: no frames, not a store
        LatentStore.open(empty)


def test_an_older_single_file_cache_entry_is_read_and_an_older_partial_discarded(model, frames, tmp_path, caplog):
    import logging

    from safetensors.torch import save_file

    clip = frames[:2]
    grid, save = inversion_grid(model, 3, 6)
    key = InversionCache.key(clip, model, "", grid, save)
    fresh = invert_frames(model, clip, steps=3, inversion_steps=6, reconstruct=False, progress=False,
                          cache=InversionCache(tmp_path / "new"))
    old = InversionCache(tmp_path / "old")
    old.root.mkdir()
    tensors = {"clean": fresh.clean, **{f"t{t}": v[:] for t, v in fresh.noisy.items()}}
    save_file(tensors, str(old.root / f"{key}.safetensors"), metadata={"info": json.dumps({"steps": 3})})
    calls, handle = _count_unet_calls(model)
    try:
        hits = []
        hit = invert_frames(model, clip, steps=3, inversion_steps=6, reconstruct=False, progress=False, cache=old,
                            on_cache_hit=hits.append)
    finally:
        handle.remove()
    assert calls[0] == 0 and hits == [old.root / f"{key}.safetensors"] and hit.info == {"steps": 3}
    assert all(torch.equal(hit.noisy[t][:], fresh.noisy[t][:]) for t in save)
    # an older release's unfinished inversion (one preallocated file + progress.json): one line, then inverted anew
    other = InversionCache(tmp_path / "partial")
    other.root.mkdir()
    other.partial_path(key).write_bytes(b"\0" * 64)
    (other.root / f"{key}.progress.json").write_text(json.dumps({"inverted": [[0, 2]], "reconstructed": []}))
    with caplog.at_level(logging.INFO, logger="tokenflow.inversion"):
        again = invert_frames(model, clip, steps=3, inversion_steps=6, reconstruct=False, progress=False, cache=other)
    assert caplog.text.count("older tokenflow") == 1
    assert torch.equal(again.noisy[save[-1]][:], fresh.noisy[save[-1]][:])
    assert sorted(other.root.iterdir()) == [other.path(key)]


# -- resumable inversion ---------------------------------------------------------------------------------------


class _Interrupt(RuntimeError):
    pass


def _count_unet_calls(model, limit=None):
    """A pre-hook counting UNet calls; raises on call ``limit + 1``."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if limit is not None and calls[0] > limit:
            raise _Interrupt(f"simulated interruption at UNet call {calls[0]}")

    return calls, model.unet.register_forward_pre_hook(hook)


def test_an_interrupted_inversion_resumes_where_it_stopped_and_ends_bit_identical(model, frames, tmp_path):
    kwargs = dict(steps=3, inversion_steps=6, batch_size=2, progress=False)
    grid, save = inversion_grid(model, 3, 6)
    g, s, batches = len(grid), len(save), 3  # 6 frames in batches of 2; reconstruction walks the saved timesteps

    calls, handle = _count_unet_calls(model)
    try:
        reference = invert_frames(model, frames, cache=InversionCache(tmp_path / "once"), **kwargs)
    finally:
        handle.remove()
    assert calls[0] == batches * g + batches * s

    cache = InversionCache(tmp_path / "interrupted")
    key = InversionCache.key(frames, model, "", grid, save)
    # 1st run: killed in the middle of the second batch's inversion
    calls, handle = _count_unet_calls(model, limit=g + 3)
    try:
        with pytest.raises(_Interrupt):
            invert_frames(model, frames, cache=cache, **kwargs)
    finally:
        handle.remove()
    assert cache.partial_path(key).exists() and not cache.path(key).exists()
    assert [p.name for p in cache.partial_path(key).glob("frames-*")] == [shard_name(0, 2)]
    # 2nd run: redoes the second batch, inverts the third, killed in the second batch's reconstruction
    calls, handle = _count_unet_calls(model, limit=2 * g + s + 1)
    try:
        with pytest.raises(_Interrupt):
            invert_frames(model, frames, cache=cache, **kwargs)
    finally:
        handle.remove()
    assert calls[0] == 2 * g + s + 2
    # 3rd run: only the two reconstruction batches left
    calls, handle = _count_unet_calls(model)
    try:
        resumed = invert_frames(model, frames, cache=cache, **kwargs)
    finally:
        handle.remove()
    assert calls[0] == 2 * s
    assert torch.equal(resumed.clean, reference.clean)
    assert all(torch.equal(resumed.noisy[t].load(), reference.noisy[t].load()) for t in reference.noisy)
    assert resumed.reconstruction_psnr == reference.reconstruction_psnr
    assert sorted(p.name for p in (tmp_path / "interrupted").iterdir()) == [key]
    # and the uncached, in-memory path computes the very same numbers
    in_memory = invert_frames(model, frames, **kwargs)
    assert all(torch.equal(in_memory.noisy[t], reference.noisy[t].load()) for t in reference.noisy)
    assert in_memory.reconstruction_psnr == reference.reconstruction_psnr


def test_an_inversion_interrupted_inside_a_batch_continues_from_its_last_checkpointed_timestep(
    model, frames, tmp_path, monkeypatch
):
    kwargs = dict(steps=3, inversion_steps=6, batch_size=3, reconstruct=False, progress=False)
    grid, save = inversion_grid(model, 3, 6)
    g = len(grid)
    reference = invert_frames(model, frames, **kwargs)  # in memory, uninterrupted
    monkeypatch.setattr(InversionCache, "checkpoint_seconds", 0.0)  # checkpoint at every saved timestep
    cache = InversionCache(tmp_path)
    key = InversionCache.key(frames, model, "", grid, save)
    calls, handle = _count_unet_calls(model, limit=g + g - 2)  # killed two steps before the 2nd batch's end
    try:
        with pytest.raises(_Interrupt):
            invert_frames(model, frames, cache=cache, **kwargs)
    finally:
        handle.remove()
    from safetensors import safe_open

    partial = cache.partial_path(key)
    assert [p.name for p in partial.glob("frames-*")] == [shard_name(0, 3)]
    with safe_open(str(partial / "checkpoint.safetensors"), framework="pt") as f:
        a, z, t = json.loads(f.metadata()["info"])["checkpoint"]
    assert (a, z) == (3, 6) and t in save and grid.index(t) < g - 2
    calls, handle = _count_unet_calls(model)
    try:
        resumed = invert_frames(model, frames, cache=cache, **kwargs)
    finally:
        handle.remove()
    assert calls[0] == g - (grid.index(t) + 1)  # only the rest of the second batch's chain
    assert torch.equal(resumed.clean, reference.clean)
    assert all(torch.equal(resumed.noisy[s].load(), reference.noisy[s]) for s in save)


def test_partial_shards_that_do_not_fit_are_discarded_and_redone(model, frames, tmp_path):
    cache = InversionCache(tmp_path)
    grid, save = inversion_grid(model, 3, 6)
    kwargs = dict(steps=3, inversion_steps=6, batch_size=2, reconstruct=False, progress=False)
    reference = invert_frames(model, frames[:4], **kwargs)
    key = InversionCache.key(frames[:4], model, "", grid, save)
    partial = cache.partial_path(key)
    partial.mkdir(parents=True)
    (partial / shard_name(0, 2)).write_bytes(b"not a safetensors file")
    write_latents(tmp_path / "other", {"clean": torch.zeros(2, 4, 3, 3)}, frames_per_shard=2)  # another shape
    os.replace(tmp_path / "other" / shard_name(0, 2), partial / shard_name(2, 4))
    calls, handle = _count_unet_calls(model)
    try:
        src = invert_frames(model, frames[:4], cache=cache, **kwargs)
    finally:
        handle.remove()
    assert calls[0] == 2 * len(grid) and src.lazy
    assert all(torch.equal(src.noisy[t][:], reference.noisy[t]) for t in save)


# -- host memory on a long clip ----------------------------------------------------------------------------------

MEMORY_SIZE, MEMORY_STEPS, MEMORY_FRAMES = 128, 8, 96


def _memory_worker(model_dir: str, num_frames: int, size: int, steps: int) -> dict:
    """``tokenflow edit`` (the runner: read, stage, invert through a cache with the reconstruction check, 2 edit
    steps, decode, write three videos) of a ``num_frames`` clip; the peak RSS growth of the whole run over the
    RSS before it, after a warm-up run of 16 frames (so one-time allocations are in the baseline)."""
    import tempfile

    from tokenflow.memory import PeakMemory
    from tokenflow.runner import RunOptions, edit_video
    from tokenflow.testing import make_pan_clip

    torch.set_num_threads(1)
    editor = TokenFlowEditor(load_model(model_dir, device="cpu", dtype="float32"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def options(n: int) -> RunOptions:
            clip = root / f"clip-{n}.mp4"
            make_pan_clip(clip, num_frames=n, width=size, height=size, shift=1, fps=24, audio=True)
            return RunOptions(
                # plain DDIM on the editing grid: the memory is the fixed-point scheme's, at half the UNet calls
                video=clip, prompt="a robot", out=root / f"out-{n}", size=size, steps=steps, inversion_steps=steps,
                inversion_refinements=0, batch_size=8, mode="sdedit", strength=2 / steps, keyframe_window="1", anchors=1, keyframe_batch="2",
                cache_dir=root / "cache", quiet=True,
            )

        edit_video(options(16), editor)
        run = options(num_frames)
        with PeakMemory() as peak:
            result = edit_video(run, editor)
    return dict(
        frames=num_frames,
        growth=peak.growth,
        exact=peak.exact,
        latent_bytes=4 * (size // 8) ** 2 * 4,
        frame_bytes=size * size * 3,
        keyframes_per_step=len(result.report["keyframes"][0]),
    )


def test_host_memory_of_a_whole_edit_beyond_the_per_frame_latents_does_not_grow_with_the_video(tiny_model_dir):
    """``edit_video`` on clips of N and 4N frames (96 and 384, 128x128, 9 saved timesteps, a keyframe every 8
    frames: 12 and 48 keyframes per step), each in a fresh process: the peak RSS growth of the whole run. N is
    past the frames the H.264 encoders buffer (their lookahead), whose memory is constant from there on.

    Growing with the number of frames N, ``l`` bytes per frame each (a 4x16x16 float32 latent): the clean latents,
    the one full-length array the editor keeps in memory. Measured: about 3 l a frame under the default kernels and
    5 l under ``MKL_CBWR=AVX2`` (the rest is not traced: the allocator's and MKL's buffers are the likely part), so
    the bound allows ``A = 6``, what the editor held when its start, current and next latents were in memory too; it
    catches any design that keeps the frames or the source latents. The goal of a tenth of a float32 frame per
    frame is a benchmark's (``bench_long.py``), not this test's. The loop's
    other full-length arrays (the start latent, the current and next latents) live in files in the run's staging
    folder (``DiskTensor``, read and written a batch at a time), outside the process's memory.
    Must not grow with N (and would in an in-memory design): the frames (``f`` = 48 KiB each, 12 l), read once
    and used by the inversion and the writers; the source latents at every saved timestep (``T = 9`` arrays);
    the decoded frames; the keyframe pass (one UNet call over all keyframes) and the keyframe tokens the
    propagation blends (both O(N / batch size)); here the pass runs in calls of 2 keyframes plus context.

    So ``growth(4N) - growth(N) <= 3N * 6 * l + 2 MB`` = 9.1 MB (measured here: 3.6 MB, and 5.8 MB under
    ``MKL_CBWR=AVX2``), while keeping the frames once adds ``3N * f`` = 14 MB and the source latents
    ``3N * T * l`` = 10.6 MB.
    """
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's resettable peak RSS")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    args = [str(tiny_model_dir), str(MEMORY_SIZE), str(MEMORY_STEPS)]
    results = []
    for n in (MEMORY_FRAMES, 4 * MEMORY_FRAMES):  # one after the other: two at once would share 2 cores
        proc = subprocess.run([sys.executable, __file__, args[0], str(n), *args[1:]], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    small, large = results
    assert small["exact"] and large["exact"]
    assert (small["keyframes_per_step"], large["keyframes_per_step"]) == (12, 48)
    extra_frames = large["frames"] - small["frames"]
    latent, frame = small["latent_bytes"], small["frame_bytes"]
    bound = extra_frames * 6 * latent + 2e6
    assert bound < extra_frames * frame and bound < extra_frames * (MEMORY_STEPS + 1) * latent
    grown = large["growth"] - small["growth"]
    assert grown <= bound, (small, large, grown, bound)


if __name__ == "__main__":
    model_dir, *numbers = sys.argv[1:]
    print(json.dumps(_memory_worker(model_dir, *(int(x) for x in numbers))))


def test_a_second_inversion_of_the_same_frames_waits_for_the_first_and_reuses_it(model, frames, tmp_path, caplog):
    """The cache entry's lock: a second inverter waits, then finds the entry the first wrote (never interleaved)."""
    import logging
    import threading

    cache = InversionCache(tmp_path)
    clip = frames[:2]
    grid, save = inversion_grid(model, 3, 6)
    key = InversionCache.key(clip, model, "", grid, save)
    holding, done = threading.Event(), []

    def first() -> None:
        with cache.lock(key):
            holding.set()
            cond = model.condition([""], clip.shape[1], clip.shape[2])
            done.append(cache.invert(key, model, clip, cond, grid, save, reconstruct=False, progress=False))

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(timeout=60)
    hits = []
    with caplog.at_level(logging.INFO, logger="tokenflow.inversion"):
        second = invert_frames(model, clip, steps=3, inversion_steps=6, cache=cache, reconstruct=False,
                               progress=False, on_cache_hit=hits.append)
    thread.join(timeout=60)
    assert "waiting for another process" in caplog.text
    assert hits == [cache.path(key)] and done  # the second reused the first's entry instead of inverting again
    assert all(torch.equal(second.noisy[t][:], done[0].noisy[t][:]) for t in save)


def test_4k_frames_are_decoded_and_downscaled_one_at_a_time(tiny_model, tmp_path):
    """A 3840x2160 clip staged for a 64 px edit by the runner's own ``_prepare``, its first 6 frames and then all
    12: the process's peak RSS grows by the same few full-size frames both times (the decoder's frames in flight
    and the RGB frames held back until it is past them, a resize; how many depends on the decoder's threads), never by the 6 frames more
    (6 x 24.9 MB = 149 MB). Measured here: 7.3 and 7.2 full frames after other tests (5.2 alone)."""
    import numpy as np

    from tokenflow.io import VideoWriter
    from tokenflow.memory import PeakMemory
    from tokenflow.runner import RunOptions, _prepare

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's resettable peak RSS")
    import ctypes

    try:  # glibc: a fixed mmap threshold, so a freed frame leaves the process (else the heap keeps it, peaks vary)
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    width, height, n = 3840, 2160, 12
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    clip = tmp_path / "4k.mp4"
    with VideoWriter(clip, 24, width, height) as out:
        for i in range(n):
            out.write(np.broadcast_to((ramp + 20 * i) % 256, (height, width, 3)).astype(np.uint8))
    del ramp
    full = width * height * 3
    editor = TokenFlowEditor(tiny_model)
    growth = {}
    for count in (2, 6, 12):  # 2: a warm-up, so one-time allocations are in the baseline
        options = RunOptions(video=clip, prompt="x", size=64, model="tiny", max_frames=count)
        folder = tmp_path / str(count)
        folder.mkdir()
        with PeakMemory() as peak:
            _, frames, info, _ = _prepare(options, editor, lambda: folder)
        growth[count] = peak.growth
        assert (info.width, info.height) == (width, height) and frames.shape == (count, 64, 112, 3)
    assert abs(float(frames[n - 1].astype(np.float32).mean()) - float(frames[0].astype(np.float32).mean())) > 1
    assert growth[12] - growth[6] < 2 * full, (growth, full)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, Cancelled], ids=["ctrl-c", "cancel"])
def test_an_interruption_keeps_the_batchs_finished_timesteps_and_the_next_run_starts_after_them(
    model, frames, tmp_path, monkeypatch, interruption
):
    """Ctrl-C (SIGTERM in the CLI unwinds the same way) or a cancel in the middle of a batch checkpoints the
    timesteps that batch has finished, however recently the periodic checkpoint ran: the next run does only the
    rest, and the result is bit-identical. A failure of the computation itself keeps nothing of the batch (the
    test above)."""
    kwargs = dict(steps=3, inversion_steps=6, batch_size=2, progress=False, reconstruct=False)
    grid, save = inversion_grid(model, 3, 6)
    g = len(grid)
    reference = invert_frames(model, frames, cache=InversionCache(tmp_path / "once"), **kwargs)
    monkeypatch.setattr(InversionCache, "checkpoint_seconds", 1e9)  # no periodic checkpoint
    cache = InversionCache(tmp_path / "interrupted")
    key = InversionCache.key(frames, model, "", grid, save)
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == g + g - 1:  # the second batch, at its last grid step
            raise interruption()

    handle = model.unet.register_forward_pre_hook(hook)
    try:
        with pytest.raises(interruption):
            invert_frames(model, frames, cache=cache, **kwargs)
    finally:
        handle.remove()
    checkpoint = cache.partial_path(key) / "checkpoint.safetensors"
    assert checkpoint.is_file()
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        a, z, t = json.loads(f.metadata()["info"])["checkpoint"]
    assert (a, z) == (2, 4) and t in save and t != save[-1]
    calls, handle = _count_unet_calls(model)
    try:
        resumed = invert_frames(model, frames, cache=cache, **kwargs)
    finally:
        handle.remove()
    assert calls[0] == (g - grid.index(t) - 1) + g  # the rest of the second batch, then the third
    assert torch.equal(resumed.clean, reference.clean)
    assert all(torch.equal(resumed.noisy[t].load(), reference.noisy[t].load()) for t in reference.noisy)
