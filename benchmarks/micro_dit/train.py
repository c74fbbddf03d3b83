"""Train a micro *trained* diffusion transformer in the micro model's procedural world, with flow matching.

    python benchmarks/micro_dit/train.py benchmarks/micro_dit/model 2700       # 45 min on 2 CPU cores
    python benchmarks/micro_dit/train.py OUT 1800 --init benchmarks/micro_dit/model --lr 3e-4   # train on

An SD3-layout MMDiT (``SD3Transformer2DModel``, joint text+image attention, 2x2 patches) on the vendored micro
model's VAE latents (factor 4, 96x64 px -> 4x16x24 latents -> 8x12 = 96 image tokens), trained as SD3 is:
rectified flow ``x_s = (1 - s) x0 + s eps``, velocity target ``eps - x0``, logit-normal levels, 10% empty captions
(classifier-free guidance), EMA of the weights. Text: the micro model's frozen CLIP text encoder twice (as SD3's two
CLIP encoders, each with its own frozen random projection for the pooled vector) and a frozen random 4-token T5
(SD3's pipeline always reads a T5 sequence; 4 tokens keep it cheap), all encoded through diffusers'
``StableDiffusion3Pipeline.encode_prompt``, the code path inference takes. Saves a ``StableDiffusion3Pipeline``
folder that ``tokenflow edit --model`` loads.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MICRO = HERE.parent / "micro_model"
sys.path.insert(0, str(MICRO))

import scenes  # noqa: E402  (the micro model's scene generator)

T5_TOKENS = 4
TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=16,
                   num_attention_heads=6, joint_attention_dim=128, caption_projection_dim=96,
                   pooled_projection_dim=128, pos_embed_max_size=32)


def components(scratch: Path, seed: int = 0) -> dict:
    """The frozen parts (VAE, tokenizers, text encoders) and a fresh transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

    from tokenflow.testing import _tiny_t5, write_tiny_t5_tokenizer

    model = MICRO / "model"
    clip = CLIPTextModel.from_pretrained(model / "text_encoder")
    encoders = []
    for k in range(2):
        torch.manual_seed(seed + 10 + k)
        enc = CLIPTextModelWithProjection(clip.config)
        inner = getattr(clip, "text_model", clip)  # transformers 5's CLIPTextModel is the text model itself
        enc.text_model.load_state_dict(inner.state_dict())
        encoders.append(enc.eval().requires_grad_(False))
    write_tiny_t5_tokenizer(scratch / "t5", model_max_length=T5_TOKENS)
    torch.manual_seed(seed + 20)
    t5 = _tiny_t5(TRANSFORMER["joint_attention_dim"]).eval().requires_grad_(False)
    torch.manual_seed(seed)
    return dict(
        transformer=SD3Transformer2DModel(**TRANSFORMER),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=AutoencoderKL.from_pretrained(model / "vae").eval().requires_grad_(False),
        text_encoder=encoders[0], tokenizer=CLIPTokenizer.from_pretrained(model / "tokenizer"),
        text_encoder_2=encoders[1], tokenizer_2=CLIPTokenizer.from_pretrained(model / "tokenizer"),
        text_encoder_3=t5, tokenizer_3=T5TokenizerFast.from_pretrained(scratch / "t5"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--images", type=int, default=30000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--init", type=Path, help="continue from a saved folder's transformer (its EMA weights)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # T5 reads 4 tokens by design: its truncation warning is noise here

    parts = components(args.out.parent / f".{args.out.name}-scratch")
    parts["vae"].register_to_config(shift_factor=0.0)  # SD3's pipeline adds the VAE's shift: the SD VAE has none
    if args.init is not None:
        from diffusers import SD3Transformer2DModel

        parts["transformer"] = SD3Transformer2DModel.from_pretrained(args.init / "transformer")
    pipe = StableDiffusion3Pipeline(**parts)
    transformer = parts["transformer"]
    ema = copy.deepcopy(transformer).requires_grad_(False)

    started = time.time()
    rng = np.random.default_rng(7)
    latents, captions = [], []
    vae = parts["vae"]
    with torch.no_grad():
        for _ in range(0, args.images, 250):
            images, texts = zip(*[scenes.sample(rng) for _ in range(250)])
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
            latents.append(vae.encode(x).latent_dist.sample() * vae.config.scaling_factor)
            captions += texts
    latents = torch.cat(latents)
    print(f"data {tuple(latents.shape)} std {latents.std():.3f} in {time.time() - started:.0f}s", flush=True)

    def save():
        pipe.transformer = ema
        pipe.save_pretrained(args.out)
        pipe.transformer = transformer

    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.01)
    step, started, last = 0, time.time(), time.time()
    while time.time() - started < args.seconds:
        frac = (time.time() - started) / args.seconds
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(latents), (args.batch,))
        x0 = latents[idx]
        prompts = [captions[i] if np.random.rand() > 0.1 else "" for i in idx.tolist()]
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=T5_TOKENS)
        s = torch.sigmoid(torch.randn(args.batch))  # SD3's logit-normal levels
        noise = torch.randn_like(x0)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        pred = transformer(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=embeds,
                           pooled_projections=pooled).sample
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.mul_(decay).add_(p, alpha=1 - decay)
        if step % 100 == 0:
            if args.threads > 1:  # two threads on a core another job keeps busy stall: one while others run
                others = os.getloadavg()[0] - torch.get_num_threads()  # the load average counts this run too
                torch.set_num_threads(args.threads if others < 0.5 else 1)
            print(f"step {step} t {time.time() - started:.0f}s loss {loss.item():.4f} "
                  f"threads {torch.get_num_threads()}", flush=True)
        if time.time() - last > 600:
            save()
            last = time.time()
    save()
    params = sum(p.numel() for p in transformer.parameters()) / 1e6
    print(f"steps {step} in {time.time() - started:.0f}s, transformer {params:.2f}M params -> {args.out}")


if __name__ == "__main__":
    main()
