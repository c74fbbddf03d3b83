"""The ``tokenflow`` command: argument parsing and messages only; the work is in :mod:`tokenflow.runner`."""

from __future__ import annotations

import inspect
import json
import logging
import sys
from dataclasses import MISSING
from pathlib import Path
from typing import Optional

import click
import typer

# Recent typer releases vendor their own copy of click: catch both copies' exceptions.
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)

from .errors import InputError, TokenFlowError
from .library_logs import quiet_model_libraries

logger = logging.getLogger("tokenflow")

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)
TERMINATED = 143  # ... and by SIGTERM (128 + 15)


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so the run unwinds as for Ctrl-C: staging folder removed, the
    inversion's finished batches kept in the cache for the next run."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _handle_sigterm() -> None:
    import signal

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (main() called from a worker thread): keep the default
        pass

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Consistent text-driven video editing with TokenFlow on any Stable Diffusion checkpoint.",
)

def _options(params: dict, cls=None):
    from .options import RunOptions

    return (cls or RunOptions)(**{k: v for k, v in params.items() if k != "config"})


_CONFIG = typer.Option(None, help="YAML or TOML file with any of these options.")
_PLAIN_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _command(name: str, doc: str, analysis: bool = False):
    """Register ``tokenflow NAME`` with one flag per :class:`~tokenflow.options.RunOptions` field (or
    :class:`~tokenflow.options.AnalysisOptions` field, ``analysis``) that the command takes (defaults, types and help
    from the fields: the one source of truth), then ``--config``."""
    from .options import AnalysisOptions, RunOptions, cli_fields

    cls = AnalysisOptions if analysis else RunOptions

    def decorate(run):
        params = []
        for f, spec in cli_fields(cls, name):
            required = f.name == "prompt" and name == "edit"  # the one option without a default here
            default = ... if required or f.default is MISSING and f.default_factory is MISSING else (
                f.default if f.default is not MISSING else f.default_factory())
            info = (typer.Argument(default, help=spec["help"]) if spec["argument"]
                    else typer.Option(default, *spec["flags"], help=spec["help"]))
            annotation = spec["type"] or _PLAIN_TYPES[f.type]  # field annotations are strings (postponed)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                            annotation=annotation))
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=_CONFIG,
                                        annotation=Optional[Path]))

        def command(**kwargs):
            quiet_model_libraries()
            run(_options(kwargs, cls))

        command.__name__, command.__doc__ = name, doc
        command.__signature__ = inspect.Signature(params)
        app.command(name)(command)
        return run

    return decorate


@_command("edit", "Edit VIDEO so it follows --prompt, consistently across frames.")
def edit(options) -> None:
    from .runner import edit_video

    result = edit_video(options)
    typer.echo(str(result.out_dir))


@_command("invert", "Precompute and cache the inversion of VIDEO, so later edits skip it.")
def invert(options) -> None:
    from .runner import invert_video

    invert_video(options)


def _print_layers(options) -> None:
    from .analysis.run import video_layers

    layers = video_layers(options)
    width = max(len(layer.name) for layer in layers)
    typer.echo(f"{'layer':<{width}}  tokens (rows x columns)  channels")
    for layer in layers:
        grid = f"{layer.grid[0]} x {layer.grid[1]}"
        typer.echo(f"{layer.name:<{width}}  {grid:<23}  {layer.channels}")


@_command("features", "Show what the model sees: one layer's tokens of VIDEO (and --edited videos) as a joint PCA, "
          "their consistency across frames.", analysis=True)
def features(options) -> None:
    if options.list_layers:
        return _print_layers(options)
    from .analysis.run import features_video

    typer.echo(str(features_video(options).out_dir))


@_command("reconstruct", "Rebuild frame --to of VIDEO from frame --from's features (token replacement, warping).",
          analysis=True)
def reconstruct(options) -> None:
    if options.list_layers:
        return _print_layers(options)
    from .analysis.run import reconstruct_video

    typer.echo(str(reconstruct_video(options).out_dir))


@app.command()
def batch(
    jobs: Path = typer.Argument(..., help="YAML, JSONL or CSV: defaults (any edit option) and jobs (video, prompt or prompts, options)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster: auto (the one `ray start` began) or ray://HOST:PORT (default: a local Ray on this machine)."),
    gpus_per_job: float = typer.Option(1.0, help="GPUs each worker reserves; fractions share a GPU (ignored without GPUs)."),
    out: Optional[Path] = typer.Option(None, help="Output folder: JOB/PROMPT/ folders and summary.json (default: ./tokenflow-out/JOBS-NAME/)."),
    retries: int = typer.Option(2, help="Times a job is resubmitted when its worker process dies."),
    cache_dir: Optional[Path] = typer.Option(None, help="Inversion cache for all workers (multi-node: a shared filesystem)."),
    workers: Optional[int] = typer.Option(None, help="Worker actors, each with the model loaded once (default: GPUs / --gpus-per-job, 1 on CPU)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings only."),
):
    """Run many edits (videos x prompts) on Ray workers; re-runs skip finished ones. Exit 1 if any failed."""
    quiet_model_libraries()
    from .batch import main as batch_main

    raise typer.Exit(batch_main(jobs, out, address=address, gpus_per_job=gpus_per_job, retries=retries,
                                cache_dir=cache_dir, workers=workers, quiet=quiet))


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
    quiet_model_libraries()
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


@app.command("ui")
def ui_command(
    host: str = typer.Option("127.0.0.1", help="Address to serve on (0.0.0.0: reachable from other machines)."),
    port: int = typer.Option(7860, help="Port to serve on."),
    model: Optional[str] = typer.Option(
        None, help="Model loaded at start: hub id, diffusers folder or file (default: SD 2.1-base; --demo: the micro model)."
    ),
    share: bool = typer.Option(False, "--share", help="Also make a temporary public gradio.live link."),
    demo: bool = typer.Option(False, "--demo", help="Offline try-out: the vendored micro model and a clip made for it."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    out: Optional[Path] = typer.Option(None, help="Folder for the runs (default: a new temporary folder)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Inversion cache folder (default: the user cache dir)."),
):
    """Serve the web UI (Gradio): upload, edit with live progress and cancel, compare, download."""
    quiet_model_libraries()
    from .ui import launch

    launch(host=host, port=port, model=model, share=share, demo=demo, device=device, dtype=dtype, out=out,
           cache_dir=cache_dir)


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


def _as_flags(message: str) -> str:
    """A library error names options by field (`inversion_steps`); here they are flags (--inversion-steps)."""
    from .options import flag_name, flags_for_fields, rename_fields

    special = flags_for_fields()
    return rename_fields(message, lambda name: special.get(name, flag_name(name)))


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2; no traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _handle_sigterm()
    _setup_logging(quiet="--quiet" in argv or "-q" in argv)
    command = typer.main.get_command(app)
    terminated = False
    try:
        default_map = _default_map(command, argv)
        if any(values.get("quiet") is True for values in (default_map or {}).values()):
            _setup_logging(quiet=True)  # `quiet: true` in a --config file silences logs as the flag does
        result = command.main(args=argv, prog_name="tokenflow", standalone_mode=False, default_map=default_map)
    except _EXIT as exc:
        return exc.exit_code
    except _ABORT:
        click.echo("tokenflow: interrupted; no output was written", err=True)
        return INTERRUPTED
    except TokenFlowError as exc:
        click.echo(f"tokenflow: error: {' '.join(_as_flags(str(exc)).split())}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("tokenflow: interrupted; no output was written", err=True)
        return INTERRUPTED
    except _Terminated:
        # said after this block: its traceback (and the progress bars its frames hold, which redraw on closing)
        # is released first
        terminated = True
    except Exception as exc:
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        # a usage error (unknown option, bad value, missing argument) from click or typer's copy of it
        click.echo(f"tokenflow: error: {' '.join(exc.format_message().split())}", err=True)
        return exc.exit_code
    if terminated:
        click.echo("tokenflow: terminated; no output was written", err=True)
        return TERMINATED
    # typer turns a KeyboardInterrupt into a *returned* 130 under standalone_mode=False (its click raises Abort);
    # `tokenflow batch` reports its own interruption (what was cancelled, what was kept)
    if result == INTERRUPTED and next((a for a in argv if a in command.commands), None) != "batch":
        click.echo("tokenflow: interrupted; no output was written", err=True)
        return INTERRUPTED
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
