"""Streaming frame reads (PyAV or a folder of images), one frame at a time, rotation applied."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from tokenflow.errors import InputError

from .probe import (
    VideoInfo,
    _apply_rotation,
    _check_exists,
    _decode_video,
    _folder_images,
    _load_image,
    _open_input,
    _rotation_of,
    _undecodable,
    probe,
)

log = logging.getLogger('tokenflow.io')


def _check_selection(path: Path, start: int, stride: int, max_frames: int | None) -> None:
    if start < 0:
        raise InputError(f"{path}: `start` {start} is negative; use 0 or more")
    if stride < 1:
        raise InputError(f"{path}: `stride` {stride} is not allowed; use `stride` 1 or more")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"{path}: `max_frames` {max_frames} selects nothing; use 1 or more")


def _past_end(path: Path, start: int, total: int) -> InputError:
    return InputError(
        f"{path}: `start` {start} is past the last frame ({total} frames); choose a smaller `start`"
    )


def _iter_folder(
    path: Path, images: list[Path], start: int, stride: int, max_frames: int | None
) -> Iterator[np.ndarray]:
    selected = images[start::stride]
    if max_frames is not None:
        selected = selected[:max_frames]
    if not selected:
        raise _past_end(path, start, len(images))
    first_shape = None
    for image_path in selected:
        rgb = _load_image(image_path)
        if first_shape is None:
            first_shape = rgb.shape
        elif rgb.shape != first_shape:
            raise InputError(
                f"{image_path}: size {rgb.shape[1]}x{rgb.shape[0]} differs from the first frame "
                f"({first_shape[1]}x{first_shape[0]}); make all images in {path} the same size"
            )
        yield rgb


def _iter_container(
    path: Path,
    container: av.container.InputContainer,
    start: int,
    stride: int,
    max_frames: int | None,
) -> Iterator[np.ndarray]:
    yielded = 0
    index = 0  # frames decoded so far
    problems: list[str] = []
    expected = None
    try:
        for thread_type in ("AUTO", "SLICE"):
            if problems:
                # Frame threading can lose the frames in flight around a damaged packet:
                # decode again on one thread and pick up after the frames already handled.
                container.close()
                container = _open_input(path)
                problems.clear()
            stream = container.streams.video[0]
            stream.thread_type = thread_type
            expected = int(stream.frames) if stream.frames else None
            seen = 0
            for frame in _decode_video(container, stream, problems):
                seen += 1
                if seen <= index:
                    continue
                if index >= start and (index - start) % stride == 0:
                    rgb = frame.to_ndarray(format="rgb24")
                    yield _apply_rotation(rgb, _rotation_of(frame, stream))
                    yielded += 1
                    if max_frames is not None and yielded >= max_frames:
                        return
                index += 1
            if not problems:
                break
    finally:
        container.close()

    if index == 0:
        raise _undecodable(path, problems)
    if expected is not None and index < expected:
        log.warning("%s: only %d of %d frames could be decoded; the file looks truncated or damaged",
                    path, index, expected)
    elif problems:
        log.warning("%s: %d damaged packet(s) skipped (%s); the file looks truncated or damaged",
                    path, len(problems), problems[0])
    if yielded == 0:
        raise _past_end(path, start, index)


def read_frames(
    path: str | Path, start: int = 0, stride: int = 1, max_frames: int | None = None
) -> Iterator[np.ndarray]:
    """Stream frames ``start, start+stride, ...`` (at most ``max_frames``) as ``HxWx3`` uint8 RGB.

    The path is checked and opened right away (bad input raises :class:`InputError`
    here); frames are then decoded one at a time as the iterator is consumed.  If
    the selection turns out to be empty (e.g. ``start`` past the end) the iterator
    raises :class:`InputError` when it is exhausted.
    """
    path = Path(path)
    _check_selection(path, start, stride, max_frames)
    _check_exists(path)
    if path.is_dir():
        return _iter_folder(path, _folder_images(path), start, stride, max_frames)
    return _iter_container(path, _open_input(path), start, stride, max_frames)


def load_frames(
    path: str | Path, start: int = 0, stride: int = 1, max_frames: int | None = None
) -> tuple[np.ndarray, VideoInfo]:
    """Read the selected frames into one ``[N,H,W,3]`` uint8 array, with the source's :class:`VideoInfo`."""
    path = Path(path)
    _check_selection(path, start, stride, max_frames)
    info = probe(path)
    frames = list(read_frames(path, start=start, stride=stride, max_frames=max_frames))
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise InputError(f"{path}: frame size changes mid-video ({sorted(shapes)}); re-encode it at one size")
    return np.stack(frames), info
