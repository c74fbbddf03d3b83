"""Tiny Stable Diffusion pipelines built from configs, for tests and benchmarks.

Real weights cannot be downloaded on CI, so tests build a random-weight model with Stable Diffusion's layout
(the way diffusers' own tests do), save it with ``save_pretrained`` and load it back through
:func:`tokenflow.models.load_model`, the very code path a user's hub id or local folder takes.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .io.write import VideoWriter

log = logging.getLogger(__name__)

__all__ = [
    "build_tiny_sd",
    "build_tiny_sdxl",
    "build_tiny_sd3",
    "build_tiny_flux",
    "build_tiny_controlnet",
    "build_tiny_lora",
    "build_tiny_depth_estimator",
    "write_tiny_tokenizer",
    "write_tiny_t5_tokenizer",
]

# SD 2.1-base's scheduler configuration (DDIM, "leading" spacing, offset 1).
SD_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    num_train_timesteps=1000,
)


def write_tiny_tokenizer(path: Path) -> None:
    """Write a character-level CLIP tokenizer (vocab.json, empty merges.txt) that loads offline."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.-'!?":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            dict(
                tokenizer_class="CLIPTokenizer",
                model_max_length=77,
                bos_token="<|startoftext|>",
                eos_token="<|endoftext|>",
                pad_token="<|endoftext|>",
                unk_token="<|endoftext|>",
            )
        )
    )


def _tiny_vae(channels: tuple[int, ...], scaling_factor: float = 0.18215, **config):
    """A small AutoencoderKL; ``config`` overrides the rest (latent_channels, shift_factor, use_quant_conv, ...)."""
    from diffusers import AutoencoderKL

    settings = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=scaling_factor,
    )
    settings.update(config)
    return AutoencoderKL(**settings)


# Characters the tiny T5 tokenizer knows, each as a word start ("▁a") and as a continuation ("a").
T5_CHARACTERS = string.ascii_letters + string.digits + string.punctuation


def write_tiny_t5_tokenizer(path: Path, *, model_max_length: int = 512) -> None:
    """Write a character-level T5 tokenizer (tokenizer.json: a SentencePiece-style Unigram, no spiece.model) that
    loads offline with ``T5TokenizerFast.from_pretrained``.

    Ids as in T5: ``<pad>`` 0, ``</s>`` 1 (appended to every sequence), ``<unk>`` 2; no ``<extra_id_*>`` sentinels.
    Both cases are in the vocabulary rather than lower-casing with a normalizer: transformers 5 rebuilds a T5
    tokenizer's pipeline from the Unigram vocabulary on loading (WhitespaceSplit + Metaspace, dropping any
    normalizer), so a normalizer would tokenize differently before and after saving.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    path = Path(path)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in T5_CHARACTERS:
        pieces += [("\u2581" + ch, -2.5), (ch, -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    ).save_pretrained(path)


def _tiny_t5(dim: int, layers: int = 2):
    """A T5 v1.1-style encoder (gated GELU, untied embeddings) whose vocabulary covers the tiny T5 tokenizer."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=256,
            d_model=dim,
            d_kv=dim // 4,
            d_ff=2 * dim,
            num_layers=layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _tiny_text_config(dim: int, layers: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=128,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_attention_heads=2,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=dim,
    )


def build_tiny_sd(
    path: Path,
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    block_out_channels: tuple[int, ...] = (8, 16, 32, 32),
    attention_head_dim: tuple[int, ...] = (2, 4, 8, 8),
    cross_attention_dim: int = 16,
    layers_per_block: int = 2,
    vae_channels: tuple[int, ...] = (8, 16, 16, 16),
) -> Path:
    """Build a random-weight SD 2.x-shaped pipeline (4 down/up blocks, VAE factor 8) and save it to ``path``.

    ``prediction_type`` selects epsilon or v-prediction (SD 2.x 768 models use ``"v_prediction"``).
    Larger ``block_out_channels`` give the "mid-sized" benchmark model.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=4,
            use_linear_projection=True,
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(vae_channels)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_tiny_text_config(cross_attention_dim, layers=2))
    finally:
        torch.random.set_rng_state(gen_state)

    scheduler = DDIMScheduler(prediction_type=prediction_type, **SD_SCHEDULER_CONFIG)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    scheduler.save_pretrained(path / "scheduler")
    write_tiny_tokenizer(path / "tokenizer")
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.30.0",
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=1,
        )
    )
    return path


def build_tiny_controlnet(path: Path, model_dir: Path, *, seed: int = 0) -> Path:
    """A ControlNet shaped for the tiny SD in ``model_dir``, saved to ``path``.

    A freshly made ControlNet's zero convolutions (outputs and the conditioning embedding's last layer) make it
    change nothing until trained; here they get random weights so that tests can see the conditioning act.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 8))
        zero_convs = list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]
        for conv in zero_convs + [controlnet.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.1)
            torch.nn.init.normal_(conv.bias, std=0.1)
    finally:
        torch.random.set_rng_state(gen_state)
    controlnet.save_pretrained(path)
    return path


def build_tiny_lora(path: Path, model_dir: Path, *, seed: int = 0, rank: int = 2) -> Path:
    """Random LoRA weights for the tiny SD's UNet attention projections, saved in diffusers' LoRA format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                       init_lora_weights=False)
        )
    finally:
        torch.random.set_rng_state(gen_state)
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return path


def build_tiny_sdxl(path: Path, *, seed: int = 0) -> Path:
    """A random-weight SDXL-shaped pipeline (two text encoders, added text/time conditioning, SDXL block layout:
    plain down block first, cross-attention up blocks first, 2 transformer layers at the deepest level)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    text_dim, time_dim = 16, 8
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16, 32),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8),
            cross_attention_dim=2 * text_dim,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + text_dim,
            norm_num_groups=4,
            use_linear_projection=True,
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae((8, 16, 16, 16), scaling_factor=0.13025)
        config = _tiny_text_config(text_dim, layers=3)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(config)
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(config)
    finally:
        torch.random.set_rng_state(gen_state)
    write_tiny_tokenizer(path / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(path / "_tokenizer")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(path)
    shutil.rmtree(path / "_tokenizer")
    return path


# Scheduler configurations of the released checkpoints (their scheduler_config.json files).
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
FLUX_DEV_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER_CONFIG = dict(FLUX_DEV_SCHEDULER_CONFIG, shift=1.0, use_dynamic_shifting=False)


def _tiny_tokenizers(scratch: Path):
    """The tiny CLIP and T5 tokenizers, written to ``scratch`` and loaded back (as a user's folder would load)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    write_tiny_tokenizer(scratch / "clip")
    write_tiny_t5_tokenizer(scratch / "t5")
    return CLIPTokenizer.from_pretrained(scratch / "clip"), T5TokenizerFast.from_pretrained(scratch / "t5")


def build_tiny_sd3(path: Path, *, seed: int = 0, with_t5: bool = True) -> Path:
    """A random-weight Stable Diffusion 3 (medium)-shaped pipeline, saved to ``path`` for
    ``StableDiffusion3Pipeline.from_pretrained``.

    As in SD3: 16 latent channels, VAE factor 8 (4 levels, no quant convs, SD3's shift and scaling factors),
    2x2 patches, two CLIP text encoders with projection (per-token hidden states concatenated, 32 + 32, and
    zero-padded to T5's width; pooled 32 + 32 = 64), a T5 encoder, flow matching with shift 3. The native size is
    64 px (``sample_size`` 8 latents); image sides must be multiples of 16 px (VAE factor x patch), 64 px gives
    4 x 4 = 16 image tokens. The text sequence is 77 CLIP tokens + ``max_sequence_length`` T5 tokens (256 by default).

    T5's ``d_model`` (= ``joint_attention_dim``) is 64, not diffusers' test value 32, so that the 64-wide CLIP
    concatenation fits as in SD3 (768 + 1280 padded to 4096): with 32, the pipeline's ``F.pad`` by a negative width
    would silently crop the second CLIP encoder's hidden states away.

    ``with_t5=False`` saves ``text_encoder_3`` and ``tokenizer_3`` as null (SD3 then feeds zeros for T5's tokens);
    diffusers loads such a folder only with them passed explicitly:
    ``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    latent_channels, text_dim, t5_dim = 16, 32, 64
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=t5_dim,
            pooled_projection_dim=2 * text_dim,
            pos_embed_max_size=64,  # sides up to 64 patches = 1024 px
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(
            (8, 16, 16, 16),
            scaling_factor=1.5305,
            shift_factor=0.0609,
            latent_channels=latent_channels,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        config = _tiny_text_config(text_dim, layers=2)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModelWithProjection(config)
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(config)
        torch.manual_seed(seed + 4)
        text_encoder_3 = _tiny_t5(t5_dim) if with_t5 else None
    finally:
        torch.random.set_rng_state(gen_state)
    clip_tokenizer, t5_tokenizer = _tiny_tokenizers(path / "_tokenizers")
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer if with_t5 else None,
    ).save_pretrained(path)
    shutil.rmtree(path / "_tokenizers")
    return path


def build_tiny_flux(path: Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A random-weight FLUX.1-shaped pipeline, saved to ``path`` for ``FluxPipeline.from_pretrained``.

    ``guidance_embeds=True`` is FLUX.1-dev-like (distilled guidance input, resolution-dependent "dynamic" shift);
    ``False`` is FLUX.1-schnell-like (no guidance input, shift 1). 4 latent channels (the real one has 16), VAE
    factor 8 (4 levels, no quant convs, FLUX's shift and scaling factors); the pipeline packs 2x2 latent patches
    into tokens, so the transformer takes 4 x 4 = 16 channels with ``patch_size`` 1, image sides must be multiples
    of 16 px and 64 px gives 4 x 4 = 16 image tokens. CLIP (hidden 32) gives only the pooled vector; T5
    (``d_model`` 32) the token sequence. Rotary axes (4, 4, 8) add up to the head width 16.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    path = Path(path)
    latent_channels, text_dim = 4, 32
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_dim,
            pooled_projection_dim=text_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(
            (8, 16, 16, 16),
            scaling_factor=0.3611,
            shift_factor=0.1159,
            latent_channels=latent_channels,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_tiny_text_config(text_dim, layers=2))
        torch.manual_seed(seed + 3)
        text_encoder_2 = _tiny_t5(text_dim)
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler_config = FLUX_DEV_SCHEDULER_CONFIG if guidance_embeds else FLUX_SCHNELL_SCHEDULER_CONFIG
    clip_tokenizer, t5_tokenizer = _tiny_tokenizers(path / "_tokenizers")
    FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
    ).save_pretrained(path)
    shutil.rmtree(path / "_tokenizers")
    return path


def build_tiny_depth_estimator(path: Path, *, seed: int = 0) -> Path:
    """A random-weight DPT depth estimator (transformers), saved with its image processor, for ``--depth-model``."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    path = Path(path)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(
            DPTConfig(
                hidden_size=16,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=32,
                patch_size=8,
                neck_hidden_sizes=[8, 8, 16, 16],
                fusion_hidden_size=16,
                backbone_out_indices=[0, 1, 2, 3],
            )
        )
    finally:
        torch.random.set_rng_state(gen_state)
    model.save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(path)
    return path


# -- synthetic clips with known motion -------------------------------------------------------------------------


def pan_frames(
    num_frames: int = 16,
    width: int = 192,
    height: int = 128,
    shift: int = 6,
    image: str = "astronaut",
    *,
    top: int | None = None,
) -> np.ndarray:
    """Frames of a horizontal camera pan across a scikit-image sample photo, ``[N,H,W,3]`` uint8.

    Frame ``i`` is the ``width x height`` crop at x offset ``i * shift`` and y offset
    ``top`` (default: vertically centered), so frame ``i+1`` is frame ``i`` moved
    left by ``shift`` pixels.  The photo is scaled up first if it is too small for
    the whole pan.
    """
    import skimage.data  # heavy import, only needed here

    loader = getattr(skimage.data, image, None)
    if loader is None or not callable(loader):
        raise InputError(f"image {image!r}: not a scikit-image sample photo; try astronaut, coffee or chelsea")
    photo = np.asarray(loader())
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    photo = photo[..., :3].astype(np.uint8)
    need_w = width + (num_frames - 1) * shift
    ph, pw = photo.shape[:2]
    if pw < need_w or ph < height:
        scale = max(need_w / pw, height / ph)
        size = (max(need_w, math.ceil(pw * scale)), max(height, math.ceil(ph * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.LANCZOS))
        ph, pw = photo.shape[:2]
    if top is None:
        top = (ph - height) // 2
    elif not 0 <= top <= ph - height:
        raise InputError(f"top {top}: the crop must lie inside the {pw}x{ph} photo; use 0..{ph - height}")
    return np.stack([photo[top : top + height, i * shift : i * shift + width] for i in range(num_frames)])


def make_pan_clip(
    path: str | Path,
    num_frames: int = 16,
    width: int = 192,
    height: int = 128,
    shift: int = 6,
    fps: float = 10,
    audio: bool = False,
    image: str = "astronaut",
    *,
    top: int | None = None,
    crf: int = 18,
) -> None:
    """Write a test clip: a camera pan across a public-domain scikit-image photo (see :func:`pan_frames`).

    The extension picks the format: ``.mp4``/``.mov`` H.264, ``.mkv`` lossless FFV1
    (exact pixels, for motion tests), ``.webm`` VP9, ``.gif``, or no extension for a
    folder of PNGs.  With ``audio=True`` a 440 Hz sine tone as long as the clip is
    added (AAC; Opus in .webm; ignored for gif and folders).
    """
    path = Path(path)
    frames = pan_frames(num_frames, width, height, shift, image, top=top)
    suffix = path.suffix.lower()
    if suffix == "":
        if audio:
            log.warning("%s: a folder of PNGs cannot hold audio; writing frames only", path)
        path.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(path / f"frame_{i:04d}.png")
        return
    if suffix == ".gif":
        if audio:
            log.warning("%s: a gif cannot hold audio; writing frames only", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / float(fps)), loop=0)
        return
    codec = "ffv1" if suffix == ".mkv" else None
    with VideoWriter(path, fps, width, height, codec=codec, crf=crf) as writer:
        if audio:
            writer._add_tone()
        for frame in frames:
            writer.write(frame)
