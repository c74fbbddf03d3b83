"""Loading checkpoints (hub id, local folder or single file, LoRAs, ControlNets) into a backbone, and the
device/dtype policy."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ..errors import InputError, ModelLoadError
from ..options import DEFAULT_MODEL
from .base import Backbone
from .dit import FluxModel, SD3Model
from .sd import StableDiffusionModel
from .sdxl import StableDiffusionXLModel

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

__all__ = [
    "DEFAULT_MODEL",
    "load_model",
    "backbone_for",
    "parse_lora",
    "resolve_device",
    "resolve_dtype",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else MPS, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise InputError(f"`device` {device!r}: unknown device; use auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"`device` {device}: CUDA is not available on this machine; use `device` cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("`device` mps: MPS is not available on this machine; use `device` cpu or auto")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` is float16 on CUDA and float32 elsewhere (fp16 on CPU is slow and partly unsupported)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"`dtype` {dtype!r}: unknown dtype; use auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def _hub_revision(model_id: str, revision: str | None) -> str | None:
    """The commit hash of a cached hub snapshot, for run.json; None for local folders or when unknown."""
    if Path(model_id).exists():
        return None
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(model_id, revision=revision, local_files_only=True, allow_patterns=["model_index.json"])
        return Path(path).name
    except Exception:  # noqa: BLE001 - the revision is informative only
        return revision


def _explain_load_error(exc: BaseException) -> str:
    """One line saying why a model could not be loaded and what to do, from the exception chain."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(" ".join(str(e).split()) for e in chain)
    if "GatedRepoError" in names:
        return "the repository is gated; accept its license on the hub and run `huggingface-cli login`"
    if "RepositoryNotFoundError" in names:
        return "no such model on the hub; check the id for a typo, or pass a local folder"
    if "LocalEntryNotFoundError" in names or "not fully cached" in text or "offline" in text.lower():
        return (
            "not in the local cache and the hub cannot be reached; connect to the internet once so it is "
            "downloaded, check the id for a typo, or pass a local diffusers folder"
        )
    reason = " ".join(str(exc).split())[:160] or type(exc).__name__
    return f"could not be loaded ({reason}); check that it is a Stable Diffusion checkpoint, or pass a local folder"


def ckpt_keys(model: str, path: Path) -> list[str]:
    """The tensor names of a ``.ckpt`` (its ``state_dict`` when nested), read with ``torch.load(weights_only=True)``
    (memory-mapped when the file is a zip archive, so nothing is read in full): a pickle may hold code, and a
    checkpoint is only ever loaded as tensors here, as diffusers then loads it. A file that holds other Python
    objects (a training callback, an optimizer class) is refused with one line saying so, never loaded with
    ``weights_only=False``."""
    import pickle
    import re
    import zipfile

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""  # not in backticks: interfaces rename those as options
        raise ModelLoadError(
            f"`model` {model}: the .ckpt holds Python objects besides tensors{what}, and a pickle can run code, so it "
            "is only read with "
            "torch.load(weights_only=True); convert it to .safetensors where you trust it, or pass a diffusers folder"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: torch raises many kinds
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ModelLoadError(f"`model` {model}: not a readable .ckpt ({reason}); download it again") from exc
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ModelLoadError(f"`model` {model}: the .ckpt holds no state dict of tensors; pass a Stable Diffusion checkpoint")
    return [str(k) for k in state]


# the first tensor-name prefix found in a single file tells its family (original checkpoints' layouts)
_SINGLE_FILE_FAMILIES = (
    ("sd3", ("model.diffusion_model.joint_blocks.", "joint_blocks.")),
    ("flux", ("model.diffusion_model.double_blocks.", "double_blocks.")),
    ("sdxl", ("conditioner.embedders.1",)),
)
_PIPELINE_FAMILIES = (("StableDiffusion3", "sd3"), ("Flux", "flux"), ("XL", "sdxl"))


def _checkpoint_family(model: str, path: Path, revision, local_files_only: bool) -> str:
    """``sd``, ``sdxl``, ``sd3`` or ``flux``: the family of a folder, hub repo or single file (read from metadata,
    not weights)."""
    import json

    if path.is_file():
        keys: list[str] = []
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        elif path.suffix == ".ckpt":
            keys = ckpt_keys(model, path)
        for family, prefixes in _SINGLE_FILE_FAMILIES:
            if any(k.startswith(prefixes) for k in keys):
                return family
        return "sd"
    index = path / "model_index.json"
    if not path.is_dir():
        try:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(model, "model_index.json", revision=revision, local_files_only=local_files_only))
        except Exception:  # noqa: BLE001 - the pipeline load below reports the real problem
            return "sd"
    if not index.is_file():
        return "sd"
    name = json.loads(index.read_text()).get("_class_name", "")
    return next((family for part, family in _PIPELINE_FAMILIES if part in name), "sd")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint accepts a connection within ``timeout`` seconds: False at once under
    ``HF_HUB_OFFLINE=1``. Without network the hub client retries for half a minute before it gives up; this
    asks once, briefly. Behind a proxy (``HTTPS_PROXY``/``ALL_PROXY``) a direct connection says nothing, so the
    hub client is left to find out."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _without_t5(folder: Path) -> bool:
    import json

    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    return index.get("text_encoder_3", [None])[0] is None if "text_encoder_3" in index else False


def _load_pipeline(model: str, path: Path, revision, local_files_only: bool, kwargs: dict):
    import diffusers

    family = _checkpoint_family(model, path, revision, local_files_only)
    cls = getattr(diffusers, {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                              "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family])
    if family != "sd":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("safety_checker", "requires_safety_checker")}
    if family == "sd3" and path.is_dir() and _without_t5(path):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)  # SD3 without T5: diffusers wants them passed as None
    with warnings.catch_warnings():
        # newer diffusers rename torch_dtype to dtype; the old name works on every supported version
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        if path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(f"`model` {model}: not a model file; pass a .safetensors/.ckpt file or a folder")
            return cls.from_single_file(str(path), **kwargs)
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise ModelLoadError(
                    f"`model` {model}: not a diffusers folder (no model_index.json); pass a Stable Diffusion folder"
                )
            return cls.from_pretrained(str(path), **kwargs)
        return cls.from_pretrained(model, revision=revision, local_files_only=local_files_only, **kwargs)


def load_model(
    model: str | Path = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    local_files_only: bool | None = None,
    loras: list[tuple[str, float]] | None = None,
    controlnet: str | Path | None = None,
    offload: str | None = None,
) -> Backbone:
    """Load an SD 1.x/2.x or SDXL checkpoint from a hub id, a local diffusers folder or a single ``.safetensors``/``.ckpt`` file.

    ``loras``: (hub id or path, scale) pairs applied on top (needs ``peft``). ``controlnet``: a ControlNet for the
    ``controlnet`` mode (hub id, folder or single file), checked to fit the base model. ``offload``: ``"model"``
    (whole models move to ``device`` when used) or ``"sequential"`` (layer by layer; least memory, slowest), with
    accelerate's CPU offload, for accelerators with little memory.
    Raises :class:`ModelLoadError` with a one-line message when something cannot be found, loaded or combined.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if offload not in (None, "none", "model", "sequential"):
        raise InputError(f"`offload` {offload!r}: unknown; use model or sequential")
    model = str(model)
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.endswith(SINGLE_FILE_SUFFIXES)
    if looks_local and not path.exists():
        raise ModelLoadError(f"`model` {model}: no such file or folder; check the path, or pass a hub id")
    kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if not looks_local and not local_files_only and not hub_reachable():
        logger.debug("the hub cannot be reached: looking for %s in the local cache only", model)
        local_files_only = True
    try:
        pipe = _load_pipeline(model, path, revision, bool(local_files_only), kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors all mean "cannot load"
        raise ModelLoadError(f"`model` {model}: {_explain_load_error(exc)}") from exc
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    flow = backbone_for(denoiser).flow_matching
    if flow and controlnet is not None:
        raise ModelLoadError(f"`controlnet` {controlnet}: ControlNet mode supports the SD 1.x/2.x and SDXL UNet "
                             f"models; {type(denoiser).__name__} is not one")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if not flow and prediction not in ("epsilon", "v_prediction"):
        raise ModelLoadError(
            f"`model` {model}: its scheduler predicts {prediction!r}; DDIM inversion here supports epsilon and "
            "v_prediction models (set prediction_type in scheduler/scheduler_config.json if it is mislabelled)"
        )
    loras = list(loras or [])
    if loras:
        _apply_loras(pipe, loras)
    control_model = _load_controlnet(str(controlnet), pipe.unet, dtype) if controlnet is not None else None
    text_encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    modules = [m for m in (*text_encoders, denoiser, control_model, pipe.vae) if m is not None]
    for module in modules:
        module.eval()
        module.requires_grad_(False)
        if offload in (None, "none"):
            module.to(device)
    if offload not in (None, "none"):
        _offload(modules, offload, device)
    cls = backbone_for(denoiser)
    if cls is StableDiffusionXLModel and dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (diffusers' own pipelines upcast it too)
    logger.info("loaded %s on %s (%s)", model, device, str(dtype).replace("torch.", ""))
    return cls(
        loras=loras,
        controlnet=control_model,
        controlnet_id=None if controlnet is None else str(controlnet),
        pipeline=pipe,
        unet=denoiser,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler_config=dict(pipe.scheduler.config),
        model_id=model,
        revision=_hub_revision(model, revision),
        device=device,
        dtype=dtype,
    )


def backbone_for(denoiser) -> type[StableDiffusionModel]:
    """The backbone class that fits a loaded denoiser (a UNet or a diffusion transformer)."""
    for cls in (SD3Model, FluxModel, StableDiffusionXLModel):
        if cls.fits(denoiser):
            return cls
    return StableDiffusionModel


def _offload(modules: list[torch.nn.Module], mode: str, device: torch.device) -> None:
    """accelerate's CPU offload: weights stay in host memory and visit ``device`` when (part of) a model runs."""
    from accelerate import cpu_offload, cpu_offload_with_hook

    hook = None
    for module in modules:
        if mode == "sequential":
            cpu_offload(module, execution_device=device)
        else:  # each model moves to the device when called and offloads the one before it in the chain
            _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hook)
    logger.info("%s CPU offload onto %s", mode, device)


def parse_lora(spec: str) -> tuple[str, float]:
    """``PATH_OR_ID[:SCALE]`` -> (path or id, scale); the scale defaults to 1."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not tail.startswith(("/", "\\")):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _apply_loras(pipe, loras: list[tuple[str, float]]) -> None:
    names = []
    for i, (source, scale) in enumerate(loras):
        name = f"lora{i}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe.load_lora_weights(source, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - missing file, hub error, wrong format
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ModelLoadError(
                f"`lora` {source}: could not be loaded onto this model ({reason}); check the path or id and that "
                "the LoRA was trained for this base model"
            ) from exc
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])


def _load_controlnet(source: str, unet, dtype: torch.dtype):
    """A ControlNet from a hub id, folder or single file, refused when it does not fit ``unet``."""
    from diffusers import ControlNetModel

    path = Path(source).expanduser()
    if (source.startswith((".", "/", "~")) or source.endswith(SINGLE_FILE_SUFFIXES)) and not path.exists():
        raise ModelLoadError(f"`controlnet` {source}: no such file or folder; check the path, or pass a hub id")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            if path.is_file():
                controlnet = ControlNetModel.from_single_file(str(path), torch_dtype=dtype)
            else:
                controlnet = ControlNetModel.from_pretrained(str(path) if path.exists() else source, torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors all mean "cannot load"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelLoadError(
            f"`controlnet` {source}: could not be loaded ({reason}); check the id or path, or pass a local folder"
        ) from exc
    mine, theirs = controlnet.config, unet.config
    for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
        a, b = mine.get(key), theirs.get(key)
        if a is not None and b is not None and list(a if isinstance(a, (list, tuple)) else [a]) != list(
            b if isinstance(b, (list, tuple)) else [b]
        ):
            raise ModelLoadError(
                f"`controlnet` {source} was made for another base model ({key} {a} vs the model's {b}); "
                "pick a ControlNet trained for this base (e.g. an SD 1.5 ControlNet for an SD 1.5 model)"
            )
    return controlnet
