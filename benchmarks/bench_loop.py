"""The editing loop's cost per UNet frame evaluation as clips grow: TokenFlow against the per-frame baseline.

    python benchmarks/bench_loop.py                                  # micro model, 16 32 64 128 frames, 5 pairs
    python benchmarks/bench_loop.py --model mid --scale 2            # SD's layout, twice the channels a token
    python benchmarks/bench_loop.py --keyframe-window full           # the paper's joint attention, for comparison

TokenFlow's loop runs as many UNet frame evaluations as per-frame editing (the keyframes are not evaluated twice),
so its cost per evaluation against the baseline's is what it adds: keyframe attention, the nearest-neighbour
field, the gathering and blending. A shared 2-core VM moves a single run by 10-20 % (the same inversion took
20-25 s in consecutive runs), more than the effect measured, so each clip is inverted once and then edited in
``--pairs`` alternating pairs (TokenFlow, per-frame) in one process; the figure is the median over pairs of the
two edits' wall-time ratio (CPU time too). ``--steps`` editing steps (the cost per evaluation does not depend on
them: every step runs the same calls), micro trained model, clips of its world (``bench_edit.micro_clip``; longer
than 32 frames they pan back and forth). Writes ``--json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def measure(n: int, args) -> dict:
    import torch

    from bench_edit import MICRO_DIR, micro_clip
    from tokenflow.editor import EditConfig, TokenFlowEditor
    from tokenflow.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        frames, meta = micro_clip(Path(tmp), 0, 2, n)
        if args.scale > 1:  # the same clip, larger (nearest: the motion stays exact)
            frames = frames.repeat(args.scale, axis=1).repeat(args.scale, axis=2)
        if args.model == "mid":
            from common import MID_KWARGS
            from tokenflow.testing import build_tiny_sd

            model_dir = build_tiny_sd(Path(tmp) / "mid", **MID_KWARGS)
        else:
            model_dir = MICRO_DIR / "model"
        editor = TokenFlowEditor(load_model(str(model_dir), device="cpu", dtype="float32"))
    source = editor.invert(torch.from_numpy(frames), inversion_prompt=meta["caption"], steps=args.steps,
                           batch_size=args.batch_size, reconstruct=False, progress=False)
    base = dict(prompt=meta["edits"][0]["prompt"], inversion_prompt=meta["caption"], negative_prompt="",
                steps=args.steps, batch_size=args.batch_size, keyframe_window=args.keyframe_window)
    configs = {mode: EditConfig(**base, propagation=mode) for mode in ("tokenflow", "none")}
    window = configs["tokenflow"].resolve_keyframe_window(n, editor.model.attention_tokens(*source.clean.shape[2:]))
    editor.edit(source, configs["tokenflow"], progress=False)  # warm-up
    runs = {mode: [] for mode in configs}
    for _ in range(args.pairs):
        for mode, config in configs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            out = editor.edit(source, config, progress=False)
            runs[mode].append((time.perf_counter() - wall, time.process_time() - cpu, out.unet_frame_evaluations))
    evals = {mode: r[0][2] for mode, r in runs.items()}
    ratio = [tf[0] / pf[0] for tf, pf in zip(runs["tokenflow"], runs["none"])]
    cpu_ratio = [tf[1] / pf[1] for tf, pf in zip(runs["tokenflow"], runs["none"])]
    ms = {mode: 1000 * statistics.median(r[0] for r in rs) / evals[mode] for mode, rs in runs.items()}
    return dict(frames=n, keyframes=-(-n // args.batch_size), window=window, evaluations=evals, runs=runs,
                ms_per_evaluation=ms, ratio_median=statistics.median(ratio), ratio_range=[min(ratio), max(ratio)],
                cpu_ratio_median=statistics.median(cpu_ratio))


def table(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; {results['settings']}", "",
             "| frames | keyframes | keyframe window | TokenFlow (ms / eval) | per-frame (ms / eval) "
             "| **ratio** (median of pairs) | range | CPU-time ratio |",
             "|---:|---:|---|---:|---:|---:|---|---:|"]
    for r in results["clips"]:
        window = "full" if r["window"] is None else f"{r['window']} each side"
        lines.append(f"| {r['frames']} | {r['keyframes']} | {window} | {r['ms_per_evaluation']['tokenflow']:.2f} "
                     f"| {r['ms_per_evaluation']['none']:.2f} | **{r['ratio_median']:.3f}** "
                     f"| {r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f} | {r['cpu_ratio_median']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--model", choices=["micro", "mid"], default="micro",
                   help="micro: the trained micro model (16 channels, 384 tokens at its first attention level); mid: "
                        "SD's layout with 32 channels there (random weights: the cost depends on shapes only)")
    p.add_argument("--scale", type=int, default=1, help="frames enlarged this many times (mid at 2: 384 tokens)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--keyframe-window", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=HERE / "results" / "bench_loop.json")
    args = p.parse_args()
    from common import QUIET_ENV

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(args.threads)
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split(":")[1].split("\n")[0].strip()
    results = dict(machine=f"{cpu}, torch {torch.__version__}, {args.threads} thread(s), CPU",
                   settings=f"{args.model} model, frames x{args.scale}, {args.steps} steps, batch size {args.batch_size}, keyframe window "
                            f"{args.keyframe_window}, {args.pairs} pairs", clips=[])
    for n in args.frames:
        results["clips"].append(measure(n, args))
        print(f"{n} frames: ratio {results['clips'][-1]['ratio_median']:.3f}", file=sys.stderr, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
