"""One edit run from a video file to an output folder: read, invert (cached), edit, decode, write.

The CLI and any other interface call :func:`edit_video` / :func:`invert_video`; they hold no algorithm.
Everything is written to a temporary folder beside the destination and moved into place at the end, so a
failed or interrupted run leaves no half-written output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from . import io as video_io
from .editor import EditOutput, TokenFlowEditor
from .errors import InputError
from .events import CancelToken, ProgressCallback, Tracker, TqdmProgress, check_cancelled
from .io import FrameStore
from .inversion import InversionCache, SourceLatents
from .io.owner import dead_owner, write_owner
from .options import RunOptions

logger = logging.getLogger(__name__)

__all__ = ["RunOptions", "RunResult", "edit_video", "invert_video"]

@dataclass
class RunResult:
    out_dir: Path
    frames: int
    width: int
    height: int
    fps: float
    cache_hit: bool
    report: dict = field(default_factory=dict)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tokenflow", "torch", "diffusers", "transformers", "av", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _default_out(options: RunOptions, kind: str = "") -> Path:
    """``./tokenflow-out/VIDEO[-KIND]-HASH/``, the hash over the options that change the result."""
    params = {k: str(v) for k, v in asdict(options).items() if k not in ("out", "quiet", "evaluate")}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return Path("tokenflow-out") / f"{Path(options.video).stem}{'-' + kind if kind else ''}-{digest}"


def _prepare(
    options: RunOptions, editor: TokenFlowEditor | None, workdir: Callable[[], Path], with_controlnet: bool = False,
    space: tuple[Path, str] | None = None, latents_per_frame: int = 0,
):
    """Load the model, then stream the selected frames, resized to the working size, into the folder ``workdir()``
    returns (asked for only then, so nothing is created when the input or the model is refused).

    ``space`` (folder, option): where the frames go, checked for room for them and ``latents_per_frame`` float32
    latents a frame besides. Returns the editor, the frames (a :class:`FrameStore`: on disk, read a batch at a
    time), the source's :class:`VideoInfo` and the timings.
    """
    timings = {}
    info = video_io.probe(options.video)  # a bad input fails here, before the model loads
    copies = 2 if with_controlnet else 1

    def check_space(frame_size=None):
        if space is not None:
            extra = 0
            if frame_size is not None:  # the latents' size is known once the model is
                factor = editor.model.vae_scale_factor
                extra = latents_per_frame * editor.model.latent_channels * (frame_size[0] // factor) * (
                    frame_size[1] // factor) * 4
            need = video_io.staged_bytes(info, options.start, options.stride, options.max_frames, options.size,
                                         copies=copies, frame_size=frame_size, extra_per_frame=extra)
            video_io.check_free_space(space[0], need, space[1])

    if options.size is not None:  # the working size is known: too little room fails before the model loads too
        check_space()
    if not options.allow_partial:  # a cut-off file fails here, before the model loads
        video_io.check_packets(options.video, options.start, options.stride, options.max_frames)
    frames_in = video_io.read_frames(options.video, options.start, options.stride, options.max_frames,
                                     allow_partial=options.allow_partial)
    started = time.perf_counter()
    editor = load_editor(options, editor, with_controlnet)
    timings["load_model"] = time.perf_counter() - started
    width, height = working_size(options, editor.model, info)
    check_space((width, height))  # at the model's own size (SDXL: 1024), before a frame is staged
    started = time.perf_counter()
    resized = (video_io.resize_frames(frame, width, height) for frame in frames_in)
    frames = FrameStore.write(workdir() / "frames.rgb", resized, source=str(options.video))
    frames.times = frames_in.variable_times()  # None at a constant frame rate
    timings["read"] = time.perf_counter() - started
    return editor, frames, info, timings


def load_editor(options: RunOptions, editor: TokenFlowEditor | None = None, with_controlnet: bool = False):
    """``editor`` if given, else one loaded with the options' model, device, dtype, LoRAs and offload."""
    if editor is not None:
        return editor
    from .backbones import parse_lora

    return TokenFlowEditor.from_pretrained(
        options.model,
        device=options.device,
        dtype=options.dtype,
        loras=[parse_lora(spec) for spec in options.lora],
        controlnet=options.controlnet if with_controlnet else None,
        offload=options.offload,
    )


def working_size(options: RunOptions, model, info) -> tuple[int, int]:
    """(width, height) the video is edited at: ``size`` (default: the model's) on the short side, aspect ratio
    kept, a multiple of the model's ``size_multiple`` (the VAE factor, times a transformer's patch); one line when the model cannot take it or the video's frames are smaller
    than the model's smallest side (a 16 px clip stretched to 512 is no edit of it)."""
    if min(info.width, info.height) < model.min_side:  # nothing to edit, whatever `size` would stretch it to
        raise InputError(
            f"{info.path}: its frames are {info.width}x{info.height}, smaller than {options.model} takes (the short "
            f"side must be at least {model.min_side} px); use a larger video"
        )
    size = options.size if options.size is not None else model.default_size
    width, height = video_io.working_size(info.width, info.height, size, multiple=model.size_multiple)
    if min(width, height) < model.min_side:
        raise InputError(
            f"`size` {size} is too small for {options.model}: the short side must be at least "
            f"{model.min_side} px; use a larger `size`"
        )
    return width, height


def _progress(options: RunOptions, progress: ProgressCallback | None) -> ProgressCallback | None:
    """The caller's callback, else progress bars unless ``quiet``."""
    if progress is not None:
        return progress
    return None if options.quiet else TqdmProgress()


def _invert(editor: TokenFlowEditor, frames: FrameStore, options: RunOptions, timings: dict, progress, cancel):
    hits = []
    started = time.perf_counter()
    source = editor.invert(
        frames,
        inversion_prompt=options.inversion_prompt,
        steps=options.steps,
        inversion=options.inversion,
        inversion_steps=options.inversion_steps,
        refinements=options.inversion_refinements,
        check_frames=options.check_frames,
        cache_stride=options.cache_stride,
        batch_size=options.batch_size,
        cache=InversionCache(options.cache_dir),
        progress=progress,
        on_cache_hit=hits.append,
        cancel=cancel,
    )
    timings["inversion"] = time.perf_counter() - started
    return source, bool(hits)


def invert_video(
    options: RunOptions,
    editor: TokenFlowEditor | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SourceLatents:
    """Precompute and cache the inversion of a video (``tokenflow invert``).

    ``progress``: a callable receiving :class:`~tokenflow.events.ProgressEvent` objects (default: progress bars unless
    ``options.quiet``); ``cancel``: a ``threading.Event`` (or anything with ``is_set()``), checked after every UNet
    call: a cancelled inversion raises :class:`~tokenflow.events.Cancelled` and resumes from its last checkpoint
    next time.
    """
    options.check_inputs(editing=False)
    progress = _progress(options, progress)
    root = InversionCache(options.cache_dir).root
    video_io.check_writable(root, "cache_dir")  # before any heavy work
    staged: list[Path] = []

    def workdir() -> Path:
        root.mkdir(parents=True, exist_ok=True)
        staged.append(Path(tempfile.mkdtemp(prefix=".frames-", dir=root)))
        return staged[-1]

    try:
        # the cache entry's shards go beside the staged frames: the clean latents and one per editing timestep
        editor, frames, _, timings = _prepare(options, editor, workdir, space=(root, "cache_dir"),
                                              latents_per_frame=options.steps + 1)
        try:
            source, hit = _invert(editor, frames, options, timings, progress, cancel)
        finally:
            frames.close()
    except OSError as exc:
        if video_io.is_out_of_space(exc):
            raise video_io.out_of_space_error(exc, root, "cache_dir") from exc
        raise
    finally:
        for folder in staged:
            shutil.rmtree(folder, ignore_errors=True)
    logger.info(
        "inversion %s in %.1f s (%d frames %dx%d; reconstruction PSNR %s dB)",
        "cache hit" if hit else "done",
        timings["inversion"],
        frames.shape[0],
        frames.shape[2],
        frames.shape[1],
        "n/a" if source.reconstruction_psnr is None else f"{source.reconstruction_psnr:.2f}",
    )
    return source


def edit_video(
    options: RunOptions,
    editor: TokenFlowEditor | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> RunResult:
    """Edit a video end to end and write the run folder (``tokenflow edit``).

    ``progress``: a callable receiving :class:`~tokenflow.events.ProgressEvent` objects, stages ``inversion``,
    ``reconstruction``, ``editing`` and ``decoding`` in that order (default: progress bars unless
    ``options.quiet``). ``cancel``: a ``threading.Event`` (or anything with ``is_set()``), checked after every UNet
    call; a cancelled run raises :class:`~tokenflow.events.Cancelled` and leaves no output folder.

    Outputs: ``edited.mp4`` (source fps / stride, with the source's audio for the selected range),
    ``source.mp4``, ``side_by_side.mp4``, ``preview.png``, ``run.json`` and optionally ``latents/`` (a latents store: :mod:`tokenflow.inversion.storage`).
    Frames and control maps are staged on disk in the output's temporary folder and read a batch at a time, so
    host memory does not grow with the video's length.
    """
    options.check_inputs()
    progress = _progress(options, progress)
    out_dir = Path(options.out) if options.out is not None else _default_out(options)
    stores: list[FrameStore] = []
    cache_root = InversionCache(options.cache_dir).root
    with staged_output(out_dir, cache_root) as staging:
        video_io.check_writable(cache_root, "cache_dir")  # before any heavy work
        work = staging / ".work"
        try:
            editor, frames, info, timings = _prepare(options, editor, lambda: work,
                                                     with_controlnet=options.mode == "controlnet",
                                                     space=(out_dir.parent, "out"),
                                                     # the loop's start, current and next latents; --save-latents
                                                     # writes every editing timestep's, the clean and final ones
                                                     latents_per_frame=3 + (options.steps + 3
                                                                            if options.save_latents else 0))
            stores.append(frames)
            editor.model.layers(options.edit_config().layer_selection())  # a pattern matching nothing: before inverting
            check_cancelled(cancel)  # loading and staging take a while: a cancel meanwhile stops here
            control = None
            fps = info.fps / options.stride
            if options.mode == "controlnet":
                from .control import stream_control_maps

                started = time.perf_counter()
                maps = stream_control_maps(
                    options.control, frames, start=options.start, stride=options.stride, low=options.canny_low,
                    high=options.canny_high, depth_model=options.depth_model, batch_size=options.batch_size,
                )
                control = FrameStore.write(work / "control.rgb", maps, source=f"`control` {options.control}")
                stores.append(control)
                timings["control_maps"] = time.perf_counter() - started
            source, cache_hit = _invert(editor, frames, options, timings, progress, cancel)
            if hasattr(source.noisy, "close"):  # a compact cache entry's recomputed timesteps: scratch files
                stores.append(source.noisy)
            config = options.edit_config()
            result = editor.edit(source, config, progress=progress, control=control, cancel=cancel, workspace=work)
            timings["edit"] = result.seconds

            started = time.perf_counter()
            _write_outputs(staging, editor, result, frames, info, options, fps, progress, cancel)
            timings["decode_write"] = time.perf_counter() - started
            if control is not None:
                _write_frames(staging / "control.mp4", control, fps, options.batch_size, frames.times)
            if options.save_latents:
                _save_latents(staging / "latents", result, source, options.batch_size)
            report = _run_report(options, editor, info, frames, fps, source, cache_hit, result, timings)
        finally:
            for store in stores:
                store.close()
        shutil.rmtree(work)  # the staged frames and latents: gone before the evaluation stages its own
        if options.evaluate:
            from .metrics import evaluate_files

            started = time.perf_counter()
            evaluation = evaluate_files(staging / "source.mp4", staging / "edited.mp4", prompt=options.prompt,
                                        workdir=staging, inversion_psnr=source.reconstruction_psnr)
            report["eval"] = evaluation.summary()
            report["timings"]["eval"] = time.perf_counter() - started
            logger.info("\n%s", evaluation.format_table())
        (staging / "run.json").write_text(json.dumps(report, indent=1, default=str))
    logger.info("wrote %s", out_dir)
    return RunResult(
        out_dir=out_dir,
        frames=frames.shape[0],
        width=frames.shape[2],
        height=frames.shape[1],
        fps=fps,
        cache_hit=cache_hit,
        report=report,
    )


def _write_frames(path: Path, frames: FrameStore, fps: float, batch: int, times: list[float] | None = None) -> None:
    """``frames`` as a video at ``fps``, or at the variable-frame-rate source's ``times`` when given."""
    spans = None if times is None else video_io.frame_spans(times)
    timing = {} if spans is None else dict(time_base=video_io.VFR_TIME_BASE)
    with video_io.VideoWriter(path, fps, frames.shape[2], frames.shape[1], **timing) as out:
        for start in range(0, frames.shape[0], max(1, batch)):
            for i, frame in enumerate(frames[start : start + batch], start=start):
                out.write(frame, **({} if spans is None else dict(time=spans[i][0], duration=spans[i][1] - spans[i][0])))


def _write_outputs(
    staging: Path, editor, result: EditOutput, frames: FrameStore, info, options, fps, progress, cancel
) -> None:
    n, height, width = frames.shape[:3]
    audio = dict(audio_from=info.path, audio_start=options.start / info.fps, audio_end=(options.start + n * options.stride) / info.fps) if info.has_audio else {}
    spans = None if frames.times is None else video_io.frame_spans(frames.times)  # variable frame rate: keep times
    timing = {} if spans is None else dict(time_base=video_io.VFR_TIME_BASE)
    if spans is not None and audio:
        audio.update(audio_start=spans[0][0], audio_end=spans[-1][1])
    previews = []
    pick = set(np.linspace(0, n - 1, min(4, n)).round().astype(int).tolist())
    with (
        video_io.VideoWriter(staging / "edited.mp4", fps, width, height, **audio, **timing) as edited_out,
        video_io.VideoWriter(staging / "source.mp4", fps, width, height, **audio, **timing) as source_out,
        video_io.VideoWriter(staging / "side_by_side.mp4", fps, 2 * width, height, **audio, **timing) as both_out,
    ):
        batch = max(1, options.batch_size)
        bar = Tracker("decoding", n, progress, cancel)
        for start in range(0, n, batch):
            decoded = editor.model.decode_latents(result.latents[start : start + batch]).numpy()
            originals = frames[start : start + len(decoded)]
            for i, (original, frame) in enumerate(zip(originals, decoded), start=start):
                when = {} if spans is None else dict(time=spans[i][0], duration=spans[i][1] - spans[i][0])
                edited_out.write(frame, **when)
                source_out.write(original, **when)
                both_out.write(video_io.side_by_side(original, frame), **when)
                if i in pick:
                    previews.append((original, frame))
            bar.update(len(decoded))
    sheet = video_io.contact_sheet([p[0] for p in previews], [p[1] for p in previews], columns=len(previews))
    sheet.save(staging / "preview.png")


def _save_latents(path: Path, result: EditOutput, source: SourceLatents, batch_size: int) -> None:
    from .inversion import write_latents
    from .inversion.storage import timestep_name

    # streamed: lazy source latents go from the inversion cache to the shards a batch at a time; the cache's format
    tensors = {"final": result.latents, "clean": source.clean}
    tensors.update({timestep_name(t): v for t, v in sorted(source.noisy.items())})
    write_latents(path, tensors, info=dict(source.info, reconstruction_psnr=source.reconstruction_psnr),
                  frames_per_shard=batch_size)


def _run_report(options, editor, info, frames, fps, source, cache_hit, result: EditOutput, timings) -> dict:
    model = editor.model
    params = {f.name: getattr(options, f.name) for f in fields(options)}
    params = json.loads(json.dumps(params, default=str))
    return dict(
        prompt=options.prompt,
        parameters=params,
        model=dict(id=model.model_id, revision=model.revision, device=str(model.device), dtype=str(model.dtype),
                   loras=model.loras, controlnet=model.controlnet_id),
        versions=_versions(),
        seed=options.seed,
        # the scale used: the user's, else the model's (parameters keep what was asked: null)
        guidance_scale=options.guidance_scale if options.guidance_scale is not None else model.default_guidance,
        video=dict(path=str(info.path), width=info.width, height=info.height, fps=info.fps, has_audio=info.has_audio,
                   rotation=info.rotation),
        output=dict(frames=int(frames.shape[0]), width=int(frames.shape[2]), height=int(frames.shape[1]), fps=fps),
        inversion_psnr=source.reconstruction_psnr,
        inversion_cache_hit=cache_hit,
        keyframes=result.keyframes,
        timesteps=result.timesteps,
        unet_frame_evaluations=result.unet_frame_evaluations,
        # a compact cache entry's timesteps recomputed during this edit (cache_stride)
        recomputed_source_evaluations=getattr(source.noisy, "recomputed_evaluations", 0),
        timings={k: round(v, 3) for k, v in timings.items()},
    )


def _remove_dead_staging(out_dir: Path) -> None:
    """Remove the staging folders beside ``out_dir`` of runs on this machine whose process is gone (killed by
    SIGKILL, the OOM killer, a power cut: no chance to clean up), each with one log line; they hold the staged
    frames, gigabytes for a long clip. A folder without an owner record, or a live owner's, is left alone."""
    for folder in out_dir.parent.glob(f".{out_dir.name}.*"):
        pid = dead_owner(folder / ".work")  # the record is in its .work/
        if pid is None:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning("removed %s: the staging folder of an earlier run that did not finish (process %d is gone)",
                       folder, pid)


@contextmanager
def staged_output(out_dir: Path, cache_root: Path | None = None) -> Iterator[Path]:
    """A staging folder beside ``out_dir`` for the block to write into (with a ``.work/`` folder for scratch files,
    removed at the end), renamed into place when the block ends without error and removed when it does not, so a
    failed or interrupted run leaves nothing half-written. ``out_dir``'s folder is checked (writable) first; a disk
    that fills up meanwhile ends the run in one line, the earlier output untouched."""
    video_io.check_writable(out_dir.parent, "out", target=out_dir, create=True)  # before any heavy work
    _remove_dead_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    work = staging / ".work"
    work.mkdir()
    write_owner(work)
    try:
        yield staging
        shutil.rmtree(work, ignore_errors=True)
        _move_into_place(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if video_io.is_out_of_space(exc):
            in_cache = cache_root is not None and exc.filename and Path(exc.filename).resolve().is_relative_to(
                cache_root.resolve())
            raise (video_io.out_of_space_error(exc, cache_root, "cache_dir") if in_cache
                   else video_io.out_of_space_error(exc, out_dir.parent, "out")) from exc
        raise


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging`` with renames only (same filesystem), old output removed last."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
