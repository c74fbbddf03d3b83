"""TokenFlow on diffusion transformers (SD3, FLUX.1) with flow-matching inversion, on tiny random-weight models
built from configs and loaded through ``load_model``: the mechanism exactly (which image tokens come from which
keyframe, joint attention against a naive computation, text tokens per frame, apply/remove identity, PnP on image
queries/keys), the flow inversion, the per-frame mode, and the CLI end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import assert_real_edit, reordering_tolerance
from tokenflow.attention import FrameCall, Injection, KeyframeCall, PropagationCall, TokenFlowState, tokenflow_attention
from tokenflow.backbones import load_model
from tokenflow.editor import EditConfig, TokenFlowEditor
from tokenflow.inversion.flow import FLOW_KEY_SCALE
from tokenflow.joint_attention import JointTokenFlowProcessor
from tokenflow.metrics.image import psnr
from tokenflow.testing import build_tiny_flux, build_tiny_sd3, pan_frames

N = 3  # frames a branch in the processor tests


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return load_model(sd3_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def flux(flux_dir):
    return load_model(flux_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def clip64() -> torch.Tensor:
    """Four 64x64 frames of a 4 px/frame pan (16 image tokens a frame on both tiny models)."""
    return torch.from_numpy(pan_frames(num_frames=4, width=64, height=64, shift=4))


# -- the processor on one layer, against a naive computation ------------------------------------------------------

def _layer(model, layout):
    blocks = model.unet.single_transformer_blocks if layout == "flux-single" else model.unet.transformer_blocks
    name = {"sd3": "transformer_blocks.0.attn.processor", "flux-double": "transformer_blocks.0.attn.processor",
            "flux-single": "single_transformer_blocks.0.attn.processor"}[layout]
    return blocks[0].attn, name


def _inputs(model, layout, seed=0):
    """Random image/text tokens for 3 branches x N frames (the single-stream layer takes them concatenated), and
    FLUX's rotary embedding for 16 image and T text tokens."""
    g = torch.Generator().manual_seed(seed)
    attn, _ = _layer(model, layout)
    dim = attn.to_q.in_features
    text_dim = attn.add_q_proj.in_features if layout != "flux-single" else dim
    image = torch.randn(3 * N, 16, dim, generator=g)
    text = torch.randn(3 * N, 5, text_dim, generator=g)
    rotary = None
    if layout != "sd3":
        ids = torch.zeros(4, 4, 3)
        ids[..., 1] += torch.arange(4)[:, None]
        ids[..., 2] += torch.arange(4)[None, :]
        rotary = model.unet.pos_embed(torch.cat([torch.zeros(5, 3), ids.reshape(-1, 3)]))
    return image, text, rotary


def _run(processor, attn, layout, image, text, rotary):
    """(image outputs, text outputs) of ``processor`` on the layer."""
    if layout == "flux-single":
        out = processor(attn, torch.cat([text, image], 1), None, None, rotary)
        return out[:, text.shape[1]:], out[:, : text.shape[1]]
    if layout == "sd3":
        return processor(attn, image, text)
    return processor(attn, image, text, None, rotary)


def _naive_qkv(attn, layout, image, text, rotary):
    """Per row: queries, keys, values ``[heads, S, d]`` of the joint sequence (family order), written out."""
    from diffusers.models.embeddings import apply_rotary_emb

    heads = attn.heads

    def proj(linears, x, norm=None):
        q = linears(x).view(x.shape[0], x.shape[1], heads, -1)  # [B, S, heads, d]
        return q if norm is None else (norm(q.transpose(1, 2)).transpose(1, 2) if layout == "sd3" else norm(q))

    if layout == "flux-single":
        joint = torch.cat([text, image], 1)
        q, k, v = proj(attn.to_q, joint, attn.norm_q), proj(attn.to_k, joint, attn.norm_k), proj(attn.to_v, joint)
    else:
        q, k, v = proj(attn.to_q, image, attn.norm_q), proj(attn.to_k, image, attn.norm_k), proj(attn.to_v, image)
        tq = proj(attn.add_q_proj, text, attn.norm_added_q)
        tk = proj(attn.add_k_proj, text, attn.norm_added_k)
        tv = proj(attn.add_v_proj, text)
        order = (lambda a, b: torch.cat([a, b], 1)) if layout == "sd3" else (lambda a, b: torch.cat([b, a], 1))
        q, k, v = order(q, tq), order(k, tk), order(v, tv)
    if rotary is not None:
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    return q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double()


def _softmax_attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def _naive(attn, layout, image, text, rotary, keyframes: bool, inject: bool = False):
    """Image and text outputs written out: per frame, or (``keyframes``) each edited frame's image queries over
    the joint sequences of all N frames of its branch; ``inject``: edited branches with the source's image q/k."""
    q, k, v = _naive_qkv(attn, layout, image, text, rotary)
    length, total = image.shape[1], q.shape[2]
    img = slice(0, length) if layout == "sd3" else slice(total - length, total)
    if inject:
        q, k = q.clone(), k.clone()
        for row in range(N, 3 * N):
            q[row, :, img], k[row, :, img] = q[row % N, :, img], k[row % N, :, img]
    out = torch.stack([_softmax_attention(q[r], k[r], v[r]) for r in range(3 * N)])
    if keyframes:
        for row in range(N, 3 * N):
            branch = range(row - row % N, row - row % N + N)
            keys = torch.cat([k[r] for r in branch], 1)
            values = torch.cat([v[r] for r in branch], 1)
            out[row, :, img] = _softmax_attention(q[row, :, img], keys, values)
    out = out.transpose(1, 2).flatten(2).float()
    image_out, text_out = out[:, img], (out[:, : img.start] if img.start else out[:, img.stop:])
    if layout == "flux-single":
        return image_out, text_out
    image_out = attn.to_out[0](image_out)
    if layout != "sd3" or not attn.context_pre_only:
        text_out = attn.to_add_out(text_out)
    return image_out, text_out


# float32 against float64 over <= 3 * 21 keys of O(1) values and one output projection of width <= 64: rounding
# ~sqrt(64) * 2^-24 * |x| ~ 1e-6; another token in a key set moves outputs by 1e-2 or more
NAIVE_ATOL = 2e-5

LAYOUTS = [("sd3", "sd3"), ("flux", "flux-double"), ("flux", "flux-single")]


@pytest.mark.numerics
@pytest.mark.parametrize("family,layout", LAYOUTS, ids=[layout for _, layout in LAYOUTS])
@pytest.mark.parametrize("inject", [False, True], ids=["plain", "pnp"])
def test_joint_keyframe_attention_equals_a_naive_computation(request, family, layout, inject):
    model = request.getfixturevalue(family)
    attn, name = _layer(model, layout)
    image, text, rotary = _inputs(model, layout)
    state = TokenFlowState()
    processor = JointTokenFlowProcessor(state, name, inject_qk=True, fallback=attn.processor, layout=layout,
                                        text_tokens=text.shape[1])
    with torch.no_grad(), state.calling(KeyframeCall.all(N, store=False, inject=Injection(qk=inject))):
        got_image, got_text = _run(processor, attn, layout, image, text, rotary)
        want_image, want_text = _naive(attn, layout, image, text, rotary, keyframes=True, inject=inject)
        per_frame_image, _ = _naive(attn, layout, image, text, rotary, keyframes=False, inject=inject)
    torch.testing.assert_close(got_image, want_image, atol=NAIVE_ATOL, rtol=0)
    torch.testing.assert_close(got_text, want_text, atol=NAIVE_ATOL, rtol=0)  # text tokens stay per frame
    # the keyframes really attend to each other (edited branches), the source branch stays per frame
    assert (got_image[N:] - per_frame_image[N:]).abs().max() > 1e-3
    torch.testing.assert_close(got_image[:N], per_frame_image[:N], atol=NAIVE_ATOL, rtol=0)


@pytest.mark.parametrize("family,layout", LAYOUTS, ids=[layout for _, layout in LAYOUTS])
def test_propagation_takes_image_tokens_from_the_keyframes_along_the_source_field(request, family, layout):
    """Frames whose source image tokens are a permutation of keyframe 0's (frame 1) or keyframe 1's (frame 2)
    get, in every branch, exactly that keyframe's image outputs permuted the same way; text outputs stay their own."""
    model = request.getfixturevalue(family)
    attn, name = _layer(model, layout)
    image, text, rotary = _inputs(model, layout, seed=1)
    state = TokenFlowState()
    processor = JointTokenFlowProcessor(state, name, fallback=attn.processor, layout=layout, text_tokens=text.shape[1])
    keys = image[[0, 1, N, N + 1, 2 * N, 2 * N + 1]]  # keyframes 0 and 1 of every branch (2 frames a branch)
    key_text = text[[0, 1, N, N + 1, 2 * N, 2 * N + 1]]
    with torch.no_grad():
        with state.calling(KeyframeCall.all(2)):
            key_out, _ = _run(processor, attn, layout, keys, key_text, rotary)
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))
        frames = image.clone()
        frames[0], frames[1] = keys[0, perm], keys[1, perm.flip(0)]  # source branch: permuted keyframes
        with state.calling(PropagationCall(prev=(0, 1, 0), next=(0, 1, 1), next_weight=(1.0, 1.0, 0.25))):
            got, got_text = _run(processor, attn, layout, frames, text, rotary)  # N = 3 frames a branch
        plain_image, plain_text = _run(attn.processor, attn, layout, frames, text, rotary)
    for branch in range(3):
        assert torch.equal(got[N * branch + 0], key_out[2 * branch + 0, perm])
        assert torch.equal(got[N * branch + 1], key_out[2 * branch + 1, perm.flip(0)])
        # frame 2 blends keyframe 1 (weight 0.25) and keyframe 0 along its own nearest neighbours
        assert not torch.allclose(got[N * branch + 2], plain_image[N * branch + 2], atol=1e-3)
    torch.testing.assert_close(got_text, plain_text, atol=NAIVE_ATOL, rtol=0)


def _predict(model, x, t, cond):
    return model.predict(x, t, cond.rows([0] * x.shape[0]))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_processors_restore_the_transformer_exactly_and_plain_calls_are_untouched(request, family):
    model = request.getfixturevalue(family)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, model.latent_channels, 8, 8, generator=g)
    cond = model.condition(["a photo"], 64, 64)
    t = 600_000
    with torch.no_grad():
        before = _predict(model, x, t, cond)
        state = TokenFlowState()
        with tokenflow_attention(model.unet, state, model.layers()) as (self_attn, _, residual):
            assert residual == [] and self_attn
            inside = _predict(model, x, t, cond)  # no call described: the layers' own processors
            with state.calling(FrameCall()):
                plain = _predict(model, x, t, cond)
            with state.calling(KeyframeCall.all(1)):
                keyframe = _predict(model, x, t, cond)  # three branches of one frame: joint == per frame
        after = _predict(model, x, t, cond)
    assert torch.equal(before, inside) and torch.equal(before, plain) and torch.equal(before, after)
    torch.testing.assert_close(keyframe, before, atol=1e-5, rtol=0)  # our attention vs diffusers' own
    assert all(type(p).__name__ != "JointTokenFlowProcessor" for p in model.unet.attn_processors.values())


def test_an_unknown_pnp_layer_pattern_names_the_transformer(sd3):
    from tokenflow.backbones import LayerSelection, LayerSelectionError

    with pytest.raises(LayerSelectionError, match="SD3Transformer2DModel"):
        sd3.layers(LayerSelection(qk_patterns=["up_blocks.*"]))
    assert sd3.layers(LayerSelection(qk_patterns=["transformer_blocks.1.*"])).qk == (
        "transformer_blocks.1.attn.processor",)


# -- flow inversion ---------------------------------------------------------------------------------------------

def _sample(model, top, cond, keys, sign=1.0):
    """Euler sampling from the noisiest latents down ``keys`` (descending) to level 0."""
    levels, final = model.noise_levels(model.make_scheduler())
    x = top.clone()
    for i, t in enumerate(keys):
        nxt = levels[keys[i + 1]] if i + 1 < len(keys) else final
        x = x + sign * (nxt - levels[t]) * _predict(model, x, t, cond)
    return x


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_inversion_then_sampling_reconstructs(request, family, clip64):
    model = request.getfixturevalue(family)
    editor = TokenFlowEditor(model)
    # three fixed-point refinements a step: the tiny FLUX's velocity field is rough (measured on 2 frames at 10
    # steps: 16.4 dB plain Euler, 23.2 with one refinement, 47.7 with three; 49.0 at 50 steps with one)
    source = editor.invert(clip64, steps=10, refinements=3, batch_size=4, progress=False)
    keys = sorted(source.noisy, reverse=True)
    assert len(keys) == 10 and max(keys) == FLOW_KEY_SCALE  # the editing grid, from pure noise (sigma 1)
    cond = model.condition([""], 64, 64)
    with torch.no_grad():
        good = _sample(model, source.noisy[keys[0]][:], cond, keys)
        wrong_sign = _sample(model, source.noisy[keys[0]][:], cond, keys, sign=-1.0)
        vae = model.decode_latents(source.clean).numpy()
        scores = {name: float(np.mean(psnr(model.decode_latents(x).numpy(), vae)))
                  for name, x in (("good", good), ("wrong", wrong_sign), ("zero", source.noisy[keys[0]][:]))}
    # against 12-15 dB for the noise itself or the wrong-sign ODE
    assert scores["good"] > max(scores["wrong"], scores["zero"]) + 15, scores
    assert source.reconstruction_psnr > max(scores["wrong"], scores["zero"]) + 15  # the editor's own check


# -- the editing loop -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_per_frame_mode_equals_each_frame_edited_alone(request, family, clip64):
    from tokenflow.inversion import SourceLatents

    model = request.getfixturevalue(family)
    editor = TokenFlowEditor(model)
    source = editor.invert(clip64[:3], steps=3, batch_size=3, reconstruct=False, progress=False)
    config = EditConfig(prompt="a robot", steps=3, batch_size=3, propagation="none", guidance_scale=4.0)
    together = editor.edit(source, config, progress=False).latents
    alone = [editor.edit(SourceLatents(source.clean[[f]], {t: v[[f]] for t, v in source.noisy.items()}),
                         config, progress=False).latents for f in range(3)]
    tokenflow = editor.edit(source, EditConfig(prompt="a robot", steps=3, batch_size=3, guidance_scale=4.0,
                                               propagation_t=1.0), progress=False).latents
    # batch 3 vs 1: other GEMM blocking only; the widest contraction is the joint attention over <= 528 tokens
    tolerance = reordering_tolerance(together, unet_evaluations=3, guidance=4.0, contraction=528)
    assert (together - torch.cat(alone)).abs().max() <= tolerance
    assert (together - tokenflow).abs().max() > 100 * tolerance  # the keyframes' joint attention changes frames


def test_flux_dev_takes_guidance_as_an_input_and_mixes_no_unconditional_branch(flux, clip64):
    editor = TokenFlowEditor(flux)
    source = editor.invert(clip64[:2], steps=3, batch_size=2, reconstruct=False, progress=False)

    def edit(**kw):
        return editor.edit(source, EditConfig(prompt="a robot", steps=3, batch_size=2, propagation="none", **kw),
                           progress=False).latents

    base = edit(guidance_scale=3.5)
    assert torch.equal(base, edit(guidance_scale=3.5, negative_prompt="something else"))  # no CFG branch mixed
    assert not torch.allclose(base, edit(guidance_scale=1.0), atol=1e-4)  # the embedded scale reaches the model
    assert flux.branch_kwargs(3.5, 2)["guidance"].tolist() == [1.0, 1.0, 3.5, 3.5]  # source, cond: no uncond rows


@pytest.mark.parametrize("family, scale", [("sd3", 7.0), ("flux", 3.5)])
def test_without_a_guidance_scale_each_family_uses_its_own(request, family, scale, clip64):
    model = request.getfixturevalue(family)
    editor = TokenFlowEditor(model)
    source = editor.invert(clip64[:2], steps=2, batch_size=2, reconstruct=False, progress=False)

    def edit(guidance):
        config = EditConfig(prompt="a robot", steps=2, batch_size=2, guidance_scale=guidance)
        return editor.edit(source, config, progress=False).latents

    default = edit(None)
    assert torch.equal(default, edit(scale)) and not torch.equal(default, edit(7.5 if family == "flux" else 3.5))


def test_flux_computes_no_unconditional_branch_and_edits_as_the_three_branch_layout_did(flux, clip64, monkeypatch):
    """A guidance-distilled model never mixes an unconditional prediction, so none is computed: calls of two row
    blocks (source, cond), a third fewer evaluations, and the edit the three-block layout gave (its uncond block
    was computed and thrown away). TokenFlow and PnP on every step, so keyframe attention, propagation and
    injection all run with two blocks."""
    editor = TokenFlowEditor(flux)
    source = editor.invert(clip64[:4], steps=3, batch_size=2, reconstruct=False, progress=False)
    rows = []
    hook = flux.unet.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    config = EditConfig(prompt="a robot", steps=3, batch_size=2, guidance_scale=3.5, propagation_t=1.0)
    two = editor.edit(source, config, progress=False)
    two_rows, rows[:] = sum(rows), []
    monkeypatch.setattr(type(flux), "branches", property(lambda self: 3))
    three = editor.edit(source, config, progress=False)
    hook.remove()
    assert (two_rows, sum(rows)) == (two.unet_frame_evaluations, three.unet_frame_evaluations) == (2 * 4 * 3, 3 * 4 * 3)
    # the same maths row for row; only the matrix products' row counts differ, which may regroup float32 sums on
    # some kernels (measured: identical, on AVX-512 and on the AVX2/default kernels)
    torch.testing.assert_close(two.latents, three.latents, rtol=0, atol=1e-5)


# -- the CLI ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_edits_a_video_with_a_transformer_model(request, family, pan_clip, tmp_path):
    from tokenflow.cli import main

    folder = request.getfixturevalue(f"{family}_dir")
    common = ["edit", str(pan_clip), "--model", str(folder), "--steps", "3", "--size", "64", "--batch-size", "5",
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main([*common, "--prompt", "a robot", "--out", str(tmp_path / "robot")]) == 0
    assert main([*common, "--prompt", "a wooden boat", "--out", str(tmp_path / "boat")]) == 0
    assert_real_edit(tmp_path / "robot", frames=10, size=(96, 64), other=tmp_path / "boat")
    import json

    run = json.loads((tmp_path / "robot" / "run.json").read_text())
    assert len(run["timesteps"]) == 3 and run["timesteps"][0] == FLOW_KEY_SCALE  # flow keys, from sigma 1
    branches = 3 if family == "sd3" else 2  # FLUX: source and cond, no unconditional branch
    assert np.isfinite(run["inversion_psnr"]) and run["unet_frame_evaluations"] == branches * 10 * 3
    assert run["parameters"]["guidance_scale"] is None and run["guidance_scale"] == (7.0 if family == "sd3" else 3.5)


def test_cli_chooses_tokenflow_and_pnp_layers_by_name_and_refuses_a_pattern_matching_none(sd3_dir, pan_clip,
                                                                                          tmp_path, capsys):
    from tokenflow.cli import main

    common = ["edit", str(pan_clip), "--model", str(sd3_dir), "--steps", "3", "--size", "64", "--prompt", "a robot",
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    rc = main([*common, "--tokenflow-layers", "transformer_blocks.9.*", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "transformer_blocks.9.*" in err[0] and "TokenFlow" in err[0], err
    assert not (tmp_path / "bad").exists() and not list((tmp_path / "cache").glob("*"))  # nothing inverted
    rc = main([*common, "--tokenflow-layers", "transformer_blocks.0.*", "--pnp-layers", "transformer_blocks.1.*",
               "--propagation-t", "1", "--out", str(tmp_path / "ok")])
    assert rc == 0 and (tmp_path / "ok" / "edited.mp4").is_file()


def test_cli_rounds_a_transformers_size_to_whole_patches(sd3_dir, pan_clip, tmp_path):
    """A transformer's token is a 2x2 patch of 8 px latents: sides are multiples of 16 (a multiple of 8 alone, as
    for a UNet, made a shape error inside the transformer)."""
    import json

    from tokenflow.cli import main

    rc = main(["edit", str(pan_clip), "--model", str(sd3_dir), "--steps", "2", "--size", "72", "--prompt", "a robot",
               "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    output = json.loads((tmp_path / "out" / "run.json").read_text())["output"]
    width, height = output["width"], output["height"]
    assert width % 16 == 0 and height % 16 == 0 and abs(height - 72) <= 8


def test_cli_refuses_ddim_inversion_on_a_flow_model_in_one_line(flux_dir, pan_clip, tmp_path, capsys):
    from tokenflow.cli import main

    rc = main(["edit", str(pan_clip), "--model", str(flux_dir), "--steps", "3", "--size", "64", "--prompt", "a robot",
               "--inversion", "ddim", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "flow-matching" in err[0] and "--inversion fixed-point" in err[0]
    assert not (tmp_path / "out").exists()


def test_propagation_t_runs_tokenflow_on_the_first_steps_only(sd3, tiny_model, clip64):
    """``propagation_t``: TokenFlow on the first ``int(steps * propagation_t)`` steps (noisiest first), per frame
    after; 0 is exactly the per-frame baseline. Transformers default to 0.1 (docs/dit.md), UNets to all steps."""
    for model in (sd3, tiny_model):
        editor = TokenFlowEditor(model)
        source = editor.invert(clip64[:4], steps=10, batch_size=2, reconstruct=False, progress=False)

        def edit(**kw):
            return editor.edit(source, EditConfig(prompt="a robot", steps=10, batch_size=2, **kw), progress=False)

        default, half = edit(), edit(propagation_t=0.5)
        expected = 1 if model is sd3 else 10  # int(10 * 0.1) for transformers, every step for UNets
        assert [bool(k) for k in default.keyframes] == [True] * expected + [False] * (10 - expected)
        assert [bool(k) for k in half.keyframes] == [True] * 5 + [False] * 5
        assert torch.equal(edit(propagation_t=0.0).latents, edit(propagation="none").latents)
        assert not torch.equal(half.latents, edit(propagation="none").latents)
    with pytest.raises(Exception, match="propagation_t"):
        EditConfig(prompt="a", propagation_t=1.5).check_inputs()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sdedit_on_a_flow_model_starts_at_its_strength(request, family, clip64):
    """SDEdit through the same loop: the edit runs the last ``strength`` of the steps from the source's latents at
    that noise level, so it moves further from the source the higher the strength."""
    model = request.getfixturevalue(family)
    editor = TokenFlowEditor(model)
    source = editor.invert(clip64, steps=4, batch_size=2, reconstruct=False, progress=False)
    moved = []
    for strength in (0.25, 0.5, 1.0):
        out = editor.edit(source, EditConfig(prompt="a robot", steps=4, batch_size=2, mode="sdedit", strength=strength),
                          progress=False)
        assert out.unet_frame_evaluations == model.branches * 4 * round(4 * strength)
        moved.append(float((out.latents - source.clean).abs().mean()))
    assert moved[0] < moved[1] < moved[2]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_long_clip_controls_work_on_transformers(request, family):
    """Keyframe window, keyframe batches and the host-memory keyframe cache on joint attention: the window and the
    split pass change the edit (and bound the calls), offloading the cache does not change it at all."""
    model = request.getfixturevalue(family)
    clip = torch.from_numpy(pan_frames(num_frames=8, width=64, height=64, shift=4))
    editor = TokenFlowEditor(model)
    source = editor.invert(clip, steps=2, batch_size=2, reconstruct=False, progress=False)

    def edit(**kw):
        return editor.edit(source, EditConfig(prompt="a robot", steps=2, batch_size=2, propagation_t=1.0, **kw),
                           progress=False)

    full = edit(keyframe_window="full", offload_cache=False)
    assert full.max_keyframes_per_call == 4
    assert torch.equal(edit(keyframe_window="full", offload_cache=True).latents, full.latents)  # a copy, no maths
    windowed = edit(keyframe_window=1, anchors=0, keyframe_batch="all")
    split = edit(keyframe_window=1, anchors=0, keyframe_batch=1)
    assert windowed.max_keyframes_per_call == 4 and split.max_keyframes_per_call == 3  # 1 computed + 1 each side
    assert not torch.allclose(windowed.latents, full.latents, atol=1e-5)
    assert torch.isfinite(split.latents).all() and not torch.equal(split.latents, windowed.latents)


def test_tokenflow_in_chosen_blocks_only(sd3, clip64):
    """``tokenflow_patterns`` on a transformer: every block is the default exactly; one block is neither the default
    nor per-frame editing."""
    from tokenflow.backbones import LayerSelection

    assert sd3.layers(LayerSelection(tokenflow_patterns=["transformer_blocks.0.*"])).tokenflow == (
        "transformer_blocks.0.attn.processor",)
    editor = TokenFlowEditor(sd3)
    source = editor.invert(clip64, steps=3, batch_size=2, reconstruct=False, progress=False)

    def edit(**kw):
        return editor.edit(source, EditConfig(prompt="a robot", steps=3, batch_size=2, propagation_t=1.0, **kw),
                           progress=False).latents

    default = edit()
    assert torch.equal(edit(layers=LayerSelection(tokenflow_patterns=["transformer_blocks.*"])), default)
    first = edit(layers=LayerSelection(tokenflow_patterns=["transformer_blocks.0.*"]))
    assert not torch.allclose(first, default, atol=1e-4) and not torch.allclose(first, edit(propagation="none"), atol=1e-4)


# -- the feature analysis on transformers -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_features_and_reconstruct_read_a_transformers_image_tokens(request, family, pan_clip, tmp_path, capsys):
    """`features` and `reconstruct` run through the joint processors: the tokens they show are the image tokens
    (a 2x2-patch grid, no text tokens), the default layer is the first block, and FLUX's resolution-shifted
    schedule gives the timesteps its inversion saved."""
    import json

    from tokenflow.cli import main

    folder = request.getfixturevalue(f"{family}_dir")
    common = ["--model", str(folder), "--size", "64", "--steps", "4", "--max-frames", "6",
              "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(["features", str(pan_clip), "--list-layers", *common]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    blocks = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] if family == "sd3" else \
        ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert list(rows) == blocks and all(r[:3] == ["4", "x", "6"] for r in rows.values())  # 64x96 px / 16 px a token

    noisy = tmp_path / "noisy.mkv"
    from tokenflow.io import VideoWriter, load_frames

    frames, info = load_frames(pan_clip)
    rng = np.random.default_rng(0)
    with VideoWriter(noisy, info.fps, frames.shape[2], frames.shape[1], codec="ffv1") as out:
        for frame in frames:
            out.write(np.clip(frame + rng.normal(0, 40, frame.shape), 0, 255).astype(np.uint8))
    out = tmp_path / "features"
    rc = main(["features", str(pan_clip), "--edited", str(noisy), "--out", str(out), *common])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "features.json").read_text())
    assert report["layer"] == blocks[0] and report["grid"] == [4, 6]
    source, edited = report["videos"]
    # the edited video is inverted and read on its own (a random tiny transformer makes no claim about which is
    # more consistent: the micro UNet's test does that); the source is its own reference
    assert source["consistency_drop"] == 0 and edited["consistency"] != source["consistency"]
    assert all(0 < v["consistency"] <= 1 for v in (source, edited))

    rc = main(["reconstruct", str(pan_clip), "--from", "1", "--to", "2", "--out", str(tmp_path / "rec"), *common])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "rec" / "reconstruct.json").read_text())
    assert all(np.isfinite(rec[k]) for k in ("psnr_tokens", "psnr_warp", "psnr_unwarped", "psnr_plain"))
