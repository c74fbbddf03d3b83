"""TokenFlow against per-frame editing on the micro *trained* diffusion transformer (flow matching, SD3 layout):
ground-truth warp error on clips of the micro world with exact known motion.

    python benchmarks/bench_dit.py                                 # seeds 0 1 2, both edit prompts
    python benchmarks/bench_dit.py --propagation-t 1               # TokenFlow on every step (the paper's)
    python benchmarks/bench_dit.py --seeds 0 --edits 0 --steps 20  # a quick look

For each clip (``micro_model/make_clip.py``: 16 frames, 96x64, a pan of 2 px a frame) and edit prompt: invert once
(flow ODE on the editing grid, fixed-point refined, prompt = the clip's caption), then edit with TokenFlow and with
the per-frame baseline (``propagation none``), same seed, guidance, PnP and steps; decode; ground-truth warp error
(edited frame i+1 moved back by the known shift onto frame i, mean absolute difference 0-255, 4 px border
excluded; ``bench_edit.gt_warp_error``) of the source, the VAE round trip, the inversion's reconstruction and the
two edits; and how far each edit moved the frames from the source (mean absolute difference), so a lower warp error
is not just a smaller edit. Writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "micro_model"))
sys.path.insert(0, str(HERE))

from bench_edit import gt_warp_error  # noqa: E402
from common import machine_info  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=HERE / "micro_dit" / "model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--edits", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--shift", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--refinements", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--propagation-t", type=float, default=None,
                        help="fraction of the steps with TokenFlow (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokenflow-blocks", type=int, nargs="+", default=None,
                        help="TokenFlow in these transformer blocks only (the others per frame; default: all)")
    parser.add_argument("--pnp-blocks", type=int, nargs="+", default=None,
                        help="PnP query/key injection in these blocks only (default: the model's, all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--border", type=int, default=4)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "bench_dit.json")
    parser.add_argument("--qk-sweep", action="store_true",
                        help="instead: which blocks PnP should inject queries/keys into (the colour edit, TokenFlow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    import make_clip
    from tokenflow.backbones import load_model
    from tokenflow.editor import EditConfig, TokenFlowEditor
    from tokenflow.metrics.image import psnr

    diffusers_logging.set_verbosity_error()  # the micro DiT's T5 reads 4 tokens by design
    model = load_model(args.model, device="cpu", dtype="float32")
    editor = TokenFlowEditor(model)
    layers = None
    if args.tokenflow_blocks is not None or args.pnp_blocks is not None:
        from tokenflow.backbones import LayerSelection

        def patterns(blocks):
            return None if blocks is None else [f"transformer_blocks.{i}.*" for i in blocks]

        layers = LayerSelection(tokenflow_patterns=patterns(args.tokenflow_blocks), qk_patterns=patterns(args.pnp_blocks))
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            meta = make_clip.make(tmp, seed, shift=args.shift)
            frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(tmp, "frames").glob("*.png"))])
            masks = np.load(Path(tmp, "masks.npy"))
        clip = torch.from_numpy(frames)
        started = time.perf_counter()
        source = editor.invert(clip, inversion_prompt=meta["caption"], steps=args.steps,
                               refinements=args.refinements, batch_size=args.batch_size, progress=False)
        invert_s = time.perf_counter() - started
        with torch.no_grad():
            vae = model.decode_latents(source.clean).numpy()
        # reconstruction through each mode: the caption as the target, guidance 1, no PnP (per-frame sampling
        # retraces the inversion; whatever TokenFlow loses here it loses in every edit)
        rebuilt = {}
        for mode in ("tokenflow", "none"):
            config = EditConfig(prompt=meta["caption"], inversion_prompt=meta["caption"], negative_prompt="",
                                steps=args.steps, guidance_scale=1.0, batch_size=args.batch_size, propagation=mode,
                                pnp=False, seed=0, propagation_t=args.propagation_t, layers=layers)
            with torch.no_grad():
                out = model.decode_latents(editor.edit(source, config, progress=False).latents).numpy()
            rebuilt[mode] = float(np.mean(psnr(out, vae)))
        base = dict(seed=seed, shift=args.shift, caption=meta["caption"],
                    rebuild_psnr_tokenflow=rebuilt["tokenflow"], rebuild_psnr_per_frame=rebuilt["none"],
                    warp_source=gt_warp_error(frames, args.shift, args.border),
                    warp_vae=gt_warp_error(vae, args.shift, args.border),
                    reconstruction_psnr=source.reconstruction_psnr, inversion_seconds=invert_s)
        if args.qk_sweep:
            runs += qk_sweep(model, editor, source, frames, masks, meta, args)
            continue
        for e in args.edits:
            edit = meta["edits"][e]
            row = dict(base, edit=edit["kind"], prompt=edit["prompt"])
            for mode in ("tokenflow", "none"):
                config = EditConfig(prompt=edit["prompt"], inversion_prompt=meta["caption"], negative_prompt="",
                                    steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size,
                                    propagation=mode, seed=0, propagation_t=args.propagation_t, layers=layers)
                started = time.perf_counter()
                out = editor.edit(source, config, progress=False)
                seconds = time.perf_counter() - started
                with torch.no_grad():
                    edited = model.decode_latents(out.latents).numpy()
                row[mode] = dict(warp=gt_warp_error(edited, args.shift, args.border),
                                 change=float(np.abs(edited.astype(float) - frames).mean()), seconds=seconds)
            row["ratio"] = row["tokenflow"]["warp"] / row["none"]["warp"]
            runs.append(row)
            print(f"seed {seed} {edit['kind']}: warp TokenFlow {row['tokenflow']['warp']:.2f} per-frame "
                  f"{row['none']['warp']:.2f} ratio {row['ratio']:.3f} (source {row['warp_source']:.2f}, VAE "
                  f"{row['warp_vae']:.2f}; change {row['tokenflow']['change']:.1f} / {row['none']['change']:.1f}; "
                  f"reconstruction {source.reconstruction_psnr:.1f} dB; rebuilt through TokenFlow "
                  f"{row['rebuild_psnr_tokenflow']:.1f} dB, per frame {row['rebuild_psnr_per_frame']:.1f} dB)",
                  flush=True)
    if args.qk_sweep:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(settings={k: str(v) for k, v in vars(args).items()}, runs=runs,
                                             machine=machine_info(args.threads, {"machine": {}})), indent=1))
        return
    ratios = [r["ratio"] for r in runs]
    result = dict(settings=vars(args) | {"model": str(args.model), "json": str(args.json)}, runs=runs,
                  ratio_mean=float(np.mean(ratios)), ratio_range=[float(min(ratios)), float(max(ratios))],
                  machine=machine_info(args.threads, {"machine": {"torch": torch.__version__}}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"ratio TokenFlow / per-frame: mean {result['ratio_mean']:.3f}, range {result['ratio_range']}")


def qk_sweep(model, editor, source, frames, masks, meta, args) -> list[dict]:
    """The colour edit with PnP query/key injection in several sets of blocks (and none): how much the background
    moves (mean absolute change outside every object, 0-255: structure kept when low) and how far the edited
    object's mean colour moves toward the target colour (0-255 RGB distance gained: the edit happening)."""
    import scenes

    from tokenflow.backbones import LayerSelection
    from tokenflow.editor import EditConfig

    edit = meta["edits"][0]
    target = np.array(scenes.COLORS[edit["target"]], np.float64)
    obj = masks[:, meta["objs_sorted"][0]] > 0.5
    background = masks.max(axis=1) < 0.05
    blocks = len(model.unet.transformer_blocks)
    half = blocks // 2
    sets = {"none (PnP off)": None, f"0-{half - 1} (default)": list(range(half)),
            f"{half}-{blocks - 1}": list(range(half, blocks)), f"0-{blocks - 1} (all)": list(range(blocks)),
            "0": [0], f"{blocks - 1}": [blocks - 1]}
    before = np.linalg.norm(frames[obj].astype(np.float64).mean(0) - target)
    rows = []
    for label, chosen in sets.items():
        layers = None if chosen is None else LayerSelection(
            qk_patterns=[f"transformer_blocks.{i}.*" for i in chosen])
        config = EditConfig(prompt=edit["prompt"], inversion_prompt=meta["caption"], negative_prompt="",
                            steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size, seed=0,
                            pnp=chosen is not None, layers=layers)
        with torch.no_grad():
            edited = model.decode_latents(editor.edit(source, config, progress=False).latents).numpy()
        moved = float(np.abs(edited.astype(np.float64) - frames)[background].mean())
        gained = float(before - np.linalg.norm(edited[obj].astype(np.float64).mean(0) - target))
        rows.append(dict(seed=meta["seed"], blocks=label, background_change=moved, toward_target=gained,
                         warp=gt_warp_error(edited, args.shift, args.border)))
        print(f"seed {meta['seed']} qk blocks {label}: background change {moved:.1f}, colour toward target "
              f"{gained:.1f}, warp {rows[-1]['warp']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
