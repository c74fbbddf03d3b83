"""The editing loop, inversion and its cache, keyframe schedules."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from tokenflow.editor import EditConfig, TokenFlowEditor
from tokenflow.errors import InputError
from tokenflow.inversion import InversionCache, SourceLatents, ddim_reconstruct, inversion_grid, invert_frames
from tokenflow.keyframes import ExplicitKeyframes, FixedKeyframes, RandomKeyframes, make_schedule
from tokenflow.models import load_model
from tokenflow.testing import build_tiny_sd
from tokenflow.testing import pan_frames

from conftest import reordering_tolerance

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


@pytest.mark.numerics
def test_per_frame_baseline_is_independent_of_the_batching(model, source, record_difference):
    editor = TokenFlowEditor(model)
    one = editor.edit(source, _config(propagation="none", batch_size=1), progress=False)
    three = editor.edit(source, _config(propagation="none", batch_size=3), progress=False)
    # batch 1 vs 3: other GEMM blocking, so fp32 rounding differs (4 steps at guidance 7.5; measured 2.3e-5 - 3.9e-5
    # at latents of scale 9 across CPU kernels, bound ~9e-4); a frame leaking into another would move them by O(0.1)
    difference = record_difference((one.latents - three.latents).abs().max())
    assert difference <= reordering_tolerance(one.latents, unet_evaluations=4, guidance=7.5), difference
    assert one.keyframes == [[]] * 4


def test_tokenflow_differs_from_per_frame_and_counts_its_unet_work(model, source):
    editor = TokenFlowEditor(model)
    tf = editor.edit(source, _config(batch_size=3), progress=False)
    pf = editor.edit(source, _config(batch_size=3, propagation="none"), progress=False)
    ref = editor.edit(source, _config(batch_size=3, blending="reference"), progress=False)
    assert not torch.allclose(tf.latents, pf.latents, atol=1e-3)
    assert tf.unet_frame_evaluations == pf.unet_frame_evaluations == 3 * 6 * 4
    assert ref.unet_frame_evaluations == 3 * (6 + 2) * 4


@pytest.fixture(scope="module")
def v_model(tmp_path_factory):
    return load_model(build_tiny_sd(tmp_path_factory.mktemp("v"), prediction_type="v_prediction"), device="cpu")


@pytest.mark.numerics
def test_v_prediction_output_is_converted_to_noise_as_diffusers_ddim_does(model, v_model):
    """The backbone's ``predicted_noise`` against the noise implied by diffusers' own ``DDIMScheduler.step`` for
    each prediction type."""
    g = torch.Generator().manual_seed(0)
    x, output = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 4, 8, 12, generator=g)
    for m in (model, v_model):
        scheduler = m.make_scheduler()
        scheduler.set_timesteps(10)
        for t in (901, 501, 1):
            step = scheduler.step(output, t, x)
            a_t = scheduler.alphas_cumprod[t]
            prev = t - 100
            a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
            implied = (step.prev_sample - a_prev**0.5 * step.pred_original_sample) / (1 - a_prev) ** 0.5
            # two fp32 formulas for the same O(1) values; the division by sqrt(1 - a_prev) (>= 0.03 at t=1)
            # magnifies their rounding (~1e-7) by at most ~30
            torch.testing.assert_close(m.predicted_noise(output, x, a_t), implied, rtol=1e-4, atol=1e-5)
    assert v_model.prediction_type == "v_prediction"


def _damped(m, scale: float = 0.01):
    """The same UNet with its output layer scaled down: a smooth, nearly linear denoiser, so that DDIM inversion
    followed by sampling is meaningful on random weights (undamped, a random UNet's inversion diverges)."""
    m.unet.conv_out.weight.data.mul_(scale)
    m.unet.conv_out.bias.data.mul_(scale)


def _sample_back(m, source: SourceLatents, steps: int) -> float:
    """Relative error of the clean latents sampled back with diffusers' ``DDIMScheduler`` (the editor's step)."""
    scheduler = m.make_scheduler()
    scheduler.set_timesteps(steps)
    text = m.condition([""], 64, 96).rows([0] * source.clean.shape[0])
    x = source.noisy[int(scheduler.timesteps[0])]
    for t in scheduler.timesteps:
        x = scheduler.step(m.predict(x, int(t), text), int(t), x).prev_sample
    return ((x - source.clean).norm() / source.clean.norm()).item()


def test_v_prediction_inversion_reconstructs_as_well_as_epsilons(tmp_path, frames):
    errors = {}
    for kind in ("epsilon", "v_prediction"):
        m = load_model(build_tiny_sd(tmp_path / kind, prediction_type=kind), device="cpu")
        _damped(m)
        src = invert_frames(m, frames[:2], steps=10, inversion_steps=10, reconstruct=False, progress=False)
        errors[kind] = _sample_back(m, src, 10)
        if kind == "v_prediction":
            out = TokenFlowEditor(m).edit(src, _config(steps=10), progress=False)
            assert torch.isfinite(out.latents).all()
    # measured: epsilon 0.115, v 0.031; inverting a v model as if it predicted noise gives 0.90
    assert errors["v_prediction"] < 0.1 and errors["v_prediction"] <= 2 * errors["epsilon"], errors


def test_check_inputs_names_the_bad_value():
    for kw, word in [
        (dict(prompt="  "), "`prompt`"),
        (dict(steps=0), "`steps`"),
        (dict(batch_size=0), "`batch_size`"),
        (dict(pnp_attn_t=1.5), "`pnp_attn_t`"),
        (dict(propagation="bogus"), "`propagation`"),
        (dict(blending="bogus"), "`blending`"),
    ]:
        with pytest.raises(InputError, match=re.escape(word)):
            _config(**kw).check_inputs()


def test_reference_blending_refuses_keyframes_that_are_not_one_per_chunk(model, source):
    with pytest.raises(InputError, match="one keyframe per chunk"):
        TokenFlowEditor(model).edit(source, _config(blending="reference", keyframes=[[0, 1]] * 4), progress=False)


def test_missing_timesteps_in_the_source_latents_are_refused(model, source):
    with pytest.raises(InputError, match="`steps`"):
        TokenFlowEditor(model).edit(source, _config(steps=5), progress=False)


def test_inversion_cache_round_trip_and_keys(model, frames, tmp_path, caplog):
    cache = InversionCache(tmp_path)
    hits = []
    first = invert_frames(model, frames[:2], steps=3, inversion_steps=6, cache=cache, progress=False,
                          on_cache_hit=hits.append)
    assert not hits and len(cache.entries()) == 1
    assert sorted(tmp_path.iterdir()) == cache.entries()  # no temporary or lock file left
    second = invert_frames(model, frames[:2], steps=3, inversion_steps=6, cache=cache, progress=False,
                           on_cache_hit=hits.append)
    assert len(hits) == 1
    assert torch.equal(first.clean, second.clean)
    assert all(torch.equal(first.noisy[t][:], second.noisy[t][:]) for t in first.noisy)
    assert second.reconstruction_psnr == pytest.approx(first.reconstruction_psnr)
    grid, save = inversion_grid(model, 3, 6)
    key = InversionCache.key(frames[:2], model, "", grid, save)
    assert key != InversionCache.key(frames[:2], model, "a photo", grid, save)
    assert key != InversionCache.key(frames[1:3], model, "", grid, save)
    # a damaged entry (one flipped byte in a shard: its checksum) is reported, recomputed, not fatal
    shard = sorted(cache.path(key).glob("frames-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tokenflow.inversion"):
        third = invert_frames(model, frames[:2], steps=3, inversion_steps=6, cache=cache, progress=False,
                              on_cache_hit=hits.append)
    assert len(hits) == 1 and torch.equal(third.clean, first.clean)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cache entry" in r.getMessage()]
    assert len(warnings) == 1 and "checksum" in warnings[0], warnings  # reported once
    assert cache.load(key) is not None  # the recomputed entry is sound


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
    # the same attention call on the same batch: exact on any kernel
    assert torch.equal(covering.latents, full.latents)
    assert not torch.allclose(narrow.latents, full.latents, atol=1e-4)
    # "auto" keeps full joint attention while it fits and costs no more than per-frame attention
    assert _config(batch_size=4).resolve_keyframe_window(20, 8 * 12) is None
    assert _config(batch_size=4).resolve_keyframe_window(24, 8 * 12) == 1
    assert _config(batch_size=8).resolve_keyframe_window(10_000, 64 * 64) >= 1
    with pytest.raises(InputError, match="`keyframe_window`"):
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


def _branches(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x.chunk(3)  # source | uncond | cond


def test_pnp_injects_qk_and_residuals_on_exactly_the_first_timesteps_and_keeps_each_branchs_shortcut(model, frames):
    """Observed from outside the processors: which UNet calls computed the edited branches' self-attention with the
    source's queries/keys, and which carried the source's residual features."""
    import math

    from tokenflow.backbones import select_layers

    steps, attn_t, f_t = 10, 0.3, 0.55  # int(3.0) = 3 q/k steps, int(5.5) = 5 residual steps
    src = invert_frames(model, frames[:2], steps=steps, inversion_steps=steps, reconstruct=False, progress=False)
    _, qk, conv = select_layers(model.unet)
    attn = model.unet.get_submodule(qk[0].removesuffix(".processor"))
    resnet = model.unet.get_submodule(conv[0])
    calls: list[dict] = []

    def on_unet(module, args, kwargs):
        calls.append({"t": int(args[1])})

    def on_attn(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]

        def heads(x):
            return x.view(x.shape[0], x.shape[1], module.heads, -1).transpose(1, 2)

        def attend(q_from, kv_from):
            q, k, v = heads(module.to_q(q_from)), heads(module.to_k(q_from)), heads(module.to_v(kv_from))
            w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            return module.to_out[0]((w @ v).transpose(1, 2).flatten(2))

        source = _branches(hidden)[0]
        edited = list(zip(_branches(hidden)[1:], _branches(output)[1:]))
        # the processor's fused kernel vs this plain softmax: fp32 rounding of O(1) tokens, far below the O(0.1)
        # gap between attending with the source's q/k and with one's own
        injected = [torch.allclose(out, attend(source, h), atol=1e-4) for h, out in edited]
        plain = [torch.allclose(out, attend(h, h), atol=1e-4) for h, out in edited]
        assert all(a != b for a, b in zip(injected, plain)), (injected, plain)
        calls[-1]["qk"] = all(injected)

    def on_resnet(module, args, output):
        x = args[0]
        shortcut = module.conv_shortcut(x) if module.conv_shortcut is not None else x
        residual = output * module.output_scale_factor - shortcut  # what conv2 (and the hook) contributed
        r_src, r_uncond, r_cond = _branches(residual)
        # the subtraction rounds at ~1e-6 of the O(1) features; a different residual differs at O(0.1)
        same = [torch.allclose(r, r_src, atol=1e-4) for r in (r_uncond, r_cond)]
        assert same[0] == same[1]
        calls[-1]["conv"] = same[0]
        o_src, o_uncond, o_cond = _branches(output)
        assert not torch.allclose(o_uncond, o_src, atol=1e-3)  # each branch keeps its own shortcut

    handles = [
        model.unet.register_forward_pre_hook(on_unet, with_kwargs=True),
        attn.register_forward_hook(on_attn, with_kwargs=True),
        resnet.register_forward_hook(on_resnet),
    ]
    try:
        TokenFlowEditor(model).edit(
            src, _config(steps=steps, pnp_attn_t=attn_t, pnp_f_t=f_t, propagation="none"), progress=False
        )
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == steps  # two frames, batch size 2: one call per step
    schedule = [c["t"] for c in calls]
    assert schedule == sorted(schedule, reverse=True)
    assert [c["qk"] for c in calls] == [True] * 3 + [False] * 7
    assert [c["conv"] for c in calls] == [True] * 5 + [False] * 5


def test_a_prompt_longer_than_the_text_encoder_reads_is_said_once_with_what_is_cut(model, caplog):
    long = "a robot " * 20 + "made of gold"  # the tiny tokenizer: one token per letter of a word, 77 at most
    with caplog.at_level(logging.WARNING, logger="tokenflow"):
        model.condition([long, "a cat"], 64, 64)
        model.condition([long], 64, 64)  # the inversion and the edit both encode it: one warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "more than the 77 the text encoder reads" in warnings[0], warnings
    assert warnings[0].endswith("made of gold'")  # what the encoder never sees, so the edit ignores
