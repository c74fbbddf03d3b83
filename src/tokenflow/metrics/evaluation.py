"""The evaluation of an edit against its source, in windows, and over files or a run folder."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tokenflow.errors import InputError

from .clip import ClipLoadError, clip_scores
from .flow import FLOW_METHODS, _check_gap, _raft_model, _warp_errors_many
from .frames import _check_frames, _FrameView
from .image import PSNR_CAP_DB, psnr, ssim
from .report import EvalReport

logger = logging.getLogger('tokenflow.metrics')


#: Frames :func:`evaluate` reads and measures at a time.
EVAL_WINDOW = 64


#: Aspect ratios of the source and the edit may differ by this much (relative) and the edit is still
#: resized to the source size; beyond it the inputs are refused.
ASPECT_TOLERANCE = 0.02


RUN_FILE = "run.json"


RUN_SOURCE = "source.mp4"


RUN_EDITED = "edited.mp4"


def _read_run_json(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("%s cannot be read (%s); its recorded values are ignored", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _align(source: Any, edited: Any, align: str, notes: list[str]) -> tuple[Any, Any]:
    if align not in ("refuse", "truncate"):
        raise InputError(f"`align` {align}: unknown alignment; use refuse or truncate")
    ns, ne = source.shape[0], edited.shape[0]
    if ns != ne:
        if align == "refuse":
            raise InputError(
                f"source has {ns} frames but edited has {ne}; pass `align` truncate to use the first {min(ns, ne)}"
            )
        n = min(ns, ne)
        msg = f"frame counts differ (source {ns}, edited {ne}); both truncated to {n}"
        logger.info(msg)
        notes.append(msg)
        source, edited = _FrameView(source, n), _FrameView(edited, n)
    hs, ws = source.shape[1:3]
    he, we = edited.shape[1:3]
    if (hs, ws) != (he, we):
        ratio = (we / he) / (ws / hs)
        if abs(ratio - 1.0) > ASPECT_TOLERANCE:
            raise InputError(
                f"edited video is {we}x{he} but source is {ws}x{hs} (different aspect ratio); "
                "evaluate an edit against the source it was made from"
            )
        interp = cv2.INTER_AREA if we * he > ws * hs else cv2.INTER_CUBIC
        edited = _FrameView(edited, edited.shape[0], (ws, hs), interp)  # resized as each window is read
        msg = f"edited frames resized from {we}x{he} to the source size {ws}x{hs}"
        logger.info(msg)
        notes.append(msg)
    return source, edited


def evaluate(
    source: np.ndarray,
    edited: np.ndarray,
    prompt: str | None = None,
    clip_model: str | Path | None = None,
    gap: int = 1,
    flow: str = "dis",
    run_dir: Path | None = None,
    align: str = "refuse",
    device: str = "cpu",
    inversion_psnr: float | None = None,
) -> EvalReport:
    """Measure an edit against its source video.

    Mismatched inputs: a different frame count raises :class:`InputError` unless ``align="truncate"``
    (the shorter length is used); a different frame size is resized to the source size when the aspect
    ratios agree within 2%, else refused. ``gap >= N`` is refused.

    CLIP scores are computed when ``clip_model`` is given (the text score also needs ``prompt``); a
    model that cannot be loaded is logged once and the CLIP fields stay None. ``run_dir`` with a
    ``run.json`` holding ``"inversion_psnr"`` fills :attr:`EvalReport.inversion_psnr`; an explicit
    ``inversion_psnr`` (the edit that is being written, before its ``run.json`` exists) takes precedence.
    """
    source = _check_frames(source, "source")
    edited = _check_frames(edited, "edited")
    if flow not in FLOW_METHODS:
        raise InputError(f"`flow` {flow}: unknown optical-flow method; use one of {', '.join(FLOW_METHODS)}")
    notes: list[str] = []
    source, edited = _align(source, edited, align, notes)
    gap = _check_gap(gap, source.shape[0])
    if flow == "raft":
        _raft_model()  # fail early, before any work, when RAFT is not available offline

    n = source.shape[0]
    logger.info("warp error, PSNR / SSIM: %d frames, gap %d, %s flow", n, gap, flow)
    # ``EVAL_WINDOW`` frames at a time (plus ``gap`` for the pairs that reach past a window): memory does not grow
    # with the video, and every per-frame and per-pair number is the one a single pass would give
    err_edit, err_src, p, s = [], [], [], []
    for a in range(0, n, EVAL_WINDOW):
        b = min(a + EVAL_WINDOW, n)
        src, edt = np.asarray(source[a : min(b + gap, n)]), np.asarray(edited[a : min(b + gap, n)])
        if min(b + gap, n) - a > gap:
            e, f = _warp_errors_many(src, [edt, src], gap, flow)
            err_edit.append(e[: b - a])
            err_src.append(f[: b - a])
        p.append(psnr(src[: b - a], edt[: b - a], cap=PSNR_CAP_DB))
        s.append(ssim(src[: b - a], edt[: b - a]))
    empty = np.zeros(0, dtype=np.float64)
    err_edit = np.concatenate(err_edit) if err_edit else empty
    err_src = np.concatenate(err_src) if err_src else empty
    p, s = np.concatenate(p), np.concatenate(s)

    clip_text = clip_cons = None
    if clip_model is not None:
        try:
            scores = clip_scores(edited, prompt, clip_model, device=device)
        except ClipLoadError as exc:
            logger.warning("CLIP scores skipped: %s", exc)
            notes.append(f"CLIP scores skipped: {exc}")
        else:
            if scores["text"] is not None:
                clip_text = np.asarray(scores["text"], dtype=np.float64)
            clip_cons = np.asarray(scores["consistency_per_pair"], dtype=np.float64)

    if inversion_psnr is None and run_dir is not None:
        value = _read_run_json(Path(run_dir)).get("inversion_psnr")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            inversion_psnr = float(value)

    return EvalReport(
        frames=int(source.shape[0]),
        gap=gap,
        flow=flow,
        warp_error=err_edit,
        warp_error_source=err_src,
        psnr=p,
        ssim=s,
        clip_text=clip_text,
        clip_consistency=clip_cons,
        inversion_psnr=inversion_psnr,
        prompt=prompt,
        clip_model=str(clip_model) if clip_model is not None else None,
        notes=notes,
    )


def _is_run_dir(path: Path | None) -> bool:
    return path is not None and path.is_dir() and (path / RUN_FILE).is_file()


def evaluate_files(
    source_path: str | Path | None,
    edited_path: str | Path | None = None,
    max_frames: int | None = None,
    workdir: str | Path | None = None,
    **kwargs: Any,
) -> EvalReport:
    """Read two videos and :func:`evaluate` them; their frames are staged in a temporary folder inside ``workdir``
    (default: the system's temporary folder) and read a window at a time.

    A run folder (holding ``run.json``, ``source.mp4`` and ``edited.mp4``) is accepted as the edit:
    ``evaluate_files(None, run)`` or ``evaluate_files(run)`` uses its ``edited.mp4`` against its
    ``source.mp4``; ``evaluate_files(other_source, run)`` uses ``other_source`` instead. A run
    folder's ``run.json`` also supplies ``inversion_psnr`` and, when no ``prompt`` is passed, its
    ``"prompt"``. Other keyword arguments go to :func:`evaluate`.
    """
    from tokenflow.io import FrameStore, read_frames

    src = Path(source_path) if source_path is not None else None
    edt = Path(edited_path) if edited_path is not None else None
    if edt is None:
        if not _is_run_dir(src):
            raise InputError(
                f"{source_path}: not a run folder (no {RUN_FILE}); give SOURCE and EDITED videos, or a run folder"
            )
        src, edt = None, src

    run_dir = None
    if _is_run_dir(edt):
        run_dir = edt
        edt = run_dir / RUN_EDITED
        if src is None:
            src = run_dir / RUN_SOURCE
    elif _is_run_dir(src):
        src = src / RUN_SOURCE
    if src is None:
        raise InputError(f"{edited_path}: not a run folder, so a SOURCE video is needed too; give SOURCE and EDITED")

    for label, path in (("source", src), ("edited", edt)):
        if not path.is_file():
            raise InputError(f"{path}: {label} video not found; check the path")

    if run_dir is not None:
        kwargs.setdefault("run_dir", run_dir)
        if kwargs.get("prompt") is None:
            recorded = _read_run_json(run_dir).get("prompt")
            if isinstance(recorded, str) and recorded:
                kwargs["prompt"] = recorded

    logger.info("reading %s and %s", src, edt)
    # staged on disk and measured a window at a time: memory does not grow with the videos' length
    with tempfile.TemporaryDirectory(prefix=".tokenflow-eval-", dir=workdir) as tmp:
        stores = []
        try:
            for name, path in (("source", src), ("edited", edt)):
                frames = read_frames(path, max_frames=max_frames)
                stores.append(FrameStore.write(Path(tmp) / f"{name}.rgb", frames, source=str(path)))
            return evaluate(*stores, **kwargs)
        finally:
            for store in stores:
                store.close()
