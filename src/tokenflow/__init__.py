"""TokenFlow: consistent text-driven video editing with any Stable Diffusion checkpoint.

Python API::

    from tokenflow import TokenFlowEditor, EditConfig, RunOptions, edit_video
    result = edit_video(RunOptions(video="clip.mp4", prompt="a shiny silver robot"))

Heavy modules (torch, diffusers) are imported on first use, not at ``import tokenflow``.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "TokenFlowEditor": "editor",
    "EditConfig": "editor",
    "EditOutput": "editor",
    "SourceLatents": "inversion",
    "InversionCache": "inversion",
    "RunOptions": "runner",
    "RunResult": "runner",
    "edit_video": "runner",
    "invert_video": "runner",
    "load_model": "models",
    "TokenFlowError": "errors",
    "InputError": "errors",
    "ModelLoadError": "errors",
    "Cancelled": "events",
    "ProgressEvent": "events",
    "TokenFlowPipeline": "pipeline",
    "TokenFlowXLPipeline": "pipeline",
    "TokenFlowSD3Pipeline": "pipeline",
    "TokenFlowFluxPipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tokenflow' has no attribute {name!r}")
