"""``tokenflow features`` and ``tokenflow reconstruct``: from a video file to an output folder of pictures and JSON.

Both read and invert the video as ``tokenflow invert`` does (the inversion is cached and shared with edits), then
call the analysis functions of this package; the output folder is written beside its destination and moved into
place at the end, like an edit's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import io as video_io
from ..editor import TokenFlowEditor
from ..errors import InputError
from ..events import CancelToken, ProgressCallback
from ..inversion import psnr
from ..io import FrameStore
from ..options import AnalysisOptions
from ..runner import _default_out, _invert, _prepare, _progress, load_editor, staged_output, working_size
from .features import (
    fit_pca,
    frame_consistency,
    frame_consistency_along,
    pca_rgb,
    time_slice,
    upsample_nearest,
)
from .plots import plot_slices, plot_sweep, save_reconstruction_figure
from .reconstruct import check_frames, reconstruct_from_tokens, warp_from
from .tokens import AttentionLayer, capture_tokens, default_layer, list_layers, resolve_layer, resolve_timestep

logger = logging.getLogger(__name__)

__all__ = ["FeaturesResult", "ReconstructResult", "features_video", "reconstruct_video", "video_layers",
           "sweep_distances"]


@dataclass
class FeaturesResult:
    out_dir: Path
    report: dict = field(default_factory=dict)


@dataclass
class ReconstructResult:
    out_dir: Path
    report: dict = field(default_factory=dict)


def video_layers(options: AnalysisOptions, editor: TokenFlowEditor | None = None) -> list[AttentionLayer]:
    """The model's self-attention layers with their token grids at the video's working size (``--list-layers``):
    the video is probed, not read or inverted."""
    options.check_inputs()
    info = video_io.probe(options.video)
    editor = load_editor(options, editor)
    width, height = working_size(options, editor.model, info)
    factor = editor.model.vae_scale_factor
    return list_layers(editor.model, height // factor, width // factor)


def _layer(model, options: AnalysisOptions, latent_height: int, latent_width: int) -> str:
    if options.layer is not None:
        return resolve_layer(model, options.layer)
    return default_layer(model, list_layers(model, latent_height, latent_width))


def _stage_edited(path: Path, store: Path, width: int, height: int, max_frames: int | None,
                  allow_partial: bool = False) -> FrameStore:
    """An edited video's frames (all of them, or the first ``max_frames``) at the source's working size."""
    frames = video_io.read_frames(path, max_frames=max_frames, allow_partial=allow_partial)
    resized = (video_io.resize_frames(frame, width, height) for frame in frames)
    return FrameStore.write(store, resized, source=f"`edited` {path}")


def features_video(
    options: AnalysisOptions,
    editor: TokenFlowEditor | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> FeaturesResult:
    """``tokenflow features``: one layer's tokens of the video (and of every ``edited`` video, inverted the same
    way) at one timestep, shown in one joint PCA basis. Writes ``pca.mp4`` (frames beside their first three
    components as RGB; ``pca-edited-K.mp4`` per edited video), ``slice.png`` (one row over time, pixels and
    features) and ``features.json`` (``consistency`` per video: the mean cosine similarity of each frame's
    tokens, centred on the joint mean token, with their nearest neighbours in the next frame; ``consistency_drop``:
    the source's minus the video's; ``consistency_along_source``, for videos as long as the source: the same
    similarity along the source's own correspondences, :func:`~.features.frame_consistency_along`)."""
    options.check_inputs()
    progress = _progress(options, progress)
    out_dir = Path(options.out) if options.out is not None else _default_out(options, "features")
    with staged_output(out_dir) as staging:
        work = staging / ".work"
        editor, frames, info, timings = _prepare(options, editor, lambda: work)
        model = editor.model
        height, width = frames.shape[1:3]
        factor = model.vae_scale_factor
        timestep = resolve_timestep(model, options.steps, options.timestep, (height // factor, width // factor))
        layer = _layer(model, options, height // factor, width // factor)
        row = options.row if options.row is not None else height // 2
        if row >= height:
            raise InputError(f"`row` {row}: the working size is {width}x{height}; use 0..{height - 1}")
        videos = [dict(path=str(options.video), frames=frames, fps=info.fps / options.stride, pca="pca.mp4")]
        for k, path in enumerate(options.edited):
            edited = _stage_edited(Path(path), work / f"edited-{k}.rgb", width, height, options.max_frames,
                                   options.allow_partial)
            videos.append(dict(path=str(path), frames=edited, fps=video_io.probe(path).fps, pca=f"pca-edited-{k}.mp4"))
        for video in videos:
            source, _ = _invert(editor, video["frames"], options, {}, progress, cancel)
            video["tokens"] = capture_tokens(model, source.noisy[timestep], timestep, [layer],
                                             prompt=options.inversion_prompt, batch_size=options.batch_size,
                                             progress=progress, cancel=cancel)[layer]
        grid = videos[0]["tokens"].grid
        basis = fit_pca([v["tokens"].outputs for v in videos])
        slices = []
        for video in videos:
            tokens = video["tokens"]
            pixels, features = _write_pca_video(staging / video["pca"], video["frames"], tokens.outputs, grid, basis,
                                                video["fps"], options.batch_size, row)
            centred = tokens.outputs - basis.mean.float()
            per_frame = frame_consistency(centred)
            video["consistency"] = None if per_frame.numel() == 0 else float(per_frame.mean())
            video["per_frame"] = [round(float(c), 6) for c in per_frame]
            video["along"] = None
            if tokens.inputs.shape[:2] == videos[0]["tokens"].inputs.shape[:2] and per_frame.numel():
                video["along"] = float(frame_consistency_along(centred, videos[0]["tokens"].inputs).mean())
            slices.append((_label(video["path"]), pixels, features))
        plot_slices(staging / "slice.png", slices, row, layer, timestep)
        base = videos[0]["consistency"]
        report = dict(
            layer=layer, timestep=timestep, grid=list(grid), row=row,
            explained_variance=[round(float(v), 6) for v in basis.explained],
            videos=[dict(path=v["path"], frames=int(v["frames"].shape[0]), consistency=v["consistency"],
                         consistency_drop=None if base is None or v["consistency"] is None
                         else base - v["consistency"], consistency_along_source=v["along"],
                         per_frame_consistency=v["per_frame"], pca=v["pca"])
                    for v in videos],
        )
        (staging / "features.json").write_text(json.dumps(report, indent=1))
    for video in report["videos"]:
        logger.info("%s: feature consistency %s", video["path"],
                    "n/a (one frame)" if video["consistency"] is None else f"{video['consistency']:.4f}")
    logger.info("wrote %s", out_dir)
    return FeaturesResult(out_dir, report)


def _label(path: str) -> str:
    """A video's name in the figures: its folder and file (edits are often all called edited.mp4)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _write_pca_video(path: Path, frames, outputs: torch.Tensor, grid, basis, fps: float, batch: int, row: int):
    """``pca.mp4``: each frame beside its tokens' PCA colours (upsampled to the frame), a batch at a time; returns
    image row ``row`` of the frames and of the colours over time (``[N, W, 3]`` each)."""
    n, height, width = frames.shape[:3]
    pixels, features = [], []
    with video_io.VideoWriter(path, fps, 2 * width, height) as out:
        for start in range(0, n, max(1, batch)):
            images = np.asarray(frames[start : start + batch])
            rgb = pca_rgb(outputs[start : start + batch], grid, basis)
            colours = (upsample_nearest(rgb, height, width) * 255).round().to(torch.uint8).numpy()
            for frame, colour in zip(images, colours):
                out.write(video_io.side_by_side(frame, colour))
            pixels.append(time_slice(images, row))
            features.append(time_slice(colours, row))
    return np.concatenate(pixels), np.concatenate(features)


def sweep_distances(from_frame: int, frames: int, farthest: int | None = None) -> list[int]:
    """Target frames at growing distance from ``from_frame`` (1, 2, 3, 4, 6, 8, 12, 16, ...: about two per octave),
    forward while the clip allows it, else backward, up to ``farthest`` frames away (default: as far as it goes)."""
    room = frames - 1 - from_frame
    direction = 1 if room > 0 else -1
    room = room if room > 0 else from_frame
    limit = room if farthest is None else min(room, farthest)
    distances, d = [], 1
    while d <= limit:
        distances.append(d)
        d = d + 1 if d < 4 else (d * 3 // 2 if (d & (d - 1)) == 0 else d * 4 // 3)
    if limit >= 1 and distances[-1] != limit:
        distances.append(limit)
    return [from_frame + direction * d for d in distances]


def reconstruct_video(
    options: AnalysisOptions,
    editor: TokenFlowEditor | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> ReconstructResult:
    """``tokenflow reconstruct``: frame ``to_frame`` rebuilt from frame ``from_frame``'s features (see
    :mod:`tokenflow.analysis.reconstruct`), or with ``sweep`` frames ever farther from it. Writes
    ``reconstruct.png`` (frame I, the true frame J, the rebuilt ones), the images alone and ``reconstruct.json``
    (``psnr_tokens``, ``psnr_warp``, ``psnr_unwarped``: frame I itself; ``psnr_plain``: frame J denoised without
    replacement, the ceiling); with ``sweep`` ``sweep.json`` and ``sweep.png`` (PSNR against frame distance)."""
    options.check_inputs()
    progress = _progress(options, progress)
    out_dir = Path(options.out) if options.out is not None else _default_out(options, "reconstruct")
    i = options.from_frame
    with staged_output(out_dir) as staging:
        work = staging / ".work"
        editor, frames, info, timings = _prepare(options, editor, lambda: work)
        model = editor.model
        n = frames.shape[0]
        if options.sweep:
            check_frames(n, i, [] if options.to_frame is None else [options.to_frame])
            farthest = None if options.to_frame is None else abs(options.to_frame - i)
            targets = sweep_distances(i, n, farthest)
            if not targets:
                raise InputError(f"`sweep` needs a clip of 2 frames or more; {options.video} has {n}")
        else:
            targets = [i + 1 if options.to_frame is None else options.to_frame]
        check_frames(n, i, targets)  # before the inversion: an out-of-range frame or timestep costs nothing
        factor = model.vae_scale_factor
        timestep = resolve_timestep(model, options.steps, options.timestep,
                                    (frames.shape[1] // factor, frames.shape[2] // factor))
        source, _ = _invert(editor, frames, options, timings, progress, cancel)
        layer = _layer(model, options, *source.clean.shape[2:])
        modes = ("tokens", "warp") if options.reconstruction == "both" else (options.reconstruction,)
        points = [dict(to=j, distance=abs(j - i)) for j in targets]
        truth = {j: np.asarray(frames[j]) for j in [i] + targets}
        images = {}
        if "warp" in modes:
            picked = [i] + targets
            tokens = capture_tokens(model, source.noisy[timestep][picked], timestep, [layer],
                                    prompt=options.inversion_prompt, batch_size=options.batch_size,
                                    progress=progress, cancel=cancel)[layer]
            for k, point in enumerate(points):
                warped = warp_from([truth[i]] + [truth[j] for j in targets], tokens, 0, k + 1).numpy()
                images[("warp", point["to"])] = warped
                point["psnr_warp"] = psnr(torch.from_numpy(warped), torch.from_numpy(truth[point["to"]]))
        if "tokens" in modes:
            rec = reconstruct_from_tokens(model, source, i, targets, options.steps, prompt=options.inversion_prompt,
                                          progress=progress, cancel=cancel)
            rebuilt = model.decode_latents(rec.tokens).numpy()
            plain = model.decode_latents(rec.plain).numpy()
            for k, point in enumerate(points):
                images[("tokens", point["to"])] = rebuilt[k]
                images[("plain", point["to"])] = plain[k]
                point["psnr_tokens"] = psnr(torch.from_numpy(rebuilt[k]), torch.from_numpy(truth[point["to"]]))
                point["psnr_plain"] = psnr(torch.from_numpy(plain[k]), torch.from_numpy(truth[point["to"]]))
        for point in points:
            point["psnr_unwarped"] = psnr(torch.from_numpy(truth[i]), torch.from_numpy(truth[point["to"]]))
            for key in ("psnr_tokens", "psnr_warp", "psnr_plain"):
                point.setdefault(key, None)
        common = dict(layer=layer if "warp" in modes else None, timestep=timestep if "warp" in modes else None,
                      steps=options.steps)
        last = points[-1]
        _save_images(staging, truth, images, i, last["to"])
        save_reconstruction_figure(staging / "reconstruct.png", truth[i], truth[last["to"]], images, i, last)
        report = {"from": i, "to": last["to"], **{k: last[k] for k in ("psnr_tokens", "psnr_warp", "psnr_unwarped",
                                                                       "psnr_plain")}, **common}
        (staging / "reconstruct.json").write_text(json.dumps(report, indent=1))
        if options.sweep:
            sweep = {"from": i, **common, "points": points}
            (staging / "sweep.json").write_text(json.dumps(sweep, indent=1))
            plot_sweep(staging / "sweep.png", sweep)
            report["sweep"] = points
    for point in points:
        logger.info("frame %d from frame %d: PSNR tokens %s, warp %s, unwarped %.2f dB", point["to"], i,
                    _db(point["psnr_tokens"]), _db(point["psnr_warp"]), point["psnr_unwarped"])
    logger.info("wrote %s", out_dir)
    return ReconstructResult(out_dir, report)


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _save_images(folder: Path, truth: dict, images: dict, i: int, j: int) -> None:
    from PIL import Image

    Image.fromarray(truth[i]).save(folder / "from.png")
    Image.fromarray(truth[j]).save(folder / "target.png")
    for kind in ("tokens", "warp", "plain"):
        if (kind, j) in images:
            Image.fromarray(images[(kind, j)]).save(folder / f"{kind}.png")
