"""Streaming frame reads (PyAV or a folder of images), one frame at a time, rotation applied."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from tokenflow.errors import InputError

from .probe import (
    DEFAULT_FOLDER_FPS,
    VideoInfo,
    _apply_rotation,
    _check_exists,
    _decode_video,
    _folder_images,
    _load_image,
    _open_input,
    _rotation_of,
    _stream_fps,
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


class FrameReader:
    """An iterator of ``HxWx3`` uint8 RGB frames that also records when each one is shown.

    ``times[i]`` is the presentation time of the ``i``-th frame yielded so far, in seconds from the start of the
    video stream (its ``start_time``, else its first frame), filled as the frames are decoded, so reading stays
    streaming. A folder of images counts as :data:`DEFAULT_FOLDER_FPS` frames per second. ``tick`` is the
    resolution of the source's timestamps (its time base), in seconds.
    """

    def __init__(self, frames: Iterator[tuple[np.ndarray, float]], tick: float, stride: int) -> None:
        self._frames = frames
        self.times: list[float] = []
        self.tick = float(tick)
        self.stride = int(stride)

    def __iter__(self) -> "FrameReader":
        return self

    def __next__(self) -> np.ndarray:
        rgb, t = next(self._frames)
        self.times.append(float(t))
        return rgb

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()

    def variable_times(self) -> list[float] | None:
        """The frames' times (see ``times``) when they are unevenly spaced (a variable-frame-rate source), else
        None: for a constant rate (gaps that differ by at most two ticks of the source's time base, its
        rounding) the frame count and the frame rate say it all."""
        times = self.times
        if len(times) < 3:
            return None
        gaps = np.diff(np.asarray(times, dtype=np.float64))
        if gaps.max() - gaps.min() <= 2 * self.tick + 1e-9:
            return None
        return list(times)


def frame_spans(times: list[float]) -> list[tuple[float, float]]:
    """(start, end) in seconds of each frame shown at ``times``: until the next frame, the last one for the
    median gap between frames."""
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    last = float(np.median(gaps)) if len(gaps) else 0.0
    ends = list(times[1:]) + [times[-1] + last]
    return list(zip(times, ends))


def _iter_folder(
    path: Path, images: list[Path], start: int, stride: int, max_frames: int | None
) -> Iterator[tuple[np.ndarray, float]]:
    indices = range(len(images))[start::stride]
    if max_frames is not None:
        indices = indices[:max_frames]
    if not indices:
        raise _past_end(path, start, len(images))
    first_shape = None
    for index in indices:
        image_path = images[index]
        rgb = _load_image(image_path)
        if first_shape is None:
            first_shape = rgb.shape
        elif rgb.shape != first_shape:
            raise InputError(
                f"{image_path}: size {rgb.shape[1]}x{rgb.shape[0]} differs from the first frame "
                f"({first_shape[1]}x{first_shape[0]}); make all images in {path} the same size"
            )
        yield rgb, index / DEFAULT_FOLDER_FPS


def _frame_time(frame: av.VideoFrame, origin: float | None, index: int, fps: float) -> tuple[float | None, float]:
    """(origin, seconds from the origin) of a decoded frame: its pts in the stream's time base, else its index
    at ``fps``; the origin is the stream's start time, else the first frame's."""
    t = frame.time
    if t is None:
        return origin, index / fps
    if origin is None:
        origin = float(t)
    return origin, float(t) - origin


def _iter_container(
    path: Path,
    container: av.container.InputContainer,
    start: int,
    stride: int,
    max_frames: int | None,
) -> Iterator[tuple[np.ndarray, float]]:
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
            fps = _stream_fps(stream)
            origin = (float(stream.start_time * stream.time_base)
                      if stream.start_time is not None and stream.time_base is not None else None)
            seen = 0
            for frame in _decode_video(container, stream, problems):
                seen += 1
                if seen <= index:
                    continue
                if index >= start and (index - start) % stride == 0:
                    origin, t = _frame_time(frame, origin, index, fps)
                    rgb = frame.to_ndarray(format="rgb24")
                    yield _apply_rotation(rgb, _rotation_of(frame, stream)), t
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
) -> FrameReader:
    """Stream frames ``start, start+stride, ...`` (at most ``max_frames``) as ``HxWx3`` uint8 RGB.

    The path is checked and opened right away (bad input raises :class:`InputError`
    here); frames are then decoded one at a time as the iterator is consumed.  If
    the selection turns out to be empty (e.g. ``start`` past the end) the iterator
    raises :class:`InputError` when it is exhausted.  The iterator (a :class:`FrameReader`)
    records each frame's presentation time as it goes (``.times``), for variable-frame-rate sources.
    """
    path = Path(path)
    _check_selection(path, start, stride, max_frames)
    _check_exists(path)
    if path.is_dir():
        return FrameReader(_iter_folder(path, _folder_images(path), start, stride, max_frames),
                           tick=1 / DEFAULT_FOLDER_FPS, stride=stride)
    container = _open_input(path)
    stream = container.streams.video[0]
    tick = float(stream.time_base) if stream.time_base else 1e-3
    return FrameReader(_iter_container(path, container, start, stride, max_frames), tick=tick, stride=stride)


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
