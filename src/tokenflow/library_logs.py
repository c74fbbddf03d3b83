"""Quieting the model libraries' own logs and progress bars, for the faces that print their own (CLI, batch)."""

from __future__ import annotations

import os


def quiet_model_libraries() -> None:
    """diffusers, transformers and huggingface_hub: errors only, no progress bars of their own.

    Called when a command is about to run rather than at start-up: importing them takes seconds, which ``--help``
    and a mistyped option should not pay."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import diffusers
        import huggingface_hub
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.logging.set_verbosity_error()  # no per-retry lines for an unreachable hub
    except Exception:  # noqa: BLE001 - quieting libraries is best effort
        pass
