"""The paper's feature analysis on the micro trained model: are an edit's diffusion features as consistent as the
source's? (Geyer et al., figure 3: per-frame editing breaks it, TokenFlow keeps it.) And how far can a frame's
features serve another frame (figure 2)?

    python benchmarks/bench_features.py                  # seed 0 of the micro world, 16 frames, 2 px/frame
    python benchmarks/bench_features.py --seeds 0 1 2 --out /tmp/features

For each seed: a clip of the micro model's own world (``micro_model/make_clip.py``, exact known motion), edited with
TokenFlow and with the per-frame Plug-and-Play baseline (50 steps, guidance 7.5, batch 4, the caption as inversion
prompt, empty negative prompt: the settings of ``bench_edit.py``), then ``tokenflow features`` on the source with
both edits (same PCA basis: their ``consistency``) and ``tokenflow reconstruct --sweep`` from frame 0. Everything
runs through the command line, as a user would. Writes ``--json`` and, for the first seed, the pictures to
``--pictures`` (the README's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info

HERE = Path(__file__).resolve().parent
MICRO_DIR = HERE / "micro_model"
MICRO_MODEL = MICRO_DIR / "model"
NAMES = ("source", "tokenflow", "per-frame")


def _run(args: list[str]) -> None:
    from tokenflow.cli import main

    rc = main(args)
    if rc != 0:
        raise SystemExit(f"tokenflow {' '.join(args)} exited with {rc}")


def study(seed: int, shift: int, frames: int, work: Path, steps: int) -> dict:
    sys.path.insert(0, str(MICRO_DIR))
    import make_clip

    meta = make_clip.make(str(work / f"clip{seed}"), seed, shift, frames)
    clip = work / f"clip{seed}" / f"clip{seed}.mkv"
    common = ["--model", str(MICRO_MODEL), "--steps", str(steps), "--inversion-prompt", meta["caption"],
              "--cache-dir", str(work / "cache"), "-q"]
    edits, seconds = {}, {}
    for mode in ("tokenflow", "none"):
        out = work / f"edit{seed}-{mode}"
        started = time.perf_counter()
        _run(["edit", str(clip), "--prompt", meta["edits"][0]["prompt"], "--negative-prompt", "", "--batch-size", "4",
              "--propagation", mode, "--out", str(out), *common])
        seconds[mode] = round(time.perf_counter() - started, 1)
        edits[mode] = out / "edited.mp4"
    features = work / f"features{seed}"
    _run(["features", str(clip), "--edited", str(edits["tokenflow"]), "--edited", str(edits["none"]),
          "--out", str(features), *common])
    sweep = work / f"sweep{seed}"
    _run(["reconstruct", str(clip), "--from", "0", "--sweep", "--out", str(sweep), *common])
    report = json.loads((features / "features.json").read_text())
    return dict(seed=seed, shift=shift, frames=frames, caption=meta["caption"], prompt=meta["edits"][0]["prompt"],
                layer=report["layer"], timestep=report["timestep"], edit_seconds=seconds,
                consistency={name: v["consistency"] for name, v in zip(NAMES, report["videos"])},
                along_source={name: v["consistency_along_source"] for name, v in zip(NAMES, report["videos"])},
                sweep=json.loads((sweep / "sweep.json").read_text())["points"],
                folders=dict(features=str(features), sweep=str(sweep)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--shift", type=int, default=2)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "bench_features.json")
    parser.add_argument("--pictures", type=Path, default=HERE.parent / "docs")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-features-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [study(seed, args.shift, args.frames, work, args.steps) for seed in args.seeds]
    first = results[0]["folders"]
    args.pictures.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(first["features"]) / "slice.png", args.pictures / "features-slice.png")
    shutil.copy(Path(first["sweep"]) / "sweep.png", args.pictures / "features-sweep.png")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    torch_facts = dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability())
    machine = machine_info(args.threads, {"machine": torch_facts})
    args.json.write_text(json.dumps(dict(machine=machine, results=results), indent=1))
    print("| seed | measure | source | TokenFlow | per-frame PnP |")
    print("|---|---|---|---|---|")
    for r in results:
        for label, key in (("nearest-neighbour consistency", "consistency"), ("along the source", "along_source")):
            c = r[key]
            print(f"| {r['seed']} | {label} | {c['source']:.4f} | {c['tokenflow']:.4f} | {c['per-frame']:.4f} |")
    print("\n| distance | tokens | warp | frame 0 itself | J alone |")
    print("|---|---|---|---|---|")
    for p in results[0]["sweep"]:
        print(f"| {p['distance']} | {p['psnr_tokens']:.2f} | {p['psnr_warp']:.2f} | {p['psnr_unwarped']:.2f} | "
              f"{p['psnr_plain']:.2f} |")


if __name__ == "__main__":
    main()
