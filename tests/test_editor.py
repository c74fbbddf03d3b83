"""The editing loop, inversion and its cache, keyframe schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokenflow.editor import EditConfig, TokenFlowEditor
from tokenflow.errors import InputError
from tokenflow.inversion import InversionCache, SourceLatents, ddim_reconstruct, inversion_grid, invert_frames
from tokenflow.keyframes import ExplicitKeyframes, FixedKeyframes, RandomKeyframes, make_schedule
from tokenflow.models import load_model
from tokenflow.testing import build_tiny_sd
from tokenflow.video import pan_frames

MICRO_MODEL = Path(__file__).parents[1] / "benchmarks" / "micro_model" / "model"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def frames(pan6) -> torch.Tensor:
    return pan6


@pytest.fixture(scope="module")
def source(model, frames) -> SourceLatents:
    return invert_frames(model, frames, steps=4, inversion_steps=8, reconstruct=False, progress=False)


def _config(**kw) -> EditConfig:
    base = dict(prompt="a robot", steps=4, batch_size=2, seed=0)
    base.update(kw)
    return EditConfig(**base)


def test_ddim_inversion_then_sampling_reconstructs_the_latents_on_a_trained_model():
    """On the micro *trained* model (random weights make DDIM inversion meaningless)."""
    micro = load_model(MICRO_MODEL, device="cpu", dtype="float32")
    clip = torch.from_numpy(pan_frames(num_frames=3, width=96, height=64, shift=2, image="coffee"))
    src = invert_frames(micro, clip, steps=50, inversion_steps=50, reconstruct=True, progress=False)
    recon = ddim_reconstruct(micro, src.noisy, micro.condition([""], 64, 96))
    rel = ((recon - src.clean).norm() / src.clean.norm()).item()
    assert rel < 0.1, rel
    assert src.reconstruction_psnr > 30
    # non-trivial: the noisiest inverted latent is far from the clean one (measured 0.97 relative)
    assert ((src.noisy[src.noisiest] - src.clean).norm() / src.clean.norm()).item() > 0.5


def test_any_steps_pair_works_the_inversion_visits_every_editing_timestep(model, frames):
    grid, save = inversion_grid(model, steps=8, inversion_steps=20)  # 125 is not on the 20-step grid
    assert set(save) <= set(grid)
    src = invert_frames(model, frames[:2], steps=8, inversion_steps=20, reconstruct=False, progress=False)
    out = TokenFlowEditor(model).edit(src, _config(steps=8), progress=False)
    assert out.timesteps == sorted(out.timesteps, reverse=True) and len(out.timesteps) == 8
    assert torch.isfinite(out.latents).all()


def test_same_seed_same_output_and_the_seed_moves_the_keyframes(model, source):
    editor = TokenFlowEditor(model)
    a = editor.edit(source, _config(seed=3), progress=False)
    b = editor.edit(source, _config(seed=3), progress=False)
    c = editor.edit(source, _config(seed=4), progress=False)
    assert torch.equal(a.latents, b.latents) and a.keyframes == b.keyframes
    assert a.keyframes != c.keyframes


def test_keyframes_are_one_per_chunk_and_explicit_schedules_are_used(model, source):
    editor = TokenFlowEditor(model)
    out = editor.edit(source, _config(batch_size=4), progress=False)
    for step in out.keyframes:  # 6 frames in chunks of 4: one keyframe in 0-3, one in 4-5
        assert len(step) == 2 and 0 <= step[0] < 4 <= step[1] < 6
    explicit = [[0, 5], [1, 4], [2, 4], [3, 5]]
    out = editor.edit(source, _config(batch_size=4, keyframes=explicit), progress=False)
    assert out.keyframes == explicit


def test_per_frame_baseline_is_independent_of_the_batching(model, source):
    editor = TokenFlowEditor(model)
    one = editor.edit(source, _config(propagation="none", batch_size=1), progress=False)
    three = editor.edit(source, _config(propagation="none", batch_size=3), progress=False)
    torch.testing.assert_close(one.latents, three.latents, rtol=1e-5, atol=1e-5)
    assert one.keyframes == [[]] * 4


def test_tokenflow_differs_from_per_frame_and_counts_its_unet_work(model, source):
    editor = TokenFlowEditor(model)
    tf = editor.edit(source, _config(batch_size=3), progress=False)
    pf = editor.edit(source, _config(batch_size=3, propagation="none"), progress=False)
    ref = editor.edit(source, _config(batch_size=3, blending="reference"), progress=False)
    assert not torch.allclose(tf.latents, pf.latents, atol=1e-3)
    assert tf.unet_frame_evaluations == pf.unet_frame_evaluations == 3 * 6 * 4
    assert ref.unet_frame_evaluations == 3 * (6 + 2) * 4


def test_v_prediction_model_edits(tmp_path, frames):
    v_model = load_model(build_tiny_sd(tmp_path / "v", prediction_type="v_prediction"), device="cpu")
    assert v_model.prediction_type == "v_prediction"
    src = invert_frames(v_model, frames[:2], steps=3, inversion_steps=6, reconstruct=False, progress=False)
    out = TokenFlowEditor(v_model).edit(src, _config(steps=3), progress=False)
    assert torch.isfinite(out.latents).all()


def test_check_inputs_names_the_bad_value():
    for kw, word in [
        (dict(prompt="  "), "--prompt"),
        (dict(steps=0), "--steps"),
        (dict(batch_size=0), "--batch-size"),
        (dict(pnp_attn_t=1.5), "--pnp-attn-t"),
        (dict(propagation="bogus"), "--propagation"),
        (dict(blending="bogus"), "--blending"),
    ]:
        with pytest.raises(InputError, match=word):
            _config(**kw).check_inputs()


def test_reference_blending_refuses_keyframes_that_are_not_one_per_chunk(model, source):
    with pytest.raises(InputError, match="one keyframe per chunk"):
        TokenFlowEditor(model).edit(source, _config(blending="reference", keyframes=[[0, 1]] * 4), progress=False)


def test_missing_timesteps_in_the_source_latents_are_refused(model, source):
    with pytest.raises(InputError, match="--steps"):
        TokenFlowEditor(model).edit(source, _config(steps=5), progress=False)


def test_inversion_cache_round_trip_and_keys(model, frames, tmp_path):
    cache = InversionCache(tmp_path)
    hits = []
    first = invert_frames(model, frames[:2], steps=3, inversion_steps=6, cache=cache, progress=False,
                          on_cache_hit=hits.append)
    assert not hits and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file
    second = invert_frames(model, frames[:2], steps=3, inversion_steps=6, cache=cache, progress=False,
                           on_cache_hit=hits.append)
    assert len(hits) == 1
    assert torch.equal(first.clean, second.clean)
    assert all(torch.equal(first.noisy[t], second.noisy[t]) for t in first.noisy)
    assert second.reconstruction_psnr == pytest.approx(first.reconstruction_psnr)
    grid, save = inversion_grid(model, 3, 6)
    key = InversionCache.key(frames[:2], model, "", grid, save)
    assert key != InversionCache.key(frames[:2], model, "a photo", grid, save)
    assert key != InversionCache.key(frames[1:3], model, "", grid, save)
    # a damaged entry is recomputed, not fatal
    cache.path(key).write_bytes(b"garbage")
    third = invert_frames(model, frames[:2], steps=3, inversion_steps=6, cache=cache, progress=False,
                          on_cache_hit=hits.append)
    assert len(hits) == 1 and torch.equal(third.clean, first.clean)


def test_random_keyframes_follow_the_reference_draws_and_handle_a_partial_chunk():
    schedule = RandomKeyframes(batch_size=4, seed=1)
    torch.manual_seed(1)
    for step in range(5):
        expected = (torch.randint(4, (4,)) + torch.arange(0, 16, 4)).tolist()
        assert schedule(step, 16) == expected
    partial = RandomKeyframes(batch_size=4, seed=0)
    for step in range(20):
        kf = partial(step, 10)
        assert len(kf) == 3 and kf[2] in (8, 9)


def test_fixed_and_explicit_schedules(tmp_path):
    assert FixedKeyframes(4)(0, 10) == [2, 6, 9]
    path = tmp_path / "kf.json"
    path.write_text(json.dumps([[0, 4], [1, 5]]))
    schedule = make_schedule(str(path), 4)
    assert schedule(1, 8) == [1, 5]
    with pytest.raises(InputError, match="2 steps"):
        schedule(2, 8)
    path.write_text("not json")
    with pytest.raises(InputError, match="not valid JSON"):
        ExplicitKeyframes.from_file(path)


def test_keyframe_window_covering_all_keyframes_equals_full_attention_and_a_small_one_differs(model, source):
    editor = TokenFlowEditor(model)
    full = editor.edit(source, _config(batch_size=1, keyframe_window="full"), progress=False)  # 6 keyframes
    covering = editor.edit(source, _config(batch_size=1, keyframe_window=5, anchors=0), progress=False)
    narrow = editor.edit(source, _config(batch_size=1, keyframe_window=1, anchors=0), progress=False)
    torch.testing.assert_close(covering.latents, full.latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(narrow.latents, full.latents, atol=1e-4)
    # "auto" keeps full joint attention while it fits
    assert _config(batch_size=1).resolve_keyframe_window(6, 8 * 12) is None
    assert _config(batch_size=8).resolve_keyframe_window(10_000, 64 * 64) >= 1
    with pytest.raises(InputError, match="--keyframe-window"):
        _config(keyframe_window="wide").check_inputs()


def test_offloaded_keyframe_cache_gives_identical_edits(model, source):
    editor = TokenFlowEditor(model)
    on = editor.edit(source, _config(offload_cache=True), progress=False)
    off = editor.edit(source, _config(offload_cache=False), progress=False)
    assert torch.equal(on.latents, off.latents)


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_cpu_offload_hooks_leave_the_edit_unchanged(tiny_model_dir, source, offload):
    """accelerate's offload hooks and the TokenFlow processors/hooks coexist (on CPU the weights just stay put)."""
    plain = TokenFlowEditor(load_model(tiny_model_dir, device="cpu")).edit(source, _config(), progress=False)
    hooked_model = load_model(tiny_model_dir, device="cpu", offload=offload)
    assert any(hasattr(m, "_hf_hook") for m in hooked_model.unet.modules())
    hooked = TokenFlowEditor(hooked_model).edit(source, _config(), progress=False)
    assert torch.equal(plain.latents, hooked.latents)
