"""What both benchmark scripts share. Standard library only: the launchers import it before any torch."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

# "mid": SD's layout (4 UNet levels, cross-attention in 3, VAE factor 8) with 4x the tiny model's channels.
MID_KWARGS = dict(
    block_out_channels=(32, 64, 128, 128),
    attention_head_dim=(4, 8, 8, 8),
    cross_attention_dim=64,
    vae_channels=(16, 32, 64, 64),
)

QUIET_ENV = dict(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_VERBOSITY="error",
    DIFFUSERS_VERBOSITY="error",
    TOKENIZERS_PARALLELISM="false",
    PYTHONWARNINGS="ignore",
)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (``ru_maxrss``: bytes on macOS, KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def machine_info(threads: int, prepared: dict) -> dict:
    """The machine a run used. Stdlib only; torch-side facts come from ``prepared["machine"]``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        memory_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        memory_gb = None
    info = dict(
        cpu=cpu,
        logical_cores=os.cpu_count(),
        usable_cores=usable,
        threads=threads,
        memory_gb=memory_gb,
        load_average_at_start=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        python=platform.python_version(),
        platform=platform.platform(),
    )
    info.update(prepared["machine"])
    return info
