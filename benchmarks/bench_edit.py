"""Benchmark TokenFlow against the per-frame Plug-and-Play baseline: time, UNet work, memory and consistency.

    python benchmarks/bench_edit.py                       # tiny + mid at 8 and 32 frames, micro seeds 0 and 1
    python benchmarks/bench_edit.py --frames 8 32 128 --threads 1
    python benchmarks/bench_edit.py --models micro --micro-seeds 0 1 2 3 4
    python benchmarks/bench_edit.py --device cuda          # same command on a GPU (``--device auto`` picks it)

Every run -- one (model, frame count or micro seed, propagation mode) -- executes in a fresh Python subprocess,
so its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) and CUDA peak (``torch.cuda.max_memory_allocated``) are
its own. Linux keeps ``ru_maxrss`` across fork + exec, so a child starts with its parent's RSS as its "peak":
the process that launches the runs therefore imports only the standard library (models and clips are prepared
in a subprocess of their own), and each run also records ``VmHWM`` from ``/proc/self/status`` as a cross-check.
Inside the run, untimed: load the model and warm it up on one frame; timed: encode + DDIM inversion
(``TokenFlowEditor.invert``, no reconstruction unless ``--reconstruct``, no cache), the edit
(``TokenFlowEditor.edit``) and the VAE decode (``model.decode_latents``, ``--batch-size`` frames at a time).
After the peaks are read, the run computes the metrics (``tokenflow.metrics.evaluate``: flow warp error vs the
source floor, PSNR/SSIM vs the source, and the ground-truth warp error from the clip's known pan shift).

Models:
  tiny   ``tokenflow.testing.build_tiny_sd`` (random weights, default channels)
  mid    the same SD layout with more channels (random weights)
  micro  the micro *trained* SD-format model vendored in ``benchmarks/micro_model`` (96x64 native, VAE factor 4).
         Random-weight models make no content decisions, so per-frame editing does not flicker on them and the
         two modes' warp errors match; on the micro model it does, and TokenFlow should win. Its clips come from
         ``micro_model/make_clip.py`` with exactly known motion, so besides the flow-based warp error the
         ground-truth warp error is reported: edited frame i+1 moved back by the known shift onto frame i,
         absolute difference (0-255) averaged over pixels and channels, ``--gt-border`` px excluded on every side.

Writes ``--json`` and ``--plot`` and prints Markdown tables (with the machine) to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MID_KWARGS, QUIET_ENV, machine_info, peak_rss_mb

HERE = Path(__file__).resolve().parent
MICRO_DIR = HERE / "micro_model"
MICRO_MODEL = MICRO_DIR / "model"
MICRO_SIZE = 64  # the micro model's native short side (96x64)
MODES = ("tokenflow", "none")
MODE_LABEL = {"tokenflow": "TokenFlow", "none": "per-frame PnP"}


# ------------------------------------------------------------------------------------------------ helpers


def gt_warp_error(frames, shift, border: int) -> float:
    """Ground-truth warp error of a pan where frame i+1 is frame i moved left by ``shift`` px (0-255 scale).

    ``frame_{i+1}(x) == frame_i(x + shift)``: compare frame i's columns ``x + shift`` with frame i+1's columns
    ``x``, over all pixels more than ``border`` px from every edge of both frames, averaged over pairs. ``shift``:
    one for every pair, or a list with one per pair (negative: the pan goes back, as in a ping-pong clip).
    """
    import numpy as np

    f = np.asarray(frames, dtype=np.float64)
    h, w = f.shape[1:3]
    b = border
    shifts = [shift] * (len(f) - 1) if isinstance(shift, int) else list(shift)
    m = max(abs(s) for s in shifts)
    if w - 2 * b - m < 1 or h - 2 * b < 1:
        raise ValueError(f"--gt-border {border} with shift {m} leaves no pixels of a {w}x{h} frame")
    errors = []
    for i, s in enumerate(shifts):
        cur = f[i, b : h - b, b + max(s, 0) : w - b + min(s, 0)]
        nxt = f[i + 1, b : h - b, b - min(s, 0) : w - b - max(s, 0)]
        errors.append(np.abs(cur - nxt).mean())
    return float(np.mean(errors))


def _vm_hwm_mb() -> float | None:
    """Peak RSS of this process image (``VmHWM``; reset by exec, unlike ``ru_maxrss``), Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ worker


def run_worker(spec_path: Path) -> None:
    """One measured run, in its own process. Reads a spec JSON, writes result JSON + decoded frames (.npy)."""
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"spec": spec}
    t_start = time.perf_counter()

    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    try:
        import cv2

        cv2.setNumThreads(spec["threads"])
    except Exception:  # noqa: BLE001
        pass
    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    from tokenflow import TokenFlowEditor, load_model

    result["import_s"] = time.perf_counter() - t_start
    frames = np.load(spec["frames_path"])
    started = time.perf_counter()
    model = load_model(spec["model_path"], device=spec["device"], dtype=spec["dtype"])
    device = model.device
    result["load_s"] = time.perf_counter() - started
    editor = TokenFlowEditor(model)

    # Untimed warm-up on one frame (allocator, kernels, lazy inits) so that one-time costs do not land in a stage.
    with torch.no_grad():
        lat = model.encode_frames(torch.from_numpy(frames[:1]), 1)
        h, w = frames.shape[1:3]
        model.predict(lat, 1, model.condition([""], height=h, width=w))
        model.decode_latents(lat)
    _sync(torch, device)
    result["rss_after_load_mb"] = peak_rss_mb()
    result["vm_hwm_after_load_mb"] = _vm_hwm_mb()
    if device.type == "cuda":
        result["cuda_after_load_mb"] = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)

    result["load_average_before"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    best: dict = {}
    for _ in range(spec["repeat"]):
        stages, source, out, edited = _timed_stages(editor, frames, spec, device)
        best = {k: min(v, best.get(k, v)) for k, v in stages.items()}
    result["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result.update(best)
    result["peak_rss_mb"] = peak_rss_mb()
    result["vm_hwm_mb"] = _vm_hwm_mb()
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["cuda_device"] = torch.cuda.get_device_name(device)
    result["device"] = str(device)
    result["dtype"] = str(model.dtype).replace("torch.", "")
    result["unet_frame_evaluations"] = int(out.unet_frame_evaluations)
    result["inversion_psnr"] = source.reconstruction_psnr
    result["latent_shape"] = list(out.latents.shape)
    result["unet_params"] = sum(p.numel() for p in model.unet.parameters())
    result["vae_params"] = sum(p.numel() for p in model.vae.parameters())
    edited = edited.numpy()
    bs = spec["batch_size"]

    # Untimed extras for the ground-truth table: VAE round trip and DDIM reconstruction of the source.
    if spec.get("extras"):
        from tokenflow.inversion import ddim_reconstruct

        with torch.no_grad():
            vae = torch.cat([model.decode_latents(source.clean[i : i + bs]) for i in range(0, len(source.clean), bs)])
            cond = model.condition([spec["inversion_prompt"]], height=frames.shape[1], width=frames.shape[2])
            recon = ddim_reconstruct(model, source.noisy, cond, bs)
            recon = torch.cat([model.decode_latents(recon[i : i + bs]) for i in range(0, len(recon), bs)])
        extras = dict(vae=vae.numpy(), recon=recon.numpy())
    else:
        extras = {}
    if spec.get("keep_frames"):
        for name, video in dict(edited=edited, **extras).items():
            np.save(Path(spec["out_dir"], f"{name}.npy"), video)

    started = time.perf_counter()
    add_metrics(result, frames, edited, extras, spec)
    result["metrics_s"] = time.perf_counter() - started
    Path(spec["out_dir"], "result.json").write_text(json.dumps(result, indent=1, default=str))


def _timed_stages(editor, frames, spec: dict, device):
    """encode+inversion, edit, decode: wall seconds of each, and their outputs."""
    import torch
    from tokenflow import EditConfig

    model = editor.model
    stages = {}
    started = time.perf_counter()
    source = editor.invert(
        torch.from_numpy(frames),
        inversion_prompt=spec["inversion_prompt"],
        steps=spec["steps"],
        inversion=spec.get("inversion", "ddim"),
        inversion_steps=spec["inversion_steps"],
        batch_size=spec["batch_size"],
        cache=None,
        reconstruct=spec["reconstruct"],
        progress=False,
    )
    _sync(torch, device)
    stages["invert_s"] = time.perf_counter() - started

    config = EditConfig(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        inversion_prompt=spec["inversion_prompt"],
        steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        batch_size=spec["batch_size"],
        propagation=spec["mode"],
        blending="linear",
        seed=spec["seed"],
        keyframe_window=spec.get("keyframe_window", "auto"),
    )
    started = time.perf_counter()
    out = editor.edit(source, config, progress=False)
    _sync(torch, device)
    stages["edit_s"] = time.perf_counter() - started
    stages["edit_internal_s"] = out.seconds

    started = time.perf_counter()
    bs = spec["batch_size"]
    edited = torch.cat([model.decode_latents(out.latents[i : i + bs]) for i in range(0, len(out.latents), bs)])
    _sync(torch, device)
    stages["decode_s"] = time.perf_counter() - started
    stages["total_s"] = stages["invert_s"] + stages["edit_s"] + stages["decode_s"]
    return stages, source, out, edited


# ------------------------------------------------------------------------------------------------ parent


def run_prepare(plan_path: Path) -> None:
    """Subprocess: build the random-weight models, write the clips, resolve the device. Writes ``prepared.json``."""
    request = json.loads(Path(plan_path).read_text())
    import numpy as np
    import torch

    torch.set_num_threads(request["threads"])
    from tokenflow.models import resolve_device

    work = Path(request["work"])
    device = resolve_device(request["device"])
    machine = dict(torch=torch.__version__, device=str(device))
    try:
        import diffusers

        machine["diffusers"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        pass
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    models = {k: str(v) for k, v in build_models(request["models"], work / "models").items()}
    clips = []
    for c in request["clips"]:
        if c["kind"] == "pan":
            frames = pan_clip(c["frames"], c["size"], c["shift"])
            meta = {}
        else:
            frames, meta = micro_clip(work / "clips", c["seed"], c["shift"], c["frames"])
        path = work / "clips" / f"{c['name']}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, frames)
        clips.append(dict(c, path=str(path), width=int(frames.shape[2]), height=int(frames.shape[1]),
                          frames=int(frames.shape[0]), meta=meta))
    Path(request["out"]).write_text(json.dumps(dict(machine=machine, models=models, clips=clips), indent=1))


def build_models(names: list[str], root: Path) -> dict[str, Path]:
    from tokenflow.testing import build_tiny_sd

    paths = {}
    for name in names:
        if name == "tiny":
            paths[name] = build_tiny_sd(root / "tiny")
        elif name == "mid":
            paths[name] = build_tiny_sd(root / "mid", **MID_KWARGS)
        elif name == "micro":
            if not (MICRO_MODEL / "model_index.json").is_file():
                raise SystemExit(f"micro model missing: {MICRO_MODEL} (vendored from ../shared/micro-model/model)")
            paths[name] = MICRO_MODEL
    return paths


def pan_clip(n: int, size: int, shift: int):
    """Camera pan across scikit-image's astronaut, short side ``size`` (3:2), frame i+1 = frame i moved ``shift`` px."""
    from tokenflow.testing import pan_frames

    width = (size * 3 // 2) // 8 * 8
    return pan_frames(n, width, size, shift, "astronaut")


def micro_clip(root: Path, seed: int, shift: int, n: int, pingpong: int = 32):
    """A clip of the micro model's world from ``make_clip.make`` with exact known motion, and its metadata.

    Its scenes keep every object in view for the whole pan, which a pan longer than about 32 frames at 2 px cannot
    do: longer clips go back and forth over a ``pingpong``-frame pan (frames 0..31, 30..0, 1..31, ...), with
    ``meta["shifts"]`` the signed shift of every pair."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(MICRO_DIR))
    try:
        import make_clip
    finally:
        sys.path.remove(str(MICRO_DIR))
    out = root / f"micro-seed{seed}-shift{shift}-{n}"
    meta = make_clip.make(str(out), seed, shift, min(n, pingpong))
    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((out / "frames").glob("*.png"))])
    if n > pingpong:
        order, step = [0], 1
        while len(order) < n:
            if not 0 <= order[-1] + step < pingpong:
                step = -step
            order.append(order[-1] + step)
        meta["shifts"] = [shift * (b - a) for a, b in zip(order, order[1:])]
        frames = frames[order]
    return frames, meta


def _child(flag: str, spec_path: Path, log: Path, args) -> int:
    env = dict(os.environ, **QUIET_ENV, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), flag, str(spec_path)],
                              stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=args.run_timeout)
    return proc.returncode


def launch(spec: dict, work: Path, args) -> dict:
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log = out_dir / "worker.log"
    started = time.perf_counter()
    returncode = _child("--worker", spec_path, log, args)
    wall = time.perf_counter() - started
    result_path = out_dir / "result.json"
    if returncode != 0 or not result_path.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        print(f"  !! run failed (exit {returncode}); log tail:\n{tail}", file=sys.stderr)
        return dict(spec=spec, error=f"exit {returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                    subprocess_wall_s=wall)
    result = json.loads(result_path.read_text())
    result["subprocess_wall_s"] = wall
    return result


def add_metrics(result: dict, source_frames, edited, extras: dict, spec: dict) -> None:
    """Flow-based metrics of the edit and ground-truth warp errors from the known pan shift (in the worker)."""
    from tokenflow.metrics import evaluate

    report = evaluate(source_frames, edited, flow=spec["flow"])
    summary = report.summary()
    result["metrics"] = {k: summary[k] for k in ("warp_error", "warp_error_source", "psnr", "ssim")}
    shift, border = spec.get("shifts") or spec.get("shift"), spec["gt_border"]
    if shift is not None:
        gt = dict(edited=gt_warp_error(edited, shift, border), source=gt_warp_error(source_frames, shift, border))
        for name, video in extras.items():
            gt[name] = gt_warp_error(video, shift, border)
        result["gt_warp_error"] = gt


# ------------------------------------------------------------------------------------------------ reporting


def _f(value, fmt="{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def markdown(report: dict) -> str:
    m = report["machine"]
    runs = [r for r in report["runs"] if "error" not in r]
    cuda = any("cuda_peak_mb" in r for r in runs)
    lines = [
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"torch {m['torch']} with {m['threads']} thread(s), device `{m['device']}`"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; load average at start {m['load_average_at_start']}. Total benchmark wall time {report['total_s']:.0f} s.",
        "",
        "| model | frames | size | mode | encode+inversion (s) | edit (s) | decode (s) | total (s) | UNet frame evals "
        "| peak RSS (MB) [after load] |" + (" peak CUDA (MB) |" if cuda else "")
        + " warp error | source floor | PSNR (dB) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|---:|",
    ]
    for r in report["runs"]:
        s = r["spec"]
        label = s["model"] + (f" seed {s['seed_clip']}" if s["model"] == "micro" else "")
        if "error" in r:
            lines.append(f"| {label} | {s['frames']} | {s['size_label']} | {MODE_LABEL[s['mode']]} | failed: {r['error'][:80]} |")
            continue
        met = r.get("metrics", {})
        lines.append(
            f"| {label} | {s['frames']} | {s['size_label']} | {MODE_LABEL[s['mode']]} | {_f(r['invert_s'])} "
            f"| {_f(r['edit_s'])} | {_f(r['decode_s'])} | {_f(r['total_s'])} | {r['unet_frame_evaluations']} "
            f"| {_f(r['peak_rss_mb'], '{:.0f}')} [{_f(r['rss_after_load_mb'], '{:.0f}')}] |" + (f" {_f(r.get('cuda_peak_mb'), '{:.0f}')} |" if cuda else "")
            + f" {_f(met.get('warp_error'))} | {_f(met.get('warp_error_source'))} | {_f(met.get('psnr'))} |"
        )
    ratios = report.get("ratios", [])
    if ratios:
        lines += [
            "",
            "Warp-error ratio TokenFlow / per-frame (lower is better; < 1 means TokenFlow is more consistent). "
            "GT = ground truth from the known shift (0-255, border excluded); flow = `tokenflow.metrics` warp error.",
            "",
            "| model | clip | frames | GT TokenFlow | GT per-frame | **GT ratio** | flow TokenFlow | flow per-frame "
            "| flow ratio | GT source | GT VAE round trip | GT inversion recon |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for q in ratios:
            lines.append(
                f"| {q['model']} | {q['clip']} | {q['frames']} | {_f(q.get('gt_tokenflow'))} | {_f(q.get('gt_none'))} "
                f"| **{_f(q.get('gt_ratio'), '{:.3f}')}** | {_f(q['flow_tokenflow'])} | {_f(q['flow_none'])} "
                f"| {_f(q['flow_ratio'], '{:.3f}')} | {_f(q.get('gt_source'))} | {_f(q.get('gt_vae'))} "
                f"| {_f(q.get('gt_recon'))} |"
            )
        lines += ["", "Editing loop cost per UNet frame evaluation (edit stage wall time / evaluations):", "",
                  "| model | clip | frames | TokenFlow (ms) | per-frame (ms) | **ratio** |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {q['model']} | {q['clip']} | {q['frames']} | {q['ms_per_eval_tokenflow']:.2f} "
                  f"| {q['ms_per_eval_none']:.2f} | **{q['loop_cost_ratio']:.3f}** |" for q in ratios]
        micro = [q["gt_ratio"] for q in ratios if q["model"] == "micro" and q.get("gt_ratio") is not None]
        if micro:
            lines += ["", f"Micro model GT ratio: mean {sum(micro) / len(micro):.3f}, range "
                          f"{min(micro):.3f}–{max(micro):.3f} over {len(micro)} clip(s) "
                          "(public reference: 0.53–0.85, mean 0.71)."]
    return "\n".join(lines)


def compute_ratios(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for r in runs:
        if "error" in r or "metrics" not in r:
            continue
        s = r["spec"]
        key = (s["model"], s["clip_label"], s["frames"])
        groups.setdefault(key, {})[s["mode"]] = r
    out = []
    for (model, clip, frames), by_mode in groups.items():
        if not all(m in by_mode for m in MODES):
            continue
        tf, pf = by_mode["tokenflow"], by_mode["none"]
        q = dict(model=model, clip=clip, frames=frames,
                 flow_tokenflow=tf["metrics"]["warp_error"], flow_none=pf["metrics"]["warp_error"])
        q["flow_ratio"] = q["flow_tokenflow"] / q["flow_none"] if q["flow_none"] else None
        # the editing loop's cost per UNet frame evaluation: TokenFlow's extra work (keyframe attention, the
        # nearest-neighbour field, blending) over the per-frame baseline's, whose loop is the UNet alone
        for mode, r in (("tokenflow", tf), ("none", pf)):
            q[f"ms_per_eval_{mode}"] = 1000 * r["edit_s"] / r["unet_frame_evaluations"]
        q["loop_cost_ratio"] = q["ms_per_eval_tokenflow"] / q["ms_per_eval_none"]
        if "gt_warp_error" in tf and "gt_warp_error" in pf:
            q["gt_tokenflow"] = tf["gt_warp_error"]["edited"]
            q["gt_none"] = pf["gt_warp_error"]["edited"]
            q["gt_ratio"] = q["gt_tokenflow"] / q["gt_none"] if q["gt_none"] else None
            q["gt_source"] = tf["gt_warp_error"]["source"]
            for name in ("vae", "recon"):
                for r in (tf, pf):
                    if name in r["gt_warp_error"]:
                        q[f"gt_{name}"] = r["gt_warp_error"][name]
        out.append(q)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    colors = {"tiny": "tab:blue", "mid": "tab:orange", "micro": "tab:green"}
    styles = {"tokenflow": "-", "none": "--"}
    markers = {"tokenflow": "o", "none": "s"}
    cuda = any("cuda_peak_mb" in r for r in runs)
    mem_key, mem_label = (("cuda_peak_mb", "peak CUDA memory allocated (MB)") if cuda
                          else ("peak_rss_mb", "peak RSS of the run's process (MB)"))
    for model in dict.fromkeys(r["spec"]["model"] for r in runs):
        for mode in MODES:
            sel = [r for r in runs if r["spec"]["model"] == model and r["spec"]["mode"] == mode]
            if not sel:
                continue
            by_n: dict[int, list] = {}
            for r in sel:
                by_n.setdefault(r["spec"]["frames"], []).append(r)
            ns = sorted(by_n)
            t = [sum(r["total_s"] for r in by_n[n]) / len(by_n[n]) for n in ns]
            mem = [max(r[mem_key] for r in by_n[n]) for n in ns]
            label = f"{model} {MODE_LABEL[mode]}"
            kw = dict(color=colors.get(model), linestyle=styles[mode], marker=markers[mode], label=label)
            axes[0].plot(ns, t, **kw)
            axes[1].plot(ns, mem, **kw)
    axes[0].set_ylabel("time: encode+inversion + edit + decode (s)")
    axes[1].set_ylabel(mem_label)
    m = report["machine"]
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(NullFormatter())
    for ax in axes:
        ax.set_xlabel("frames")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["spec"]["frames"] for r in runs}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"TokenFlow vs per-frame PnP on {m['device']} ({m['cpu']}, {m['threads']} thread(s)); "
                 "micro: 16-frame clips, mean over seeds", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    try:
        all_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        all_cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=("tiny", "mid", "micro"), default=["tiny", "mid", "micro"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="propagation modes")
    p.add_argument("--frames", nargs="+", type=int, default=[8, 32], help="frame counts for tiny/mid (e.g. 8 32 128)")
    p.add_argument("--size", type=int, default=128, help="short side of the tiny/mid clips (3:2 pan)")
    p.add_argument("--shift", type=int, default=4, help="pan speed of the tiny/mid clips, px per frame")
    p.add_argument("--steps", type=int, default=10, help="editing steps for tiny/mid")
    p.add_argument("--inversion-steps", type=int, default=20, help="inversion steps for tiny/mid")
    p.add_argument("--inversion", choices=("ddim", "fixed-point"), default="ddim",
                   help="inversion scheme (ddim: the one the recorded figures used; fixed-point: the tool's default)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for tiny/mid")
    p.add_argument("--prompt", default="a marble statue of an astronaut", help="edit prompt for tiny/mid")
    p.add_argument("--micro-seeds", nargs="+", type=int, default=[0, 1], help="make_clip.py seeds for micro")
    p.add_argument("--micro-shift", type=int, default=None,
                   help="micro pan shift; default the reference protocol: 2 for seeds 0-2, 3 otherwise")
    p.add_argument("--keyframe-window", default="auto",
                   help="TokenFlow's keyframe attention: auto (the tool's default), full, or K keyframes each side")
    p.add_argument("--micro-frames", type=int, nargs="+", default=[16],
                   help="frame counts of the micro clips (e.g. 16 32 64 128: the editing-loop cost study)")
    p.add_argument("--micro-steps", type=int, default=50, help="inversion and editing steps for micro")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--micro-edit", type=int, nargs="+", default=[0],
                   help="which of the clip's edit prompts (0: object colour, 1: background texture)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0, help="keyframe sampling seed")
    p.add_argument("--reconstruct", action="store_true",
                   help="include the inversion's reconstruction check in the timed stage (as the CLI does)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time the three stages this many times in each run and keep each stage's minimum")
    p.add_argument("--gt-border", type=int, default=4, help="px excluded at every edge for the ground-truth warp error")
    p.add_argument("--flow", default="dis", help="optical flow for tokenflow.metrics (dis, farneback, raft)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), float32, float16, bfloat16")
    p.add_argument("--threads", type=int, default=all_cores, help="torch threads (default: all usable cores)")
    p.add_argument("--json", type=Path, default=HERE / "results" / "bench.json")
    p.add_argument("--plot", type=Path, default=HERE / "results" / "bench.png")
    p.add_argument("--workdir", type=Path, default=None, help="keep models/clips/logs here (default: temporary)")
    p.add_argument("--keep-frames", action="store_true", help="keep the decoded frames (.npy) in --workdir")
    p.add_argument("--run-timeout", type=float, default=3600, help="seconds before a single run is killed")
    p.add_argument("--from-json", type=Path, default=None,
                   help="run nothing: redraw --plot and reprint the tables from a results JSON written earlier")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        return run_worker(args.worker)
    if args.prepare is not None:
        return run_prepare(args.prepare)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        report["markdown"] = markdown(report)
        plot(report, args.plot)
        print(report["markdown"])
        return None
    # From here on: standard library only until every run is done (see the module docstring on ru_maxrss).
    t_all = time.perf_counter()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_edit-")
        work = Path(tmp.name)
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)

    clips = []
    for model in args.models:
        if model in ("tiny", "mid"):
            clips += [dict(kind="pan", name=f"pan-{n}-{args.size}-{args.shift}", frames=n, size=args.size,
                           shift=args.shift) for n in args.frames]
        else:
            for seed in args.micro_seeds:
                shift = args.micro_shift if args.micro_shift is not None else (2 if seed <= 2 else 3)
                clips += [dict(kind="micro", name=f"micro-seed{seed}-shift{shift}-{n}", frames=n, seed=seed,
                               shift=shift) for n in args.micro_frames]
    clips = list({c["name"]: c for c in clips}.values())
    request = dict(work=str(work), models=args.models, clips=clips, device=args.device, threads=args.threads,
                   out=str(work / "prepared.json"))
    (work / "prepare.json").write_text(json.dumps(request, indent=1))
    print("preparing models and clips ...", file=sys.stderr, flush=True)
    if _child("--prepare", work / "prepare.json", work / "prepare.log", args) != 0:
        print((work / "prepare.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise SystemExit("preparing the models and clips failed (log above)")
    prepared = json.loads((work / "prepared.json").read_text())
    machine = machine_info(args.threads, prepared)
    device = machine["device"]
    print(f"# bench_edit on {machine['cpu']} ({machine['usable_cores']} cores, {args.threads} thread(s)), "
          f"device {device}, torch {machine['torch']}", file=sys.stderr)
    clip_by_name = {c["name"]: c for c in prepared["clips"]}

    common = dict(inversion=args.inversion, keyframe_window=args.keyframe_window, device=device, dtype=args.dtype,
                  threads=args.threads, guidance_scale=args.guidance_scale,
                  seed=args.seed, reconstruct=args.reconstruct, repeat=args.repeat, flow=args.flow,
                  gt_border=args.gt_border, keep_frames=args.keep_frames)
    plan = []
    for model in args.models:
        if model in ("tiny", "mid"):
            for n in args.frames:
                c = clip_by_name[f"pan-{n}-{args.size}-{args.shift}"]
                for i, mode in enumerate(args.modes):
                    plan.append(dict(common, model=model, model_path=prepared["models"][model], mode=mode,
                                     frames=c["frames"], frames_path=c["path"], clip_label=f"pan {args.shift}px",
                                     size_label=f"{c['width']}x{c['height']}", steps=args.steps,
                                     inversion_steps=args.inversion_steps, batch_size=args.batch_size,
                                     prompt=args.prompt, inversion_prompt="", negative_prompt="",
                                     shift=args.shift, extras=(i == 0)))
        else:
            for seed, n, e in itertools.product(args.micro_seeds, args.micro_frames, args.micro_edit):
                shift = args.micro_shift if args.micro_shift is not None else (2 if seed <= 2 else 3)
                c = clip_by_name[f"micro-seed{seed}-shift{shift}-{n}"]
                meta = c["meta"]
                for i, mode in enumerate(args.modes):
                    plan.append(dict(common, model="micro", model_path=prepared["models"]["micro"], mode=mode,
                                     frames=c["frames"], frames_path=c["path"], seed_clip=seed,
                                     clip_label=f"seed {seed}, shift {shift}, edit {e} ({meta['edits'][e]['kind']})",
                                     size_label=f"{c['width']}x{c['height']}", steps=args.micro_steps,
                                     inversion_steps=args.micro_steps, batch_size=args.micro_batch_size,
                                     prompt=meta["edits"][e]["prompt"], inversion_prompt=meta["caption"],
                                     negative_prompt="", shift=shift, shifts=meta.get("shifts"), extras=(i == 0)))

    runs = []
    for k, spec in enumerate(plan):
        spec["out_dir"] = str(work / "runs" / f"{k:03d}-{spec['model']}-{spec['frames']}-{spec['mode']}")
        what = f"{spec['model']} {spec['clip_label']} {spec['frames']} frames {MODE_LABEL[spec['mode']]}"
        print(f"[{k + 1}/{len(plan)}] {what} ...", file=sys.stderr, flush=True)
        result = launch(spec, work, args)
        if "error" not in result:
            gt = result.get("gt_warp_error", {}).get("edited")
            print(f"    {result['total_s']:.1f} s (inv {result['invert_s']:.1f} / edit {result['edit_s']:.1f} / "
                  f"dec {result['decode_s']:.1f}), {result['unet_frame_evaluations']} UNet frame evals, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB (VmHWM {result['vm_hwm_mb'] or 0:.0f}), "
                  f"warp {result['metrics']['warp_error']:.2f}" + (f", GT warp {gt:.2f}" if gt is not None else ""),
                  file=sys.stderr, flush=True)
        runs.append(result)

    report = dict(machine=machine, args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  runs=runs, ratios=compute_ratios(runs))
    micro = [q["gt_ratio"] for q in report["ratios"] if q["model"] == "micro" and q.get("gt_ratio") is not None]
    if micro:
        report["micro_gt_ratio"] = dict(mean=sum(micro) / len(micro), min=min(micro), max=max(micro), clips=len(micro),
                                        reference="0.53-0.85, mean 0.71 (public reference code, 10 cases)")
    report["total_s"] = time.perf_counter() - t_all
    report["launcher_peak_rss_mb"] = peak_rss_mb()  # every run's ru_maxrss starts at least this high
    # paths into the (temporary) workdir mean nothing in committed results
    for r in report["runs"]:
        for key in ("frames_path", "out_dir", "model_path"):
            base = HERE if (key == "model_path" and r["spec"]["model"] == "micro") else work
            r["spec"][key] = os.path.relpath(r["spec"][key], base)
    report["markdown"] = markdown(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    plot(report, args.plot)
    print(report["markdown"])
    print(f"\nwrote {args.json} and {args.plot}; total {report['total_s']:.0f} s", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
