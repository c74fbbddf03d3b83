"""`tokenflow eval` and `tokenflow edit --eval` from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenflow.cli import main
from tokenflow.io import write_video
from tokenflow.testing import make_pan_clip, pan_frames


@pytest.fixture(scope="module")
def run_dir(pan_clip, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-run")
    out = root / "run"
    code = main(["edit", str(pan_clip), "--prompt", "a robot", "--model", str(tiny_model_dir), "--size", "64",
                 "--steps", "3", "--inversion-steps", "3", "--batch-size", "4", "--cache-dir", str(root / "cache"),
                 "--out", str(out), "--eval", "--quiet"])
    assert code == 0
    return out


def test_edit_eval_adds_the_numbers_to_run_json(run_dir):
    report = json.loads((run_dir / "run.json").read_text())
    summary = report["eval"]
    assert summary["warp_error"] > summary["warp_error_source"] >= 0  # a random model's edit flickers
    assert "psnr" in summary and "ssim" in summary and "eval" in report["timings"]
    # the inversion's reconstruction PSNR of this very run (a finite number: the tiny model does not reconstruct
    # exactly), the same value the run records at the top level
    assert isinstance(summary["inversion_psnr"], float) and summary["inversion_psnr"] > 0
    assert summary["inversion_psnr"] == pytest.approx(report["inversion_psnr"])


def test_eval_on_a_run_folder_writes_json_and_plot(run_dir, tmp_path, capsys):
    code = main(["eval", str(run_dir), "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png")])
    assert code == 0
    table = capsys.readouterr().out
    assert "warp error" in table
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["frames"] == 10 and len(data["per_frame"]["warp_error"]) == 9 and len(data["per_frame"]["psnr"]) == 10
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the inversion PSNR comes from the run folder's run.json
    run_psnr = json.loads((run_dir / "run.json").read_text())["inversion_psnr"]
    assert data["inversion_psnr"] == pytest.approx(run_psnr)


def test_eval_of_a_video_against_itself_has_zero_warp_error_beyond_the_floor(tmp_path, capsys):
    clip = tmp_path / "pan.mkv"
    make_pan_clip(clip, num_frames=6, width=96, height=64, shift=3)
    assert main(["eval", str(clip), str(clip), "--json", str(tmp_path / "same.json")]) == 0
    data = json.loads((tmp_path / "same.json").read_text())
    assert data["warp_error"] == pytest.approx(data["warp_error_source"])
    assert data["warp_error"] < 2  # a lossless exact pan: only flow error remains


def test_eval_refuses_mismatched_videos_in_one_line(tmp_path, capsys):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    write_video(a, pan_frames(num_frames=6, width=96, height=64, shift=3), fps=10)
    write_video(b, pan_frames(num_frames=4, width=96, height=64, shift=3), fps=10)
    code = main(["eval", str(a), str(b)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tokenflow: error:"), err
    wide = tmp_path / "wide.mp4"
    write_video(wide, np.zeros((6, 64, 160, 3), np.uint8), fps=10)
    code = main(["eval", str(a), str(wide)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
