"""What fits on a 24, 48 or 80 GB GPU with SD3 and FLUX.1: device memory of a TokenFlow edit, estimated from
measured small transformers and the real models' exact sizes.

    python benchmarks/bench_dit_memory.py            # measure, fit, write results/bench_dit_memory.json, print tables

No GPU and no real weights were available to this project, so the figure is a model with two measured parts:

1. **Weights**, exact: every real configuration (FLUX.1-dev, SD3-medium, SD3.5-large transformers; CLIP-L/G, T5-XXL
   encoders; the 16-channel VAE) is instantiated on PyTorch's ``meta`` device and its parameters counted, at 2 bytes
   each (bfloat16/float16).
2. **Activations of one denoiser call**, measured: small SD3- and FLUX-layout transformers (random weights, widths
   128-512, 256-1024 image tokens, 2-4 frames a branch) run one call of each kind the editor makes (per frame,
   keyframe pass, propagation) through this project's processors on the CPU in float32, and the peak resident
   memory the call adds is read (``tokenflow.memory.PeakMemory``; glibc told to return large blocks at once). It is
   divided by ``rows x tokens x width x 4 bytes`` (rows = branches x frames, tokens = image + text), less the
   propagation's float32 similarity batch (known exactly): the call's peak in hidden-state copies, whose largest
   value over the shapes is the family's coefficient. Flash/memory-efficient attention keeps attention linear in
   the sequence on a GPU, as on the CPU here.

Estimate = weights on the device + coefficient x rows x tokens x width x 2 bytes for the largest call + the
largest similarity batch + 1 GiB (CUDA context, allocator slack). The keyframe token cache lives in host memory on a GPU (``offload_cache``), so
it is reported as host bytes per keyframe. Re-measure with ``--device cuda`` semantics when a GPU is lent.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # large tensors as their own mappings, returned when freed
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

GIB = 2**30

# -- the real models' shapes (diffusers / transformers configs of the published checkpoints) ---------------------

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)

#: name: (transformer class, config, text encoders, branches a call, text tokens, width, layers)
MODELS = {
    "FLUX.1-dev": ("FluxTransformer2DModel", FLUX_DEV, ("clip-l", "t5-xxl"), 2, 512, 3072, 57),
    "SD3-medium": ("SD3Transformer2DModel", SD3_MEDIUM, ("clip-l", "clip-g", "t5-xxl"), 3, 333, 1536, 24),
    "SD3.5-large": ("SD3Transformer2DModel", SD35_LARGE, ("clip-l", "clip-g", "t5-xxl"), 3, 333, 2432, 38),
}


def _count(build) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=None)
def parameters(part: str) -> int:
    """Exact parameter count of a real component, built on the meta device (no memory, no weights)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if part in MODELS:
        cls, config = MODELS[part][:2]
        return _count(lambda: getattr(diffusers, cls)(**config))
    if part in ("clip-l", "clip-g"):
        return _count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**(CLIP_L if part == "clip-l" else CLIP_G))))
    if part == "t5-xxl":
        return _count(lambda: T5EncoderModel(T5Config(**T5_XXL)))
    if part == "vae":
        return _count(lambda: diffusers.AutoencoderKL(**VAE_16))
    raise KeyError(part)


# -- measured: a denoiser call's activation peak on small transformers --------------------------------------------

def _small(family: str, heads: int, head_dim: int, text_dim: int):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if family == "flux":
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                      attention_head_dim=head_dim, num_attention_heads=heads,
                                      joint_attention_dim=text_dim, pooled_projection_dim=text_dim,
                                      guidance_embeds=True,  # rotary axes in FLUX's proportions (16, 56, 56)
                                      axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=head_dim,
                                 num_attention_heads=heads, joint_attention_dim=text_dim,
                                 caption_projection_dim=heads * head_dim, pooled_projection_dim=text_dim,
                                 out_channels=16, pos_embed_max_size=64)


def _layers(transformer, family: str, text_tokens: int):
    from tokenflow.backbones.base import Layers
    from tokenflow.backbones.dit import _make_processor

    if family == "flux":
        blocks = [(f"transformer_blocks.{i}.attn.processor", "flux-double") for i in range(len(transformer.transformer_blocks))]
        blocks += [(f"single_transformer_blocks.{i}.attn.processor", "flux-single")
                   for i in range(len(transformer.single_transformer_blocks))]
    else:
        blocks = [(f"transformer_blocks.{i}.attn.processor", "sd3") for i in range(len(transformer.transformer_blocks))]
    names = tuple(name for name, _ in blocks)
    factory = functools.partial(_make_processor, layouts=dict(blocks), text_tokens=text_tokens)
    return Layers(names, names, (), processor=factory)


def _forward(transformer, family: str, rows: int, side: int, text_tokens: int, text_dim: int):
    """One call on ``rows`` latents of ``side`` x ``side`` latent pixels (FLUX: already packed, ``side`` tokens a
    side), random inputs."""
    g = torch.Generator().manual_seed(1)
    text = torch.randn(rows, text_tokens, text_dim, generator=g)
    pooled = torch.randn(rows, text_dim, generator=g)
    t = torch.full((rows,), 0.5)
    if family == "flux":
        ids = torch.zeros(side, side, 3)
        ids[..., 1] += torch.arange(side)[:, None]
        ids[..., 2] += torch.arange(side)[None, :]
        return transformer(hidden_states=torch.randn(rows, side * side, 64, generator=g), timestep=t,
                           encoder_hidden_states=text, pooled_projections=pooled, txt_ids=torch.zeros(text_tokens, 3),
                           img_ids=ids.reshape(-1, 3), guidance=torch.full((rows,), 3.5), return_dict=False)[0]
    return transformer(hidden_states=torch.randn(rows, 16, 2 * side, 2 * side, generator=g), timestep=t * 1000,
                       encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]


def measure(family: str, heads: int, head_dim: int, side: int, frames: int, text_tokens: int = 64,
            text_dim: int = 64) -> dict:
    from tokenflow.attention import FrameCall, Injection, KeyframeCall, PropagationCall, TokenFlowState, tokenflow_attention
    from tokenflow.memory import PeakMemory

    transformer = _small(family, heads, head_dim, text_dim).eval()
    branches = 2 if family == "flux" else 3
    width, image_tokens = heads * head_dim, side * side
    state = TokenFlowState(branches=branches)
    inject = Injection(qk=True)
    rows = branches * frames
    unit = rows * (image_tokens + text_tokens) * width * 4
    out = dict(family=family, width=width, image_tokens=image_tokens, text_tokens=text_tokens, frames=frames,
               branches=branches, hidden_state_bytes=unit)
    calls = {
        "per-frame": FrameCall(inject),
        "keyframes": KeyframeCall.all(frames, store=False, inject=inject),
        "propagation": PropagationCall(tuple([0] * frames), tuple([1] * frames), tuple([0.5] * frames), inject),
    }
    with torch.no_grad(), tokenflow_attention(transformer, state, _layers(transformer, family, text_tokens)):
        with state.calling(KeyframeCall((0, 1), 2, store=(0, 1), inject=inject)):  # the keyframes propagation reads
            _forward(transformer, family, branches * 2, side, text_tokens, text_dim)
        for kind, call in calls.items():
            gc.collect()
            with state.calling(call), PeakMemory() as m:
                _forward(transformer, family, rows, side, text_tokens, text_dim)
            # propagation also holds the nearest-neighbour similarities (float32, whatever the model's dtype)
            similarity = similarity_bytes(frames, image_tokens) if kind == "propagation" else 0
            out[kind] = dict(bytes=m.growth, similarity_bytes=similarity, copies=(m.growth - similarity) / unit,
                             exact=m.exact)
    return out


def similarity_bytes(frames: int, image_tokens: int) -> int:
    """The propagation's similarity product: each frame's image tokens against its two keyframes', in batches of
    frames under ``attention.SIMILARITY_BUDGET`` values (at least one frame), float32."""
    from tokenflow.attention import SIMILARITY_BUDGET

    per_frame = image_tokens * 2 * image_tokens
    return min(frames, max(1, SIMILARITY_BUDGET // per_frame)) * per_frame * 4


SHAPES = [  # (family, heads, head_dim, latent tokens a side, frames a branch)
    ("flux", 4, 32, 16, 2), ("flux", 4, 32, 32, 2), ("flux", 4, 64, 32, 2), ("flux", 4, 128, 32, 2), ("flux", 4, 64, 32, 4),
    ("sd3", 4, 32, 16, 2), ("sd3", 4, 32, 32, 2), ("sd3", 4, 64, 32, 2), ("sd3", 4, 128, 32, 2), ("sd3", 4, 64, 32, 4),
]


# -- the estimate ---------------------------------------------------------------------------------------------------

def estimate(coefficients: dict[str, float], bytes_per_value: int = 2) -> list[dict]:
    rows = []
    for name, (cls, _, encoders, branches, text, width, layers) in MODELS.items():
        coefficient = coefficients["flux" if cls.startswith("Flux") else "sd3"]
        weights = {"transformer": parameters(name), "text encoders": sum(parameters(e) for e in encoders),
                   "vae": parameters("vae")}
        for px in (512, 768, 1024):
            image = (px // 16) ** 2
            per_frame = coefficient * branches * (image + text) * width * bytes_per_value
            # the similarity batch is at most SIMILARITY_BUDGET values: bounded, counted at its largest
            base = (weights["transformer"] + weights["vae"]) * bytes_per_value + GIB + similarity_bytes(64, image)
            with_text = base + weights["text encoders"] * bytes_per_value
            fits = {}
            for gb in (24, 48, 80):
                budget = gb * 10**9
                fits[gb] = dict(text_encoders_on_gpu=max(0, int((budget - with_text) // per_frame)),
                                text_encoders_offloaded=max(0, int((budget - base) // per_frame)))
            rows.append(dict(model=name, px=px, image_tokens=image, text_tokens=text, branches=branches,
                             weights_gb={k: v * bytes_per_value / 1e9 for k, v in weights.items()},
                             gb_per_frame_in_a_call=per_frame / 1e9,
                             keyframe_cache_gb_per_keyframe=(1 + branches) * image * width * layers * bytes_per_value / 1e9,
                             frames_per_call_that_fit=fits))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | px | weights GB (transformer + VAE / text encoders) | GB per frame in a call | frames a call on 24 / 48 / 80 GB (encoders offloaded) | host GB per cached keyframe |",
             "|---|---:|---|---:|---|---:|"]
    for r in rows:
        w = r["weights_gb"]
        fits = " / ".join(f"{r['frames_per_call_that_fit'][gb]['text_encoders_on_gpu']} "
                          f"({r['frames_per_call_that_fit'][gb]['text_encoders_offloaded']})" for gb in (24, 48, 80))
        lines.append(f"| {r['model']} | {r['px']} | {w['transformer'] + w['vae']:.1f} / {w['text encoders']:.1f} "
                     f"| {r['gb_per_frame_in_a_call']:.2f} | {fits} | {r['keyframe_cache_gb_per_keyframe']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=HERE / "results" / "bench_dit_memory.json")
    args = p.parse_args()
    from common import QUIET_ENV

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    torch.set_num_threads(1)
    measured = []
    for shape in SHAPES:
        measured.append(measure(*shape))
        m = measured[-1]
        print(f"{m['family']} width {m['width']} tokens {m['image_tokens']}+{m['text_tokens']} frames {m['frames']}: "
              + ", ".join(f"{k} {m[k]['copies']:.1f}" for k in ("per-frame", "keyframes", "propagation")),
              file=sys.stderr, flush=True)
    coefficients = {family: max(m[k]["copies"] for m in measured if m["family"] == family
                                for k in ("per-frame", "keyframes", "propagation")) for family in ("flux", "sd3")}
    rows = estimate(coefficients)
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split(":")[1].split("\n")[0].strip()
    result = dict(machine=f"{cpu}, torch {torch.__version__}, CPU float32 (the measured part)",
                  hidden_state_copies=coefficients, measured=measured, estimate=rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print("largest call peak, in hidden-state copies (rows x tokens x width): "
          + ", ".join(f"{k} {v:.1f}" for k, v in coefficients.items()) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
