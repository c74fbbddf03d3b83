"""The feature analysis (`tokenflow features`, `tokenflow reconstruct`): its maths exactly on synthetic tokens, its
claims on the micro *trained* model (a random model's features make no correspondences: measured, a tiny random UNet's
nearest neighbours recover a 1-token shift for 4% of the tokens), its plumbing end to end on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenflow.analysis import (
    capture_tokens,
    default_layer,
    feature_consistency,
    field_displacement,
    fit_pca,
    frame_consistency,
    frame_consistency_along,
    list_layers,
    nearest_neighbor_field,
    pca_rgb,
    reconstruct_from_tokens,
    resolve_timestep,
    warp_by_field,
    warp_from,
)
from tokenflow.analysis.run import sweep_distances
from tokenflow.cli import main
from tokenflow.inversion import psnr

MICRO = Path(__file__).resolve().parent.parent / "benchmarks" / "micro_model"
GRID = (6, 8)


def _shifted_tokens(shift: int, channels: int = 16, seed: int = 0) -> torch.Tensor:
    """Two frames of tokens on GRID; frame 1 is frame 0 moved left by ``shift`` columns, new tokens entering on
    the right (a camera panning right)."""
    g = torch.Generator().manual_seed(seed)
    rows, columns = GRID
    wide = torch.randn(rows, columns + shift, channels, generator=g)
    frames = torch.stack([wide[:, :columns], wide[:, shift:]])
    return frames.reshape(2, rows * columns, channels)


# ------------------------------------------------------------------------------------ exact, on synthetic tokens


def test_the_pca_image_of_a_shifted_frame_is_the_shifted_pca_image():
    tokens = _shifted_tokens(2)
    basis = fit_pca([tokens])
    projected = basis.project(tokens).reshape(2, *GRID, -1)
    # the same token projects to the same components wherever it sits (float64: only the GEMM's row blocking can
    # differ, a few ulps of values of order 1)
    torch.testing.assert_close(projected[1][:, :-2], projected[0][:, 2:], rtol=0, atol=1e-12)
    rgb = pca_rgb(tokens, GRID, basis)
    assert rgb.shape == (2, *GRID, 3) and 0 <= rgb.min() and rgb.max() <= 1
    torch.testing.assert_close(rgb[1][:, :-2], rgb[0][:, 2:], rtol=0, atol=1e-6)  # float32 rounding of [0, 1]
    # and the colours are not all one: the first three components spread over the colour range
    assert (rgb.amax((0, 1, 2)) - rgb.amin((0, 1, 2)) > 0.9).all()


def test_pca_components_are_ordered_by_variance_and_deterministic():
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([5.0, 3.0, 1.0, 0.1])
    tokens = (torch.randn(3, 200, 4, generator=g) * scales)  # axes with known, decreasing variance
    basis = fit_pca([tokens[:2], tokens[2:]])  # two token sets fit jointly == one set of all their tokens
    whole = fit_pca([tokens])
    torch.testing.assert_close(basis.components, whole.components, rtol=0, atol=1e-9)
    assert torch.equal(basis.components.abs().argmax(0), torch.tensor([0, 1, 2]))
    assert basis.explained[0] > basis.explained[1] > basis.explained[2]


def test_the_nearest_neighbour_field_recovers_a_shift_and_the_warp_undoes_it():
    tokens = _shifted_tokens(3)
    field = nearest_neighbor_field(tokens[1], tokens[0], GRID)
    moved = field_displacement(field)
    # every token of frame 1 that was in frame 0 finds itself there, 3 columns to the right
    assert torch.equal(moved[:, : GRID[1] - 3], torch.tensor([0, 3]).expand(GRID[0], GRID[1] - 3, 2))
    # warping frame 0's pixels (8x8-pixel cells) by that field rebuilds frame 1 wherever frame 1 was visible in 0
    g = torch.Generator().manual_seed(2)
    scene = torch.randint(0, 256, (GRID[0] * 8, (GRID[1] + 3) * 8, 3), generator=g, dtype=torch.uint8)
    frame0, frame1 = scene[:, : GRID[1] * 8], scene[:, 24:]
    warped = warp_by_field(frame0, field)
    assert torch.equal(warped[:, : (GRID[1] - 3) * 8], frame1[:, : (GRID[1] - 3) * 8])
    assert not torch.equal(frame0[:, :40], frame1[:, :40])


def test_consistency_is_one_for_a_shifted_copy_and_drops_with_per_frame_noise():
    still = _shifted_tokens(0)
    assert frame_consistency(still).tolist() == pytest.approx([1.0], abs=1e-6)  # identical tokens: cosine 1
    g = torch.Generator().manual_seed(3)
    noisy = still + 0.5 * torch.randn(still.shape, generator=g)
    assert feature_consistency(noisy) < 0.95
    assert feature_consistency(still[:1]) is None  # one frame has no next frame


def test_consistency_along_the_source_catches_a_reshuffle_that_nearest_neighbours_miss():
    """An 'edit' whose next frame holds the same tokens in another order (a texture re-invented in every frame)
    keeps its nearest-neighbour consistency; along the source's correspondences it falls apart."""
    source = _shifted_tokens(0)
    order = torch.randperm(source.shape[1], generator=torch.Generator().manual_seed(4))
    shuffled = torch.stack([source[0], source[1][order]])
    assert feature_consistency(shuffled) == pytest.approx(1.0, abs=1e-6)
    assert frame_consistency_along(source, source).tolist() == pytest.approx([1.0], abs=1e-6)
    assert frame_consistency_along(shuffled, source).item() < 0.5  # random 16-d tokens: cosine about 0
    with pytest.raises(ValueError):
        frame_consistency_along(source[:, :10], source)


def test_sweep_distances_grow_and_stay_inside_the_clip():
    assert sweep_distances(0, 40) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 39]
    assert sweep_distances(5, 8) == [6, 7]
    assert sweep_distances(7, 8) == [6, 5, 4, 3, 1, 0]  # from the last frame: backwards, to the first
    assert sweep_distances(0, 40, farthest=5) == [1, 2, 3, 4, 5]
    assert sweep_distances(0, 1) == []


# ------------------------------------------------------------------ claims, on the micro trained model's own world


SHIFT = 8  # pixels per frame: 2 tokens of the micro model's 16x24 highest-resolution level (VAE factor 4)
STEPS = 10


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory):
    """The vendored micro trained model, 4 frames of its world panning SHIFT px per frame, and their inversion."""
    from PIL import Image

    from tokenflow.editor import TokenFlowEditor
    from tokenflow.models import load_model

    sys.path.insert(0, str(MICRO))
    try:
        import make_clip
    finally:
        sys.path.remove(str(MICRO))
    out = tmp_path_factory.mktemp("micro-clip") / "clip"
    meta = make_clip.make(str(out), 0, SHIFT, 4)
    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((out / "frames").glob("*.png"))])
    model = load_model(str(MICRO / "model"), device="cpu", dtype="float32")
    source = TokenFlowEditor(model).invert(torch.from_numpy(frames), inversion_prompt=meta["caption"], steps=STEPS,
                                           progress=False)
    timestep = resolve_timestep(model, STEPS, None)
    layer = default_layer(model, list_layers(model, 16, 24))
    tokens = capture_tokens(model, source.noisy[timestep], timestep, [layer], prompt=meta["caption"])[layer]
    return model, frames, source, tokens, meta


def test_the_default_layer_is_the_highest_resolution_decoder_self_attention(micro_world):
    model, _, _, tokens, _ = micro_world
    assert tokens.layer == "up_blocks.3.attentions.0.transformer_blocks.0.attn1"
    assert tokens.grid == (16, 24) and tokens.inputs.shape == (4, 16 * 24, 16) == tokens.outputs.shape
    grids = {layer.name: layer.grid for layer in list_layers(model, 16, 24)}
    assert grids["mid_block.attentions.0.transformer_blocks.0.attn1"] == (2, 3) and len(grids) == 16


def test_on_a_trained_model_the_field_follows_the_motion_and_the_warp_rebuilds_the_frame(micro_world):
    """Measured (10 steps, t=451): 90% of the interior tokens match exactly 2 tokens over; warp 27.5 dB against
    13.8 dB for frame 0 itself. Asserted: most tokens (a wrong field, e.g. the identity, gets none) and 6 dB."""
    _, frames, _, tokens, _ = micro_world
    for i in (0, 1, 2):
        moved = field_displacement(nearest_neighbor_field(tokens.inputs[i + 1], tokens.inputs[i], tokens.grid))
        interior = moved[1:-1, 1:-3]  # away from the borders and from the columns that enter the frame
        exact = ((interior[..., 0] == 0) & (interior[..., 1] == SHIFT // 4)).float().mean()
        assert exact > 0.7, (i, exact)
        warped = warp_from(torch.from_numpy(frames), tokens, i, i + 1)
        unwarped = psnr(torch.from_numpy(frames[i]), torch.from_numpy(frames[i + 1]))
        assert psnr(warped, torch.from_numpy(frames[i + 1])) > unwarped + 6


def test_on_a_trained_model_the_pca_image_moves_with_the_frame(micro_world):
    _, _, _, tokens, _ = micro_world
    rgb = pca_rgb(tokens.outputs, tokens.grid, fit_pca([tokens.outputs]))
    s = SHIFT // 4
    aligned = (rgb[1][1:-1, : -s - 1] - rgb[0][1:-1, s:-1]).abs().mean()
    unaligned = (rgb[1][1:-1, : -s - 1] - rgb[0][1:-1, : -s - 1]).abs().mean()
    assert aligned < 0.5 * unaligned, (aligned, unaligned)


def test_tokens_reconstruction_of_a_frame_from_itself_is_its_plain_reconstruction(micro_world):
    """Every token's nearest neighbour in its own frame is itself, so the replacement changes nothing: exact (each
    UNet call holds one frame, same shapes, same kernels)."""
    model, _, source, _, meta = micro_world
    rec = reconstruct_from_tokens(model, source, 2, [2], STEPS, prompt=meta["caption"])
    assert torch.equal(rec.tokens, rec.plain)
    assert not torch.equal(rec.tokens, source.clean[2:3])  # it did denoise (a DDIM reconstruction is not exact)


def test_tokens_reconstruction_rebuilds_a_neighbour_far_better_than_the_neighbour_itself(micro_world):
    """Measured: frame 1 from frame 0's tokens 25.5 dB, denoised on its own 25.7 dB, frame 0 itself 13.8 dB."""
    model, frames, source, _, meta = micro_world
    rec = reconstruct_from_tokens(model, source, 0, [1, 3], STEPS, prompt=meta["caption"])
    decoded = model.decode_latents(rec.tokens)
    plain = model.decode_latents(rec.plain)
    for k, j in enumerate([1, 3]):
        truth = torch.from_numpy(frames[j])
        rebuilt = psnr(decoded[k], truth)
        assert rebuilt > psnr(torch.from_numpy(frames[0]), truth) + 6
        assert rebuilt < psnr(plain[k], truth) + 0.5  # replacement can only lose what frame 0 does not show
        assert not torch.equal(rec.tokens[k], rec.plain[k])


# ------------------------------------------------------------------------------------------ the commands, end to end


@pytest.fixture(scope="module")
def noisy_clip(tmp_path_factory, pan_clip):
    """The pan clip with independent noise in every frame (a flickering 'edit'), lossless."""
    from tokenflow.io import VideoWriter, load_frames

    frames, info = load_frames(pan_clip)
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("noisy") / "noisy.mkv"
    with VideoWriter(path, info.fps, frames.shape[2], frames.shape[1], codec="ffv1") as out:
        for frame in frames:
            out.write(np.clip(frame + rng.normal(0, 40, frame.shape), 0, 255).astype(np.uint8))
    return path


def _analysis_args(tiny_model_dir, tmp_path) -> list[str]:
    return ["--model", str(tiny_model_dir), "--size", "64", "--steps", "4", "--max-frames", "6",
            "--cache-dir", str(tmp_path / "cache"), "-q"]


def test_features_command_writes_pca_video_slice_and_scores(tiny_model_dir, pan_clip, noisy_clip, tmp_path, capsys):
    out = tmp_path / "features"
    rc = main(["features", str(pan_clip), "--edited", str(noisy_clip), "--out", str(out),
               *_analysis_args(tiny_model_dir, tmp_path)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "features.json").read_text())
    assert report["layer"] == "up_blocks.3.attentions.0.transformer_blocks.0.attn1"
    assert report["timestep"] == 251 and report["grid"] == [8, 12]  # 4 steps 751, 501, 251, 1: the middle one
    source, edited = report["videos"]
    assert source["path"] == str(pan_clip) and edited["path"] == str(noisy_clip)
    assert source["frames"] == edited["frames"] == 6 and source["consistency_drop"] == 0
    # per-frame noise breaks the features' consistency even on a random model
    assert edited["consistency"] < source["consistency"] and edited["consistency_drop"] > 0
    assert edited["consistency_along_source"] < source["consistency_along_source"]
    from tokenflow.io import load_frames

    for name in (source["pca"], edited["pca"]):
        video, _ = load_frames(out / name)
        assert video.shape == (6, 64, 192, 3)  # each frame beside its PCA colours
    assert (out / "slice.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".features.*"))  # no staging folder left


def test_reconstruct_command_writes_images_and_psnrs(tiny_model_dir, pan_clip, tmp_path, capsys):
    out = tmp_path / "rec"
    rc = main(["reconstruct", str(pan_clip), "--from", "1", "--to", "3", "--out", str(out),
               *_analysis_args(tiny_model_dir, tmp_path)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "reconstruct.json").read_text())
    assert report["from"] == 1 and report["to"] == 3
    assert all(isinstance(report[k], float) for k in ("psnr_tokens", "psnr_warp", "psnr_unwarped", "psnr_plain"))
    from PIL import Image

    for name in ("from", "target", "tokens", "warp", "plain"):
        assert Image.open(out / f"{name}.png").size == (96, 64)
    assert (out / "reconstruct.png").is_file()

    rc = main(["reconstruct", str(pan_clip), "--from", "0", "--sweep", "--mode", "warp", "--out", str(tmp_path / "s"),
               *_analysis_args(tiny_model_dir, tmp_path)])
    assert rc == 0
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [p["distance"] for p in sweep["points"]] == [1, 2, 3, 4, 5]
    assert all(p["psnr_tokens"] is None and isinstance(p["psnr_warp"], float) for p in sweep["points"])
    assert (tmp_path / "s" / "sweep.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["features", "--layer", "up_blocks.9.attn1"], "--layer 'up_blocks.9.attn1': UNet2DConditionModel has no "
                                                        "self-attention layer of that name; list them with --list-layers"),
        (["features", "--timestep", "500"], "--timestep 500: not a timestep of the 4-step editing schedule"),
        (["reconstruct", "--from", "6"], "--from 6: outside the clip's 6 frames; use 0..5"),
        (["reconstruct", "--to", "-1"], "--to -1: must be 0 or more"),
        (["reconstruct", "--mode", "pixels"], "--mode 'pixels': unknown; use tokens, warp or both"),
    ],
)
def test_analysis_errors_are_one_line_and_leave_nothing(tiny_model_dir, pan_clip, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = main([args[0], str(pan_clip), *args[1:], "--out", str(out), *_analysis_args(tiny_model_dir, tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # refused before inverting


def test_list_layers_prints_every_self_attention_with_its_grid(tiny_model_dir, pan_clip, tmp_path, capsys):
    rc = main(["features", str(pan_clip), "--list-layers", *_analysis_args(tiny_model_dir, tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and lines[0].split() == ["layer", "tokens", "(rows", "x", "columns)", "channels"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert len(rows) == 16
    assert rows["up_blocks.3.attentions.0.transformer_blocks.0.attn1"] == ["8", "x", "12", "8"]
    assert rows["mid_block.attentions.0.transformer_blocks.0.attn1"] == ["1", "x", "2", "32"]
    assert not (tmp_path / "cache").exists()  # listing inverts nothing
