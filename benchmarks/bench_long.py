"""Long videos: peak host memory, time per frame and seams, at 32 to 1000 frames.

    python benchmarks/bench_long.py --threads 1                                  # tiny + mid, 32 128 512 1000 frames
    python benchmarks/bench_long.py --models tiny --frames 32 128 512 1000 --size 64
    python benchmarks/bench_long.py --models mid --frames 32 128 --size 128
    python benchmarks/bench_long.py --device cuda --size 512                     # same on a GPU
    python benchmarks/bench_long.py --from-json benchmarks/results/bench_long.json   # tables only

Every configuration (model x frame count) runs in a **fresh Python subprocess**, so its peak RSS is its own (the
launching process imports only the standard library). Inside it, untimed: load the model, generate the clip and
write it losslessly (FFV1 .mkv), warm up with an 8-frame run. Timed and measured: one ``tokenflow edit`` run through
the library's runner (``tokenflow.runner.edit_video``), exactly what the command does: stream the clip's frames
into the on-disk frame store, invert into the on-disk cache (streamed, resumable, with the reconstruction check;
the source latents then read lazily), edit (windowed keyframe attention, the keyframe pass in calls of
``--keyframe-batch`` keyframes, keyframe tokens dropped once propagated), decode and write edited/source/side-by-side
H.264 videos a batch at a time. Memory: the peak RSS of that run (Linux ``VmHWM`` reset just before it), shown with
the RSS at its start; ``torch.cuda.max_memory_allocated`` on CUDA. Seams: the flow-based warp error
(``tokenflow.metrics.warp_errors``, DIS flow on the source) of each frame pair of the written ``edited.mp4``,
averaged separately over the pairs that straddle a position where a chunked approach would cut (every
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

# ------------------------------------------------------------------------------------------------ worker


def _run_options(spec: dict, clip: Path, out: Path, cache: Path):
    """What ``tokenflow edit`` is given for this configuration."""
    from tokenflow.runner import RunOptions

    window, batch = spec["keyframe_window"], spec["keyframe_batch"]
    return RunOptions(
        video=clip, prompt=spec["prompt"], out=out, model=spec["model_path"],
        inversion_prompt=spec.get("inversion_prompt", ""), negative_prompt="", size=spec["size"],
        steps=spec["steps"], inversion=spec.get("inversion", "ddim"), inversion_steps=spec["inversion_steps"],
        batch_size=spec["batch_size"], seed=0,
        device=spec["device"], dtype=spec["dtype"], cache_dir=cache, quiet=True,
        keyframe_window="full" if window is None else str(window), anchors=spec["anchors"], keyframe_batch=str(batch),
    )


def run_worker(spec_path: Path) -> None:
    """One configuration in its own process: writes ``result.json`` next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"spec": spec}
    import gc

    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    try:
        import cv2

        cv2.setNumThreads(spec["threads"])
    except Exception:  # noqa: BLE001
        pass
    from tokenflow import TokenFlowEditor, load_model
    from tokenflow.memory import PeakMemory
    from tokenflow.metrics import warp_errors
    from tokenflow.runner import edit_video, invert_video
    from tokenflow.io import VideoWriter, load_frames
    from tokenflow.testing import pan_frames

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

    def write_clip(path: Path, clip: np.ndarray) -> Path:  # lossless FFV1: the exact frames, exact motion
        with VideoWriter(path, 24, clip.shape[2], clip.shape[1], codec="ffv1") as writer:
            for frame in clip:
                writer.write(frame)
        return path

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        cache = work / "cache"
        # untimed warm-up through the same code paths
        edit_video(_run_options(spec, write_clip(work / "warm.mkv", frames[:8]), work / "warm", cache), editor)
        clip = write_clip(work / "clip.mkv", frames)
        np.save(work / "frames.npy", frames)
        del frames  # the run reads the clip file, as a user's run does
        gc.collect()
        options = _run_options(spec, clip, work / "out", cache)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        with PeakMemory() as memory:
            run = edit_video(options, editor)
            sync()
        result["wall_s"] = time.perf_counter() - started
        result["rss_after_load_mb"] = memory.baseline / 2**20
        result["peak_rss_mb"] = memory.peak / 2**20
        result["peak_exact"] = memory.exact
        if device.type == "cuda":
            result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            result["gpu"] = torch.cuda.get_device_name(device)
        timings = run.report["timings"]
        result["read_s"], result["invert_s"] = timings["read"], timings["inversion"]
        result["edit_s"], result["decode_s"] = timings["edit"], timings["decode_write"]
        result["unet_frame_evaluations"] = int(run.report["unet_frame_evaluations"])
        result["keyframes_per_step"] = len(run.report["keyframes"][0]) if run.report["keyframes"] else 0
        result["width"], result["height"] = run.width, run.height
        entries = [e for e in cache.iterdir() if e.is_dir() and not e.name.startswith(".")]
        result["cache_bytes"] = sum(f.stat().st_size for e in entries for f in e.rglob("*") if f.is_file())
        result["cache_bytes_per_frame"] = result["cache_bytes"] / (spec["frames"] + 8)  # + the warm-up's 8 frames

        frames = np.load(work / "frames.npy")
        edited, _ = load_frames(run.out_dir / "edited.mp4")
        chunked = None
        if spec["chunked"]:
            # the comparison: independent edits of consecutive chunks, concatenated
            source = invert_video(options, editor)  # the cached inversion
            config = options.edit_config()
            period = spec["cut_period"]
            parts = []
            for start in range(0, spec["frames"], period):
                stop = min(start + period, spec["frames"])
                part = type(source)(clean=source.clean[start:stop],
                                    noisy={t: v[start:stop] for t, v in source.noisy.items()})
                latents = editor.edit(part, config, progress=False).latents
                parts += [model.decode_latents(latents[i : i + 8]) for i in range(0, len(latents), 8)]
            # encoded like the runner's edited.mp4, so both are measured after the same H.264 round trip
            with VideoWriter(work / "chunked.mp4", 24, run.width, run.height) as writer:
                for frame in torch.cat(parts).numpy():
                    writer.write(frame)
            chunked, _ = load_frames(work / "chunked.mp4")

    total = result["read_s"] + result["invert_s"] + result["edit_s"] + result["decode_s"]
    result["seconds_per_frame"] = total / spec["frames"]
    result["device"] = str(device)
    result["dtype"] = str(model.dtype).replace("torch.", "")

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
        "| model | frames | size | keyframes/step | window (anchors) / keyframes per call | read + inversion (s) "
        "| edit (s) | decode + write (s) | s / frame | peak RSS (MB) [at start] | growth (MB) | device peak (MB) "
        "| warp error at cuts | elsewhere | source floor cuts / elsewhere |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        s = r["spec"]
        if "error" in r:
            lines.append(f"| {s['model']} | {s['frames']} | {s['size']} | failed: {r['error'][:80]} |")
            continue
        tf, floor = r["tokenflow"], r["source_floor"]
        growth = r["peak_rss_mb"] - r["rss_after_load_mb"]
        lines.append(
            f"| {s['model']} | {s['frames']} | {r['width']}x{r['height']} | {r['keyframes_per_step']} | "
            f"{s['keyframe_window'] or 'full'} ({s['anchors']}) / {s['keyframe_batch']} | "
            f"{r['read_s'] + r['invert_s']:.1f} | {r['edit_s']:.1f} | {r['decode_s']:.1f} | "
            f"{r['seconds_per_frame']:.3f} | {r['peak_rss_mb']:.0f} [{r['rss_after_load_mb']:.0f}] | {growth:.0f} | "
            f"{_fmt(r.get('cuda_peak_mb'), 0)} | {_fmt(tf['warp_cut'])} | {_fmt(tf['warp_elsewhere'])} | "
            f"{_fmt(floor['warp_cut'])} / {_fmt(floor['warp_elsewhere'])} |"
        )
    lines += _growth_lines(report["runs"])
    chunked = [r for r in report["runs"] if r.get("chunked")]
    if chunked:
        lines += ["", "Chunked comparison (independent edits of `batch_size * window` frames, same clip):", "",
                  "| model | frames | windowed: cuts / elsewhere | chunked: cuts / elsewhere |", "|---|---|---|---|"]
        for r in chunked:
            a, b = r["tokenflow"], r["chunked"]
            lines.append(f"| {r['spec']['model']} | {r['spec']['frames']} | {_fmt(a['warp_cut'])} / "
                         f"{_fmt(a['warp_elsewhere'])} | {_fmt(b['warp_cut'])} / {_fmt(b['warp_elsewhere'])} |")
    return "\n".join(lines)


def _growth_lines(runs: list[dict]) -> list[str]:
    """Host memory per extra frame, between consecutive frame counts of one model (the slope, free of the fixed
    base), against a decoded float32 frame; and the inversion cache's bytes per frame."""
    lines = ["", "Growth per extra frame (peak RSS over the RSS at start, between consecutive frame counts) and the "
             "inversion cache on disk:", "",
             "| model | frames | RSS growth per extra frame (KiB) | a float32 frame (KiB) | ratio | cache per frame (KiB) |",
             "|---|---|---|---|---|---|"]
    by_model: dict[str, list[dict]] = {}
    for r in runs:
        if "error" not in r:
            by_model.setdefault(r["spec"]["model"], []).append(r)
    for model, rs in by_model.items():
        rs.sort(key=lambda r: r["spec"]["frames"])
        for a, b in zip(rs, rs[1:]):
            grown = (b["peak_rss_mb"] - b["rss_after_load_mb"]) - (a["peak_rss_mb"] - a["rss_after_load_mb"])
            per_frame = grown * 1024 / (b["spec"]["frames"] - a["spec"]["frames"])
            frame = b["width"] * b["height"] * 3 * 4 / 1024
            cache = b.get("cache_bytes_per_frame")
            lines.append(f"| {model} | {a['spec']['frames']} -> {b['spec']['frames']} | {per_frame:.1f} | {frame:.0f} | "
                         f"{per_frame / frame:.3f} | {_fmt(None if cache is None else cache / 1024, 1)} |")
    return lines


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
    parser.add_argument("--keyframe-batch", default="4", help="keyframes per keyframe-pass call: a number, auto or all")
    parser.add_argument("--anchors", type=int, default=1)
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
                            keyframe_window=window, anchors=args.anchors, keyframe_batch=args.keyframe_batch,
                            cut_period=bs * (window or 2), chunked=n in args.chunked,
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
