"""The tiny DiT pipelines (SD3, FLUX.1) in tokenflow.testing: saved folders load offline with diffusers' own
pipeline classes and generate finite images whose content depends on the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenflow.testing import build_tiny_flux, build_tiny_sd3

# Mean absolute difference (0..1 scale) that shows a prompt changed the image. Measured: another prompt moves it by
# ~0.05 (SD3) and ~0.01 (FLUX); another prompt for T5 alone, diluted among the padding of its 256 (SD3) or 512 (FLUX)
# tokens, by 0.002-0.004. The same prompt twice gives the same bits, and other CPU kernels or thread counts move
# float32 results by ~1e-6, so this sits well between.
PROMPT_EFFECT = 2e-4
OTHER = "a blue boat on a stormy sea"


def generate(pipe, prompt, height=64, width=64, **kwargs) -> np.ndarray:
    out = pipe(prompt, height=height, width=width, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs).images
    assert out.shape == (1, height, width, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    return out[0]


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).mean()) > PROMPT_EFFECT


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no-t5"])
def test_tiny_sd3_loads_and_follows_the_prompt(tmp_path, with_t5):
    from diffusers import StableDiffusion3Pipeline

    # A folder saved without T5 records text_encoder_3/tokenizer_3 as null, which diffusers only accepts when
    # they are passed explicitly (the documented way to run SD3 without T5).
    no_t5 = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(build_tiny_sd3(tmp_path / "sd3", with_t5=with_t5), **no_t5)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.text_encoder_3 is not None) == with_t5
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.patch_size == 2
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 16

    car = generate(pipe, "a red car")
    assert np.array_equal(generate(pipe, "a red car"), car)
    assert differ(generate(pipe, "A snowy Mountain!"), car)
    # each text encoder reaches the transformer: change only the second CLIP's prompt, then only T5's
    assert differ(generate(pipe, "a red car", prompt_2=OTHER), car)
    if with_t5:
        assert differ(generate(pipe, "a red car", prompt_3=OTHER), car)
    generate(pipe, "a red car", height=48, width=96)  # non-square, any multiple of 16 px


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_tiny_flux_loads_and_follows_the_prompt(tmp_path, guidance_embeds):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(build_tiny_flux(tmp_path / "flux", guidance_embeds=guidance_embeds))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embeds == guidance_embeds
    assert pipe.scheduler.config.use_dynamic_shifting == guidance_embeds
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 16  # 2x2 packing

    car = generate(pipe, "a red car")
    assert np.array_equal(generate(pipe, "a red car"), car)
    assert differ(generate(pipe, "A snowy Mountain!"), car)
    # CLIP's pooled vector and T5's sequence each reach the transformer (prompt_2 goes to T5 only)
    assert differ(generate(pipe, "a red car", prompt_2=OTHER), car)
    assert differ(generate(pipe, OTHER, prompt_2="a red car"), car)
    generate(pipe, "a red car", height=48, width=96)
