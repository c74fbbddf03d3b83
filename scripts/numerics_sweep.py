"""Run the test suite under other CPU kernels and thread counts; tabulate the worst difference of each numerically
sensitive test (the ``record_difference`` fixture) into docs/numerics.md.

    python scripts/numerics_sweep.py                      # every variant x 1 and 2 threads, the whole suite
    python scripts/numerics_sweep.py -m numerics          # only the numerically sensitive tests
    python scripts/numerics_sweep.py --threads 1 --jobs 2 # one-thread runs two at a time (a two-core machine)
    python scripts/numerics_sweep.py --variants 3,5       # only some variants (--help lists them)
    python scripts/numerics_sweep.py --table-only --log LOG   # re-tabulate an existing log

Each variant makes the libraries pick other kernels, so other rounding: ``ATEN_CPU_CAPABILITY`` (torch's own
vectorised kernels), ``MKL_CBWR`` (MKL's GEMM code path), ``ONEDNN_MAX_CPU_ISA`` (oneDNN's convolutions).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [
    {},
    {"ATEN_CPU_CAPABILITY": "default"},
    {"ATEN_CPU_CAPABILITY": "avx2"},
    {"ATEN_CPU_CAPABILITY": "avx512"},
    {"MKL_CBWR": "COMPATIBLE"},
    {"MKL_CBWR": "AVX2"},
    {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "default"},  # CI's extra pass
]
# the memory benchmark-style test takes minutes and compares byte counts, not floats
SLOW = "tests/test_long_video.py::test_host_memory_of_a_whole_edit_beyond_the_per_frame_latents_does_not_grow_with_the_video"

log = logging.getLogger("numerics_sweep")


def _label(variant: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in variant.items()) or "(defaults)"


def _run_one(pytest_args: list[str], log_path: Path, variant: dict, n: int, full: bool) -> dict:
    env = dict(os.environ, **variant, TOKENFLOW_TEST_THREADS=str(n), TOKENFLOW_NUMERICS_LOG=str(log_path))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
    if not full:
        args += ["--deselect", SLOW]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    # each run's whole output beside the log, so a failure that does not reproduce can still be read
    runs = log_path.with_suffix(".runs")
    runs.mkdir(exist_ok=True)
    name = "".join(c if c.isalnum() else "_" for c in _label(variant)).strip("_") or "defaults"
    (runs / f"{name}-{n}thr.txt").write_text(proc.stdout + proc.stderr)
    lines = proc.stdout.strip().splitlines()
    last = (lines or ["(no output)"])[-1]
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in lines if line.startswith("FAILED ")]
    outcome = {"variant": _label(variant), "threads": n, "returncode": proc.returncode, "summary": last,
               "failed": failed}
    log.info("%-80s threads=%d  %s", _label(variant), n, last)
    for test in failed:  # which ones, so a failure that does not reproduce is still known
        log.info("    failed: %s", test)
    with _outcomes_path(log_path).open("a") as f:  # kept, so --append and --table-only tabulate every run
        f.write(json.dumps(outcome) + "\n")
    return outcome


def run(pytest_args: list[str], log_path: Path, threads: tuple[int, ...], full: bool, variants: list[dict],
        jobs: int = 1) -> list[dict]:
    """Every variant at one thread count before the next; ``jobs`` runs at once (only for one-thread runs: two
    two-thread runs on a two-core machine would oversubscribe it)."""
    outcomes = []
    for n in threads:
        with ThreadPoolExecutor(max_workers=jobs if n == 1 else 1) as pool:
            outcomes += list(pool.map(lambda v: _run_one(pytest_args, log_path, v, n, full), variants))
    return outcomes


def _outcomes_path(log_path: Path) -> Path:
    return log_path.with_suffix(".outcomes.jsonl")


def table(log_path: Path, outcomes: list[dict]) -> str:
    worst: dict[tuple[str, str], dict] = {}
    seen: dict[tuple[str, str], set] = defaultdict(set)
    for line in log_path.read_text().splitlines():
        e = json.loads(line)
        key = (e["test"], e["what"])
        variant = _label({k: e[k] for k in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if e.get(k)})
        seen[key].add(f"{variant}, {e['threads']} thr")
        if key not in worst or e["value"] > worst[key]["value"]:
            worst[key] = dict(e, variant=variant)
    cpu = platform.processor() or platform.machine()
    try:
        import torch

        cpu = f"{cpu}, torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}"
    except ImportError:
        pass
    lines = [
        "# Numerics across CPU kernels",
        "",
        f"Measured by `scripts/numerics_sweep.py` on {cpu}. Each row: the worst value a numerically sensitive test",
        "recorded over every variant and thread count it ran under, and where it occurred. The bound each test",
        "asserts is argued next to it in the test.",
        "",
        "| test | measured | worst | under | runs |",
        "|---|---|---|---|---|",
    ]
    for (test, what), e in sorted(worst.items()):
        lines.append(f"| `{test}` | {what} | {e['value']:.3g} | {e['variant']}, {e['threads']} thr |"
                     f" {len(seen[(test, what)])} |")
    if outcomes:
        lines += ["", "| variant | threads | result |", "|---|---|---|"]
        lines += [f"| {o['variant']} | {o['threads']} | {o['summary']}"
                  + (f" ({', '.join(o['failed'])})" if o["failed"] else "") + " |" for o in outcomes]
    return "\n".join(lines) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", dest="marker", help="only tests with this pytest marker (e.g. numerics)")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, comma separated")
    parser.add_argument("--full", action="store_true", help=f"also run the slow memory test ({SLOW})")
    parser.add_argument("--log", type=Path, default=ROOT / "numerics-log.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "numerics.md")
    parser.add_argument("--table-only", action="store_true", help="tabulate --log without running anything")
    parser.add_argument("--append", action="store_true", help="add to --log instead of starting it anew")
    parser.add_argument("--variants", help="comma-separated indices of the variants to run (default all): "
                        + ", ".join(f"{i}: {_label(v)}" for i, v in enumerate(VARIANTS)))
    parser.add_argument("--jobs", type=int, default=1, help="one-thread runs at once (e.g. 2 on a two-core machine)")
    args = parser.parse_args()
    outcomes = []
    if not args.table_only:
        if not args.append:
            args.log.unlink(missing_ok=True)
            _outcomes_path(args.log).unlink(missing_ok=True)
        pytest_args = ["-m", args.marker] if args.marker else []
        variants = ([VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS)
        outcomes = run(pytest_args, args.log, tuple(int(t) for t in args.threads.split(",")), args.full, variants,
                       args.jobs)
    if _outcomes_path(args.log).exists():  # every run of this log, earlier invocations (--append) included
        outcomes = [json.loads(line) for line in _outcomes_path(args.log).read_text().splitlines()]
    args.out.write_text(table(args.log, outcomes))
    log.info("wrote %s", args.out)
    return 0 if all(o["returncode"] == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
