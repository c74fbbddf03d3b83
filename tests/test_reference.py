"""Numerical equality with the public reference TokenFlow code (omerbt/TokenFlow @ 5dd6a69) on its own outputs.

tests/data/reference/ holds the reference's inverted latents, sampled keyframes and final latents on a tiny
SD 2.x-shaped model (see its README and settings.json). Tolerances are the issue's: from the golden inverted
latents every frame within 1e-4 relative (TokenFlow: the median frame, see below); from our own inversion, the
inversion within 1e-3, the per-frame edit within 1e-3 on every frame and TokenFlow within 1e-3 on the median frame.

Why these hold on any CPU: the reference ran on another machine and library build, so every comparison already
crosses kernels. From the golden inverted latents the two computations are the same sums in another order
(measured <= 2.4e-5 relative: the 1e-4 bound leaves 4x), except for one discontinuous step: TokenFlow's
nearest-neighbour search is an argmax over float32 cosines, and a token whose two best matches lie within rounding
(measured top-2 margins of 1e-7 to 3e-6, against cosines computed over 64 channels: 64 x 2^-24 = 4e-6) picks
either, as the kernels' rounding falls. One such flip moves its frame by 6e-5 to 1.3e-4 relative (measured on an
AVX-512 EPYC: one token flipped under MKL_CBWR=COMPATIBLE and the default kernels, in frames 4 and 5). So TokenFlow is held
to 1e-4 on the median frame and 1e-3 (about eight flips) on every frame, at every step. From our own inversion
the 500 inversion steps and these flips add up to 4.4e-3 on the worst TokenFlow frame, which is why only its median
frame is held to 1e-3 there.
The worst differences over kernel variants and thread counts are in docs/numerics.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenflow.inversion import load_latents

from tokenflow.cli import main
from tokenflow.editor import EditConfig, TokenFlowEditor
from tokenflow.inversion import SourceLatents, invert_frames
from tokenflow.models import load_model

pytestmark = pytest.mark.numerics  # every test here compares floats with the reference's

GOLDEN = Path(__file__).parent / "data" / "reference"
SETTINGS = json.loads((GOLDEN / "settings.json").read_text())


def _load(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)


def _per_frame_rel(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (ours - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def golden_model():
    return load_model(GOLDEN / "model", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def golden_frames() -> torch.Tensor:
    paths = sorted((GOLDEN / "frames").glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))


@pytest.fixture(scope="module")
def golden_inverted() -> dict[int, torch.Tensor]:
    return {int(p.stem.rsplit("_", 1)[1]): _load(p) for p in (GOLDEN / "inverted").glob("noisy_latents_*.pt")}


def _config(propagation: str) -> EditConfig:
    edit = SETTINGS["edit"]
    return EditConfig(
        prompt=edit["prompt"],
        negative_prompt=edit["negative_prompt"],
        inversion_prompt=SETTINGS["inversion"]["prompt"],
        steps=len(edit["timesteps"]),
        guidance_scale=edit["guidance_scale"],
        batch_size=edit["batch_size"],
        pnp_attn_t=edit["pnp_attn_t"],
        pnp_f_t=edit["pnp_f_t"],
        propagation=propagation,
        blending="reference",
        keyframes=json.loads((GOLDEN / "tokenflow" / "keyframes.json").read_text()),
        seed=edit["seed"],
    )


def test_our_ddim_inversion_matches_the_reference(golden_model, golden_frames, golden_inverted, record_difference):
    ours = invert_frames(
        golden_model,
        golden_frames,
        prompt=SETTINGS["inversion"]["prompt"],
        steps=len(SETTINGS["edit"]["timesteps"]),
        inversion_steps=SETTINGS["inversion"]["steps"],
        batch_size=4,
        reconstruct=False,
        progress=False,
    )
    assert sorted(ours.noisy) == sorted(golden_inverted) == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901, 951]
    worst = max(((ours.noisy[t] - ref).norm() / ref.norm()).item() for t, ref in golden_inverted.items())
    assert record_difference(worst, "max relative difference over timesteps") < 1e-3, worst


@pytest.mark.parametrize("mode,propagation", [("tokenflow", "tokenflow"), ("perframe", "none")])
def test_edit_from_reference_inversion_matches_every_frame(
    golden_model, golden_frames, golden_inverted, mode, propagation, record_difference
):
    clean = golden_model.encode_frames(golden_frames, batch_size=10)
    source = SourceLatents(clean=clean, noisy=golden_inverted)
    steps = {int(p.stem.split("_")[0]): p for p in (GOLDEN / mode / "steps").glob("*.pt")}
    # the per-frame edit has no argmax: every frame within 1e-4; TokenFlow's near-tie flips (module docstring) move
    # single frames, so its median frame within 1e-4 and every frame within 1e-3
    typical = (lambda rel: rel.max().item()) if propagation == "none" else (lambda rel: rel.median().item())
    first_bad = []

    def check_step(i, t, latents):
        rel = _per_frame_rel(latents, _load(steps[i]))
        if (typical(rel) >= 1e-4 or rel.max().item() >= 1e-3) and not first_bad:
            first_bad.append((i, t, rel.max().item(), rel.median().item()))

    out = TokenFlowEditor(golden_model).edit(source, _config(propagation), progress=False, callback_on_step_end=check_step)
    assert not first_bad, f"first step that diverges from the reference (step, t, max, median): {first_bad[0]}"
    rel = _per_frame_rel(out.latents, _load(GOLDEN / mode / "final_latents.pt"))
    if propagation == "none":
        assert record_difference(rel.max().item(), "max relative difference over frames") < 1e-4, rel
    else:
        assert record_difference(rel.median().item(), "median relative difference over frames") < 1e-4, rel
        assert record_difference(rel.max().item(), "max relative difference over frames (near-tie flips)") < 1e-3, rel
        assert out.keyframes == json.loads((GOLDEN / "tokenflow" / "keyframes.json").read_text())


def test_reference_options_change_the_result(golden_model, golden_frames, golden_inverted):
    """The project's own defaults (linear blending, keyframe reuse) are a real departure that the option switches."""
    clean = golden_model.encode_frames(golden_frames, batch_size=10)
    source = SourceLatents(clean=clean, noisy=golden_inverted)
    config = _config("tokenflow")
    config.blending = "linear"
    out = TokenFlowEditor(golden_model).edit(source, config, progress=False)
    rel = _per_frame_rel(out.latents, _load(GOLDEN / "tokenflow" / "final_latents.pt"))
    assert rel.median().item() > 1e-3
    # linear blending skips the keyframes in the propagation pass: 3 x N frame evaluations per step
    assert out.unet_frame_evaluations == 3 * 16 * 10


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The two golden edits end to end through the CLI, from the frames (our own inversion)."""
    root = tmp_path_factory.mktemp("reference-cli")
    edit = SETTINGS["edit"]
    keyframes = root / "keyframes.json"
    keyframes.write_text((GOLDEN / "tokenflow" / "keyframes.json").read_text())
    runs = {}
    for mode, propagation in (("tokenflow", "tokenflow"), ("perframe", "none")):
        out = root / mode
        code = main(
            [
                "edit", str(GOLDEN / "frames"),
                "--prompt", edit["prompt"],
                "--negative-prompt", edit["negative_prompt"],
                "--model", str(GOLDEN / "model"),
                "--size", str(SETTINGS["height"]),
                "--steps", str(len(edit["timesteps"])),
                "--inversion", "ddim",  # the reference's scheme
                "--inversion-steps", str(SETTINGS["inversion"]["steps"]),
                "--batch-size", str(edit["batch_size"]),
                "--guidance-scale", str(edit["guidance_scale"]),
                "--pnp-attn-t", str(edit["pnp_attn_t"]),
                "--pnp-f-t", str(edit["pnp_f_t"]),
                "--propagation", propagation,
                "--blending", "reference",
                "--keyframes", str(keyframes),
                "--seed", str(edit["seed"]),
                "--device", "cpu",
                "--dtype", "float32",
                "--save-latents",
                "--cache-dir", str(root / "cache"),
                "--out", str(out),
                "--quiet",
            ]
        )
        assert code == 0
        runs[mode] = load_latents(out / "latents")
    return runs


def test_cli_end_to_end_inversion_matches(cli_runs, golden_inverted, record_difference):
    rel = {t: ((cli_runs["tokenflow"][f"t{t}"] - ref).norm() / ref.norm()).item() for t, ref in golden_inverted.items()}
    assert record_difference(max(rel.values()), "max relative difference over timesteps") < 1e-3, rel


def test_cli_end_to_end_per_frame_edit_matches_every_frame(cli_runs, record_difference):
    rel = _per_frame_rel(cli_runs["perframe"]["final"], _load(GOLDEN / "perframe" / "final_latents.pt"))
    assert record_difference(rel.max().item(), "max relative difference over frames") < 1e-3, rel


def test_cli_end_to_end_tokenflow_matches_on_the_median_frame(cli_runs, record_difference):
    rel = _per_frame_rel(cli_runs["tokenflow"]["final"], _load(GOLDEN / "tokenflow" / "final_latents.pt"))
    record_difference(rel.max().item(), "max relative difference over frames (not asserted)")
    assert record_difference(rel.median().item(), "median relative difference over frames") < 1e-3, rel
