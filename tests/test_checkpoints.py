"""Single-file ``.ckpt`` checkpoints are read as tensors only (``torch.load(weights_only=True)``): a pickle that
would run code or needs other classes is refused in one line, and the code never runs."""

from __future__ import annotations

import pathlib

import pytest
import torch

from tokenflow.backbones.loading import _checkpoint_family, ckpt_keys
from tokenflow.cli import main
from tokenflow.errors import ModelLoadError


class Payload:
    """Unpickling this touches a file: what a malicious checkpoint would do with a shell command."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_ckpt_of_tensors_is_read_and_recognised_by_its_keys(tmp_path):
    xl, sd = tmp_path / "xl.ckpt", tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}}, xl)
    torch.save({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2),
                "global_step": 10}, sd)  # plain numbers beside the tensors are fine
    assert _checkpoint_family(str(xl), xl, None, True) == "sdxl"
    assert _checkpoint_family(str(sd), sd, None, True) == "sd"
    assert ckpt_keys(str(sd), sd) == ["cond_stage_model.transformer.text_model.final_layer_norm.weight",
                                      "global_step"]


@pytest.mark.parametrize("key, family", [
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3"),  # SD3/3.5 as Stability ships it
    ("joint_blocks.0.context_block.attn.qkv.weight", "sd3"),  # transformer-only file
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "flux"),  # FLUX.1 (ComfyUI layout)
    ("double_blocks.0.img_attn.qkv.weight", "flux"),  # as Black Forest Labs ships it
])
def test_a_transformer_single_file_is_recognised_by_its_keys(tmp_path, key, family):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2)}, str(path))
    assert _checkpoint_family(str(path), path, None, True) == family


def test_a_ckpt_whose_pickle_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(2)}, "callback": Payload(marker)},
               path)
    with pytest.raises(ModelLoadError) as exc:
        _checkpoint_family(str(path), path, None, True)
    message = str(exc.value)
    assert "\n" not in message and "`model`" in message and "weights_only=True" in message
    assert "Python objects besides tensors (getattr)" in message and ".safetensors" in message  # what, what to do
    assert not marker.exists()


def test_a_damaged_ckpt_is_one_line(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match=r"`model` .*cut\.ckpt: not a readable \.ckpt"):
        ckpt_keys(str(path), path)


def test_the_cli_refuses_a_code_running_ckpt_in_one_line_before_reading_video(pan_clip, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": Payload(marker)}, path)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["edit", str(pan_clip), "--prompt", "a robot", "--model", str(path), "--out", str(out), "--size", "64",
               "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"tokenflow: error: --model {path}") and "weights_only=True" in err
    assert not marker.exists() and not out.exists()
