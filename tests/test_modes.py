"""SDEdit and ControlNet modes, LoRA weights, and the mismatches they refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenflow.inversion import load_latents

from tokenflow.cli import main
from tokenflow.control import canny_maps, to_control_tensor
from tokenflow.editor import EditConfig, TokenFlowEditor
from tokenflow.errors import InputError, ModelLoadError
from tokenflow.inversion import invert_frames
from tokenflow.models import load_model
from tokenflow.testing import build_tiny_controlnet, build_tiny_lora, build_tiny_sd
from tokenflow.testing import pan_frames

from conftest import PAN_FRAMES, assert_real_edit

STEPS = 6
SIZE = (96, 64)  # the 144x96 clip at --size 64


@pytest.fixture(scope="module")
def controlnet_dir(tiny_model_dir, tmp_path_factory):
    return build_tiny_controlnet(tmp_path_factory.mktemp("tiny-controlnet"), tiny_model_dir)


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return build_tiny_lora(tmp_path_factory.mktemp("tiny-lora"), tiny_model_dir)


@pytest.fixture(scope="module")
def cn_model(tiny_model_dir, controlnet_dir):
    return load_model(tiny_model_dir, device="cpu", dtype="float32", controlnet=controlnet_dir)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return pan_frames(num_frames=4, width=96, height=64, shift=4)


@pytest.fixture(scope="module")
def source(cn_model, frames):
    return invert_frames(cn_model, torch.from_numpy(frames), steps=STEPS, inversion_steps=STEPS, reconstruct=False,
                         progress=False)


def _config(**kw) -> EditConfig:
    base = dict(prompt="a robot", steps=STEPS, batch_size=2, seed=0)
    base.update(kw)
    return EditConfig(**base)


@pytest.mark.parametrize("strength,expected", [(1.0, 6), (0.9, 5), (0.5, 3), (0.2, 1)])
def test_sdedit_runs_exactly_round_strength_times_steps_from_the_right_timestep(cn_model, source, strength, expected):
    out = TokenFlowEditor(cn_model).edit(source, _config(mode="sdedit", strength=strength), progress=False)
    scheduler = cn_model.make_scheduler()
    scheduler.set_timesteps(STEPS)
    full = [int(t) for t in scheduler.timesteps]
    assert len(out.timesteps) == expected == round(strength * STEPS)
    assert out.timesteps == full[STEPS - expected :]  # the least noisy part of the schedule, ending at the last t
    assert len(out.keyframes) == expected


def test_sdedit_strength_zero_returns_the_vae_round_trip(cn_model, source):
    out = TokenFlowEditor(cn_model).edit(source, _config(mode="sdedit", strength=0.0), progress=False)
    assert torch.equal(out.latents, source.clean) and out.timesteps == [] and out.unet_frame_evaluations == 0


def test_sdedit_differs_from_pnp_and_has_its_per_frame_baseline(cn_model, source):
    editor = TokenFlowEditor(cn_model)
    sdedit = editor.edit(source, _config(mode="sdedit", strength=1.0), progress=False)
    pnp = editor.edit(source, _config(mode="pnp"), progress=False)
    assert not torch.allclose(sdedit.latents, pnp.latents, atol=1e-4)  # PnP injection is really off in SDEdit
    forced = editor.edit(source, _config(mode="sdedit", strength=1.0, pnp=True), progress=False)
    assert torch.equal(forced.latents, pnp.latents)
    baseline = editor.edit(source, _config(mode="sdedit", propagation="none"), progress=False)
    assert baseline.keyframes == [[]] * round(0.9 * STEPS)


def test_controlnet_changes_the_output_and_zero_scale_equals_no_controlnet(cn_model, source, frames):
    editor = TokenFlowEditor(cn_model)
    control = to_control_tensor(canny_maps(frames))
    without = editor.edit(source, _config(mode="sdedit", strength=1.0), progress=False)
    zero = editor.edit(source, _config(mode="controlnet", controlnet_scale=0.0), control=control, progress=False)
    full = editor.edit(source, _config(mode="controlnet"), control=control, progress=False)
    assert torch.equal(zero.latents, without.latents)
    assert not torch.allclose(full.latents, without.latents, atol=1e-4)
    # other maps, other result: the conditioning is really read
    other = editor.edit(source, _config(mode="controlnet"), control=1 - control, progress=False)
    assert not torch.allclose(other.latents, full.latents, atol=1e-4)
    with_pnp = editor.edit(source, _config(mode="controlnet", pnp=True), control=control, progress=False)
    assert not torch.allclose(with_pnp.latents, full.latents, atol=1e-4)


def test_controlnet_mode_refuses_missing_or_misshaped_control(cn_model, source, frames):
    editor = TokenFlowEditor(cn_model)
    with pytest.raises(InputError, match="control images"):
        editor.edit(source, _config(mode="controlnet"), progress=False)
    with pytest.raises(InputError, match="do not match"):
        editor.edit(source, _config(mode="controlnet"), control=torch.zeros(4, 3, 32, 32), progress=False)


def test_canny_maps_have_the_frames_size_and_find_edges(frames):
    maps = canny_maps(frames)
    assert maps.shape == frames.shape and maps.dtype == np.uint8
    flat = np.full((1, 40, 60, 3), 128, np.uint8)
    assert canny_maps(flat).max() == 0  # no edges in a flat image
    step = flat.copy()
    step[:, :, 30:] = 255
    assert canny_maps(step)[0, :, 28:32].max() == 255  # the step edge is found where it is


def test_lora_at_scale_zero_equals_no_lora(tiny_model_dir, lora_dir):
    base = load_model(tiny_model_dir, device="cpu")
    zero = load_model(tiny_model_dir, device="cpu", loras=[(str(lora_dir), 0.0)])
    one = load_model(tiny_model_dir, device="cpu", loras=[(str(lora_dir), 1.0)])
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 16, generator=g)
    outputs = [m.unet(x, 500, encoder_hidden_states=text).sample for m in (base, zero, one)]
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-4)


def test_a_controlnet_for_another_base_is_refused(tiny_model_dir, tmp_path):
    other = build_tiny_sd(tmp_path / "other", cross_attention_dim=32)
    other_cn = build_tiny_controlnet(tmp_path / "other-cn", other)
    with pytest.raises(ModelLoadError, match="another base model"):
        load_model(tiny_model_dir, device="cpu", controlnet=other_cn)


def _edit_args(pan_clip, model, out, cache, *extra):
    return ["edit", str(pan_clip), "--prompt", "a robot", "--model", str(model), "--size", "64", "--steps", "3",
            "--inversion-steps", "3", "--batch-size", "4", "--cache-dir", str(cache), "--out", str(out), "--quiet",
            *extra]


def test_cli_controlnet_with_pnp_and_lora_end_to_end(pan_clip, tiny_model_dir, controlnet_dir, lora_dir, tmp_path):
    out = tmp_path / "cn"
    code = main(_edit_args(pan_clip, tiny_model_dir, out, tmp_path / "cache", "--mode", "controlnet",
                           "--controlnet", str(controlnet_dir), "--pnp", "--lora", f"{lora_dir}:0.5",
                           "--save-latents"))
    assert code == 0
    for name in ("edited.mp4", "source.mp4", "control.mp4", "side_by_side.mp4", "preview.png", "run.json"):
        assert (out / name).is_file(), name
    other = tmp_path / "cn-other"
    assert main(_edit_args(pan_clip, tiny_model_dir, other, tmp_path / "cache", "--mode", "controlnet",
                           "--controlnet", str(controlnet_dir), "--pnp", "--lora", f"{lora_dir}:0.5",
                           "--prompt", "a marble statue")) == 0
    assert_real_edit(out, PAN_FRAMES, SIZE, other=other)
    report = json.loads((out / "run.json").read_text())
    assert report["parameters"]["mode"] == "controlnet" and report["parameters"]["pnp"] is True
    assert report["model"]["loras"] == [[str(lora_dir), 0.5]]
    import av

    with av.open(str(out / "control.mp4")) as c, av.open(str(out / "edited.mp4")) as e:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (e.streams.video[0].width,
                                                                         e.streams.video[0].height)


def test_cli_sdedit_strength_zero_is_the_vae_round_trip(pan_clip, tiny_model_dir, tmp_path):
    out = tmp_path / "sd0"
    assert main(_edit_args(pan_clip, tiny_model_dir, out, tmp_path / "cache", "--mode", "sdedit", "--strength", "0",
                           "--save-latents")) == 0
    latents = load_latents(out / "latents")
    assert torch.equal(latents["final"], latents["clean"])


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--mode", "controlnet"], "--controlnet"),
        (["--mode", "controlnet", "--controlnet", "lllyasviel/sd-controlnet-depth", "--control", "canny"],
         "depth ControlNet"),
        (["--mode", "controlnet", "--controlnet", "x/y", "--control", "depth"], "--depth-model"),
        (["--mode", "controlnet", "--controlnet", "x/y", "--control", "nowhere"], "--control nowhere"),
        (["--controlnet", "x/y"], "only used with --mode controlnet"),
        (["--mode", "bogus"], "--mode"),
        (["--mode", "sdedit", "--strength", "1.5"], "--strength"),
        (["--lora", "/no/such/lora.safetensors"], "--lora"),
    ],
)
def test_cli_mode_mismatches_are_one_line_errors(pan_clip, tiny_model_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    code = main(_edit_args(pan_clip, tiny_model_dir, out, tmp_path / "cache", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tokenflow: error:") and needle in err[0], err
    assert not out.exists()


def test_depth_maps_from_a_transformers_estimator_end_to_end(pan_clip, tiny_model_dir, controlnet_dir, tmp_path):
    from tokenflow.control import depth_maps
    from tokenflow.testing import build_tiny_depth_estimator

    depth_dir = build_tiny_depth_estimator(tmp_path / "dpt")
    frames = pan_frames(num_frames=2, width=96, height=64, shift=4)
    maps = depth_maps(frames, str(depth_dir))
    assert maps.shape == frames.shape and maps.min() == 0 and maps.max() == 255  # normalised per frame
    assert (maps[..., 0] == maps[..., 1]).all()  # grey
    out = tmp_path / "depth-run"
    assert main(_edit_args(pan_clip, tiny_model_dir, out, tmp_path / "cache", "--mode", "controlnet", "--controlnet",
                           str(controlnet_dir), "--control", "depth", "--depth-model", str(depth_dir))) == 0
    assert (out / "control.mp4").is_file()
    assert_real_edit(out, PAN_FRAMES, SIZE)


def test_an_unloadable_depth_model_is_one_line(pan_clip, tiny_model_dir, controlnet_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(_edit_args(pan_clip, tiny_model_dir, out, tmp_path / "cache", "--mode", "controlnet", "--controlnet",
                           str(controlnet_dir), "--control", "depth", "--depth-model", str(tmp_path / "no-dpt")))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--depth-model" in err[0], err
    assert not out.exists()


def test_a_folder_of_maps_is_selected_like_the_frames(tmp_path):
    from PIL import Image

    from tokenflow.control import control_maps

    folder = tmp_path / "maps"
    folder.mkdir()
    for i in range(12):  # map i is a flat image of value 10 * i
        Image.fromarray(np.full((32, 48, 3), 10 * i, np.uint8)).save(folder / f"{i:04d}.png")
    frames = np.zeros((4, 64, 96, 3), np.uint8)
    maps = control_maps(str(folder), frames, start=2, stride=3)
    assert maps.shape == frames.shape
    assert [int(m.mean()) for m in maps] == [20, 50, 80, 110]  # frames 2, 5, 8, 11
    with pytest.raises(InputError, match="maps for the"):
        control_maps(str(folder), np.zeros((5, 64, 96, 3), np.uint8), start=2, stride=3)


def load_frames_of(path):
    from tokenflow.io import load_frames

    return load_frames(path)[0]


def test_cli_with_a_folder_of_maps(pan_clip, tiny_model_dir, controlnet_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "maps"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(np.full((96, 144, 3), 25 * i, np.uint8)).save(folder / f"{i:04d}.png")
    out = tmp_path / "folder-run"
    assert main(_edit_args(pan_clip, tiny_model_dir, out, tmp_path / "cache", "--mode", "controlnet", "--controlnet",
                           str(controlnet_dir), "--control", str(folder))) == 0
    assert (out / "control.mp4").is_file()
    assert_real_edit(out, PAN_FRAMES, SIZE)
    control = load_frames_of(out / "control.mp4")
    assert [round(float(m.mean()) / 25) for m in control] == list(range(10))  # map i is the flat image 25 * i


def test_a_model_predicting_something_ddim_inversion_cannot_use_is_refused(tmp_path):
    odd = build_tiny_sd(tmp_path / "sample-pred", prediction_type="sample")
    with pytest.raises(ModelLoadError, match="predicts 'sample'"):
        load_model(odd, device="cpu")


def test_sdxl_vae_stays_float32_when_the_model_runs_in_float16(tmp_path):
    from tokenflow.testing import build_tiny_sdxl

    xl = load_model(build_tiny_sdxl(tmp_path / "xl"), device="cpu", dtype="float16")
    assert xl.unet.dtype == torch.float16 and xl.vae.dtype == torch.float32
    sd = load_model(build_tiny_sd(tmp_path / "sd"), device="cpu", dtype="float16")
    assert sd.vae.dtype == torch.float16  # SD 1.x/2.x VAEs are fine in float16
