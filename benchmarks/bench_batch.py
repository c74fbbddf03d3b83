"""``tokenflow batch`` throughput: jobs/hour for N jobs with 1 and with 2 workers (CPU, tiny model by default).

    python benchmarks/bench_batch.py                                  # 4 jobs, 1 and 2 workers, tiny model
    python benchmarks/bench_batch.py --jobs 8 --workers 1 2 4 --frames 16
    python benchmarks/bench_batch.py --model PATH_OR_ID --size 512 --device cuda --gpus-per-job 1   # a GPU box

Each configuration is one ``run_batch`` call (the same code as ``tokenflow batch``) on a fresh local Ray instance
with a fresh inversion cache and output folder, so every job loads nothing from an earlier run: each worker loads
the model once, each job reads, inverts and edits its own clip (4 pan clips over different photos). Reported: wall
time of the whole call (Ray start, worker start and model load included) and jobs/hour from it, plus jobs/hour
without the Ray start (``ray_start_seconds`` of the summary). CPU workers share the cores: each gets
cores / workers torch threads. Writes ``--json`` (default ``benchmarks/results/bench_batch.json``) and prints a
Markdown table with the machine (``lscpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGES = ("astronaut", "coffee", "chelsea", "rocket")


def machine() -> dict:
    info = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), python=platform.python_version())
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Core(s) per socket", "Thread(s) per core", "Socket(s)"):
                info[key.strip()] = value.strip()
        info["cpu"] = info.get("Model name", info["cpu"])
    except (OSError, subprocess.CalledProcessError):
        pass
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4, help="Jobs (one clip, one prompt each).")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to compare.")
    parser.add_argument("--model", default=None, help="Model (default: a tiny random-weight SD built here).")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--inversion-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpus-per-job", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per CPU worker (default: cores / workers)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "bench_batch.json")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenflow.batch import run_batch
    from tokenflow.testing import make_pan_clip

    root = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        model = args.model
        if model is None:
            from tokenflow.testing import build_tiny_sd

            model = str(build_tiny_sd(root / "tiny-sd"))
        lines = [f"defaults:\n  model: {model}\n  size: {args.size}\n  steps: {args.steps}\n"
                 f"  inversion: ddim\n  inversion_steps: {args.inversion_steps}\n  batch_size: {args.batch_size}\n"
                 f"  device: {args.device}\njobs:\n"]
        for i in range(args.jobs):
            clip = root / f"clip{i}.mp4"
            make_pan_clip(clip, num_frames=args.frames, width=args.size * 3 // 2, height=args.size, shift=4, fps=12,
                          image=IMAGES[i % len(IMAGES)], top=(i // len(IMAGES)) * 7)
            lines.append(f"  - video: {clip}\n    prompt: a watercolor painting number {i}\n")
        jobs = root / "jobs.yaml"
        jobs.write_text("".join(lines))

        runs = []
        for count in args.workers:
            out, cache = root / f"out-{count}", root / f"cache-{count}"
            started = time.perf_counter()
            result = run_batch(jobs, out, cache_dir=cache, workers=count, gpus_per_job=args.gpus_per_job, quiet=True,
                               threads=args.threads)
            wall = time.perf_counter() - started
            summary = result.summary
            assert result.exit_code == 0, [p["error"] for j in summary["jobs"] for p in j["prompts"]]
            ray_start = summary.get("ray_start_seconds") or 0.0
            per_job = [p["seconds"] for j in summary["jobs"] for p in j["prompts"]]
            runs.append(dict(workers=count, jobs=args.jobs, wall_s=round(wall, 2), ray_start_s=ray_start,
                             jobs_per_hour=round(args.jobs / wall * 3600, 1),
                             jobs_per_hour_without_ray_start=round(args.jobs / (wall - ray_start) * 3600, 1),
                             mean_job_s=round(sum(per_job) / len(per_job), 2), job_s=per_job,
                             threads_per_worker=summary["ray"]["threads_per_worker"],
                             job_timings=[p["timings"] for j in summary["jobs"] for p in j["prompts"]]))
            print(f"{count} worker(s): {wall:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    report = dict(machine=machine(), settings={k: v for k, v in vars(args).items() if k != "json"}, runs=runs)
    report["settings"]["model"] = args.model or "tiny (tokenflow.testing.build_tiny_sd, random weights)"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    m = report["machine"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores (load average at start {m['load_average_at_start']})\n")
    print(f"{args.jobs} jobs, {args.frames} frames at --size {args.size}, {args.steps} steps / "
          f"{args.inversion_steps} inversion steps, {report['settings']['model']}\n")
    print("| workers | torch threads each | wall (s) | Ray start (s) | mean job (s) | jobs/hour "
          "| jobs/hour w/o Ray start |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['workers']} | {r['threads_per_worker']} | {r['wall_s']} | {r['ray_start_s']} | {r['mean_job_s']} "
              f"| {r['jobs_per_hour']} | {r['jobs_per_hour_without_ray_start']} |")


if __name__ == "__main__":
    main()
