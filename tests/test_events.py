"""Progress events, cancellation and sharing one editor between threads."""

from __future__ import annotations

import threading

import pytest
import torch

from tokenflow import Cancelled, ProgressEvent
from tokenflow.editor import EditConfig, TokenFlowEditor
from tokenflow.inversion import InversionCache, invert_frames
from tokenflow.runner import RunOptions, edit_video, invert_video

from conftest import PAN_FRAMES


def _options(clip, model_dir, tmp_path, **kw) -> RunOptions:
    base = dict(video=clip, prompt="a robot", model=str(model_dir), size=64, steps=3, inversion_steps=6,
                batch_size=4, cache_dir=tmp_path / "cache", out=tmp_path / "out", quiet=True, device="cpu")
    base.update(kw)
    return RunOptions(**base)


def _count_unet_calls(unet) -> tuple[list[int], object]:
    calls: list[int] = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_progress_events_arrive_in_order_and_reach_the_end(pan_clip, tiny_model_dir, tmp_path):
    events: list[ProgressEvent] = []
    result = edit_video(_options(pan_clip, tiny_model_dir, tmp_path), progress=events.append)
    assert result.out_dir.is_dir()
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["inversion", "reconstruction", "editing", "decoding"]
    for stage in stages:
        mine = [e for e in events if e.stage == stage]
        assert mine[0].done == 0 and mine[0].eta_s is None  # announced before any work
        assert all(a.done <= b.done for a, b in zip(mine, mine[1:]))  # never backwards
        assert mine[-1].done == mine[-1].total and mine[-1].fraction == 1.0  # reaches 100%
        assert all(e.eta_s is not None and e.eta_s >= 0 for e in mine[1:])
        assert {e.unit for e in mine} == {"frame"}
    frames = {e.stage: e.total for e in events}
    assert frames["inversion"] == frames["decoding"] == PAN_FRAMES
    assert frames["editing"] == PAN_FRAMES * 3  # frames x steps
    # stages come one after another: no event of an earlier stage after a later one started
    order = [stages.index(e.stage) for e in events]
    assert order == sorted(order)


def test_a_cancelled_edit_stops_within_one_unet_call_and_leaves_nothing(pan_clip, tiny_model_dir, tmp_path):
    from tokenflow.models import load_model

    editor = TokenFlowEditor(load_model(tiny_model_dir, device="cpu"))
    edit_video(_options(pan_clip, tiny_model_dir, tmp_path, out=tmp_path / "warm"), editor=editor)  # cached inversion
    cancel = threading.Event()
    calls, handle = _count_unet_calls(editor.model.unet)
    stop_at = 4  # cancel while the 4th UNet call of the edit is running

    def during_call(module, args):
        if len(calls) == stop_at:
            cancel.set()

    during = editor.model.unet.register_forward_pre_hook(during_call)
    try:
        with pytest.raises(Cancelled):
            edit_video(_options(pan_clip, tiny_model_dir, tmp_path), editor=editor, cancel=cancel)
    finally:
        handle.remove()
        during.remove()
    assert len(calls) == stop_at  # the running call finished, no other started
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging folder either
    # the editor is still usable: its UNet carries no processor of the cancelled edit
    assert all(type(p).__name__ != "TokenFlowAttnProcessor" for p in editor.model.unet.attn_processors.values())
    edit_video(_options(pan_clip, tiny_model_dir, tmp_path), editor=editor)
    assert (tmp_path / "out" / "edited.mp4").is_file()


def test_a_cancelled_inversion_raises_and_the_next_run_resumes_it(pan_clip, tiny_model_dir, tmp_path):
    cancel = threading.Event()
    seen: list[ProgressEvent] = []

    def progress(event: ProgressEvent) -> None:
        seen.append(event)
        if event.stage == "inversion" and event.done >= 5:  # past the first batch of 4 frames
            cancel.set()

    options = _options(pan_clip, tiny_model_dir, tmp_path)
    with pytest.raises(Cancelled):
        invert_video(options, progress=progress, cancel=cancel)
    assert list((tmp_path / "cache").glob("*.partial/frames-*.safetensors"))  # the finished batch was kept
    resumed: list[ProgressEvent] = []
    invert_video(options, progress=resumed.append)
    first = next(e for e in resumed if e.stage == "inversion")
    assert first.done >= 4  # starts after the frames done before the cancel
    assert InversionCache(tmp_path / "cache").entries()


def test_cancel_accepts_anything_with_is_set(tiny_model, pan6):
    class Flag:
        def is_set(self) -> bool:
            return True

    with pytest.raises(Cancelled):
        invert_frames(tiny_model, pan6[:2], steps=2, inversion_steps=2, reconstruct=False, progress=False,
                      cancel=Flag())


def test_two_threads_editing_with_one_editor_equal_two_sequential_edits(tiny_model, pan6):
    editor = TokenFlowEditor(tiny_model)
    source = editor.invert(pan6, steps=3, inversion_steps=3, reconstruct=False, progress=False)
    configs = [EditConfig(prompt="a robot", steps=3, batch_size=2, seed=1),
               EditConfig(prompt="a marble statue", steps=3, batch_size=3, seed=2, propagation="none")]
    sequential = [editor.edit(source, c, progress=False).latents for c in configs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = editor.edit(source, configs[i], progress=False).latents
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert torch.equal(results[0], sequential[0]) and torch.equal(results[1], sequential[1])


def test_progress_true_draws_bars_and_a_callable_receives_events(tiny_model, pan6, capsys):
    events: list[ProgressEvent] = []
    invert_frames(tiny_model, pan6[:2], steps=2, inversion_steps=4, reconstruct=True, progress=events.append)
    assert [e.stage for e in events][0] == "inversion" and events[-1].stage == "reconstruction"
    assert capsys.readouterr().err == ""  # a callable replaces the bars
    with pytest.raises(TypeError, match="progress"):
        invert_frames(tiny_model, pan6[:2], steps=2, inversion_steps=2, reconstruct=False, progress="yes")


def test_the_staging_folder_of_a_run_that_died_is_removed_by_the_next_one(pan_clip, tiny_model_dir, tmp_path,
                                                                          caplog):
    """A run killed with SIGKILL cannot clean up: the next run into the same place removes its staging folder
    (a dead process's, on this machine), and only that one."""
    import json
    import logging
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    stale, live, foreign = (tmp_path / ".out.dead1234", tmp_path / ".out.live5678", tmp_path / ".out.other")
    for folder, owner in ((stale, {"pid": dead_pid, "host": host}), (live, {"pid": os.getpid(), "host": host}),
                          (foreign, None)):
        (folder / ".work").mkdir(parents=True)
        (folder / ".work" / "frames.rgb").write_bytes(b"\0" * 1024)
        if owner is not None:
            (folder / ".work" / "owner.json").write_text(json.dumps(owner))
    with caplog.at_level(logging.WARNING, logger="tokenflow"):
        edit_video(_options(pan_clip, tiny_model_dir, tmp_path, steps=1, inversion_steps=1, check_frames=0))
    assert not stale.exists() and live.exists() and foreign.exists()
    assert f"process {dead_pid} is gone" in caplog.text and str(stale) in caplog.text
    assert (tmp_path / "out" / "edited.mp4").is_file()
