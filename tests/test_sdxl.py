"""SDXL-family models: the same processors and hooks fit its block layout by role, end to end through the CLI."""

from __future__ import annotations

import json

import av
import pytest
import torch

from tokenflow.attention import Injection, KeyframeCall, TokenFlowState, tokenflow_attention
from tokenflow.backbones import select_layers
from tokenflow.cli import main
from tokenflow.models import load_model
from tokenflow.testing import build_tiny_controlnet, build_tiny_sd, build_tiny_sdxl

from conftest import PAN_FRAMES, assert_real_edit

OUTPUTS = ("edited.mp4", "source.mp4", "side_by_side.mp4", "preview.png", "run.json")


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def xl(xl_dir):
    return load_model(xl_dir, device="cpu", dtype="float32")


def test_sdxl_is_recognised_with_its_native_size_and_dual_conditioning(xl):
    assert xl.family == "sdxl" and xl.default_size == 64  # sample_size 8 x VAE factor 8
    cond = xl.condition(["", "a robot"], height=64, width=96)
    assert cond.embeds.shape == (2, 77, 32)  # both text encoders' hidden states, concatenated
    assert cond.added["text_embeds"].shape == (2, 16)
    assert cond.added["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    assert not torch.equal(cond.embeds[0], cond.embeds[1])


def test_layers_chosen_by_role_on_the_sdxl_layout(xl):
    self_attn, qk, conv = select_layers(xl.unet)
    # SDXL's decoder starts with cross-attention blocks; the first (coarsest) attention module is skipped
    assert all(n.startswith("up_blocks.") for n in qk)
    assert not any(n.startswith("up_blocks.0.attentions.0.") for n in qk)
    assert any(n.startswith("up_blocks.0.attentions.1.") for n in qk)
    assert conv == ["up_blocks.1.resnets.1"]
    assert len(self_attn) == sum(1 for n in xl.unet.attn_processors if n.endswith("attn1.processor"))


def test_processors_on_sdxl_apply_and_remove_exactly(xl):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 12, generator=g)
    cond = xl.condition(["", "ugly", "a robot"], 64, 96).rows([0, 0, 1, 1, 2, 2])
    before = xl.predict(latents, 500, cond)
    state = TokenFlowState()
    with tokenflow_attention(xl.unet, state):
        assert torch.equal(xl.predict(latents, 500, cond), before)
        with state.calling(KeyframeCall.all(2, store=False, inject=Injection(qk=True, residual=True))):
            assert not torch.allclose(xl.predict(latents, 500, cond), before, atol=1e-4)
    assert torch.equal(xl.predict(latents, 500, cond), before)


def _args(clip, model, out, cache, *extra):
    return ["edit", str(clip), "--prompt", "a robot", "--model", str(model), "--steps", "3", "--inversion-steps", "3",
            "--batch-size", "4", "--cache-dir", str(cache), "--out", str(out), "--quiet", *extra]


def test_sdxl_edits_end_to_end_through_the_cli_at_its_native_size(pan_clip, xl_dir, tmp_path):
    out = tmp_path / "xl"
    assert main(_args(pan_clip, xl_dir, out, tmp_path / "cache")) == 0  # no --size: the model's own (64)
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    with av.open(str(out / "edited.mp4")) as c:
        stream = c.streams.video[0]
        assert (stream.width, stream.height) == (96, 64)  # 144x96 source at short side 64
        assert c.streams.audio
    report = json.loads((out / "run.json").read_text())
    assert report["output"]["height"] == 64 and len(report["keyframes"]) == 3
    other = tmp_path / "xl-other"
    assert main(_args(pan_clip, xl_dir, other, tmp_path / "cache", "--prompt", "a marble statue")) == 0
    assert_real_edit(out, PAN_FRAMES, (96, 64), other=other)


def test_sdxl_with_controlnet_end_to_end(pan_clip, xl_dir, tmp_path):
    cn = build_tiny_controlnet(tmp_path / "xl-cn", xl_dir)
    out = tmp_path / "xl-cn-run"
    assert main(_args(pan_clip, xl_dir, out, tmp_path / "cache", "--mode", "controlnet", "--controlnet", str(cn))) == 0
    assert (out / "control.mp4").is_file() and (out / "edited.mp4").is_file()
    assert_real_edit(out, PAN_FRAMES, (96, 64))


def test_an_sdxl_controlnet_on_an_sd_base_is_refused(pan_clip, xl_dir, tmp_path, capsys):
    sd = build_tiny_sd(tmp_path / "sd")
    cn = build_tiny_controlnet(tmp_path / "xl-cn", xl_dir)
    out = tmp_path / "bad"
    code = main(_args(pan_clip, sd, out, tmp_path / "cache", "--mode", "controlnet", "--controlnet", str(cn)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another base model" in err[0], err
    assert not out.exists()


def test_a_single_file_checkpoint_is_recognised_as_sdxl_by_its_keys(tmp_path):
    from safetensors.torch import save_file

    from tokenflow.backbones.loading import _checkpoint_family

    xl_file, sd_file = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(xl_file))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, str(sd_file))
    assert _checkpoint_family(str(xl_file), xl_file, None, True) == "sdxl"
    assert _checkpoint_family(str(sd_file), sd_file, None, True) == "sd"


def test_the_keyframe_budget_counts_the_tokens_of_the_largest_attention_level(xl, tiny_model):
    # SDXL's first block has no attention: its largest attention level is the latent downsampled once
    assert xl.attention_tokens(128, 96) == 64 * 48
    assert tiny_model.attention_tokens(64, 48) == 64 * 48


def test_the_adapters_facts_match_each_unets_config(xl, tiny_model):
    """What the adapter says about each family, checked against the configs it summarises."""
    from tokenflow.backbones import StableDiffusionModel, StableDiffusionXLModel

    assert type(xl) is StableDiffusionXLModel and type(tiny_model) is StableDiffusionModel
    for model in (xl, tiny_model):
        config = model.unet.config
        factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        assert model.vae_scale_factor == factor == 8
        assert model.min_side == factor * 2 ** (len(config.down_block_types) - 1)
        assert model.default_size == config.sample_size * factor
        assert model.prediction_type == model.scheduler_config.get("prediction_type", "epsilon")
        attention_levels = [i for i, b in enumerate(config.down_block_types) if "Attn" in b]
        assert model.attention_tokens(64, 32) == (64 >> attention_levels[0]) * (32 >> attention_levels[0])
        layers = model.layers()
        processors = model.unet.attn_processors
        assert set(layers.self_attention) == {n for n in processors if n.endswith("attn1.processor")}
        assert set(layers.qk) <= set(layers.self_attention) and all(n.startswith("up_blocks.") for n in layers.qk)
        assert all(type(model.unet.get_submodule(n)).__name__ == "ResnetBlock2D" for n in layers.residual)
    assert xl.attention_tokens(64, 32) == 32 * 16 and tiny_model.attention_tokens(64, 32) == 64 * 32
    # the two families condition differently: SDXL adds pooled text and size ids
    assert xl.condition(["a"], 64, 96).added is not None and tiny_model.condition(["a"], 64, 96).added is None


def test_feature_analysis_on_sdxl_defaults_to_its_highest_resolution_decoder_attention(xl):
    """SDXL's highest-resolution level has no attention: the default layer is the first self-attention of the
    decoder's next level, found from the token grids (not from layer names)."""
    from tokenflow.analysis import capture_tokens, default_layer, list_layers, reconstruct_from_tokens
    from tokenflow.editor import TokenFlowEditor
    from tokenflow.testing import pan_frames

    frames = torch.from_numpy(pan_frames(num_frames=3, width=128, height=128, shift=8))
    source = TokenFlowEditor(xl).invert(frames, steps=4, progress=False)
    layers = list_layers(xl, 16, 16)
    assert max(layer.grid for layer in layers) == (8, 8)  # latent 16x16, first attention one level down
    name = default_layer(xl, layers)
    assert name == "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    tokens = capture_tokens(xl, source.noisy[251], 251, [name])[name]
    assert tokens.grid == (8, 8) and tokens.outputs.shape == (3, 64, 16)
    rec = reconstruct_from_tokens(xl, source, 0, [0], 4)  # SDXL's added conditioning reaches the replaced calls
    assert torch.equal(rec.tokens, rec.plain)
