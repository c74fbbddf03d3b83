"""float16 overflow is detected, never written as a black video: NaN/inf in the inverted, edited or decoded latents
ends the run with one line naming ``--dtype float32``, and nothing reaches the output folder or the cache."""

from __future__ import annotations

import pytest
import torch

from tokenflow.backbones.base import check_finite
from tokenflow.cli import main
from tokenflow.errors import NumericalError


def test_check_finite_names_the_dtype_option():
    check_finite(torch.ones(3), "x", torch.float16)
    with pytest.raises(NumericalError, match=r"^the frames hold NaN or inf: float16 overflowed; rerun with "
                                             r"`dtype` float32$"):
        check_finite(torch.tensor([1.0, float("inf")]), "the frames", torch.float16)
    with pytest.raises(NumericalError, match="bfloat16 overflowed"):
        check_finite(torch.tensor([float("nan")]), "the frames", torch.bfloat16)
    with pytest.raises(NumericalError, match="in float32; the model's weights may be broken, check `model`"):
        check_finite(torch.tensor([float("nan")]), "the frames", torch.float32)


@pytest.fixture
def overflowing(monkeypatch):
    """``overflowing(part)``: the model loads in float16 with ``part``'s last convolution scaled by 1e6, so its
    output passes float16's largest value (65504) as a checkpoint that overflows would."""
    from tokenflow.editor import TokenFlowEditor

    load = TokenFlowEditor.from_pretrained.__func__

    def arm(part: str):
        def from_pretrained(cls, *args, **kwargs):
            editor = load(cls, *args, **kwargs)
            module = editor.model.unet if part == "unet" else editor.model.vae.decoder
            with torch.no_grad():
                module.conv_out.weight.mul_(1e6)
            return editor

        monkeypatch.setattr(TokenFlowEditor, "from_pretrained", classmethod(from_pretrained))

    return arm


@pytest.mark.parametrize("part, what", [("unet", "the inverted latents at timestep"), ("vae", "the decoded frames")])
def test_float16_overflow_fails_in_one_line_naming_dtype_float32(tiny_model_dir, pan_clip, tmp_path, capsys,
                                                                  overflowing, part, what):
    overflowing(part)
    out, cache = tmp_path / "out", tmp_path / "cache"
    capsys.readouterr()
    rc = main(["edit", str(pan_clip), "--prompt", "a robot", "--model", str(tiny_model_dir), "--out", str(out),
               "--cache-dir", str(cache), "--size", "64", "--steps", "2", "--inversion-steps", "2",
               "--batch-size", "5", "--max-frames", "5", "--check-frames", "0", "--device", "cpu",
               "--dtype", "float16", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"tokenflow: error: {what}") and "float16 overflowed; rerun with --dtype float32" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # the cache holds no overflowed latents (a decoder that overflows leaves a good inversion there)
    from safetensors.torch import load_file

    shards = list(cache.rglob("*.safetensors")) if cache.exists() else []
    assert all(torch.isfinite(t).all() for shard in shards for t in load_file(shard).values())
    if part == "unet":
        assert not [p for p in cache.rglob("index.json") if ".partial" not in str(p)]


def test_an_edit_that_overflows_fails_at_that_step(tiny_model_dir, pan_clip, tmp_path, capsys):
    """A good inversion, then a guidance scale far past float16's range: the step that overflows ends the run."""
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["edit", str(pan_clip), "--prompt", "a robot", "--model", str(tiny_model_dir), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--size", "64", "--steps", "2", "--inversion-steps", "2",
               "--batch-size", "5", "--max-frames", "5", "--check-frames", "0", "--device", "cpu",
               "--dtype", "float16", "--guidance-scale", "1e30", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("tokenflow: error: the edited latents after step") and "--dtype float32" in err
    assert not out.exists()
