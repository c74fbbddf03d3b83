"""Long videos: peak host memory, time per frame and seams, at 32 to 1000 frames.

    python benchmarks/bench_long.py --threads 1                                  # tiny + mid, 32 128 512 1000 frames
    python benchmarks/bench_long.py --models tiny --frames 32 128 512 1000 --size 64
    python benchmarks/bench_long.py --models mid --frames 32 128 --size 128
    python benchmarks/bench_long.py --device cuda --size 512                     # same on a GPU
    python benchmarks/bench_long.py --from-json benchmarks/results/bench_long.json   # tables only

Every configuration (model x frame count) runs in a **fresh Python subprocess**, so its peak RSS is its own (the
launching process imports only the standard library: Linux carries ``ru_maxrss`` across fork + exec). Inside it,
untimed: load the model, warm up on 8 frames (invert + edit + decode). Timed: the streamed, resumable inversion
into an on-disk cache (its source latents then read lazily), the edit (windowed keyframe attention, keyframe tokens
offloaded to host memory) and the VAE decode, a batch at a time. Memory: peak RSS of the process
(``VmHWM``/``ru_maxrss``) and its growth over the RSS after load + warm-up; ``torch.cuda.max_memory_allocated`` on
CUDA. Seams: the flow-based warp error (``tokenflow.metrics.warp_errors``, DIS flow on the source) of each frame
pair, averaged separately over the pairs that straddle a position where a chunked approach would cut (every
``batch_size * keyframe_window`` frames) and over all other pairs; with ``--chunked`` the same clip is also edited
chunk by chunk (independent edits of ``batch_size * keyframe_window`` frames) for comparison.

Writes ``--json`` and prints Markdown tables (with the machine) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MID_KWARGS, QUIET_ENV, machine_info, peak_rss_mb

HERE = Path(__file__).resolve().parent
MICRO_DIR = HERE / "micro_model"  # the micro *trained* model (see its README): it makes content decisions

def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    return None


# ------------------------------------------------------------------------------------------------ worker


def _edit_config(spec: dict, **overrides):
    """The EditConfig of a run; the long-video options go on the state until EditConfig carries them."""
    import dataclasses
    import functools

    from tokenflow import editor as editor_module
    from tokenflow.attention import TokenFlowState
    from tokenflow.editor import EditConfig

    options = dict(keyframe_window=spec["keyframe_window"], anchors=spec["anchors"], offload_cache=spec["offload"])
    fields = {f.name for f in dataclasses.fields(EditConfig)}
    carried = {k: v for k, v in options.items() if k in fields}
    if len(carried) < len(options):
        state_options = {k: v for k, v in options.items() if k not in fields}
        editor_module.TokenFlowState = functools.partial(TokenFlowState, **state_options)
    values = dict(prompt=spec["prompt"], negative_prompt="", inversion_prompt=spec.get("inversion_prompt", ""),
                  steps=spec["steps"], guidance_scale=7.5, batch_size=spec["batch_size"], seed=0)
    values.update(carried)
    values.update(overrides)
    return EditConfig(**values)


def run_worker(spec_path: Path) -> None:
    """One configuration in its own process: writes ``result.json`` next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"spec": spec}
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    try:
        import cv2

        cv2.setNumThreads(spec["threads"])
    except Exception:  # noqa: BLE001
        pass
    from tokenflow import TokenFlowEditor, load_model
    from tokenflow.inversion import InversionCache
    from tokenflow.metrics import warp_errors
    from tokenflow.video import pan_frames

    model = load_model(spec["model_path"], device=spec["device"], dtype=spec["dtype"])
    device = model.device
    editor = TokenFlowEditor(model)
    if spec["model"] == "micro":
        # a long pan over one scene of the micro model's world (2 objects somewhere along it); the edit changes
        # the background's texture, whose angle, period and phase the model must invent: seams show there
        sys.path.insert(0, str(MICRO_DIR))
        import scenes
        from make_clip import edits

        rng = np.random.default_rng(1000 + spec["micro_seed"])
        width = scenes.W + spec["shift"] * (spec["frames"] - 1)
        scene = scenes.random_scene(rng, width=width, n_obj=2, visible=(4, width - 4))
        frames = np.stack([scenes.render(scene, x0=i * spec["shift"], width=scenes.W) for i in range(spec["frames"])])
        spec.update(prompt=edits(scene)[1]["prompt"], inversion_prompt=scenes.caption(scene))
    else:
        frames = pan_frames(num_frames=spec["frames"], width=spec["size"], height=spec["size"], shift=spec["shift"])
    bs = spec["batch_size"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def invert(clip, cache_dir):
        return editor.invert(torch.from_numpy(clip), inversion_prompt=spec.get("inversion_prompt", ""),
                             steps=spec["steps"], inversion_steps=spec["inversion_steps"], batch_size=bs,
                             cache=None if spec.get("in_memory") else InversionCache(cache_dir), reconstruct=False,
                             progress=False)

    def decode(latents):
        return torch.cat([model.decode_latents(latents[i : i + bs]) for i in range(0, len(latents), bs)]).numpy()

    with tempfile.TemporaryDirectory() as cache_dir:
        warm = invert(frames[:8], cache_dir)  # untimed warm-up through the same code paths
        decode(editor.edit(warm, _edit_config(spec), progress=False).latents)
        sync()
        result["rss_after_load_mb"] = _status_mb("VmRSS")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        started = time.perf_counter()
        source = invert(frames, cache_dir)
        sync()
        result["invert_s"] = time.perf_counter() - started
        started = time.perf_counter()
        out = editor.edit(source, _edit_config(spec), progress=False)
        sync()
        result["edit_s"] = time.perf_counter() - started
        started = time.perf_counter()
        edited = decode(out.latents)
        sync()
        result["decode_s"] = time.perf_counter() - started
        result["peak_rss_mb"] = peak_rss_mb()
        result["vm_hwm_mb"] = _status_mb("VmHWM")
        if device.type == "cuda":
            result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            result["gpu"] = torch.cuda.get_device_name(device)
        result["unet_frame_evaluations"] = int(out.unet_frame_evaluations)
        result["keyframes_per_step"] = len(out.keyframes[0]) if out.keyframes else 0

        chunked = None
        if spec["chunked"]:
            # the comparison: independent edits of consecutive chunks, concatenated
            period = spec["cut_period"]
            parts = []
            for start in range(0, spec["frames"], period):
                stop = min(start + period, spec["frames"])
                part = type(source)(clean=source.clean[start:stop],
                                    noisy={t: v[start:stop] for t, v in source.noisy.items()})
                parts.append(editor.edit(part, _edit_config(spec), progress=False).latents)
            chunked = decode(torch.cat(parts))

    total = result["invert_s"] + result["edit_s"] + result["decode_s"]
    result["seconds_per_frame"] = total / spec["frames"]
    result["device"] = str(device)
    result["dtype"] = str(model.dtype).replace("torch.", "")
    result["latent_shape"] = list(out.latents.shape)
    result["height"], result["width"] = int(frames.shape[1]), int(frames.shape[2])

    started = time.perf_counter()
    period = spec["cut_period"]
    cut = np.array([(i + 1) % period == 0 for i in range(spec["frames"] - 1)])
    floor = warp_errors(frames, frames)
    for name, video in (("tokenflow", edited), ("chunked", chunked)):
        if video is None:
            continue
        errors = warp_errors(frames, video)
        result[name] = dict(
            warp_cut=float(np.nanmean(errors[cut])) if cut.any() else None,
            warp_elsewhere=float(np.nanmean(errors[~cut])),
            warp_mean=float(np.nanmean(errors)),
        )
    result["source_floor"] = dict(
        warp_cut=float(np.nanmean(floor[cut])) if cut.any() else None, warp_elsewhere=float(np.nanmean(floor[~cut]))
    )
    result["metrics_s"] = time.perf_counter() - started
    Path(spec_path).with_name("result.json").write_text(json.dumps(result, indent=1, default=str))


# ------------------------------------------------------------------------------------------------ parent


def run_prepare(request_path: Path) -> None:
    """Subprocess: build the random-weight models and report torch-side machine facts."""
    request = json.loads(Path(request_path).read_text())
    import torch

    from tokenflow.models import resolve_device
    from tokenflow.testing import build_tiny_sd

    root = Path(request["work"]) / "models"
    models = {}
    for name in request["models"]:
        if name == "micro":
            models[name] = str(MICRO_DIR / "model")
        else:
            models[name] = str(build_tiny_sd(root / name, **(MID_KWARGS if name == "mid" else {})))
    machine = dict(torch=torch.__version__, device=str(resolve_device(request["device"])))
    Path(request["out"]).write_text(json.dumps(dict(models=models, machine=machine)))


def _sub(args: list[str], threads: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, **QUIET_ENV, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, capture_output=True,
                          text=True)


def _fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"{m.get('memory_gb')} GB RAM, torch {m['torch']} with {m['threads']} thread(s), device `{m['device']}`; "
        f"load average at start {m['load_average_at_start']}. Total wall time {report['wall_s']:.0f} s.",
        "",
        "| model | frames | size | keyframes/step | window (anchors) [inversion] | inversion (s) | edit (s) | decode (s) "
        "| s / frame | peak RSS (MB) [after load] | growth (MB) | warp error at cuts | elsewhere | source floor "
        "cuts / elsewhere |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        s = r["spec"]
        if "error" in r:
            lines.append(f"| {s['model']} | {s['frames']} | {s['size']} | failed: {r['error'][:80]} |")
            continue
        tf, floor = r["tokenflow"], r["source_floor"]
        growth = r["peak_rss_mb"] - r["rss_after_load_mb"] if r.get("rss_after_load_mb") else None
        lines.append(
            f"| {s['model']} | {s['frames']} | {r.get('width', s['size'])}x{r.get('height', s['size'])} | "
            f"{r['keyframes_per_step']} | "
            f"{s['keyframe_window'] or 'full'} ({s['anchors']}){' in-memory' if s.get('in_memory') else ''} | "
            f"{r['invert_s']:.1f} | {r['edit_s']:.1f} | "
            f"{r['decode_s']:.1f} | "
            f"{r['seconds_per_frame']:.3f} | {r['peak_rss_mb']:.0f} [{_fmt(r.get('rss_after_load_mb'), 0)}] | "
            f"{_fmt(growth, 0)} | {_fmt(tf['warp_cut'])} | {_fmt(tf['warp_elsewhere'])} | "
            f"{_fmt(floor['warp_cut'])} / {_fmt(floor['warp_elsewhere'])} |"
        )
    chunked = [r for r in report["runs"] if r.get("chunked")]
    if chunked:
        lines += ["", "Chunked comparison (independent edits of `batch_size * window` frames, same clip):", "",
                  "| model | frames | windowed: cuts / elsewhere | chunked: cuts / elsewhere |", "|---|---|---|---|"]
        for r in chunked:
            a, b = r["tokenflow"], r["chunked"]
            lines.append(f"| {r['spec']['model']} | {r['spec']['frames']} | {_fmt(a['warp_cut'])} / "
                         f"{_fmt(a['warp_elsewhere'])} | {_fmt(b['warp_cut'])} / {_fmt(b['warp_elsewhere'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid", "micro"])
    parser.add_argument("--frames", nargs="+", type=int, default=[32, 128, 512, 1000])
    parser.add_argument("--size", type=int, default=64, help="square working size in px (tiny)")
    parser.add_argument("--mid-size", type=int, default=None, help="working size for the mid model (default --size)")
    parser.add_argument("--mid-frames", nargs="+", type=int, default=None,
                        help="frame counts for the mid model (default --frames)")
    parser.add_argument("--shift", type=int, default=1, help="pan speed, px per frame")
    parser.add_argument("--micro-frames", nargs="+", type=int, default=[64], help="frame counts for micro")
    parser.add_argument("--micro-steps", type=int, default=20, help="editing and inversion steps for micro")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-seed", type=int, default=0, help="make_clip.py scene seed")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--inversion-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keyframe-window", default="2", help="a number of keyframes, or full")
    parser.add_argument("--in-memory", action="store_true",
                        help="baseline: invert without a cache (all source latents in memory)")
    parser.add_argument("--anchors", type=int, default=1)
    parser.add_argument("--no-offload", action="store_true", help="keep keyframe tokens on the device")
    parser.add_argument("--chunked", nargs="*", type=int, default=[],
                        help="frame counts at which to also edit chunk by chunk, for comparison")
    parser.add_argument("--prompt", default="a robot")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "bench_long.json")
    parser.add_argument("--from-json", type=Path, default=None, help="print the tables of an earlier run")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    if args.prepare:
        return run_prepare(args.prepare)
    if args.from_json:
        print(tables(json.loads(args.from_json.read_text())))
        return None

    window = None if args.keyframe_window == "full" else int(args.keyframe_window)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_long.") as work:
        work = Path(work)
        request = dict(work=str(work), models=args.models, device=args.device, out=str(work / "prepared.json"))
        (work / "prepare.json").write_text(json.dumps(request))
        done = _sub(["--prepare", str(work / "prepare.json")], args.threads)
        if done.returncode:
            raise SystemExit(f"preparation failed:\n{done.stderr[-3000:]}")
        prepared = json.loads((work / "prepared.json").read_text())
        machine = machine_info(args.threads, prepared)
        runs = []
        for name in args.models:
            size = args.mid_size if name == "mid" and args.mid_size else args.size
            counts = args.mid_frames if name == "mid" and args.mid_frames else args.frames
            steps, inversion_steps, bs = args.steps, args.inversion_steps, args.batch_size
            if name == "micro":
                size, counts, bs = 64, args.micro_frames, args.micro_batch_size
                steps = inversion_steps = args.micro_steps
            for n in counts:
                spec = dict(model=name, model_path=prepared["models"][name], frames=n, size=size, shift=args.shift,
                            steps=steps, inversion_steps=inversion_steps, batch_size=bs,
                            keyframe_window=window, anchors=args.anchors, offload=not args.no_offload,
                            in_memory=args.in_memory, cut_period=bs * (window or 2), chunked=n in args.chunked,
                            micro_seed=args.micro_seed, prompt=args.prompt, device=args.device, dtype=args.dtype,
                            threads=args.threads)
                run_dir = work / f"{name}-{n}"
                run_dir.mkdir()
                (run_dir / "spec.json").write_text(json.dumps(spec))
                print(f"running {name} x {n} frames at {size} px ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                done = _sub(["--worker", str(run_dir / "spec.json")], args.threads)
                if done.returncode:
                    runs.append(dict(spec=spec, error=done.stderr.strip().splitlines()[-1] if done.stderr else "?"))
                    print(done.stderr[-3000:], file=sys.stderr)
                    continue
                result = json.loads((run_dir / "result.json").read_text())
                result["run_wall_s"] = time.perf_counter() - t0
                runs.append(result)
                print(f"  {result['run_wall_s']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr)
    report = dict(machine=machine, runs=runs, wall_s=time.perf_counter() - started,
                  launcher_peak_rss_mb=peak_rss_mb())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    print(tables(report))
    return None


if __name__ == "__main__":
    main()
