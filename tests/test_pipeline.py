"""TokenFlowPipeline: the diffusers face of the editor, checked against TokenFlowEditor on the tiny model (and
the SDXL, SD3 and FLUX.1 pipelines on theirs)."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import PIL.Image
import pytest
import torch

from tokenflow.editor import EditConfig, TokenFlowEditor
from tokenflow.inversion import InversionCache, SourceLatents
from tokenflow.pipeline import (
    TokenFlowFluxPipeline,
    TokenFlowPipeline,
    TokenFlowPipelineOutput,
    TokenFlowSD3Pipeline,
    TokenFlowXLPipeline,
)
from tokenflow.io import resize_frames
from tokenflow.testing import make_pan_clip, pan_frames

STEPS, INV_STEPS, BATCH = 3, 6, 2
KW = dict(prompt="a robot", num_inference_steps=STEPS, num_inversion_steps=INV_STEPS, batch_size=BATCH,
          reconstruct=False)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    """Loaded from a plain StableDiffusionPipeline folder (the tiny model's)."""
    return _quiet(TokenFlowPipeline.from_pretrained(str(tiny_model_dir)))


@pytest.fixture(scope="module")
def editor(tiny_model):
    return TokenFlowEditor(tiny_model)


@pytest.fixture(scope="module")
def source(editor, pan6) -> SourceLatents:
    return editor.invert(pan6, steps=STEPS, inversion_steps=INV_STEPS, batch_size=BATCH, reconstruct=False,
                         progress=False)


@pytest.fixture(scope="module")
def reference(editor, source):
    """The editor's own edit of pan6 (default options, seed 0) and its decode."""
    out = editor.edit(source, EditConfig(prompt="a robot", steps=STEPS, batch_size=BATCH), progress=False)
    return out, editor.model.decode_latents(out.latents).numpy()


def test_output_equals_the_editor_edit_and_decode_exactly(pipe, pan6, reference):
    ref, ref_frames = reference
    latent = pipe(pan6, output_type="latent", **KW)
    assert isinstance(latent, TokenFlowPipelineOutput)
    assert torch.equal(latent.frames[0], ref.latents)
    frames = pipe(pan6, **KW).frames[0]  # pil
    assert np.array_equal(np.stack([np.asarray(f) for f in frames]), ref_frames)
    assert all(p.requires_grad for p in pipe.unet.parameters())  # run frozen, as the CLI's model; restored after


def test_generator_drives_the_keyframes_like_the_editor(pipe, editor, pan6, source):
    config = EditConfig(prompt="a robot", steps=STEPS, batch_size=BATCH)
    ref = editor.edit(source, config, progress=False, generator=torch.Generator().manual_seed(7))
    seed0 = editor.edit(source, config, progress=False)
    assert ref.keyframes != seed0.keyframes  # the generator, not the seed, drew them
    out = pipe(pan6, source_latents=source, generator=torch.Generator().manual_seed(7), output_type="latent", **KW)
    assert torch.equal(out.frames[0], ref.latents)


def test_every_output_type_and_the_default_size(pipe, pan6, source, reference):
    _, ref_frames = reference
    n = pan6.shape[0]
    pil = pipe(pan6, source_latents=source, output_type="pil", **KW).frames
    assert len(pil) == 1 and len(pil[0]) == n and all(isinstance(f, PIL.Image.Image) for f in pil[0])
    assert {f.size for f in pil[0]} == {(96, 64)}
    arr = pipe(pan6, source_latents=source, output_type="np", **KW).frames
    assert isinstance(arr, np.ndarray) and arr.shape == (1, n, 64, 96, 3) and arr.dtype == np.float32
    assert 0 <= arr.min() and arr.max() <= 1 and np.array_equal((arr[0] * 255).round().astype(np.uint8), ref_frames)
    pt = pipe(pan6, source_latents=source, output_type="pt", **KW).frames
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, n, 3, 64, 96)
    assert torch.equal(pt.permute(0, 1, 3, 4, 2), torch.from_numpy(arr))
    latent = pipe(pan6, source_latents=source, output_type="latent", return_dict=False, **KW)
    assert isinstance(latent, tuple) and latent[0].shape == (1, n, 4, 8, 12)


def test_height_and_width_default_to_the_video_size_rounded_to_the_vae_factor(pipe):
    odd = pan_frames(num_frames=2, width=101, height=70, shift=4)  # -> 96x64, center-cropped, aspect kept
    kw = dict(KW, num_inference_steps=1, num_inversion_steps=1, output_type="np")
    out = pipe(odd, **kw).frames
    assert out.shape == (1, 2, 64, 96, 3)
    assert np.array_equal(out, pipe(resize_frames(odd, 96, 64), **kw).frames)
    wide = pan_frames(num_frames=1, width=150, height=100, shift=4)
    assert pipe(wide, width=96, **kw).frames.shape == (1, 1, 64, 96, 3)  # height from the aspect ratio
    assert pipe(wide, height=64, width=64, **kw).frames.shape == (1, 1, 64, 64, 3)


def test_from_pipe_shares_the_very_modules(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None,
                                                 requires_safety_checker=False)
    tf = TokenFlowPipeline.from_pipe(sd)
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert getattr(tf, name) is getattr(sd, name), name
    model = tf.tokenflow_model()
    assert model.unet is sd.unet and model.vae is sd.vae and model.text_encoder is sd.text_encoder
    assert tf.name_or_path == sd.name_or_path == str(tiny_model_dir)
    back = StableDiffusionPipeline.from_pipe(tf)
    assert back.unet is sd.unet


def test_save_pretrained_then_from_pretrained_round_trips(pipe, pan6, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "TokenFlowPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    loaded = _quiet(TokenFlowPipeline.from_pretrained(tmp_path / "saved"))
    kw = dict(KW, num_inference_steps=2, num_inversion_steps=2, output_type="latent")
    assert torch.equal(loaded(pan6, **kw).frames, pipe(pan6, **kw).frames)


def test_callback_gets_diffusers_arguments_and_may_replace_the_latents(pipe, editor, pan6, source, reference):
    ref, _ = reference
    calls = []

    def record(p, step, t, kwargs):
        calls.append((p, step, t, sorted(kwargs), kwargs["latents"].clone()))
        return kwargs

    out = pipe(pan6, source_latents=source, output_type="latent", callback_on_step_end=record, **KW)
    assert torch.equal(out.frames[0], ref.latents)  # returning the same latents changes nothing
    assert [c[1] for c in calls] == list(range(STEPS))
    assert all(c[0] is pipe and c[3] == ["latents"] for c in calls)
    assert all(isinstance(c[2], torch.Tensor) for c in calls) and [int(c[2]) for c in calls] == ref.timesteps
    assert torch.equal(calls[-1][4], ref.latents)

    # a returned "latents" replaces them: mid-run, as the editor's own callback does
    def halve(p, step, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if step == 1 else {}

    halved = pipe(pan6, source_latents=source, output_type="latent", callback_on_step_end=halve, **KW).frames[0]
    expect = editor.edit(source, EditConfig(prompt="a robot", steps=STEPS, batch_size=BATCH), progress=False,
                         callback_on_step_end=lambda step, t, x: x * 0.5 if step == 1 else None)
    assert torch.equal(halved, expect.latents) and not torch.equal(halved, ref.latents)

    # ... and at the last step they are the output: zeros decode to the decode of zeros
    def zeros(p, step, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == STEPS - 1 else {}

    arr = pipe(pan6, source_latents=source, output_type="np", callback_on_step_end=zeros, **KW).frames[0]
    decoded = editor.model.decode_latents(torch.zeros_like(ref.latents)).numpy()
    assert np.array_equal((arr * 255).round().astype(np.uint8), decoded)


def test_invert_equals_the_editor_and_source_latents_are_reused(pipe, pan6, source, reference):
    ref, _ = reference
    mine = pipe.invert(pan6, num_inference_steps=STEPS, num_inversion_steps=INV_STEPS, batch_size=BATCH,
                       reconstruct=False)
    assert isinstance(mine, SourceLatents) and torch.equal(mine.clean, source.clean)
    assert sorted(mine.noisy) == sorted(source.noisy)
    assert all(torch.equal(mine.noisy[t], source.noisy[t]) for t in source.noisy)
    # the video may be left out when the source latents are given
    out = pipe(None, source_latents=mine, output_type="latent", **KW)
    assert torch.equal(out.frames[0], ref.latents)


def test_cache_dir_writes_one_entry_the_cli_finds_and_a_second_call_hits_it(
    pipe, editor, pan6, reference, tmp_path, monkeypatch
):
    ref, _ = reference
    cache = tmp_path / "cache"
    first = pipe(pan6, cache_dir=cache, output_type="latent", **KW)
    assert torch.equal(first.frames[0], ref.latents)
    entries = InversionCache(cache).entries()
    assert len(entries) == 1

    def no_inversion(*args, **kwargs):
        raise AssertionError("inverted again instead of reading the cache")

    monkeypatch.setattr(InversionCache, "invert", no_inversion)
    again = pipe.invert(pan6, num_inference_steps=STEPS, num_inversion_steps=INV_STEPS, batch_size=BATCH,
                        cache_dir=cache, reconstruct=False)
    assert again.lazy and again.clean.shape[0] == 6
    second = pipe(pan6, cache_dir=cache, output_type="latent", **KW)
    assert torch.equal(second.frames[0], ref.latents)
    # the same key as the CLI's (load_model of the same folder): the CLI's inversion reads this entry
    hits = []
    editor.invert(pan6, steps=STEPS, inversion_steps=INV_STEPS, batch_size=BATCH, cache=InversionCache(cache),
                  reconstruct=False, progress=False, on_cache_hit=hits.append)
    assert hits == entries and InversionCache(cache).entries() == entries


def test_a_pipeline_built_in_memory_keys_the_cache_by_its_weights(pipe, pan6, tmp_path):
    kw = dict(num_inference_steps=1, num_inversion_steps=1, batch_size=BATCH, reconstruct=False,
              cache_dir=tmp_path / "cache")
    built = _quiet(TokenFlowPipeline(**pipe.components))  # no folder or hub id to name it
    assert not built.name_or_path and built.unet is pipe.unet
    built.invert(pan6[:2], **kw)
    built.invert(pan6[:2], **kw)
    assert len(InversionCache(tmp_path / "cache").entries()) == 1
    vae = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    _quiet(TokenFlowPipeline(**dict(pipe.components, vae=vae))).invert(pan6[:2], **kw)  # other weights: a new key
    assert len(InversionCache(tmp_path / "cache").entries()) == 2
    pipe.invert(pan6[:2], **kw)  # the same weights by name: its own key
    assert len(InversionCache(tmp_path / "cache").entries()) == 3


def test_bad_arguments_raise_value_errors_naming_them(pipe, pan6, source):
    g = torch.Generator()
    cases = [
        (dict(output_type="gif"), "output_type"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inversion_steps=0), "num_inversion_steps"),
        (dict(prompt="  "), "prompt"),
        (dict(prompt=None), "prompt"),
        (dict(prompt=["a", "b"]), "prompt"),
        (dict(callback_on_step_end_tensor_inputs=["prompt_embeds"]), "callback_on_step_end_tensor_inputs"),
        (dict(batch_size=0), "batch_size"),
        (dict(pnp_attn_t=1.5), "pnp_attn_t"),
        (dict(propagation="bogus"), "propagation"),
        (dict(mode="bogus"), "mode"),
        (dict(mode="controlnet"), "controlnet"),
        (dict(height=60), "height"),
        (dict(width=32), "width"),
        (dict(generator=[g, g]), "generator"),
        (dict(video=[]), "video"),
        (dict(video=np.zeros((0, 64, 96, 3), np.uint8)), "video"),
        (dict(video=np.full((2, 64, 96, 3), 2.0)), "video"),
        (dict(video=np.zeros((2, 3, 64, 96, 3), np.uint8)), "video"),
        (dict(video="no/such/clip.mp4"), "`video`: no/such/clip.mp4"),
        (dict(video=np.zeros((2, 40, 60, 3), np.uint8)), "`video` is 60x40: too small"),
        (dict(video=None), "video"),
        (dict(video=pan6[:5], source_latents=source), "source_latents"),
        (dict(source_latents=source, num_inference_steps=4), "num_inference_steps"),
    ]
    for kwargs, word in cases:
        call = dict(KW, video=pan6)
        call.update(kwargs)
        with pytest.raises(ValueError, match=word):
            pipe(**call)


def test_pil_numpy_tensor_and_path_inputs_give_the_same_result(pipe, pan6, tmp_path):
    kw = dict(KW, num_inference_steps=1, num_inversion_steps=1, output_type="latent")
    frames = pan6.numpy()
    expect = pipe(frames, **kw).frames
    clip, folder = tmp_path / "pan.mkv", tmp_path / "pan"  # lossless FFV1, and a folder of PNGs
    make_pan_clip(clip, num_frames=6, width=96, height=64, shift=4)
    make_pan_clip(folder, num_frames=6, width=96, height=64, shift=4)
    inputs = {
        "pil": [PIL.Image.fromarray(f) for f in frames],
        "torch uint8 NHWC": pan6,
        "float np": frames.astype(np.float32) / 255,
        "float torch NCHW": torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255,
        "video file": clip,
        "folder path": str(folder),
    }
    for name, video in inputs.items():
        assert torch.equal(pipe(video, **kw).frames, expect), name


def test_progress_follows_the_progress_bar_config(tiny_model_dir, pan6, source, capsys):
    loud = TokenFlowPipeline.from_pretrained(str(tiny_model_dir))
    capsys.readouterr()
    loud(pan6, source_latents=source, output_type="latent", **KW)
    assert "editing" in capsys.readouterr().err
    loud.set_progress_bar_config(disable=True)
    loud(pan6, source_latents=source, output_type="latent", **KW)
    assert "editing" not in capsys.readouterr().err


def test_the_model_follows_to_and_cpu_offload(tiny_model_dir, pan6, source, reference):
    ref, _ = reference
    moved = _quiet(TokenFlowPipeline.from_pretrained(str(tiny_model_dir)))
    moved.to(torch.float64)
    model = moved.tokenflow_model()
    assert model.dtype == torch.float64 and model.unet is moved.unet and model.device.type == "cpu"
    double = moved(pan6, source_latents=source, output_type="latent", **KW).frames[0]
    assert not torch.equal(double, ref.latents)  # run in float64 ...
    torch.testing.assert_close(double, ref.latents, atol=1e-3, rtol=1e-3)  # ... the same edit
    moved.to(torch.float32)
    moved.enable_model_cpu_offload(device="cpu")  # accelerate's hooks; the device a GPU would be
    assert moved.tokenflow_model().device == moved._execution_device
    out = moved(pan6, source_latents=source, output_type="latent", **KW).frames[0]
    assert torch.equal(out, ref.latents)


def test_safety_checker_from_an_sd_folder_loads_and_flags_frames(tiny_model_dir, pipe, pan6, source, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config=dict(tower, vocab_size=128), vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16))
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine >= -1 > -2: every frame is flagged
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    sd = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=checker,
                                                 feature_extractor=extractor)
    sd.save_pretrained(tmp_path / "sd15-like")  # model_index names the safety checker and its processor
    loaded = _quiet(TokenFlowPipeline.from_pretrained(tmp_path / "sd15-like"))
    assert isinstance(loaded.safety_checker, StableDiffusionSafetyChecker) and loaded.feature_extractor is not None
    out = loaded(pan6, source_latents=source, output_type="np", **KW)
    assert out.nsfw_content_detected == [[True] * 6] and not out.frames.any()
    assert pipe(pan6, source_latents=source, output_type="np", **KW).frames.any()
    without = _quiet(TokenFlowPipeline.from_pretrained(tmp_path / "sd15-like", safety_checker=None))
    plain = without(pan6, source_latents=source, output_type="np", **KW)
    assert plain.nsfw_content_detected is None and plain.frames.any()


def test_lora_weights_load_and_key_the_cache(tiny_model_dir, pan6, tmp_path):
    from tokenflow.models import load_model
    from tokenflow.testing import build_tiny_lora

    lora = build_tiny_lora(tmp_path / "lora", tiny_model_dir)
    kw = dict(KW, num_inference_steps=2, num_inversion_steps=2, output_type="latent", cache_dir=tmp_path / "cache")
    tuned = _quiet(TokenFlowPipeline.from_pretrained(str(tiny_model_dir)))
    base = tuned(pan6, **kw).frames[0]
    tuned.load_lora_weights(str(lora))
    out = tuned(pan6, **kw).frames[0]
    assert not torch.equal(out, base)
    assert len(InversionCache(tmp_path / "cache").entries()) == 2  # the LoRA is part of the cache key
    model = load_model(tiny_model_dir, device="cpu", dtype="float32", loras=[(str(lora), 1.0)])
    editor = TokenFlowEditor(model)
    src = editor.invert(pan6, steps=2, inversion_steps=2, batch_size=BATCH, reconstruct=False, progress=False)
    expect = editor.edit(src, EditConfig(prompt="a robot", steps=2, batch_size=BATCH), progress=False)
    assert torch.equal(out, expect.latents)


def test_controlnet_mode_with_canny_maps_equals_the_editor(pipe, tiny_model, pan6, source, tmp_path):
    from diffusers import ControlNetModel

    from tokenflow.control import canny_maps
    from tokenflow.backbones.loading import _load_controlnet
    from tokenflow.testing import build_tiny_controlnet

    cn_dir = build_tiny_controlnet(tmp_path / "cn", pipe.name_or_path)
    controlnet = ControlNetModel.from_pretrained(cn_dir)
    controlled = _quiet(TokenFlowPipeline.from_pipe(pipe, controlnet=controlnet))
    assert controlled.unet is pipe.unet and controlled.controlnet is controlnet
    out = controlled(pan6, source_latents=source, mode="controlnet", conditioning_frames="canny",
                     output_type="latent", **KW).frames[0]
    # the CLI's ControlNet (load_model --controlnet): loaded and frozen by tokenflow.models
    model = dataclasses.replace(tiny_model, controlnet=_load_controlnet(str(cn_dir), tiny_model.unet,
                                                                        torch.float32).requires_grad_(False))
    expect = TokenFlowEditor(model).edit(source, EditConfig(prompt="a robot", steps=STEPS, batch_size=BATCH,
                                                            mode="controlnet"),
                                         progress=False, control=canny_maps(pan6.numpy()))
    assert torch.equal(out, expect.latents)
    maps = [PIL.Image.fromarray(m) for m in canny_maps(pan6.numpy())]
    again = controlled(pan6, source_latents=source, mode="controlnet", conditioning_frames=maps,
                       output_type="latent", **KW).frames[0]
    assert torch.equal(again, expect.latents)


def test_sdxl_pipeline_equals_the_editor(tmp_path, pan6):
    from tokenflow.models import load_model
    from tokenflow.testing import build_tiny_sdxl

    xl_dir = build_tiny_sdxl(tmp_path / "xl")
    with pytest.raises(ValueError, match="TokenFlowXLPipeline"):
        TokenFlowPipeline.from_pretrained(xl_dir)
    xl = _quiet(TokenFlowXLPipeline.from_pretrained(xl_dir))
    frames = pan6[:2]
    kw = dict(KW, num_inference_steps=2, num_inversion_steps=2, output_type="latent")
    out = xl(frames, **kw).frames[0]
    editor = TokenFlowEditor(load_model(xl_dir, device="cpu", dtype="float32"))
    src = editor.invert(frames, steps=2, inversion_steps=2, batch_size=BATCH, reconstruct=False, progress=False)
    expect = editor.edit(src, EditConfig(prompt="a robot", steps=2, batch_size=BATCH), progress=False)
    assert torch.equal(out, expect.latents)


def test_the_readme_snippet_with_diffusers_own_video_helpers(tiny_model_dir, tmp_path):
    """``load_video`` -> pipeline -> ``export_to_video``, as a diffusers user writes it (imageio-ffmpeg backend)."""
    from diffusers.utils import export_to_video, load_video

    from tokenflow.io import probe

    clip = tmp_path / "wolf.mp4"
    make_pan_clip(clip, num_frames=6, width=96, height=64, shift=4, fps=12, audio=False)
    pipe = TokenFlowPipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    video = load_video(str(clip))[:4]  # list of PIL images
    out = pipe(video, prompt="a shiny silver robot wolf", inversion_prompt="a wolf in the snow",
               num_inference_steps=2, num_inversion_steps=2, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0))
    path = export_to_video(out.frames[0], str(tmp_path / "robot.mp4"), fps=10)
    info = probe(path)
    assert info.num_frames == 4 and (info.width, info.height) == (96, 64) and info.fps == pytest.approx(10)


# -- SD3 and FLUX.1: the diffusion-transformer pipelines ---------------------------------------------------------

# (pipeline class, the diffusers pipeline a folder holds, a guidance scale of the family's usual kind)
DIT = {"sd3": (TokenFlowSD3Pipeline, "StableDiffusion3Pipeline", 7.0),
       "flux": (TokenFlowFluxPipeline, "FluxPipeline", 3.5)}
DIT_KW = dict(prompt="a robot", inversion_prompt="a photo", num_inference_steps=STEPS, batch_size=BATCH,
              reconstruct=False)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from tokenflow.testing import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from tokenflow.testing import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux"))  # FLUX.1-dev-like: guidance is an input


@pytest.fixture(scope="module")
def clip64() -> torch.Tensor:
    """Four 64x64 frames of a pan: 16 image tokens a frame on both tiny transformers."""
    return torch.from_numpy(pan_frames(num_frames=4, width=64, height=64, shift=4))


def _editor_edit(folder, frames, guidance: float, steps: int = STEPS):
    """The same edit through ``load_model`` + ``TokenFlowEditor`` (the CLI's path): (source, edit, decoded)."""
    from tokenflow.models import load_model

    editor = TokenFlowEditor(load_model(folder, device="cpu", dtype="float32"))
    source = editor.invert(frames, inversion_prompt="a photo", steps=steps, batch_size=BATCH, reconstruct=False,
                           progress=False)
    config = EditConfig(prompt="a robot", inversion_prompt="a photo", steps=steps, batch_size=BATCH,
                        guidance_scale=guidance)
    out = editor.edit(source, config, progress=False)
    return editor, source, out, editor.model.decode_latents(out.latents).numpy()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_pipelines_equal_the_editor_edit_and_decode_exactly(request, family, clip64, tmp_path):
    cls, _, guidance = DIT[family]
    folder = request.getfixturevalue(f"{family}_dir")
    pipe = _quiet(cls.from_pretrained(folder))
    model = pipe.tokenflow_model()
    assert model.family == family and model.unet is pipe.transformer and model.pipeline is pipe
    editor, ref_source, ref, ref_frames = _editor_edit(folder, clip64, guidance)
    kw = dict(DIT_KW, guidance_scale=guidance)
    latent = pipe(clip64, output_type="latent", cache_dir=tmp_path / "cache", **kw)
    assert torch.equal(latent.frames[0], ref.latents)
    frames = pipe(clip64, **kw).frames[0]  # pil
    assert np.array_equal(np.stack([np.asarray(f) for f in frames]), ref_frames)
    assert all(p.requires_grad for p in pipe.transformer.parameters())  # run frozen; restored after
    # the CLI's inversion finds the pipeline's cache entry (the same key)
    hits = []
    editor.invert(clip64, inversion_prompt="a photo", steps=STEPS, batch_size=BATCH, reconstruct=False,
                  progress=False, cache=InversionCache(tmp_path / "cache"), on_cache_hit=hits.append)
    assert hits and hits == InversionCache(tmp_path / "cache").entries()
    # invert, then edit from the source latents; the guidance scale reaches the model (FLUX: as an input)
    source = pipe.invert(clip64, inversion_prompt="a photo", num_inference_steps=STEPS, batch_size=BATCH,
                         reconstruct=False)
    assert torch.equal(source.clean, ref_source.clean)
    assert all(torch.equal(source.noisy[t], ref_source.noisy[t]) for t in ref_source.noisy)
    again = pipe(None, source_latents=source, output_type="latent", **kw).frames[0]
    assert torch.equal(again, ref.latents)
    other = pipe(None, source_latents=source, output_type="latent", **dict(kw, guidance_scale=1.0)).frames[0]
    assert not torch.equal(other, ref.latents)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_from_pipe_of_a_diffusers_sd3_or_flux_pipeline_shares_its_modules(request, family, clip64):
    import diffusers

    cls, diffusers_name, guidance = DIT[family]
    folder = request.getfixturevalue(f"{family}_dir")
    base = getattr(diffusers, diffusers_name).from_pretrained(str(folder))
    tf = _quiet(cls.from_pipe(base))
    assert set(tf.components) <= set(base.components)  # no IP-Adapter image encoder
    for name, module in tf.components.items():
        assert module is getattr(base, name), name
    assert tf.tokenflow_model().unet is base.transformer and tf.name_or_path == str(folder)
    kw = dict(DIT_KW, guidance_scale=guidance, num_inference_steps=2, output_type="latent")
    out = tf(clip64[:2], **kw).frames[0]
    _, _, expect, _ = _editor_edit(folder, clip64[:2], guidance, steps=2)
    assert torch.equal(out, expect.latents)
    assert getattr(diffusers, diffusers_name).from_pipe(tf).transformer is base.transformer


def test_sd3_without_t5_loads_and_edits_as_the_editor(tmp_path, clip64):
    from tokenflow.testing import build_tiny_sd3

    folder = build_tiny_sd3(tmp_path / "sd3-no-t5", with_t5=False)  # diffusers' own pipeline needs them passed
    pipe = _quiet(TokenFlowSD3Pipeline.from_pretrained(folder))
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    kw = dict(DIT_KW, num_inference_steps=2, guidance_scale=7.0, output_type="latent")
    _, _, expect, _ = _editor_edit(folder, clip64[:2], 7.0, steps=2)
    assert torch.equal(pipe(clip64[:2], **kw).frames[0], expect.latents)
    pipe.enable_model_cpu_offload(device="cpu")  # diffusers' offload order names T5, absent here
    assert torch.equal(pipe(clip64[:2], **kw).frames[0], expect.latents)


def test_a_folder_of_another_family_is_refused_naming_the_pipeline_that_takes_it(sd3_dir, flux_dir, tiny_model_dir):
    with pytest.raises(ValueError, match="takes an SD3 transformer, got a FluxTransformer2DModel; use "
                                         "TokenFlowFluxPipeline"):
        TokenFlowSD3Pipeline.from_pretrained(flux_dir)  # diffusers loads the folder's modules by name
    with pytest.raises(ValueError, match="takes a FLUX.1 transformer, got a SD3Transformer2DModel; use "
                                         "TokenFlowSD3Pipeline"):
        TokenFlowFluxPipeline.from_pretrained(sd3_dir)
    for cls, folder in ((TokenFlowSD3Pipeline, tiny_model_dir), (TokenFlowPipeline, flux_dir)):
        with pytest.raises(ValueError, match="expected"):  # diffusers' own: the denoiser is missing
            cls.from_pretrained(folder)
    sd = TokenFlowPipeline.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="got a UNet2DConditionModel; use TokenFlowPipeline"):
        TokenFlowFluxPipeline(**dict(TokenFlowFluxPipeline.from_pretrained(flux_dir).components, transformer=sd.unet))


def test_sd3_and_flux_arguments_are_checked_against_the_transformer(flux_dir, sd3_dir, clip64):
    flux = _quiet(TokenFlowFluxPipeline.from_pretrained(flux_dir))
    sd3 = _quiet(TokenFlowSD3Pipeline.from_pretrained(sd3_dir))
    cases = [
        (dict(height=72), "`height` 72 has to be a positive multiple of 16 \\(the VAE factor 8 x the patch size 2\\)"),
        (dict(width=8), "`width` 8 has to be a positive multiple of 16"),
        (dict(mode="controlnet"), "has no ControlNet"),
        (dict(video=np.zeros((2, 12, 40, 3), np.uint8)), "`video` is 40x12: too small for this transformer"),
    ]
    for pipe in (flux, sd3):
        for kwargs, message in cases:
            call = dict(DIT_KW, video=clip64)
            call.update(kwargs)
            with pytest.raises(ValueError, match=message):
                pipe(**call)
    # the default working size rounds down to whole tokens: a 72x56 video is edited at 64x48
    out = flux(pan_frames(num_frames=2, width=72, height=56, shift=4), output_type="np",
               **dict(DIT_KW, num_inference_steps=1)).frames
    assert out.shape == (1, 2, 48, 64, 3)
