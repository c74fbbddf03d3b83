"""Known-answer tests for tokenflow.metrics.

The clips are windows cropped from a real photo (skimage's astronaut), moved by a whole number of
pixels per frame to simulate a camera pan, so the true optical flow is known exactly.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from skimage import data

from tokenflow import metrics
from tokenflow.errors import InputError, ModelLoadError

SHIFT = 3  # px per frame
N, H, W = 6, 160, 224


def make_pan(n: int = N, shift: int = SHIFT, h: int = H, w: int = W) -> np.ndarray:
    """Frame k shows the photo from column 40 + k*shift: content moves left by `shift` px per frame."""
    img = data.astronaut()
    return np.stack([img[120 : 120 + h, 40 + k * shift : 40 + k * shift + w] for k in range(n)])


@pytest.fixture(scope="module")
def pan() -> np.ndarray:
    return make_pan()


@pytest.fixture(scope="module")
def pan_error(pan) -> np.ndarray:
    return metrics.warp_errors(pan, pan)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- flow, warp, mask


def test_flow_recovers_known_shift(pan):
    fw = metrics.optical_flow(pan[0], pan[1])
    bw = metrics.optical_flow(pan[1], pan[0])
    assert fw.shape == (H, W, 2) and fw.dtype == np.float32
    # prev(x) = next(x - shift): the forward flow is -shift in x, the backward flow +shift.
    assert abs(np.median(fw[..., 0]) + SHIFT) < 0.5
    assert abs(np.median(fw[..., 1])) < 0.5
    assert abs(np.median(bw[..., 0]) - SHIFT) < 0.5
    fb = metrics.optical_flow(pan[0], pan[1], method="farneback")
    assert abs(np.median(fb[..., 0]) + SHIFT) < 0.5


def test_warp_with_exact_flow_reproduces_frame(pan):
    flow = np.zeros((H, W, 2), np.float32)
    flow[..., 0] = -SHIFT
    warped = metrics.warp(pan[1], flow)
    assert warped.dtype == np.float32
    # Columns that stay in view are reproduced exactly (integer shift, bilinear weights 1/0).
    np.testing.assert_array_equal(warped[:, SHIFT:], pan[0][:, SHIFT:].astype(np.float32))


def test_identical_frames_have_zero_flow(pan):
    assert not metrics.optical_flow(pan[2], pan[2].copy()).any()


def test_occluded_border_strips_are_masked(pan):
    fw = metrics.optical_flow(pan[0], pan[1])
    bw = metrics.optical_flow(pan[1], pan[0])
    on_first = metrics.consistency_mask(fw, bw)  # pixels of frame 0 that are visible in frame 1
    on_second = metrics.consistency_mask(bw, fw)  # pixels of frame 1 that are visible in frame 0
    assert on_first.dtype == bool and on_first.shape == (H, W)
    # Frame 0's left strip leaves the view; frame 1's right strip is content that entered it.
    assert not on_first[:, :SHIFT].any()
    assert not on_second[:, W - SHIFT :].any()
    # Away from the borders nearly everything is consistent.
    assert on_first[:, 2 * SHIFT : -2 * SHIFT].mean() > 0.9
    assert on_second[:, 2 * SHIFT : -2 * SHIFT].mean() > 0.9


def test_mask_rejects_inconsistent_flows():
    fw = np.zeros((20, 20, 2), np.float32)
    bw = np.zeros((20, 20, 2), np.float32)
    fw[..., 0] = 2.0
    bw[..., 0] = 2.0  # should be -2 for a round trip: off by 4 px
    assert not metrics.consistency_mask(fw, bw)[:, :10].any()
    bw[..., 0] = -2.0
    assert metrics.consistency_mask(fw, bw)[:, :18].all()


# ----------------------------------------------------------------------------- warp error


def test_pan_warp_error_is_near_zero(pan_error):
    # An exact integer pan: the only error is DIS's sub-pixel flow error (a few hundredths of a px)
    # times the image gradient; measured ~0.4 on 0-255. A bound of 2 leaves 5x headroom and is still
    # 5x below the noisy clip below (~10).
    assert pan_error.shape == (N - 1,)
    assert np.all(pan_error < 2.0), pan_error


def test_noise_and_colour_jitter_raise_warp_error(pan, pan_error):
    rng = np.random.default_rng(0)
    noisy = np.clip(pan + rng.normal(0.0, 10.0, pan.shape), 0, 255).astype(np.uint8)
    # Independent N(0, 10) noise per frame: E|n1 - n2| = 2 * 10 / sqrt(pi) ~ 11.3 before clipping.
    err_noisy = metrics.warp_errors(pan, noisy)
    assert err_noisy.mean() > 5 * pan_error.mean()
    assert 7.0 < err_noisy.mean() < 13.0

    gains = rng.uniform(0.85, 1.15, size=(N, 1, 1, 3))
    jitter = np.clip(pan * gains, 0, 255).astype(np.uint8)
    assert metrics.warp_errors(pan, jitter).mean() > 5 * pan_error.mean()


def test_static_clip_scores_zero():
    frame = make_pan(n=1)[0]
    static = np.repeat(frame[None], 4, axis=0)
    err = metrics.warp_errors(static, static)
    assert err.shape == (3,)
    assert np.all(err < 1e-6)


def test_gap_uses_frames_further_apart(pan):
    err = metrics.warp_errors(pan, pan, gap=2)
    assert err.shape == (N - 2,)
    assert np.all(err < 2.0)


def test_raft_without_offline_weights_is_refused(pan):
    if metrics.flow._raft_weights_path() is not None:
        pytest.skip("torchvision RAFT weights are cached here")
    with pytest.raises(InputError) as exc:
        metrics.optical_flow(pan[0], pan[1], method="raft")
    assert "`flow` dis" in one_line(exc)
    with pytest.raises(InputError):
        metrics.evaluate(pan, pan, flow="raft")


def test_unknown_flow_method(pan):
    with pytest.raises(InputError) as exc:
        metrics.optical_flow(pan[0], pan[1], method="lucas")
    assert "`flow` lucas" in one_line(exc)


# ----------------------------------------------------------------------------- psnr / ssim


def test_psnr_and_ssim_known_values(pan):
    assert np.all(np.isinf(metrics.psnr(pan, pan)))
    assert np.all(metrics.psnr(pan, pan, cap=metrics.PSNR_CAP_DB) == metrics.PSNR_CAP_DB)
    brighter = pan.copy()
    brighter[pan < 255] += 1
    brighter[pan == 255] -= 1  # every value off by exactly 1 -> MSE 1 -> 20*log10(255) dB
    np.testing.assert_allclose(metrics.psnr(pan, brighter), 20 * np.log10(255.0), rtol=1e-9)
    np.testing.assert_allclose(metrics.ssim(pan, pan), 1.0, atol=1e-12)
    assert np.all(metrics.ssim(pan, pan[::-1]) < 0.9)  # different frames are not similar
    assert metrics.psnr(pan[0], pan[0]).shape == (1,)


# ----------------------------------------------------------------------------- evaluate / report


def test_mismatched_inputs_are_refused(pan):
    with pytest.raises(InputError) as exc:
        metrics.evaluate(pan, pan[:-1])
    assert "truncate" in one_line(exc)

    wide = np.zeros((N, H, W + 60, 3), np.uint8)
    with pytest.raises(InputError) as exc:
        metrics.evaluate(pan, wide)
    msg = one_line(exc)
    assert f"{W + 60}x{H}" in msg and f"{W}x{H}" in msg

    with pytest.raises(InputError) as exc:
        metrics.evaluate(pan, pan, gap=N)
    assert "`gap`" in one_line(exc)
    with pytest.raises(InputError):
        metrics.evaluate(pan, pan, gap=0)
    with pytest.raises(InputError) as exc:
        metrics.evaluate(pan, pan.astype(np.float32))
    one_line(exc)
    with pytest.raises(InputError):
        metrics.evaluate(pan, pan, align="stretch")


def test_truncate_and_resize_align_inputs(pan, caplog):
    caplog.set_level(logging.INFO, logger="tokenflow.metrics")
    report = metrics.evaluate(pan, pan[:-2], align="truncate")
    assert report.frames == N - 2 and report.warp_error.shape == (N - 3,)

    # Same content at twice the size (same aspect ratio): resized back to the source size.
    import cv2

    big = np.stack([cv2.resize(f, (2 * W, 2 * H), interpolation=cv2.INTER_CUBIC) for f in pan])
    report = metrics.evaluate(pan, big)
    assert any("resized" in note for note in report.notes)
    assert any("resized" in rec.getMessage() for rec in caplog.records)
    assert report.ssim.mean() > 0.9
    assert report.warp_error.mean() < 3.0


def test_report_summary_json_table_and_plot(pan, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"inversion_psnr": 31.25}))
    rng = np.random.default_rng(1)
    noisy = np.clip(pan + rng.normal(0.0, 10.0, pan.shape), 0, 255).astype(np.uint8)
    report = metrics.evaluate(pan, noisy, run_dir=run, prompt="an astronaut", clip_model=tmp_path / "missing")

    assert report.inversion_psnr == 31.25
    assert report.clip_text is None and report.clip_consistency is None  # unloadable CLIP is skipped
    assert any("CLIP" in note for note in report.notes)
    summary = report.summary()
    assert summary["warp_error"] > 5 * summary["warp_error_source"]
    assert summary["frames"] == N and summary["gap"] == 1 and summary["flow"] == "dis"

    same = metrics.evaluate(pan, pan)
    assert same.summary()["psnr"] == metrics.PSNR_CAP_DB  # identical frames: the documented cap
    text = json.dumps(same.to_dict(), allow_nan=False)
    assert json.loads(text)["per_frame"]["ssim"] == pytest.approx([1.0] * N)

    d = report.to_dict()
    json.dumps(d, allow_nan=False)
    assert len(d["per_frame"]["warp_error"]) == N - 1 and len(d["per_frame"]["psnr"]) == N

    table = report.format_table()
    assert "warp error, edited" in table and "inversion PSNR" in table

    png = tmp_path / "plots" / "metrics.png"
    report.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_files_reads_run_folder(pan, tmp_path):
    from tokenflow.io import load_frames, write_video

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"prompt": "an astronaut", "inversion_psnr": 30.0}))
    write_video(run / "source.mp4", pan, fps=10)
    write_video(run / "edited.mp4", pan[:, :, ::-1].copy(), fps=10)
    report = metrics.evaluate_files(run, workdir=tmp_path)
    assert report.prompt == "an astronaut" and report.inversion_psnr == 30.0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the staged frames are gone
    # the files, staged and measured a window at a time, give what the decoded arrays give
    source, _ = load_frames(run / "source.mp4")
    edited, _ = load_frames(run / "edited.mp4")
    in_memory = metrics.evaluate(source, edited)
    for name in ("warp_error", "warp_error_source", "psnr", "ssim"):
        np.testing.assert_array_equal(getattr(report, name), getattr(in_memory, name))
    report = metrics.evaluate_files(None, run, max_frames=4)
    assert report.frames == 4

    with pytest.raises(InputError) as exc:
        metrics.evaluate_files(run / "source.mp4")
    one_line(exc)
    with pytest.raises(InputError) as exc:
        metrics.evaluate_files(tmp_path / "nope.mp4", run / "edited.mp4")
    assert "nope.mp4" in one_line(exc)


@pytest.mark.parametrize("gap", [1, 2])
def test_evaluation_in_windows_equals_one_pass_with_truncation_and_resizing(pan, monkeypatch, tmp_path, gap):
    import cv2

    from tokenflow.io import FrameStore

    rng = np.random.default_rng(gap)
    edited = np.clip(pan.astype(int) + rng.integers(-20, 20, pan.shape), 0, 255).astype(np.uint8)
    edited = np.stack([cv2.resize(f, (pan.shape[2] * 2, pan.shape[1] * 2)) for f in edited])[:-1]  # 2x, 1 frame short
    whole = metrics.evaluate(pan, edited, gap=gap, align="truncate")
    assert whole.frames == len(pan) - 1 and len(whole.notes) == 2  # truncated and resized
    monkeypatch.setattr(metrics.evaluation, "EVAL_WINDOW", 3)
    for inputs in ((pan, edited), None):
        if inputs is None:  # frames read on demand
            inputs = tuple(FrameStore.write(tmp_path / f"{i}.rgb", iter(x)) for i, x in enumerate((pan, edited)))
        windowed = metrics.evaluate(*inputs, gap=gap, align="truncate")
        for name in ("warp_error", "warp_error_source", "psnr", "ssim"):
            np.testing.assert_array_equal(getattr(windowed, name), getattr(whole, name))
        assert windowed.notes == whole.notes


# ----------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A seeded, randomly initialised CLIP small enough to run in milliseconds, saved as a folder."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    # Byte-level BPE without merges: printable ASCII maps to itself, each char also as a word end.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = [chr(i) for i in range(33, 127)]
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_scores_with_tiny_model(tiny_clip, pan):
    frames = np.concatenate([pan[:1], pan[:1], pan[:1], data.coffee()[:H, :W][None]])
    scores = metrics.clip_scores(frames, "a photo of an astronaut", model=tiny_clip)
    assert len(scores["text"]) == 4 and len(scores["consistency_per_pair"]) == 3
    assert all(-1.0 <= s <= 1.0 for s in scores["text"])
    assert -1.0 <= scores["text_mean"] <= 1.0
    # Identical frames embed identically.
    assert scores["consistency_per_pair"][0] == pytest.approx(1.0, abs=1e-5)
    assert scores["consistency_per_pair"][1] == pytest.approx(1.0, abs=1e-5)
    assert scores["text"][0] == pytest.approx(scores["text"][1], abs=1e-6)
    assert scores["consistency"] == pytest.approx(np.mean(scores["consistency_per_pair"]))

    same = metrics.clip_scores(np.repeat(pan[:1], 3, axis=0), None, model=str(tiny_clip))
    assert same["text"] is None and same["consistency"] == pytest.approx(1.0, abs=1e-5)
    # A prompt longer than the text encoder's context is truncated, not an error.
    assert -1.0 <= metrics.clip_scores(pan[:2], "astronaut " * 50, model=tiny_clip)["text_mean"] <= 1.0


def test_evaluate_with_clip(tiny_clip, pan):
    report = metrics.evaluate(pan, pan, prompt="an astronaut", clip_model=tiny_clip)
    assert report.clip_text.shape == (N,) and report.clip_consistency.shape == (N - 1,)
    json.dumps(report.to_dict(), allow_nan=False)
    assert "CLIP text similarity" in report.format_table()


def test_unloadable_clip_raises_input_error(tmp_path, pan):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(InputError) as exc:
            metrics.clip_scores(pan[:2], "x", model=bad)
        assert str(bad) in one_line(exc)
        assert isinstance(exc.value, ModelLoadError)
