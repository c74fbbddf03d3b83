"""The ``tokenflow`` command end to end on a tiny random-weight model: outputs, cache, options, errors.

Everything runs in-process through :func:`tokenflow.cli.main` (one subprocess proves the installed entry point).
Runs that several tests inspect are module-scoped fixtures, so each edit happens once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import audio_only as _audio_only
import torch
from PIL import Image
from tokenflow.inversion import InversionCache, load_latents

from tokenflow.cli import main

STEPS, N, BS, FPS = 3, 10, 4, 12  # editing steps, clip frames, --batch-size, clip fps (see conftest.pan_clip)
OUT_W, OUT_H = 96, 64  # working size of the 144x96 clip at --size 64
SMALL = ["--size", "64", "--steps", str(STEPS), "--inversion-steps", "6", "--batch-size", str(BS)]
OUTPUTS = ("edited.mp4", "source.mp4", "side_by_side.mp4", "preview.png", "run.json")


@dataclass
class Env:
    root: Path
    model: Path
    clip: Path
    cache: Path

    def edit(self, name: str, *extra: str, prompt: str = "a shiny robot", quiet: bool = True) -> tuple[int, Path]:
        out = self.root / name
        argv = ["edit", str(self.clip), "--prompt", prompt, "--model", str(self.model), "--out", str(out),
                "--cache-dir", str(self.cache), *SMALL, *extra]
        rc = main(argv + (["--quiet"] if quiet else []))
        return rc, out


def report(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def env(tiny_model_dir, pan_clip, tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("cli")
    return Env(root=root, model=tiny_model_dir, clip=pan_clip, cache=root / "cache")


@pytest.fixture(scope="module")
def first_run(env) -> Path:
    """The first edit of the clip: computes (and caches) the inversion."""
    rc, out = env.edit("first", "--save-latents")
    assert rc == 0
    return out


# ----------------------------------------------------------------------------- media helpers


def video_stats(path: Path) -> dict:
    """Decoded frame count, fps, size and video/audio durations (seconds) of a file, through PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = sum(1 for _ in container.decode(stream))
    stats = dict(frames=frames, fps=fps, width=width, height=height, video_seconds=frames / fps, audio_seconds=None)
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(audio))
            stats["audio_seconds"] = samples / audio.rate
    return stats


def assert_audio_matches(stats: dict) -> None:
    assert stats["audio_seconds"] is not None, "the source's audio was dropped"
    assert stats["audio_seconds"] == pytest.approx(stats["video_seconds"], abs=0.12), stats


# ----------------------------------------------------------------------------- 1. end to end


def test_edit_writes_every_output(first_run):
    for name in OUTPUTS:
        assert (first_run / name).is_file(), name
        assert (first_run / name).stat().st_size > 0, name
    assert (first_run / "latents" / "index.json").is_file()
    # nothing half-written left beside the output folder
    assert sorted(p.name for p in first_run.parent.iterdir() if p.name.startswith(".")) == []


def test_edited_video_has_selected_frames_fps_aspect_and_audio(first_run, pan_clip):
    from tokenflow.io import probe

    source = probe(pan_clip)
    assert (source.width, source.height, source.fps) == (144, 96, FPS)
    edited = video_stats(first_run / "edited.mp4")
    assert edited["frames"] == N
    assert edited["fps"] == pytest.approx(source.fps)
    assert (edited["width"], edited["height"]) == (OUT_W, OUT_H)
    assert edited["width"] != edited["height"]
    assert edited["width"] / edited["height"] == pytest.approx(source.width / source.height)
    assert_audio_matches(edited)

    src = video_stats(first_run / "source.mp4")
    assert (src["frames"], src["width"], src["height"]) == (N, OUT_W, OUT_H)
    both = video_stats(first_run / "side_by_side.mp4")
    assert (both["frames"], both["width"], both["height"]) == (N, 2 * OUT_W, OUT_H)
    assert_audio_matches(both)
    with Image.open(first_run / "preview.png") as preview:
        preview.load()
        assert preview.width > 0 and preview.height > 0


def test_a_variable_frame_rate_clip_keeps_its_frame_times_and_audio_sync(env, tmp_path):
    """Irregular source timestamps (0, 0.083, 0.167, 0.333, ...): every output keeps each selected frame's time
    relative to the first selected one (within a tick), and the audio spans the same time as the video."""
    import numpy as np

    from conftest import VFR_TIMES, frame_times, write_vfr_clip

    clip = tmp_path / "vfr.mp4"
    write_vfr_clip(clip, width=144, height=96, audio=True)
    out = tmp_path / "vfr-out"
    rc = main(["edit", str(clip), "--prompt", "a robot", "--model", str(env.model), "--out", str(out),
               "--cache-dir", str(env.cache), *SMALL, "--start", "1", "--max-frames", "8", "--quiet"])
    assert rc == 0
    expected = np.asarray(VFR_TIMES[1:9]) - VFR_TIMES[1]
    for name in ("edited.mp4", "source.mp4", "side_by_side.mp4"):
        got, tick = frame_times(out / name)
        assert len(got) == 8, name
        np.testing.assert_allclose(got, expected, atol=max(tick, 1e-3) + 1e-9, err_msg=name)
        stats = video_stats(out / name)
        # the audio covers the frames' span: the 8th frame is shown for the median gap (0.084 s; the 9th comes at 1.1)
        assert stats["audio_seconds"] == pytest.approx(VFR_TIMES[9] - VFR_TIMES[1], abs=0.06), name


@pytest.mark.parametrize("name, frames, width, height", [
    ("odd size/clip.mkv", 3, 97, 171),  # odd on both sides, portrait (as 1081x1917 phone footage): FFV1 holds it
    ("single frame/clip.mp4", 1, 144, 96),
    ("vidéo ünï dir/my clip é.mp4", 3, 144, 96),  # spaces and non-ASCII characters in every path of the run
])
def test_unusual_inputs_edit_with_their_frame_count_and_orientation(env, tmp_path, name, frames, width, height):
    from tokenflow.testing import make_pan_clip

    clip = tmp_path / name
    clip.parent.mkdir()
    make_pan_clip(clip, num_frames=frames, width=width, height=height, shift=2)
    out = clip.parent / "ëdited out"
    rc = main(["edit", str(clip), "--prompt", "a robot", "--model", str(env.model), "--out", str(out),
               "--cache-dir", str(clip.parent / "câche"), *SMALL, "--quiet"])
    assert rc == 0
    for video in ("edited.mp4", "source.mp4"):
        stats = video_stats(out / video)
        assert stats["frames"] == frames, video
        # the short side at --size 64, the aspect kept up to the multiple of 8 the model needs
        assert min(stats["width"], stats["height"]) == 64 and (stats["height"] > stats["width"]) == (height > width)
        assert stats["width"] * height == pytest.approx(stats["height"] * width, rel=0.1), video
    assert report(out)["parameters"]["video"] == str(clip)


def test_a_phone_clip_stored_sideways_is_edited_upright(env, tmp_path):
    """Portrait phone footage is stored landscape with a display matrix (-90: turn clockwise): every output is
    upright, the source's picture the right way round (not turned the other way)."""
    from conftest import write_rotated_clip
    from tokenflow.io import load_frames, resize_frames

    clip = tmp_path / "phone.mp4"
    stored = write_rotated_clip(clip, -90, width=144, height=96)
    out = tmp_path / "out"
    assert main(["edit", str(clip), "--prompt", "a robot", "--model", str(env.model), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), *SMALL, "--quiet"]) == 0
    for video in ("edited.mp4", "source.mp4"):
        stats = video_stats(out / video)
        assert (stats["width"], stats["height"]) == (64, 96) and stats["frames"] == 3, video
    source, _ = load_frames(out / "source.mp4")
    upright = resize_frames(np.rot90(stored, k=-1, axes=(1, 2)).copy(), 64, 96)  # clockwise
    wrong = resize_frames(np.rot90(stored, k=1, axes=(1, 2)).copy(), 64, 96)
    err = np.abs(source.astype(int) - upright).mean()
    assert err < 6 and np.abs(source.astype(int) - wrong).mean() > 3 * err + 10


def test_run_json_records_the_run(first_run, env):
    run = report(first_run)
    params = run["parameters"]
    assert params["prompt"] == "a shiny robot"
    assert (params["size"], params["steps"], params["inversion_steps"], params["batch_size"]) == (64, STEPS, 6, BS)
    assert params["save_latents"] is True
    assert run["model"]["id"] == str(env.model)
    for name in ("python", "tokenflow", "torch", "diffusers", "transformers", "av"):
        assert run["versions"].get(name), name
    assert run["seed"] == 0
    assert run["output"] == dict(frames=N, width=OUT_W, height=OUT_H, fps=FPS)
    assert run["video"]["has_audio"] is True
    for stage in ("inversion", "edit"):
        assert isinstance(run["timings"][stage], (int, float)) and run["timings"][stage] >= 0
    psnr = run["inversion_psnr"]
    assert isinstance(psnr, (int, float)) and not isinstance(psnr, bool) and math.isfinite(psnr)
    assert run["inversion_cache_hit"] is False
    assert len(run["timesteps"]) == STEPS
    # random keyframes: one per chunk of --batch-size frames, at every step
    chunks = math.ceil(N / BS)
    assert len(run["keyframes"]) == STEPS
    for step in run["keyframes"]:
        assert len(step) == chunks
        assert [k // BS for k in step] == list(range(chunks))
        assert all(0 <= k < N for k in step)


# ----------------------------------------------------------------------------- 2./3. inversion cache


def test_second_edit_with_new_prompt_hits_the_cache(first_run, env, caplog, capsys):
    capsys.readouterr()
    caplog.set_level("INFO", logger="tokenflow")
    rc, out = env.edit("second", prompt="a cat", quiet=False)
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)  # the command prints the output folder
    first, second = report(first_run), report(out)
    assert first["inversion_cache_hit"] is False
    assert second["inversion_cache_hit"] is True
    assert "inversion cache hit" in caplog.text + captured.err
    assert "inversion:" not in captured.err  # no inversion progress bar: no inversion work (not timed: load varies)
    assert second["inversion_psnr"] == pytest.approx(first["inversion_psnr"])


def test_invert_refused_before_work_creates_nothing(env, tmp_path, capsys):
    cache = tmp_path / "cache"
    rc = main(["invert", str(env.clip), "--model", str(tmp_path / "no-model"), "--cache-dir", str(cache), *SMALL])
    assert rc == 2 and "no-model" in capsys.readouterr().err
    assert not cache.exists()


def test_invert_then_edit_is_a_cache_hit(env, tmp_path):
    cache = tmp_path / "cache"
    rc = main(["invert", str(env.clip), "--model", str(env.model), "--cache-dir", str(cache), "--stride", "2",
               *SMALL, "--quiet"])
    assert rc == 0
    entries = InversionCache(cache).entries()
    assert sorted(cache.iterdir()) == entries and len(entries) == 1  # the staged frames are gone
    out = tmp_path / "strided"
    rc = main(["edit", str(env.clip), "--prompt", "a robot", "--model", str(env.model), "--out", str(out),
               "--cache-dir", str(cache), "--stride", "2", *SMALL, "--quiet"])
    assert rc == 0
    run = report(out)
    assert run["inversion_cache_hit"] is True
    # --stride 2 keeps every other frame and halves the frame rate (same duration, same audio span)
    stats = video_stats(out / "edited.mp4")
    assert stats["frames"] == N // 2
    assert stats["fps"] == pytest.approx(FPS / 2)
    assert run["output"]["fps"] == pytest.approx(FPS / 2)
    assert (stats["width"], stats["height"]) == (OUT_W, OUT_H)
    assert_audio_matches(stats)


# ----------------------------------------------------------------------------- 4. propagation / blending


def test_tokenflow_linear_evaluates_each_frame_once_per_step(first_run):
    # keyframe pass (K frames) + propagation of the N-K others, three branches each
    assert report(first_run)["unet_frame_evaluations"] == 3 * N * STEPS


def test_propagation_none_is_the_per_frame_baseline(env, first_run):
    rc, out = env.edit("no-propagation", "--propagation", "none")
    assert rc == 0
    run = report(out)
    assert run["parameters"]["propagation"] == "none"
    assert run["keyframes"] == [[] for _ in range(STEPS)]
    assert run["unet_frame_evaluations"] == 3 * N * STEPS
    assert video_stats(out / "edited.mp4")["frames"] == N


def test_reference_blending_rederives_every_frame(env, first_run):
    rc, out = env.edit("reference", "--blending", "reference")
    assert rc == 0
    run = report(out)
    assert run["parameters"]["blending"] == "reference"
    assert len(run["keyframes"]) == STEPS
    # keyframe pass (K frames) + every frame again chunk by chunk, three branches each
    assert run["unet_frame_evaluations"] == sum(3 * (N + len(k)) for k in run["keyframes"])
    assert run["unet_frame_evaluations"] == 3 * (N + math.ceil(N / BS)) * STEPS


# ----------------------------------------------------------------------------- 5. determinism, latents


@pytest.fixture(scope="module")
def first_again(env, first_run) -> Path:
    """``first_run``'s exact command into another --out (its inversion now comes from the cache)."""
    rc, out = env.edit("first-again", "--save-latents")
    assert rc == 0
    return out


def test_same_seed_same_inputs_give_identical_latents(env, first_again):
    rc, third = env.edit("first-third", "--save-latents")
    assert rc == 0
    a = load_latents(first_again / "latents")
    b = load_latents(third / "latents")
    assert a["final"].shape == (N, 4, OUT_H // 8, OUT_W // 8)
    assert torch.equal(a["final"], b["final"])
    assert report(third)["keyframes"] == report(first_again)["keyframes"]


def test_first_run_and_rerun_give_identical_latents(first_run, first_again):
    assert report(first_run)["inversion_cache_hit"] is False and report(first_again)["inversion_cache_hit"] is True
    a = load_latents(first_run / "latents")
    b = load_latents(first_again / "latents")
    for key in a:
        if key.startswith("t"):
            assert torch.equal(a[key], b[key]), key  # the inverted source latents do round-trip exactly
    assert report(first_again)["keyframes"] == report(first_run)["keyframes"]
    assert torch.equal(a["final"], b["final"])


def test_latents_file_has_source_latents_of_every_editing_step(first_run):
    tensors = load_latents(first_run / "latents")
    timesteps = report(first_run)["timesteps"]
    assert len(timesteps) == STEPS
    for t in timesteps:
        assert f"t{t}" in tensors, sorted(tensors)
        assert tensors[f"t{t}"].shape == tensors["final"].shape


# ----------------------------------------------------------------------------- 6. config files


def test_yaml_config_supplies_options_and_flags_override_it(env, first_run, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"prompt: a red car\nmodel: {env.model}\nsize: 64\nsteps: {STEPS}\ninversion-steps: 6\n"
        f"batch_size: {BS}\ncache-dir: {env.cache}\nseed: 5\nguidance_scale: 5.0\nquiet: true\n"
    )
    out = tmp_path / "yaml-out"
    rc = main(["edit", str(env.clip), "--config", str(config), "--out", str(out), "--seed", "1"])
    assert rc == 0
    run = report(out)
    params = run["parameters"]
    assert params["prompt"] == "a red car"
    assert params["model"] == str(env.model)
    assert (params["size"], params["steps"], params["inversion_steps"], params["batch_size"]) == (64, STEPS, 6, BS)
    assert params["guidance_scale"] == 5.0
    assert params["seed"] == 1 and run["seed"] == 1  # the flag wins over the file's 5
    assert run["inversion_cache_hit"] is True  # same clip and inversion settings as first_run


def test_toml_config_supplies_options_and_flags_override_it(env, first_run, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'prompt = "a red car"\nmodel = "{env.model}"\nsize = 64\nsteps = {STEPS}\ninversion-steps = 6\n'
        f'batch_size = {BS}\ncache_dir = "{env.cache}"\nguidance_scale = 5.0\npropagation = "none"\n'
        "quiet = true\n"
    )
    out = tmp_path / "toml-out"
    rc = main(["edit", str(env.clip), f"--config={config}", "--out", str(out), "--guidance-scale", "3"])
    assert rc == 0
    params = report(out)["parameters"]
    assert params["prompt"] == "a red car"
    assert params["propagation"] == "none"
    assert params["steps"] == STEPS and params["size"] == 64
    assert params["guidance_scale"] == 3.0  # the flag wins over the file's 5.0


def test_unknown_config_key_is_a_one_line_error(env, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("prompt: a red car\nbogus_option: 1\n")
    out = tmp_path / "out"
    rc = main(["edit", str(env.clip), "--config", str(config), "--out", str(out), *SMALL])
    assert_one_line_error(rc, capsys, tmp_path, out, "bogus_option")


def test_a_config_file_that_would_run_code_is_refused_and_the_code_does_not_run(env, tmp_path, capsys):
    marker = tmp_path / "ran"
    config = tmp_path / "hostile.yaml"
    config.write_text(f"prompt: !!python/object/apply:os.system ['touch {marker}']\n")
    out = tmp_path / "out"
    rc = main(["edit", str(env.clip), "--config", str(config), "--out", str(out), *SMALL])
    assert_one_line_error(rc, capsys, tmp_path, out, "hostile.yaml: cannot be parsed")
    assert not marker.exists()  # YAML read with the safe loader: no object of the file's choosing is made


# ----------------------------------------------------------------------------- 7. keyframes file


def test_keyframes_file_is_used(env, first_run, tmp_path):
    lists = [[1, 5, 8], [0, 4, 9], [3, 6, 7]]
    path = tmp_path / "keyframes.json"
    path.write_text(json.dumps(lists))
    rc, out = env.edit("explicit-keyframes", "--keyframes", str(path))
    assert rc == 0
    run = report(out)
    assert run["keyframes"] == lists
    assert run["unet_frame_evaluations"] == 3 * N * STEPS


# ----------------------------------------------------------------------------- 8. bad input


def assert_one_line_error(rc, capsys, parent: Path, out: Path, needle: str) -> None:
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tokenflow: error:"), err
    assert needle in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}")] == []


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, pan_clip) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    text = root / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    truncated = root / "truncated.mp4"
    truncated.write_bytes(pan_clip.read_bytes()[:200])
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    not_model = root / "not-a-model"
    not_model.mkdir()
    (not_model / "weights.txt").write_text("nothing here")
    from tokenflow.testing import make_pan_clip

    tiny = root / "tiny.mp4"  # 48x32: the tiny model's deepest level needs a short side of 64
    make_pan_clip(tiny, num_frames=4, width=48, height=32, shift=2)
    return dict(missing=root / "missing.mp4", text=text, truncated=truncated, empty=empty, not_model=not_model,
                cut_mkv=cut_mkv(root / "cut.mkv"), audio_only=_audio_only(pan_clip, root / "tone.m4a"), tiny=tiny)


def cut_mkv(path: Path) -> Path:
    """The clip as lossless FFV1 cut in half: the first frames decode, the header's duration says more."""
    from tokenflow.testing import make_pan_clip

    whole = path.with_name("whole.mkv")
    make_pan_clip(whole, num_frames=N, width=144, height=96, shift=4, fps=FPS)
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# (case id, argv changes, text the error line must contain); "{...}" names a bad_files entry
BAD_INPUTS = [
    ("missing-file", dict(video="{missing}"), "missing.mp4"),
    ("text-file", dict(video="{text}"), "notes.mp4"),
    ("truncated-mp4", dict(video="{truncated}"), "truncated.mp4"),
    ("empty-mp4", dict(video="{empty}"), "empty.mp4"),
    ("truncated-mkv", dict(video="{cut_mkv}"), "cut.mkv: truncated or damaged after frame"),
    ("truncated-mkv-names-the-flag", dict(video="{cut_mkv}"), "--allow-partial"),
    # found from the packets before the model loads (this model cannot load: its error would come first)
    ("truncated-mkv-before-the-model", dict(video="{cut_mkv}", model="{not_model}"),
     "cut.mkv: truncated or damaged after frame"),
    ("audio-only", dict(video="{audio_only}"), "tone.m4a: has no video stream (audio only)"),
    ("frames-smaller-than-the-model-takes", dict(video="{tiny}"), "tiny.mp4: its frames are 48x32, smaller than"),
    ("frames-smaller-than-the-model-takes-at-any-size", dict(video="{tiny}", extra=["--size", "128"]),
     "the short side must be at least 64 px"),
    ("empty-prompt", dict(prompt=""), "--prompt"),
    ("blank-prompt", dict(prompt="   "), "--prompt"),
    ("size-16", dict(extra=["--size", "16"]), "--size"),
    ("start-past-end", dict(extra=["--start", "1000"]), "--start"),
    ("stride-0", dict(extra=["--stride", "0"]), "--stride"),
    ("propagation", dict(extra=["--propagation", "bogus"]), "--propagation"),
    ("blending", dict(extra=["--blending", "bogus"]), "--blending"),
    ("device", dict(extra=["--device", "bogus"]), "--device"),
    ("dtype", dict(extra=["--dtype", "bogus"]), "--dtype"),
    ("unknown-flag", dict(extra=["--bogus"]), "--bogus"),
    ("model-missing", dict(model="{missing_model}"), "--model"),
    ("model-not-diffusers", dict(model="{not_model}"), "--model"),
    ("steps-0", dict(extra=["--steps", "0"]), "--steps"),
    ("inversion-steps-past-training", dict(extra=["--inversion-steps", "1001"]), "--inversion-steps 1001"),
    ("inversion-steps-past-the-last-timestep", dict(extra=["--inversion-steps", "1000"]), "--inversion-steps 1000"),
    ("keyframe-window", dict(extra=["--keyframe-window", "wide"]), "--keyframe-window"),
    ("keyframe-batch-0", dict(extra=["--keyframe-batch", "0"]), "--keyframe-batch"),
]


@pytest.mark.parametrize("change,needle", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_error_and_writes_nothing(env, bad_files, tmp_path, capsys, change, needle):
    paths = {k: str(v) for k, v in bad_files.items()} | {"missing_model": str(tmp_path / "no-such-model")}
    video = change.get("video", str(env.clip)).format(**paths)
    model = change.get("model", str(env.model)).format(**paths)
    out = tmp_path / "out"
    argv = ["edit", video, "--prompt", change.get("prompt", "a robot"), "--model", model, "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), *SMALL, *change.get("extra", [])]
    capsys.readouterr()
    rc = main(argv)
    assert_one_line_error(rc, capsys, tmp_path, out, needle)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_allow_partial_edits_the_frames_of_a_truncated_video_that_decode(env, bad_files, tmp_path, caplog):
    import logging

    out = tmp_path / "partial"
    argv = ["edit", str(bad_files["cut_mkv"]), "--prompt", "a robot", "--model", str(env.model), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), *SMALL, "--allow-partial", "--quiet"]
    with caplog.at_level(logging.WARNING, logger="tokenflow.io"):
        assert main(argv) == 0
    assert any("truncated or damaged" in r.getMessage() for r in caplog.records)  # a warning, even under --quiet
    frames = video_stats(out / "edited.mp4")["frames"]
    assert 1 <= frames < N
    assert report(out)["parameters"]["allow_partial"] is True


# ----------------------------------------------------------------------------- 8b. where the output goes


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model starts loading: the checks under test must come first."""
    from tokenflow.editor import TokenFlowEditor

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(TokenFlowEditor, "from_pretrained", refuse)


@pytest.mark.parametrize("command, where, flag", [("edit", "under-a-file", "--out"), ("edit", "is-a-file", "--out"),
                                                  ("edit", "cache-under-a-file", "--cache-dir"),
                                                  ("invert", "cache-under-a-file", "--cache-dir")])
def test_an_output_location_that_cannot_be_written_is_refused_before_the_model_loads(
    env, tmp_path, capsys, no_model_load, command, where, flag
):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file, not a folder")
    out = {"under-a-file": blocker / "out", "is-a-file": blocker}.get(where, tmp_path / "out")
    cache = blocker / "cache" if where == "cache-under-a-file" else tmp_path / "cache"
    argv = [command, str(env.clip), "--model", str(env.model), "--cache-dir", str(cache), *SMALL]
    argv += ["--prompt", "a robot", "--out", str(out)] if command == "edit" else []
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("tokenflow: error:") and flag in err and str(blocker) in err
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize("command, extra, latents", [("edit", [], 3), ("edit", ["--save-latents"], 3 + 2 + 3),
                                                     ("invert", [], 2 + 1)])
def test_free_space_is_checked_at_the_models_own_size(env, tmp_path, capsys, monkeypatch, command, extra, latents):
    # without --size the model's trained size decides what is staged (SDXL: 1024, four times SD's 512): a copy of
    # the tiny model trained "at 2048 px" stages the clip's 10 frames at 3072x2048 RGB, about 189 MB, not 512 px's
    # 12 MB; beside them the editing loop keeps three float32 latents a frame (start, current, next: 4x384x256 at
    # the VAE's factor 8), and --save-latents every editing timestep's, the clean and the final ones besides;
    # `invert` stages the frames in the cache, beside the entry's clean latents and one a frame per editing timestep
    import shutil
    from collections import namedtuple

    import tokenflow.io.space as space

    big = tmp_path / "model-2048"
    shutil.copytree(env.model, big)
    unet_config = big / "unet" / "config.json"
    unet_config.write_text(unet_config.read_text().replace('"sample_size": 8', '"sample_size": 256'))
    with av.open(str(env.clip)) as clip:
        stream = clip.streams.video[0]
        frames, width, height = stream.frames, stream.width, stream.height
    assert (frames, width * 2048 // height) == (10, 3072)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(space.shutil, "disk_usage", lambda path: usage(2**34, 2**34 - 100 * 2**20, 100 * 2**20))
    out = tmp_path / "out"
    argv = [command, str(env.clip), "--model", str(big), "--cache-dir", str(tmp_path / "cache"), "--steps", "2",
            "--inversion-steps", "2", *extra]
    argv += ["--prompt", "a robot", "--out", str(out)] if command == "edit" else []
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    need = (10 * (3072 * 2048 * 3 + latents * 4 * 384 * 256 * 4) + space.MARGIN_BYTES) / 2**20
    flag = "--out" if command == "edit" else "--cache-dir"
    assert rc == 2 and f"100 MB free, the run needs about {need:.0f} MB" in err and flag in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_cache_folder_without_room_for_the_inverted_latents_is_refused_before_the_inversion(
    env, tmp_path, capsys, monkeypatch
):
    # `edit` stages the frames beside the output, the inversion's shards go to the cache: the output's filesystem
    # has room, the cache's has less than its entry's 1 MB of headroom (10 frames x (the clean latents + one per
    # editing timestep) x 4x8x12 float32 is tiny)
    from collections import namedtuple

    import tokenflow.io.space as space

    cache = tmp_path / "cache"
    cache.mkdir()
    usage = namedtuple("usage", "total used free")
    real = space.shutil.disk_usage
    monkeypatch.setattr(space.shutil, "disk_usage",
                        lambda path: usage(2**30, 2**30 - 2**19, 2**19) if Path(path) == cache else real(path))
    out = tmp_path / "out"
    argv = ["edit", str(env.clip), "--model", str(env.model), "--cache-dir", str(cache), *SMALL,
            "--prompt", "a robot", "--out", str(out)]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(cache) in err and "0 MB free, the run needs about 1 MB" in err and "--cache-dir" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no partial entry, no frames


@pytest.mark.parametrize("command, flag", [("edit", "--out"), ("invert", "--cache-dir")])
def test_too_little_free_space_is_refused_before_the_model_loads(env, tmp_path, capsys, monkeypatch, no_model_load,
                                                                 command, flag):
    from collections import namedtuple

    import tokenflow.io.space as space

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(space.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))  # 1 MB free
    out = tmp_path / "out"
    argv = [command, str(env.clip), "--model", str(env.model), "--cache-dir", str(tmp_path / "cache"), *SMALL]
    argv += ["--prompt", "a robot", "--out", str(out)] if command == "edit" else []
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "1 MB free, the run needs about" in err and flag in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_disk_that_fills_while_the_outputs_are_written_fails_in_one_line_keeping_the_old_output(
    env, tmp_path, capsys, monkeypatch
):
    import errno

    from tokenflow.io import VideoWriter

    out = tmp_path / "out"
    rc = main(["edit", str(env.clip), "--prompt", "a robot", "--model", str(env.model), "--out", str(out),
               "--cache-dir", str(env.cache), *SMALL, "--quiet"])
    assert rc == 0
    before, cache_before = tree_digest(out), tree_digest(env.cache)
    real_write = VideoWriter.write

    def write(self, frame, *args, **kwargs):
        if self.frames_written == 3 and self.path.name == "side_by_side.mp4":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_write(self, frame, *args, **kwargs)

    monkeypatch.setattr(VideoWriter, "write", write)
    capsys.readouterr()
    rc = main(["edit", str(env.clip), "--prompt", "a cat", "--model", str(env.model), "--out", str(out),
               "--cache-dir", str(env.cache), *SMALL, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device while writing" in err and "--out" in err
    assert tree_digest(out) == before and tree_digest(env.cache) == cache_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_a_cache_that_fills_up_is_named_in_the_message(env, tmp_path, capsys, monkeypatch):
    """The disk under --cache-dir fills while the inversion writes a shard: the one line names --cache-dir (the
    folder to clear), not --out, and no output folder is left."""
    import errno

    import safetensors.torch

    cache = tmp_path / "cache"

    def full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    rc = main(["edit", str(env.clip), "--prompt", "a robot", "--model", str(env.model), "--out", str(out),
               "--cache-dir", str(cache), *SMALL, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device while writing" in err and "--cache-dir" in err and "--out" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_file_size_limit_hit_while_staging_fails_cleanly_in_a_real_process(env, tmp_path):
    """RLIMIT_FSIZE below the staged frames' size (SIGXFSZ ignored, so the write raises EFBIG): exit 2, one line, no
    traceback; the earlier output folder and the inversion cache stay as they were, no staging folder is left."""
    import resource
    import signal

    out = tmp_path / "out"
    rc = main(["edit", str(env.clip), "--prompt", "a robot", "--model", str(env.model), "--out", str(out),
               "--cache-dir", str(env.cache), *SMALL, "--quiet"])
    assert rc == 0
    before, cache_before = tree_digest(out), tree_digest(env.cache)
    staged = N * OUT_W * OUT_H * 3  # frames.rgb
    limit = staged // 2
    assert max(p.stat().st_size for p in env.cache.rglob("*") if p.is_file()) < limit  # a cache hit rewrites nothing

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    script = Path(sys.executable).with_name("tokenflow")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "tokenflow.cli"]
    proc = subprocess.run(cmd + ["edit", str(env.clip), "--prompt", "a cat", "--model", str(env.model), "--out",
                                 str(out), "--cache-dir", str(env.cache), *SMALL, "--quiet"],
                          capture_output=True, text=True, timeout=300, preexec_fn=limited,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("tokenflow: error:") and "File too large while writing" in lines[0]
    assert proc.stdout == ""
    assert tree_digest(out) == before and tree_digest(env.cache) == cache_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


# ----------------------------------------------------------------------------- 9. help, entry point


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "edit" in text and "invert" in text
    assert main(["edit", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--prompt" in text and "--propagation" in text


def test_help_and_usage_errors_do_not_import_the_model_libraries():
    """`--help` and a mistyped option answer at once: diffusers/transformers (seconds to import) are imported, and
    quieted, only when a command runs."""
    code = ("import sys; from tokenflow.cli import main; codes = [main(['--help']), main(['edit', '--help']), "
            "main(['edit', 'x.mp4', '--prompt', 'p', '--no-such-flag'])]; "
            "print(codes, sorted(m for m in ('diffusers', 'transformers', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[0, 0, 2] []"
    assert "no such option" in proc.stderr.lower()


def test_installed_command_reports_errors_in_one_line(tmp_path):
    script = Path(sys.executable).with_name("tokenflow")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "tokenflow.cli"]
    missing = tmp_path / "missing.mp4"
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + ["edit", str(missing), "--prompt", "a robot", "--out", str(out), "--size", "64"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tokenflow: error:") and "missing.mp4" in lines[0]
    assert proc.stdout == ""
    assert not out.exists()


def test_a_hub_model_that_is_not_cached_offline_is_one_line_saying_how_to_fix_it(pan_clip, tmp_path):
    script = Path(sys.executable).with_name("tokenflow")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "tokenflow.cli"]
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(cmd + ["edit", str(pan_clip), "--prompt", "a robot", "--model", "someone/typo-model",
                                 "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "someone/typo-model" in lines[0] and "local cache" in lines[0] and "internet" in lines[0]
    assert not out.exists()


def test_the_hub_is_asked_once_briefly_and_not_at_all_offline(monkeypatch):
    """Without network the hub client retries for half a minute; the loader asks the endpoint once (a real local
    socket stands in for it here) and, under HF_HUB_OFFLINE=1, not at all."""
    import socket

    from huggingface_hub import constants

    from tokenflow.backbones.loading import hub_reachable

    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(2)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        assert hub_reachable()
        server.accept()[0].close()  # it did connect
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not hub_reachable()
        server.settimeout(0.5)
        with pytest.raises(socket.timeout):  # ... and offline it did not
            server.accept()
    finally:
        server.close()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not hub_reachable(timeout=1)  # nothing listens there now


@pytest.mark.parametrize("signal_name, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_during_the_inversion_exits_128_plus_it_with_one_line_and_writes_nothing(
    pan_clip, tiny_model_dir, tmp_path, signal_name, code, word
):
    """A real process and a real signal (Ctrl-C, or SIGTERM from a scheduler): `tokenflow edit ... && upload` must
    not see success, no staging folder (the staged frames) may stay behind, and the inversion's finished timesteps
    stay in the cache for the next run."""
    import signal
    import time

    script = Path(sys.executable).with_name("tokenflow")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "tokenflow.cli"]
    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = ["edit", str(pan_clip), "--prompt", "a robot", "--model", str(tiny_model_dir), "--out", str(out),
            "--size", "64", "--steps", "3", "--inversion-steps", "999", "--cache-dir", str(tmp_path / "cache")]
    with log.open("w") as err:
        # a shell's background job inherits SIGINT ignored (and Python then keeps it ignored): restore the default
        proc = subprocess.Popen(cmd + argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while "inversion:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # a few grid steps in: the first saved timestep is done
            assert proc.poll() is None, log.read_text()  # 999 inversion steps: still inverting
            proc.send_signal(getattr(signal, signal_name))
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = log.read_text()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.replace("\r", "\n").strip().splitlines()[-1] == f"tokenflow: {word}; no output was written"
    assert stdout == ""
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # no output, no staging folder left behind
    # the inversion's finished timesteps are kept for the next run (the batch in progress as its checkpoint)
    assert list((tmp_path / "cache").glob("*.partial/checkpoint.safetensors")), list((tmp_path / "cache").rglob("*"))


def test_quiet_in_a_config_file_silences_logs_as_the_flag_does(pan_clip, tiny_model_dir, tmp_path):
    script = Path(sys.executable).with_name("tokenflow")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "tokenflow.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = ["edit", str(pan_clip), "--prompt", "a robot", "--model", str(tiny_model_dir), "--size", "64",
            "--steps", "2", "--inversion-steps", "2", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache")]
    loud = subprocess.run(cmd + argv + ["--out", str(tmp_path / "loud")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert loud.returncode == 0 and "loaded" in loud.stderr  # the logs this test expects to disappear
    config = tmp_path / "quiet.yaml"
    config.write_text("quiet: true\n")
    quiet = subprocess.run(cmd + argv + ["--out", str(tmp_path / "quiet"), "--config", str(config)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and quiet.stdout.strip() == str(tmp_path / "quiet")


# ----------------------------------------------------------------------------- errors name fields, the CLI flags


def _library_error_references() -> set[str]:
    """Every option named (`field` in backticks) by the message of an error the library raises (not an
    interface's), read from the source: the string parts of every ``raise`` statement, and of the tuples a
    message's option name is drawn from."""
    import ast
    import re

    root = Path(__file__).resolve().parent.parent / "src" / "tokenflow"
    names = set()
    for path in root.rglob("*.py"):
        if path.name in ("cli.py", "ui.py", "pipeline.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Raise, ast.For)):
                scope = node.exc if isinstance(node, ast.Raise) else node.iter
                for part in ast.walk(scope) if scope is not None else ():
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        names.update(re.findall(r"`([a-z][a-z0-9_]*)`", part.value))
    return names


def test_library_errors_name_fields_and_the_cli_shows_each_as_an_existing_flag(tmp_path, capsys):
    import typer

    from tokenflow.cli import _as_flags, app
    from tokenflow.errors import InputError
    from tokenflow.runner import RunOptions

    with pytest.raises(InputError) as exc:  # the library speaks field names...
        RunOptions(video=tmp_path / "v.mp4", prompt="a robot", inversion_steps=0).check_inputs()
    assert str(exc.value).startswith("`inversion_steps` 0:") and "--" not in str(exc.value)
    # ...and every option a library error can name is a flag of some command, once the CLI renames it
    flags = {opt for command in typer.main.get_command(app).commands.values() for p in command.params
             for opt in p.opts + p.secondary_opts}
    references = _library_error_references()
    assert {"inversion_steps", "depth_model", "gpus_per_job", "clip_model", "pnp_attn_t"} <= references
    unknown = {name: _as_flags(f"`{name}`") for name in references if _as_flags(f"`{name}`") not in flags}
    assert not unknown, unknown
    assert _as_flags("`evaluate` and `pnp`") == "--eval and --pnp"  # declared flags, not the default spelling
    rc = main(["edit", str(tmp_path / "v.mp4"), "--prompt", "x", "--inversion-steps", "0"])
    assert rc == 2 and "--inversion-steps 0: must be at least 1" in capsys.readouterr().err
