"""Time the public reference TokenFlow code (omerbt/TokenFlow, commit 5dd6a69, PnP path) on CPU, end to end.

What: runs the reference's own ``preprocess.prep`` (encode, DDIM inversion, its reconstruction pass, saving the
latents) and its own ``run_tokenflow_pnp.py`` (TokenFlow + Plug-and-Play edit, decode, saving frames and videos)
on the micro trained model of ``micro_model/`` and a ``micro_model/make_clip.py`` clip, in float32 on CPU, and
writes a JSON with the wall time of each stage (``preprocess``, ``edit``, ``total``; sub-stages under
``breakdown``) and the machine. It gives a baseline for this project's own first-edit wall time on the same
machine (``bench_edit.py``). Nothing of the reference is copied here: bring your own checkout.

How to run (the reference needs torchvision and kornia, which this project does not; use a separate venv)::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 torchvision==0.28.0 diffusers==0.42.1 transformers==5.25.0 \\
        accelerate kornia==0.8.1 av opencv-python-headless pyyaml tqdm pillow numpy
    git clone https://github.com/omerbt/TokenFlow /tmp/refcode && git -C /tmp/refcode checkout 5dd6a69
    /tmp/refvenv/bin/python benchmarks/bench_reference.py --reference-dir /tmp/refcode \\
        --steps 500 --edit-steps 50 --threads 1 --json benchmarks/results/bench_reference.json

Defaults: clip seed 0 (shift 2, 16 frames of 96x64, no resize: the reference only forces *square* frames to
512x512), inversion prompt = the clip's caption, prompt = its ``edits[--edit-index]`` prompt, negative prompt "",
500 inversion steps saved at 50, batch size 4, 50 editing steps, guidance 7.5, pnp_attn_t 0.5, pnp_f_t 0.8, seed 1.
Versions that work: the ones above, Python 3.11 (kornia 0.9 moved ``kornia.utils.grid``, which
``util.py`` imports, so kornia < 0.9). The micro model's tokenizer is in transformers 5's
``tokenizers`` format, so transformers >= 5 is required.

What is patched, from the outside, and why (the reference's algorithm is untouched):
  * ``from_pretrained`` of AutoencoderKL, UNet2DConditionModel, DDIMScheduler, StableDiffusionPipeline,
    CLIPTextModel, CLIPTokenizer: the hub ids the reference hard-codes (``stabilityai/stable-diffusion-2-1-base``)
    are mapped to ``--model`` (no network here), ``revision="fp16"`` is dropped and fp16 becomes float32.
  * ``torch.Tensor.to``, ``torch.nn.Module.to``, ``DiffusionPipeline.to``: the hard-coded ``"cuda"`` (e.g.
    ``pipe.to("cuda")``, ``get_text_embeds(device="cuda")``) becomes ``"cpu"`` and ``torch.float16`` becomes
    ``torch.float32`` (CPU fp16 kernels are slow or missing; float32 is what this project's CPU runs use). The
    ``device`` settings themselves are set to ``"cpu"``. ``torch.autocast("cuda")`` needs no patch: without CUDA
    it disables itself.
  * torchvision 0.28 (the one for torch 2.13) no longer has ``torchvision.io.write_video``/``read_video``:
    ``write_video`` is re-added with PyAV (same codec and options, libx264 crf 18 preset slow); ``read_video`` is
    only used by the reference's video-to-frames extraction, which is skipped (the clip already has PNG frames at
    the target size, so its LANCZOS resize would be a no-op). PyPI's torchvision wheels are CUDA builds whose C
    ops cannot load next to a CPU torch; its Python part (transforms) works once the fake-kernel registrations of
    those missing ops are skipped during import.
  * The two scripts' ``__main__`` blocks are replaced by direct calls: ``preprocess.prep(opt)`` (its module-level
    ``device`` global set to "cpu") and ``run_tokenflow_pnp.run(config)`` (its module-level ``config`` global set
    to the same dict). Their sub-stages are timed by wrapping the reference's methods (``breakdown``).

Stage times include what the reference does around the math: model loading, VAE encode/decode, saving latents,
PNGs and its nine mp4 files. ``breakdown`` entries may overlap (``edit_decode`` also runs inside
``edit_vae_recon`` and ``edit_denoise_decode_save``). Checked against ``../shared/golden/ref-pan`` (its model,
frames and settings): inverted latents within 1e-5 relative, edited frames within 0.02/255 per frame.

Run only short smoke tests on a shared machine, e.g. ``--n-frames 4 --steps 20 --edit-steps 5`` (seconds); the
editing grid must be a subset of the inversion grid (1000 // edit_steps a multiple of 1000 // steps) or the edit
fails on a missing latents file. The full default run takes about 2 minutes on one thread of an idle EPYC core.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

from common import QUIET_ENV, machine_info

HERE = Path(__file__).resolve().parent
MICRO_DIR = HERE / "micro_model"
log = logging.getLogger("bench_reference")


# ------------------------------------------------------------------------------------------------ patches


def _cpu_args(args, kwargs):
    """Map any CUDA device to "cpu" and float16 to float32 in ``.to()``-style arguments."""
    import torch

    def fix(a):
        if isinstance(a, str) and a.startswith("cuda"):
            return "cpu"
        if isinstance(a, torch.device) and a.type == "cuda":
            return torch.device("cpu")
        if a is torch.float16:
            return torch.float32
        return a

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}


def _patch_to(cls):
    orig = cls.to

    def to(self, *args, **kwargs):
        args, kwargs = _cpu_args(args, kwargs)
        return orig(self, *args, **kwargs)

    cls.to = to


def _patch_from_pretrained(cls, model_dir: str):
    orig = cls.from_pretrained.__func__

    def from_pretrained(klass, key, *args, **kwargs):
        if not os.path.isdir(str(key)):  # a hub id: use the local model folder instead
            key = model_dir
            kwargs.pop("revision", None)
        for name in ("torch_dtype", "dtype"):
            if kwargs.get(name) is not None:
                kwargs[name] = __import__("torch").float32
        return orig(klass, key, *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


def _import_torchvision():
    """Import torchvision even where its compiled ops cannot load (CUDA wheel beside a CPU torch)."""
    import torch

    try:
        import torchvision
    except RuntimeError as err:  # "operator torchvision::nms does not exist"
        log.info("torchvision ops unavailable (%s); importing its Python part only", err)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        orig = torch.library.register_fake
        torch.library.register_fake = lambda *a, **k: (lambda fn: fn)
        try:
            import torchvision
        finally:
            torch.library.register_fake = orig
    import torchvision.io

    if not hasattr(torchvision.io, "write_video"):
        torchvision.io.write_video = _write_video
    if not hasattr(torchvision.io, "read_video"):
        torchvision.io.read_video = _read_video_unavailable


def _write_video(filename, video_array, fps, video_codec="libx264", options=None, **_):
    """torchvision's ``write_video`` (uint8 THWC tensor), re-added with PyAV."""
    import av

    frames = video_array.cpu().numpy() if hasattr(video_array, "numpy") else video_array
    with av.open(filename, "w") as container:
        stream = container.add_stream(video_codec, rate=Fraction(fps).limit_denominator())
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options or {})
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _read_video_unavailable(*_, **__):
    raise NotImplementedError("torchvision.io.read_video is gone in this torchvision; pass a frames folder")


def install_patches(model_dir: str) -> None:
    """Everything that lets the CUDA/fp16/hub-only reference code run on CPU in float32 from a local folder."""
    import torch

    _import_torchvision()  # first: transformers and diffusers import torchvision when it is installed
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiffusionPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    for cls in (torch.Tensor, torch.nn.Module, DiffusionPipeline):
        _patch_to(cls)
    for cls in (AutoencoderKL, UNet2DConditionModel, DDIMScheduler, StableDiffusionPipeline, CLIPTextModel,
                CLIPTokenizer):
        _patch_from_pretrained(cls, model_dir)


@contextmanager
def timed_methods(targets: dict, into: dict):
    """Record the wall time of each ``(class, method name)`` in ``targets`` (label -> target) into ``into``."""
    saved = []
    for label, (cls, name) in targets.items():
        orig = getattr(cls, name)

        def wrapper(*args, _orig=orig, _label=label, **kwargs):
            t0 = time.perf_counter()
            try:
                return _orig(*args, **kwargs)
            finally:
                into[_label] = into.get(_label, 0.0) + time.perf_counter() - t0

        setattr(cls, name, wrapper)
        saved.append((cls, name, orig))
    try:
        yield
    finally:
        for cls, name, orig in saved:
            setattr(cls, name, orig)


# ------------------------------------------------------------------------------------------------ stages


def run_preprocess(args, frames_dir: str, inversion_prompt: str, work: Path, breakdown: dict) -> float:
    """The reference's ``preprocess.prep``: load, encode, DDIM inversion, reconstruction, save. Returns seconds."""
    import preprocess  # the reference's module, from --reference-dir

    preprocess.device = "cpu"  # the global its __main__ block would set to "cuda"
    opt = argparse.Namespace(
        data_path=frames_dir, H=args.height, W=args.width, save_dir=str(work / "latents"), sd_version="2.1",
        steps=args.steps, batch_size=args.inversion_batch_size or args.batch_size, save_steps=args.save_steps,
        n_frames=args.n_frames, inversion_prompt=inversion_prompt,
    )
    targets = {"preprocess_load_encode": (preprocess.Preprocess, "__init__"),
               "preprocess_inversion": (preprocess.Preprocess, "ddim_inversion"),
               "preprocess_reconstruction": (preprocess.Preprocess, "ddim_sample"),
               "preprocess_decode": (preprocess.Preprocess, "decode_latents")}
    with timed_methods(targets, breakdown):
        t0 = time.perf_counter()
        preprocess.prep(opt)
        return time.perf_counter() - t0


def run_edit(args, frames_dir: str, prompt: str, work: Path, breakdown: dict) -> tuple[float, str]:
    """The reference's ``run_tokenflow_pnp.run(config)``: load, encode, edit, decode, save. Returns seconds, folder.

    Does what its ``__main__`` block does (a config dict, the output folder, ``config.yaml`` there, ``run``), with
    the module-level ``config`` global that its methods read set to the same dict.
    """
    import run_tokenflow_pnp as ref  # the reference's module, from --reference-dir
    import yaml

    config = dict(
        seed=args.seed, device="cpu", output_path=str(work / "tokenflow-results"), data_path=frames_dir,
        latents_path=str(work / "latents"), n_inversion_steps=args.steps, n_frames=args.n_frames,
        sd_version="2.1", guidance_scale=args.guidance, n_timesteps=args.edit_steps, prompt=prompt,
        negative_prompt=args.negative_prompt, batch_size=args.batch_size, pnp_attn_t=args.pnp_attn_t,
        pnp_f_t=args.pnp_f_t,
    )
    os.makedirs(config["output_path"], exist_ok=True)
    Path(config["output_path"], "config.yaml").write_text(yaml.dump(config))
    ref.config = config
    targets = {"edit_load_encode": (ref.TokenFlow, "__init__"),
               "edit_vae_recon": (ref.TokenFlow, "save_vae_recon"),
               "edit_denoise_decode_save": (ref.TokenFlow, "sample_loop"),
               "edit_decode": (ref.TokenFlow, "decode_latents")}
    with timed_methods(targets, breakdown):
        t0 = time.perf_counter()
        ref.run(config)
        return time.perf_counter() - t0, config["output_path"]


# ------------------------------------------------------------------------------------------------ main


def torch_machine(threads: int) -> dict:
    import torch

    return dict(torch=torch.__version__, torch_threads=torch.get_num_threads(), requested_threads=threads,
                cuda=False)


def check_outputs(out_dir: str, n_frames: int) -> dict:
    """Sanity of what the reference wrote: edited PNGs present, finite, not constant."""
    import numpy as np
    from PIL import Image

    pngs = sorted(Path(out_dir, "img_ode").glob("*.png"))
    frames = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in pngs]) if pngs else np.zeros(0)
    videos = sorted(p.name for p in Path(out_dir).glob("*.mp4"))
    return dict(edited_frames=len(pngs), expected_frames=n_frames, videos=videos,
                finite=bool(np.isfinite(frames).all()), mean=float(frames.mean()) if pngs else None,
                std=float(frames.std()) if pngs else None)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reference-dir", required=True, help="your checkout of omerbt/TokenFlow (commit 5dd6a69)")
    p.add_argument("--model", default=str(MICRO_DIR / "model"), help="diffusers Stable Diffusion folder")
    p.add_argument("--clip-dir", help="a make_clip.py output folder (frames/; clip.json, read for missing prompts);"
                   " made if not given")
    p.add_argument("--clip-seed", type=int, default=0)
    p.add_argument("--clip-shift", type=int, default=2)
    p.add_argument("--edit-index", type=int, default=0, help="which of clip.json's edits[] prompts to use")
    p.add_argument("--prompt", help="edit prompt (default: clip.json's edits[--edit-index].prompt)")
    p.add_argument("--inversion-prompt", help="default: clip.json's caption")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--n-frames", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4, help="TokenFlow chunk size (and inversion batch)")
    p.add_argument("--inversion-batch-size", type=int, help="preprocess --batch_size (default: --batch-size)")
    p.add_argument("--steps", type=int, default=500, help="inversion steps (preprocess --steps)")
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--edit-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--pnp-attn-t", type=float, default=0.5)
    p.add_argument("--pnp-f-t", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", help="where the reference writes latents and results (default: a temp folder)")
    p.add_argument("--json", default=str(HERE / "results" / "bench_reference.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_reference_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.clip_dir is None:
        sys.path.insert(0, str(MICRO_DIR))
        import make_clip

        args.clip_dir = str(work / "clip")
        log.info("making clip seed %d in %s", args.clip_seed, args.clip_dir)
        make_clip.make(args.clip_dir, args.clip_seed, args.clip_shift, 16)
    inversion_prompt, prompt = args.inversion_prompt, args.prompt
    if inversion_prompt is None or prompt is None:
        meta = json.loads(Path(args.clip_dir, "clip.json").read_text())
        inversion_prompt = meta["caption"] if inversion_prompt is None else inversion_prompt
        prompt = meta["edits"][args.edit_index]["prompt"] if prompt is None else prompt
    frames_dir = str(Path(args.clip_dir, "frames").resolve())

    install_patches(str(Path(args.model).resolve()))
    sys.path.insert(0, str(Path(args.reference_dir).resolve()))
    cwd = os.getcwd()
    os.chdir(work)  # the reference writes relative to the working directory
    breakdown: dict = {}
    try:
        log.info("preprocess: %d frames, %d inversion steps, inversion prompt %r", args.n_frames, args.steps,
                 inversion_prompt)
        t_pre = run_preprocess(args, frames_dir, inversion_prompt, work, breakdown)
        log.info("preprocess done in %.1f s; edit: %d steps, prompt %r", t_pre, args.edit_steps, prompt)
        t_edit, out_dir = run_edit(args, frames_dir, prompt, work, breakdown)
        log.info("edit done in %.1f s -> %s", t_edit, out_dir)
    finally:
        os.chdir(cwd)

    result = dict(
        what="public reference TokenFlow (omerbt/TokenFlow 5dd6a69), PnP path, CPU float32",
        reference_dir=str(Path(args.reference_dir).resolve()),
        settings={k: v for k, v in vars(args).items() if k not in ("json",)} | dict(
            prompt=prompt, inversion_prompt=inversion_prompt),
        seconds=dict(preprocess=round(t_pre, 3), edit=round(t_edit, 3), total=round(t_pre + t_edit, 3),
                     breakdown={k: round(v, 3) for k, v in breakdown.items()}),
        outputs=check_outputs(out_dir, args.n_frames) | dict(folder=out_dir),
        machine=machine_info(args.threads, dict(machine=torch_machine(args.threads))),
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    log.info("wrote %s: preprocess %.1f s, edit %.1f s, total %.1f s", args.json, t_pre, t_edit, t_pre + t_edit)
    return result


if __name__ == "__main__":
    main()
