"""What both benchmark scripts share. Standard library only: the launchers import it before any torch."""

from __future__ import annotations

import resource
import sys

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
