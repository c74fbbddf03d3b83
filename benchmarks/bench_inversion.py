"""The inversion study: reconstruction PSNR against cost for plain DDIM inversion and fixed-point refined inversion,
and the end-to-end first edit of the default scheme against the reference's (``--inversion ddim
--inversion-steps 500``).

    python benchmarks/bench_inversion.py                          # micro model, 16 frames, every scheme
    python benchmarks/bench_inversion.py --models micro tiny mid --end-to-end
    python benchmarks/bench_inversion.py --from-json benchmarks/results/bench_inversion.json   # tables + plot

Each scheme inverts the same frames on the 50-step editing grid joined with its own inversion grid (as an edit
does), then samples back down the editing timesteps and decodes; its PSNR against the VAE round trip of the
frames is the project's reconstruction check (``tokenflow.inversion.reconstruction_psnr``), the same measure for
every scheme. Cost: UNet frame-evaluations of the inversion (counted by a forward pre-hook) and its wall time.
``--end-to-end`` times ``tokenflow edit``'s whole run (``tokenflow.runner.edit_video``: read, invert with the
reconstruction check through a fresh cache, edit, decode, write) for each ``--e2e-scheme``.

Models: ``micro`` (the vendored micro *trained* model, a clip of its world), ``tiny``/``mid`` (random weights,
SD layout; a camera pan across a photo). Writes ``--json`` and ``--plot`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SCHEMES = [  # (label, inversion steps, refinements per step)
    ("ddim 50", 50, 0),
    ("ddim 100", 100, 0),
    ("ddim 250", 250, 0),
    ("ddim 500 (reference)", 500, 0),
    ("fixed-point 50 x1", 50, 1),
    ("fixed-point 50 x2", 50, 2),
    ("fixed-point 50 x3", 50, 3),
]


def _model_and_frames(name: str, work: Path, frames: int):
    import torch

    from bench_edit import MICRO_DIR, micro_clip, pan_clip
    from common import MID_KWARGS
    from tokenflow.models import load_model
    from tokenflow.testing import build_tiny_sd

    if name == "micro":
        clip, _ = micro_clip(work, seed=0, shift=2, n=frames)
        path = MICRO_DIR / "model"
    else:
        path = work / name
        if not path.exists():
            if name == "tiny":
                build_tiny_sd(path)
            else:
                build_tiny_sd(path, **MID_KWARGS)  # the mid model of bench_edit.py
        clip = pan_clip(frames, 128, 4)
    return load_model(str(path), device="cpu", dtype="float32"), torch.from_numpy(clip), path


def study(model, frames, steps: int, batch: int, schemes) -> list[dict]:
    import torch

    from tokenflow.inversion import invert_frames

    counted = [0]
    handle = model.unet.register_forward_pre_hook(lambda m, a: counted.__setitem__(0, counted[0] + a[0].shape[0]))
    rows = []
    try:
        for label, inversion_steps, refinements in schemes:
            counted[0] = 0
            started = time.perf_counter()
            source = invert_frames(model, frames, steps=steps, inversion_steps=inversion_steps, batch_size=batch,
                                   reconstruct=False, progress=False, refinements=refinements)
            seconds = time.perf_counter() - started
            evaluations = counted[0]
            from tokenflow.inversion import reconstruction_psnr

            cond = model.condition([""], height=frames.shape[1], width=frames.shape[2])
            psnr = reconstruction_psnr(model, source, cond, batch)
            rows.append(dict(scheme=label, inversion_steps=inversion_steps, refinements=refinements,
                             unet_frame_evaluations=evaluations, seconds=round(seconds, 3),
                             ms_per_evaluation=round(1000 * seconds / evaluations, 2), psnr=round(psnr, 3)))
            print(f"  {label:24s} {evaluations:6d} evals {seconds:8.2f} s  PSNR {psnr:.2f} dB", flush=True)
            del source
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    finally:
        handle.remove()
    return rows


def end_to_end(model_path: Path, frames, work: Path, steps: int, batch: int, schemes: list[str]) -> list[dict]:
    import numpy as np

    from tokenflow.editor import TokenFlowEditor
    from tokenflow.io import write_video
    from tokenflow.models import load_model
    from tokenflow.runner import RunOptions, edit_video

    clip = work / "e2e.mp4"
    write_video(clip, np.asarray(frames), fps=10)
    editor = TokenFlowEditor(load_model(str(model_path), device="cpu", dtype="float32"))
    rows = []
    for spec in schemes:
        scheme, _, steps_text = spec.partition(":")
        kwargs = dict(inversion=scheme)
        if steps_text:
            kwargs["inversion_steps"] = int(steps_text)
        options = RunOptions(video=clip, prompt="a red car", out=work / f"out-{spec}", size=frames.shape[1],
                             steps=steps, batch_size=batch, cache_dir=work / f"cache-{spec}", quiet=True, **kwargs)
        started = time.perf_counter()
        result = edit_video(options, editor)
        seconds = time.perf_counter() - started
        report = result.report
        rows.append(dict(scheme=spec, seconds=round(seconds, 2), inversion_seconds=report["timings"]["inversion"],
                         edit_seconds=report["timings"]["edit"], psnr=report["inversion_psnr"]))
        print(f"  e2e {spec:24s} {seconds:8.2f} s (inversion {report['timings']['inversion']:.2f} s, "
              f"PSNR {report['inversion_psnr']:.2f} dB)", flush=True)
    return rows


def tables(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    for name, entry in results["models"].items():
        lines += [f"### {name} ({entry['frames']} frames {entry['size']}, {entry['steps']} editing steps)", "",
                  "| scheme | UNet frame evals | inversion (s) | ms / eval | reconstruction PSNR (dB) |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['scheme']} | {r['unet_frame_evaluations']} | {r['seconds']:.2f} | {r['ms_per_evaluation']:.2f} |"
                  f" {r['psnr']:.2f} |" for r in entry["study"]]
        if entry.get("end_to_end"):
            lines += ["", "| first edit, end to end | wall (s) | inversion + check (s) | edit (s) | PSNR (dB) |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['scheme']} | {r['seconds']:.2f} | {r['inversion_seconds']:.2f} | "
                      f"{'n/a' if r['edit_seconds'] is None else format(r['edit_seconds'], '.2f')} |"
                      f" {r['psnr']:.2f} |" for r in entry["end_to_end"]]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in results["models"].items():
        for family, marker in (("ddim", "o-"), ("fixed-point", "s-")):
            rows = [r for r in entry["study"] if r["scheme"].startswith(family)]
            if rows:
                ax.plot([r["unet_frame_evaluations"] / entry["frames"] for r in rows], [r["psnr"] for r in rows],
                        marker, label=f"{name}: {family}")
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per frame (inversion)")
    ax.set_ylabel("reconstruction PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=("micro", "tiny", "mid"), default=["micro"])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="editing steps (the grid the check samples down)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--schemes", nargs="+", default=[s[0] for s in SCHEMES], help="labels from SCHEMES")
    p.add_argument("--end-to-end", action="store_true", help="also time whole first edits (micro model only)")
    p.add_argument("--e2e-scheme", nargs="+", default=["fixed-point", "ddim:500"],
                   help="SCHEME[:INVERSION_STEPS] for --end-to-end")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=HERE / "results" / "bench_inversion.json")
    p.add_argument("--plot", type=Path, default=HERE / "results" / "bench_inversion.png")
    p.add_argument("--from-json", type=Path, default=None, help="print tables and plot from an earlier run")
    args = p.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        import torch

        torch.set_num_threads(args.threads)
        try:
            cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split(":")[1].split("\n")[0].strip()
        except (OSError, IndexError):
            cpu = platform.processor() or platform.machine()
        results = {"machine": f"{cpu}, torch {torch.__version__}, {args.threads} thread(s), CPU", "models": {}}
        schemes = [s for s in SCHEMES if s[0] in args.schemes]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for name in args.models:
                print(f"{name}:", flush=True)
                model, frames, path = _model_and_frames(name, work, args.frames)
                entry = dict(frames=int(frames.shape[0]), size=f"{frames.shape[2]}x{frames.shape[1]}",
                             steps=args.steps, study=study(model, frames, args.steps, args.batch_size, schemes))
                if args.end_to_end and name == "micro":
                    entry["end_to_end"] = end_to_end(path, frames, work, args.steps, args.batch_size,
                                                     args.e2e_scheme)
                results["models"][name] = entry
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    plot(results, args.plot)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
