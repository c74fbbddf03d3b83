"""The web UI (``tokenflow ui``): a Gradio page over the same Python API as the command line.

Upload a video, see its first selected frame, length, fps and working size, write a prompt, run with a live
progress bar and a Cancel button, and get the edited video, a side-by-side player, the contact sheet, metrics and
downloads; earlier results stay in a gallery while the app runs. One job runs on the device at a time (Gradio's
queue, concurrency 1, plus a lock), so two tabs cannot run it out of memory. The edit is also a named API endpoint::

    from gradio_client import Client, handle_file
    result = Client("http://127.0.0.1:7860/").predict(video=handle_file("clip.mp4"), prompt="...", api_name="/edit")

This module holds no algorithm: :class:`EditorApp` loads the model once (:func:`tokenflow.models.load_model`) and
calls :func:`tokenflow.runner.edit_video` with ``editor=``, ``progress=`` and ``cancel=``; :func:`build_ui` wires
it to Gradio components; :func:`launch` is the command. ``--demo`` uses the vendored micro trained model
(``benchmarks/micro_model``, in a source checkout) and a clip made in its world, so a real edit shows on a CPU.
"""

import html
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import io as video_io
from .errors import InputError, TokenFlowError
from .events import Cancelled, ProgressEvent
from .models import DEFAULT_MODEL
from .options import rename_fields

logger = logging.getLogger(__name__)

__all__ = ["DemoSetup", "EditorApp", "build_ui", "launch", "make_demo", "plain_message", "repo_root", "serve"]

#: Checkouts hold ``benchmarks/`` and ``examples/`` beside ``src/``; an installed package does not.
_CHECKOUT = Path(__file__).resolve().parents[2]
MICRO_MODEL = Path("benchmarks") / "micro_model"
SAMPLE_CLIP = Path("examples") / "pan.mp4"

MAX_STEPS = 999  # 1000 DDIM steps of a 1000-step model with steps_offset 1 would reach timestep 1000

STAGE_LABELS = {
    "loading": "Loading the model",
    "inversion": "Inverting the source",
    "reconstruction": "Checking the reconstruction",
    "editing": "Editing",
    "decoding": "Decoding and writing",
}

# Option names (fields) in messages from the library, as the page's labels.
FIELD_LABELS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "inversion_prompt": "Inversion prompt",
    "mode": "Mode",
    "steps": "Steps",
    "inversion_steps": "Inversion steps",
    "guidance_scale": "Guidance scale",
    "batch_size": "Batch size",
    "size": "Size",
    "propagation": "Propagation",
    "strength": "Strength",
    "seed": "Seed",
    "start": "Start frame",
    "stride": "Stride",
    "max_frames": "Max frames",
    "pnp_attn_t": "PnP attention fraction",
    "pnp_f_t": "PnP feature fraction",
    "blending": "Blending",
    "keyframes": "Keyframes",
    "keyframe_window": "Keyframe window",
    "keyframe_batch": "Keyframe batch",
    "anchors": "Anchors",
    "allow_partial": "“Use the frames that decode”",
    "propagation_t": "TokenFlow steps fraction",
    "controlnet": "ControlNet",
    "control": "Control maps",
    "canny_low": "Canny low",
    "canny_high": "Canny high",
    "depth_model": "Depth model",
    "controlnet_scale": "ControlNet scale",
    "model": "Model",
    "device": "Device",
    "dtype": "Dtype",
}


def repo_root() -> Path | None:
    """The source checkout this module runs from (it holds ``benchmarks/`` and ``examples/``), else ``None``."""
    for root in (_CHECKOUT, Path.cwd()):
        if (root / MICRO_MODEL).is_dir() or (root / SAMPLE_CLIP).is_file():
            return root
    return None


def plain_message(exc: BaseException, paths: dict[str, str] | None = None) -> str:
    """One line for the page: whitespace collapsed, long temporary paths shortened to the names the user knows,
    command-line flags named like the page's fields."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for long, short in sorted((paths or {}).items(), key=lambda kv: -len(kv[0])):
        text = text.replace(long, short)
    return rename_fields(text, lambda name: FIELD_LABELS.get(name, name))


def _unset(value, kind=float):
    """An optional number from the page: empty or 0 (what Gradio shows for an empty number) means "not set"."""
    if value in (None, "") or float(value) == 0:
        return None
    return kind(value)


# ----------------------------------------------------------------------------- demo


@dataclass
class DemoSetup:
    """What ``--demo`` pre-fills: the micro model, a clip made in its world and prompts from its grammar."""

    model: Path
    clip: Path
    caption: str
    prompts: list[str]
    values: dict[str, Any] = field(default_factory=dict)  # page fields -> pre-filled values


def micro_model_dir() -> Path:
    """The vendored micro trained model, from the source checkout; one clear line when it is absent."""
    root = repo_root()
    folder = None if root is None else root / MICRO_MODEL
    if folder is None or not (folder / "model" / "model_index.json").is_file():
        raise InputError(
            f"--demo needs {MICRO_MODEL}/model from a source checkout of tokenflow (it is not installed with the "
            "package); run `tokenflow ui --demo` from a git checkout, or pass --model ID_OR_PATH without --demo"
        )
    return folder


def make_demo(workdir: str | Path, seed: int = 0, frames: int = 16, shift: int = 2) -> DemoSetup:
    """Make the demo clip in ``workdir`` with the micro model's ``make_clip.py`` (exact known pan motion), as an
    H.264 mp4 the browser plays, and the prompts from its ``clip.json``."""
    import importlib.util

    folder = micro_model_dir()
    workdir = Path(workdir)
    clip_dir = workdir / f"micro-clip-{seed}"
    sys.path.insert(0, str(folder))  # make_clip.py imports its sibling scenes.py
    try:
        spec = importlib.util.spec_from_file_location("tokenflow_micro_make_clip", folder / "make_clip.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        meta = module.make(str(clip_dir), seed, shift=shift, n=frames)
    finally:
        sys.path.remove(str(folder))
    lossless = clip_dir / f"{clip_dir.name}.mkv"
    frames_rgb, info = video_io.load_frames(lossless)
    clip = workdir / "micro_clip.mp4"
    with video_io.VideoWriter(clip, info.fps, info.width, info.height, crf=8) as out:
        for frame in frames_rgb:
            out.write(frame)
    prompts = [edit["prompt"] for edit in meta["edits"]]
    values = dict(prompt=prompts[0], inversion_prompt=meta["caption"], negative_prompt="", size=64, steps=50,
                  inversion_steps=50, batch_size=4, guidance_scale=7.5)
    return DemoSetup(model=folder / "model", clip=clip, caption=meta["caption"], prompts=prompts, values=values)


# ----------------------------------------------------------------------------- the app (no Gradio here)


@dataclass
class Job:
    """One run in progress for one browser session: its cancel token and where it stands."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    stage: str = "waiting"


@dataclass
class Outcome:
    """What one run from the page produced (the TokenFlow edit and, when asked, the per-frame baseline)."""

    result: Any  # RunResult
    baseline: Any | None  # RunResult of propagation="none"
    seconds: float
    label: str

    @property
    def out_dir(self) -> Path:
        return Path(self.result.out_dir)


class EditorApp:
    """The UI's state and actions: one loaded model, the run folders, the gallery history, the running jobs.

    Every action calls the same Python API as the command line; errors are :class:`TokenFlowError` with one line.
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        out_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        demo: DemoSetup | None = None,
        load: bool = True,
    ):
        self.device, self.dtype = device, dtype
        self.out_root = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="tokenflow-ui-"))
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir
        self.demo = demo
        self.model_id = str(model)
        self.editor = None
        self._controlnet: str | None = None
        self.device_lock = threading.RLock()  # one job on the device at a time, whatever the queue does
        self.history: list[Outcome] = []
        self._jobs: dict[str, Job] = {}
        self._jobs_guard = threading.Lock()
        self._counter = 0
        root = repo_root()
        self.sample = demo.clip if demo is not None else (root / SAMPLE_CLIP if root is not None else None)
        if self.sample is not None and not Path(self.sample).is_file():
            self.sample = None
        if load:
            self.load_model(self.model_id)

    # -- model

    def load_model(self, model: str | Path, controlnet: str | None = None):
        """Load ``model`` (hub id, folder or file), replacing the loaded one only once it loaded."""
        from .editor import TokenFlowEditor
        from .models import load_model

        model = str(model).strip()
        if not model:
            raise InputError("--model is empty; enter a hub id or a local folder")
        with self.device_lock:
            loaded = load_model(model, device=self.device, dtype=self.dtype, controlnet=controlnet)
            self.editor = TokenFlowEditor(loaded)
            self.model_id, self._controlnet = model, controlnet
        return self.editor

    def model_status(self) -> str:
        if self.editor is None:
            return "No model loaded."
        model = self.editor.model
        extra = f" with ControlNet `{self._controlnet}`" if self._controlnet else ""
        return (f"Model `{self.model_id}`{extra} on {model.device} ({str(model.dtype).replace('torch.', '')}), "
                f"native size {model.default_size} px.")

    def _editor_for(self, model: str, controlnet: str | None, progress: Callable | None):
        model = str(model or self.model_id).strip() or self.model_id
        need_control = controlnet is not None and controlnet != self._controlnet
        if self.editor is None or model != self.model_id or need_control:
            if progress is not None:
                progress(ProgressEvent("loading", 0, 1, unit="model", detail=model))
            self.load_model(model, controlnet=controlnet)
        return self.editor

    # -- the source

    def describe(self, video: str | Path | None, start=0, stride=1, max_frames=None, size=None):
        """The first selected frame and a short description (length, fps, selection, working size)."""
        if not video:
            return None, "Upload a video" + (" or use the sample clip." if self.sample else ".")
        path = Path(video)
        start, stride = int(start or 0), int(stride or 1)
        max_frames = _unset(max_frames, int)
        info = video_io.probe(path)
        frames = video_io.read_frames(path, start, stride, 1)
        try:
            first = next(iter(frames))
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()
        lines = [f"**{path.name}**: {info.width}x{info.height}, {info.fps:.3g} fps"
                 + (", with audio" if info.has_audio else "")]
        if info.num_frames:
            lines.append(f"Length: {info.num_frames} frames ({info.num_frames / info.fps:.2f} s)")
            selected = len(range(start, info.num_frames, stride))
            if max_frames is not None:
                selected = min(selected, max_frames)
            sel = f"{selected} frames" if selected else "no frames (the start frame is past the end)"
        else:
            lines.append("Length: not stored in the file")
            sel = f"up to {max_frames} frames" if max_frames else "every frame"
        lines.append(f"Selection: {sel} from frame {start}, every {stride}; output {info.fps / stride:.3g} fps")
        if self.editor is not None:
            model = self.editor.model
            short = _unset(size, int) or model.default_size
            try:
                w, h = video_io.working_size(info.width, info.height, short, multiple=model.size_multiple)
                lines.append(f"Working size: {w}x{h} (short side {short} px)")
            except InputError as exc:
                lines.append(f"Working size: {plain_message(exc)}")
        return first, "  \n".join(lines)

    # -- jobs

    def job(self, session: str) -> Job:
        with self._jobs_guard:
            job = self._jobs.get(session)
            if job is None or job.done.is_set():
                job = self._jobs[session] = Job()
            return job

    def cancel(self, session: str, wait: float = 60.0) -> str:
        """Stop ``session``'s run (it stops after the current UNet call); wait for it to clean up."""
        with self._jobs_guard:
            job = self._jobs.get(session)
        if job is None or job.done.is_set():
            return "No run of this page was on the device; a waiting one is taken off the queue."
        job.cancel.set()
        if job.done.wait(wait):
            return "**Cancelled.** The run stopped; nothing was written."
        return "Cancelling: the run stops after its current step."

    def _finish(self, session: str, job: Job) -> None:
        job.done.set()
        with self._jobs_guard:
            if self._jobs.get(session) is job:
                del self._jobs[session]

    # -- a run

    def _run_dir(self, video: Path) -> Path:
        with self._jobs_guard:
            self._counter += 1
            n = self._counter
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", video.stem)[:40] or "video"
        return self.out_root / f"{n:03d}-{stem}-{time.strftime('%H%M%S')}"

    def run(self, params: dict, session: str = "default", progress: Callable[[ProgressEvent], None] | None = None,
            baseline: bool = False) -> Outcome:
        """Edit ``params["video"]`` with the RunOptions fields in ``params`` (the model is this app's, loaded once),
        and the per-frame baseline too when ``baseline``. Raises :class:`TokenFlowError` (one line) or
        :class:`Cancelled` (nothing written)."""
        from .runner import RunOptions, edit_video

        params = dict(params)
        video = params.pop("video", None)
        if not video:
            raise InputError("No video: upload one" + (" or click “Use the sample clip”" if self.sample else ""))
        model = params.pop("model", None) or self.model_id
        if params.get("mode") != "controlnet":
            params["controlnet"] = None
        if not str(params.get("prompt") or "").strip():
            raise InputError("The prompt is empty: describe the edit, e.g. “a shiny silver robot”")
        options = RunOptions(video=Path(video), model=str(model), device=self.device, dtype=self.dtype,
                             cache_dir=self.cache_dir, quiet=True, evaluate=bool(params.pop("evaluate", False))
                             or baseline, **params)
        options.check_inputs()  # cheap checks before a model swap
        video_io.probe(options.video)
        job = self.job(session)
        started = time.perf_counter()
        out_dir = self._run_dir(Path(video))
        try:
            with self.device_lock:
                job.stage = "running"
                editor = self._editor_for(options.model, options.controlnet, progress)
                options.model = self.model_id
                options.out = out_dir
                result = edit_video(options, editor=editor, progress=progress, cancel=job.cancel)
                other = None
                if baseline:
                    base = RunOptions(**{**options.__dict__, "propagation": "none", "out": out_dir / "baseline"})

                    def tagged(event: ProgressEvent) -> None:
                        if progress is not None:
                            progress(ProgressEvent(f"baseline {event.stage}", event.done, event.total, event.unit,
                                                   event.eta_s, event.detail))

                    try:
                        other = edit_video(base, editor=editor, progress=tagged, cancel=job.cancel)
                    except BaseException:
                        shutil.rmtree(out_dir, ignore_errors=True)  # a cancelled run writes nothing
                        raise
        finally:
            self._finish(session, job)
        outcome = Outcome(result, other, time.perf_counter() - started, label=f"{out_dir.name}: {options.prompt}")
        self.history.insert(0, outcome)
        return outcome

    def gallery(self) -> list[tuple[str, str]]:
        previews = [(o.out_dir / "preview.png", o.label) for o in self.history]
        return [(str(path), label) for path, label in previews if path.is_file()]


# ----------------------------------------------------------------------------- presenting an outcome


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def metrics_table(outcome: Outcome) -> str:
    """Markdown table of ``report["eval"]`` (and the baseline's) when the run measured itself."""
    ours = outcome.result.report.get("eval")
    theirs = outcome.baseline.report.get("eval") if outcome.baseline is not None else None
    if not ours:
        return "Tick *Measure the result* to get the warp error and PSNR/SSIM of an edit."
    rows = [("Warp error (lower: more consistent)", "warp_error", 2), ("Warp error of the source (floor)",
            "warp_error_source", 2), ("PSNR vs source (dB)", "psnr", 2), ("SSIM vs source", "ssim", 3),
            ("Inversion PSNR (dB)", "inversion_psnr", 2)]
    head = "| metric | TokenFlow |" + (" per-frame baseline |" if theirs else "")
    lines = [head, "|---|---|" + ("---|" if theirs else "")]
    for label, key, digits in rows:
        line = f"| {label} | {_fmt(ours.get(key), digits)} |"
        if theirs:
            line += f" {_fmt(theirs.get(key), digits)} |"
        lines.append(line)
    if theirs and ours.get("warp_error") and theirs.get("warp_error"):
        lines.append(f"\nWarp error ratio TokenFlow / per-frame: **{ours['warp_error'] / theirs['warp_error']:.2f}**")
    return "\n".join(lines)


def status_text(outcome: Outcome) -> str:
    result = outcome.result
    report = result.report
    timings = report.get("timings", {})
    cached = result.cache_hit or report.get("inversion_cache_hit")
    inversion = ("**Inversion reused from the cache** (same video and settings): only the editing ran."
                 if cached else f"Inverted the source in {timings.get('inversion', 0):.1f} s (cached for next time).")
    psnr = report.get("inversion_psnr")
    lines = [
        f"**Done** in {outcome.seconds:.1f} s: {result.frames} frames at {result.width}x{result.height}, "
        f"{result.fps:.3g} fps.",
        inversion + (f" Reconstruction PSNR {psnr:.1f} dB." if psnr is not None and not cached else ""),
        f"Edited in {timings.get('edit', 0):.1f} s; output folder `{result.out_dir}`.",
    ]
    if outcome.baseline is not None:
        lines.append(f"Per-frame baseline (propagation none) in `{outcome.baseline.out_dir}`.")
    return "  \n".join(lines)


def progress_text(event: ProgressEvent) -> str:
    stage = event.stage
    prefix = ""
    if stage.startswith("baseline "):
        prefix, stage = "Baseline: ", stage[len("baseline "):]
    parts = [prefix + STAGE_LABELS.get(stage, stage.capitalize())]
    if event.total and stage != "loading":
        parts.append(f"{event.total:.0f} {event.unit}s")  # Gradio shows the fraction done
    if event.detail:
        parts.append(event.detail)
    if event.eta_s is not None and event.done < event.total:
        parts.append(f"about {event.eta_s:.0f} s left")
    return " · ".join(parts)


# ----------------------------------------------------------------------------- Gradio


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home; the app works offline
    try:
        import gradio as gr
    except ImportError as exc:
        raise TokenFlowError("the web UI needs Gradio: pip install 'tokenflow[ui]' (or pip install 'gradio>=5')") \
            from exc
    return gr


def _major(gr) -> int:
    try:
        return int(gr.__version__.split(".")[0])
    except ValueError:
        return 6


def _supported(component, **kwargs) -> dict:
    """The keyword arguments this Gradio version's ``component`` takes (newer ones are left out on older)."""
    import inspect

    names = inspect.signature(component.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def _private(gr) -> dict:
    return {"api_visibility": "private"} if _major(gr) >= 6 else {"show_api": False}


CSS = """
#tf-title h1 {margin-bottom: 0}
#tf-run {min-height: 48px}
.tf-info p {margin: 0.1em 0}
"""


def _theme(gr):
    # System fonts: the default theme fetches web fonts, which an offline machine cannot.
    fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Soft(font=fonts, font_mono=["ui-monospace", "monospace"])


def build_ui(app: EditorApp):
    """The Gradio page (a ``gr.Blocks``) for ``app``; :func:`serve` queues and launches it."""
    gr = _gradio()
    from .runner import RunOptions

    defaults = RunOptions(video="")
    values = dict(prompt="", negative_prompt=defaults.negative_prompt, inversion_prompt="", size=defaults.size,
                  steps=defaults.steps, inversion_steps=defaults.inversion_steps, batch_size=defaults.batch_size,
                  guidance_scale=defaults.guidance_scale)
    if app.demo is not None:
        values.update(app.demo.values)
    private = _private(gr)
    blocks_kwargs = dict(title="TokenFlow video editing")
    if _major(gr) < 6:
        blocks_kwargs.update(theme=_theme(gr), css=CSS)

    def user_error(exc: BaseException, paths: dict[str, str] | None = None):
        return gr.Error(html.escape(plain_message(exc, paths)), title="Cannot run", print_exception=False)

    def unexpected(exc: BaseException):
        logger.exception("unexpected error in the web UI")
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return gr.Error(html.escape(f"Something went wrong ({type(exc).__name__}: {first}). The terminal running "
                                    "`tokenflow ui` has the details."), title="Error", print_exception=False)

    def short_paths(video) -> dict[str, str]:
        return {str(video): Path(video).name, str(Path(video).parent) + "/": ""} if video else {}

    with gr.Blocks(**blocks_kwargs) as page:
        gr.Markdown("# TokenFlow video editing\nConsistent text-driven video editing (Geyer et al., ICLR 2024) on "
                    "Stable Diffusion. One job runs on the device at a time; others wait in the queue.",
                    elem_id="tf-title")
        model_line = gr.Markdown(app.model_status(), elem_id="tf-model-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                gr.Markdown("### 1. Source")
                video = gr.Video(label="Source video", sources=["upload"], value=str(app.sample) if app.demo else None,
                                 elem_id="tf-video", height=240)
                sample = gr.Button("Use the sample clip", size="sm", visible=app.sample is not None,
                                   elem_id="tf-sample")
                with gr.Row():
                    start = gr.Number(0, label="Start frame", precision=0, minimum=0, elem_id="tf-start")
                    stride = gr.Number(1, label="Stride", precision=0, minimum=1, elem_id="tf-stride")
                    max_frames = gr.Number(None, label="Max frames (0: all)", precision=0, minimum=0,
                                           elem_id="tf-max-frames")
                allow_partial = gr.Checkbox(defaults.allow_partial, label="Use the frames that decode",
                                            info="a truncated or damaged file: edit what decodes, skip the rest",
                                            elem_id="tf-allow-partial")
                first_frame = gr.Image(label="First selected frame", interactive=False, height=180,
                                       elem_id="tf-first-frame")
                info = gr.Markdown("Upload a video.", elem_id="tf-info", elem_classes="tf-info")
            with gr.Column(scale=4):
                gr.Markdown("### 2. Edit")
                prompt = gr.Textbox(values["prompt"], label="Prompt", placeholder="a shiny silver robot", lines=2,
                                    elem_id="tf-prompt")
                if app.demo is not None:
                    gr.Examples([[p] for p in app.demo.prompts], inputs=[prompt], label="Prompts from the micro "
                                "model's grammar")
                negative_prompt = gr.Textbox(values["negative_prompt"], label="Negative prompt", elem_id="tf-negative")
                inversion_prompt = gr.Textbox(values["inversion_prompt"], label="Inversion prompt (describes the "
                                              "source)", elem_id="tf-inversion-prompt")
                mode = gr.Radio(["pnp", "sdedit", "controlnet"], value=defaults.mode, label="Mode", elem_id="tf-mode")
                with gr.Row():
                    steps = gr.Number(values["steps"], label="Steps", precision=0, minimum=1, maximum=MAX_STEPS,
                                      elem_id="tf-steps")
                    inversion_steps = gr.Number(values["inversion_steps"], label="Inversion steps", precision=0,
                                                info="empty: the editing steps (fixed-point inversion)",
                                                minimum=1, maximum=MAX_STEPS, elem_id="tf-inversion-steps")
                    guidance_scale = gr.Number(values["guidance_scale"], label="Guidance scale", minimum=0,
                                               info="empty: the model's (7.5 SD, 7.0 SD3, 3.5 FLUX)",
                                               elem_id="tf-guidance")
                with gr.Row():
                    batch_size = gr.Number(values["batch_size"], label="Batch size", precision=0, minimum=1,
                                           elem_id="tf-batch-size")
                    size = gr.Number(values["size"], label="Size (short side px; 0: model's)", precision=0,
                                     minimum=0, elem_id="tf-size")
                    strength = gr.Number(defaults.strength, label="Strength (0: mode's, 1 or 0.9)", minimum=0,
                                         maximum=1, elem_id="tf-strength")
                propagation = gr.Radio(["tokenflow", "none"], value=defaults.propagation,
                                       label="Propagation (none: per-frame baseline)", elem_id="tf-propagation")
                with gr.Row():
                    seed = gr.Number(defaults.seed, label="Seed", precision=0, elem_id="tf-seed", scale=3)
                    reseed = gr.Button("Random seed", size="sm", elem_id="tf-random-seed", scale=1)
                with gr.Row():
                    evaluate = gr.Checkbox(defaults.evaluate, label="Measure the result (warp error, PSNR/SSIM)",
                                           elem_id="tf-evaluate")
                    baseline = gr.Checkbox(False, label="Also run the per-frame baseline to compare",
                                           elem_id="tf-baseline")
                with gr.Accordion("Advanced", open=False, elem_id="tf-advanced"):
                    with gr.Row():
                        pnp_attn_t = gr.Number(defaults.pnp_attn_t, label="PnP attention fraction", minimum=0,
                                               maximum=1)
                        pnp_f_t = gr.Number(defaults.pnp_f_t, label="PnP feature fraction", minimum=0, maximum=1)
                    with gr.Row():
                        blending = gr.Radio(["linear", "reference"], value=defaults.blending, label="Blending")
                        keyframes = gr.Radio(["random", "fixed"], value=defaults.keyframes, label="Keyframes")
                    with gr.Row():
                        keyframe_window = gr.Textbox(defaults.keyframe_window, label="Keyframe window (auto, full, K)")
                        anchors = gr.Number(defaults.anchors, label="Anchors", precision=0, minimum=0)
                    propagation_t = gr.Number(None, label="TokenFlow steps fraction (empty or 0: the model's; 1 for "
                                              "SD/SDXL, 0.1 for SD3/FLUX)", minimum=0, maximum=1,
                                              elem_id="tf-propagation-t")
                    controlnet = gr.Textbox("", label="ControlNet id or folder (mode controlnet)",
                                            elem_id="tf-controlnet")
                    with gr.Row():
                        control = gr.Radio(["canny", "depth"], value=defaults.control, label="Control maps")
                        controlnet_scale = gr.Number(defaults.controlnet_scale, label="ControlNet scale", minimum=0)
                    with gr.Row():
                        canny_low = gr.Number(defaults.canny_low, label="Canny low", precision=0)
                        canny_high = gr.Number(defaults.canny_high, label="Canny high", precision=0)
                    depth_model = gr.Textbox("", label="Depth model (control depth)")
                with gr.Accordion("Model", open=False, elem_id="tf-model-box"):
                    model = gr.Textbox(app.model_id, label="Model (hub id, folder or .safetensors)",
                                       elem_id="tf-model")
                    load = gr.Button("Load this model", size="sm", elem_id="tf-load")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="tf-run", scale=3)
                    stop = gr.Button("Cancel", variant="stop", elem_id="tf-cancel", scale=1)
            with gr.Column(scale=5):
                gr.Markdown("### 3. Result")
                status = gr.Markdown("", label="Status", show_label=False, elem_id="tf-status")
                edited = gr.Video(label="Edited", interactive=False, autoplay=True, loop=True, elem_id="tf-edited",
                                  height=240)
                side = gr.Video(label="Source | edited", interactive=False, autoplay=True, loop=True,
                                elem_id="tf-side", height=200)
                other = gr.Video(label="Per-frame baseline (propagation none)", interactive=False, autoplay=True,
                                 loop=True, visible=False, elem_id="tf-baseline-video", height=200)
                preview = gr.Image(label="Contact sheet (source above, edit below)", interactive=False,
                                   elem_id="tf-preview")
                metrics = gr.Markdown("", label="Metrics", show_label=False, elem_id="tf-metrics")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="tf-files")
                with gr.Accordion("run.json", open=False):
                    report = gr.JSON(label="Run report", elem_id="tf-report")
        gallery = gr.Gallery(label="Earlier results (while the app runs; click one to show it)", columns=4,
                             height=300, object_fit="contain", allow_preview=False, elem_id="tf-gallery",
                             **_supported(gr.Gallery, fit_columns=False))

        # -- source info
        def describe(video_path, start_frame, frame_stride, frames_max, short_side):
            try:
                return app.describe(video_path, start_frame, frame_stride, frames_max, short_side)
            except TokenFlowError as exc:  # shown beside the video and as a toast; Run refuses it the same way
                message = html.escape(plain_message(exc, short_paths(video_path)))
                gr.Warning(message, title="Cannot use this video")
                return None, f"**Cannot use this video:** {message}"
            except Exception as exc:  # noqa: BLE001 - shown in plain words, logged with its traceback
                raise unexpected(exc) from None

        source_inputs = [video, start, stride, max_frames, size]
        gr.on([video.change, start.change, stride.change, max_frames.change, size.change], describe,
              inputs=source_inputs, outputs=[first_frame, info], concurrency_limit=None, show_progress="hidden",
              **private)
        sample.click(lambda: str(app.sample) if app.sample else None, outputs=[video], concurrency_limit=None,
                     **private)
        baseline.change(lambda on: gr.update(visible=bool(on)), inputs=[baseline], outputs=[other],
                        concurrency_limit=None, show_progress="hidden", **private)
        reseed.click(lambda: random.randint(0, 2**31 - 1), outputs=[seed], concurrency_limit=None, **private)

        # -- model
        def load_selected(model_id, progress=gr.Progress()):
            progress(0.0, desc=f"Loading {model_id}")
            try:
                app.load_model(model_id)
            except TokenFlowError as exc:
                raise user_error(exc) from None
            except Exception as exc:  # noqa: BLE001
                raise unexpected(exc) from None
            return app.model_status()

        load.click(load_selected, inputs=[model], outputs=[model_line], concurrency_id="device",
                   concurrency_limit=1, **private)

        # -- the edit (the named API endpoint /edit; parameters and defaults are RunOptions')
        def edit(
            video: str,
            prompt: str,
            negative_prompt: str = values["negative_prompt"],
            inversion_prompt: str = values["inversion_prompt"],
            mode: str = defaults.mode,
            steps: int = values["steps"],
            inversion_steps: int | None = values["inversion_steps"],
            guidance_scale: float | None = values["guidance_scale"],
            batch_size: int = values["batch_size"],
            size: int | None = values["size"],
            propagation: str = defaults.propagation,
            strength: float | None = defaults.strength,
            seed: int = defaults.seed,
            start: int = defaults.start,
            stride: int = defaults.stride,
            max_frames: int | None = defaults.max_frames,
            allow_partial: bool = defaults.allow_partial,
            evaluate: bool = defaults.evaluate,
            baseline: bool = False,
            pnp_attn_t: float = defaults.pnp_attn_t,
            pnp_f_t: float = defaults.pnp_f_t,
            blending: str = defaults.blending,
            keyframes: str = defaults.keyframes,
            keyframe_window: str = defaults.keyframe_window,
            anchors: int = defaults.anchors,
            controlnet: str = "",
            control: str = defaults.control,
            controlnet_scale: float = defaults.controlnet_scale,
            canny_low: int = defaults.canny_low,
            canny_high: int = defaults.canny_high,
            depth_model: str = "",
            model: str = app.model_id,
            propagation_t: float | None = None,
            request: gr.Request = None,
            progress=gr.Progress(),
        ):
            def on_progress(event: ProgressEvent) -> None:
                progress(event.fraction, desc=progress_text(event))

            numbers = dict(steps=steps,
                           batch_size=batch_size, seed=seed, start=start, stride=stride, pnp_attn_t=pnp_attn_t,
                           pnp_f_t=pnp_f_t, anchors=anchors, controlnet_scale=controlnet_scale, canny_low=canny_low,
                           canny_high=canny_high)
            try:
                for name, value in numbers.items():
                    if value is None:
                        raise InputError(f"`{name}` is empty; enter a number")
                params = dict(
                    video=video, prompt=prompt, negative_prompt=negative_prompt or "",
                    inversion_prompt=inversion_prompt or "", mode=mode, size=_unset(size, int),
                    inversion_steps=_unset(inversion_steps, int),  # empty: the scheme's default
                    propagation=propagation, strength=_unset(strength, float), max_frames=_unset(max_frames, int),
                    allow_partial=bool(allow_partial), evaluate=bool(evaluate), blending=blending, keyframes=keyframes,
                    keyframe_window=str(keyframe_window or "auto").strip(),
                    propagation_t=_unset(propagation_t, float),
                    guidance_scale=_unset(guidance_scale, float),  # empty: the model's
                    controlnet=(controlnet or "").strip() or None,
                    control=control, depth_model=(depth_model or "").strip() or None, model=model,
                    **{k: (int(v) if k not in ("pnp_attn_t", "pnp_f_t", "controlnet_scale")
                           else float(v)) for k, v in numbers.items()},
                )
                progress(0.0, desc="Starting")
                session = getattr(request, "session_hash", None) or "api"
                outcome = app.run(params, session=session, progress=on_progress, baseline=bool(baseline))
            except Cancelled:
                return [gr.skip()] * 7 + ["**Cancelled.** The run stopped; nothing was written."]
            except TokenFlowError as exc:
                raise user_error(exc, short_paths(video)) from None
            except Exception as exc:  # noqa: BLE001
                raise unexpected(exc) from None
            return present(outcome)

        def present(outcome: Outcome) -> list:
            out = outcome.out_dir
            base = outcome.baseline
            baseline_video = str(Path(base.out_dir) / "edited.mp4") if base else None
            report_data = json.loads((out / "run.json").read_text())
            return [str(out / "edited.mp4"), str(out / "side_by_side.mp4"), baseline_video, str(out / "preview.png"),
                    [str(out / "edited.mp4"), str(out / "run.json")], metrics_table(outcome), report_data,
                    status_text(outcome)]

        outputs = [edited, side, other, preview, files, metrics, report, status]
        edit_inputs = [video, prompt, negative_prompt, inversion_prompt, mode, steps, inversion_steps, guidance_scale,
                       batch_size, size, propagation, strength, seed, start, stride, max_frames, allow_partial, evaluate,
                       baseline, pnp_attn_t, pnp_f_t, blending, keyframes, keyframe_window, anchors, controlnet,
                       control, controlnet_scale, canny_low, canny_high, depth_model, model, propagation_t]
        running = run.click(edit, inputs=edit_inputs, outputs=outputs, api_name="edit", concurrency_id="device",
                            concurrency_limit=1, show_progress_on=[edited])
        running.success(lambda: (app.gallery(), app.model_status(), app.model_id), outputs=[gallery, model_line, model],
                        concurrency_limit=None, **private)

        def cancel(request: gr.Request = None):
            return app.cancel(getattr(request, "session_hash", None) or "api")

        stop.click(cancel, outputs=[status], cancels=[running], concurrency_limit=None, **private)

        def show(evt: gr.SelectData):
            if evt.index is None or evt.index >= len(app.history):
                return [gr.skip()] * len(outputs)
            outcome = app.history[evt.index]
            return present(outcome)[:-1] + [f"Showing an earlier result: {html.escape(outcome.label)}  \n"
                                            + status_text(outcome)]

        gallery.select(show, outputs=outputs, concurrency_limit=None, **private)

        def on_load():
            first, text = (None, "Upload a video" + (" or use the sample clip." if app.sample else "."))
            if app.demo is not None:
                try:
                    first, text = app.describe(app.sample, 0, 1, None, values["size"])
                except TokenFlowError as exc:
                    text = plain_message(exc)
            return app.gallery(), app.model_status(), app.model_id, first, text

        page.load(on_load, outputs=[gallery, model_line, model, first_frame, info], concurrency_limit=None, **private)

        def on_unload(request: gr.Request = None):
            """Closing the tab cancels that tab's run."""
            if request is not None and request.session_hash:
                app.cancel(request.session_hash, wait=0)

        page.unload(on_unload)
    return page


def serve(app: EditorApp, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
          block: bool = True, quiet: bool = False):
    """Queue (one device job at a time) and launch the page; returns the ``gr.Blocks`` (running in the background
    when ``block`` is False: ``page.local_url``, ``page.close()``)."""
    gr = _gradio()
    page = build_ui(app)
    page.queue(default_concurrency_limit=1, max_size=32)
    allowed = [str(app.out_root)] + ([str(Path(app.sample).parent)] if app.sample else [])
    kwargs = dict(server_name=host, server_port=port, share=share, allowed_paths=allowed, show_error=True,
                  prevent_thread_lock=not block, quiet=quiet, ssr_mode=False)
    if _major(gr) >= 6:
        kwargs.update(theme=_theme(gr), css=CSS)
    try:
        page.launch(**kwargs)
    except OSError as exc:
        raise InputError(f"--port {port}: cannot serve on {host}:{port} ({' '.join(str(exc).split())}); "
                         "choose another --port") from exc
    return page


def launch(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, share: bool = False,
           demo: bool = False, device: str = "auto", dtype: str = "auto", out: str | Path | None = None,
           cache_dir: str | Path | None = None) -> None:
    """``tokenflow ui``: load the model once, then serve the page until Ctrl-C."""
    import atexit

    _gradio()  # a missing Gradio is one line, before the model loads
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own requests to itself
    setup = None
    if demo:
        workdir = Path(tempfile.mkdtemp(prefix="tokenflow-demo-"))
        atexit.register(shutil.rmtree, workdir, True)
        setup = make_demo(workdir)
        model = model or str(setup.model)
        logger.info("demo: micro model %s, clip %s", model, setup.clip)
    app = EditorApp(model or DEFAULT_MODEL, device=device, dtype=dtype, out_dir=out, cache_dir=cache_dir, demo=setup)
    logger.info("%s", app.model_status().replace("`", ""))
    logger.info("runs are written to %s", app.out_root)
    serve(app, host=host, port=port, share=share, block=True)
