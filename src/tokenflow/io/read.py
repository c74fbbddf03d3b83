"""Streaming frame reads (PyAV or a folder of images), one frame at a time, rotation applied."""

from __future__ import annotations

import logging
import os
from collections import deque
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
    _frame_rgb,
    _load_image,
    _close_input,
    _open_input,
    Damage,
    PacketLog,
    _rotation_of,
    _stream_fps,
    _ffmpeg_reason,
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
    path: Path, images: list[Path], start: int, stride: int, max_frames: int | None, allow_partial: bool = False
) -> Iterator[tuple[np.ndarray, float]]:
    indices = range(len(images))[start::stride]
    if max_frames is not None:
        indices = indices[:max_frames]
    if not indices:
        raise _past_end(path, start, len(images))
    first_shape = None
    for index in indices:
        image_path = images[index]
        try:
            rgb = _load_image(image_path)
        except InputError as exc:
            if not allow_partial:
                raise InputError(f"{exc}, or pass `allow_partial` to skip unreadable images") from exc
            log.warning("%s; skipped", exc)
            continue
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


def _tagged_end(stream: av.video.stream.VideoStream) -> float | None:
    """When a Matroska/WebM stream ends by its ``DURATION`` tag (``HH:MM:SS.fraction``: the last packet's time plus
    its duration, written by FFmpeg's muxer once the stream was complete), in seconds; None without one. (Other
    containers' durations are estimates, an avi's from its frame count; mp4's sample table is checked instead.)"""
    try:
        tag = (stream.metadata or {}).get("DURATION")
        if tag:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except (TypeError, ValueError, OverflowError):
        pass
    return None


def _frames_in_flight() -> int:
    """Frames a frame-threaded FFmpeg decoder may hold at once: one a thread (FFmpeg's automatic count is the
    core count, at most 16), and one more."""
    return min(os.cpu_count() or 1, 16) + 1


def _sample_table(container: av.container.InputContainer) -> bool:
    return any(name in ("mov", "mp4") for name in container.format.name.split(","))


def _after(count: int, last: float | None) -> str:
    return f"after frame {count - 1}" + ("" if last is None else f" ({last:.2f} s)")


def _iter_container(
    path: Path,
    container: av.container.InputContainer,
    start: int,
    stride: int,
    max_frames: int | None,
    allow_partial: bool = False,
) -> Iterator[tuple[np.ndarray, float]]:
    yielded = 0
    index = 0  # frames handled (yielded or passed over by the selection) so far
    problems: list[Damage] = []
    try:
        for thread_type in ("AUTO", "SLICE"):
            if problems:
                # Frame threading can lose the frames in flight around a damaged packet:
                # decode again on one thread and pick up after the frames already handled.
                _close_input(container)
                container = _open_input(path)
                problems.clear()
            stream = container.streams.video[0]
            stream.thread_type = thread_type
            # A frame-threaded decoder can hand out a damaged frame just before the packet that fails (measured:
            # FFV1, the frame before a damaged one, about 1 read in 20): hold back as many frames as it may have
            # in flight until it is past them without a problem; on one, redo them on one thread.
            hold = _frames_in_flight() if thread_type == "AUTO" else 0
            held: deque[tuple[int, tuple[np.ndarray, float]]] = deque()
            # the sample table of mp4/mov lists every packet (other containers' counts are estimates: an avi's
            # may count one more), and an edit list may hide some frames: compare it with the packets read
            expected = int(stream.frames) if stream.frames and _sample_table(container) else None
            packets = PacketLog()
            fps = _stream_fps(stream)
            origin = (float(stream.start_time * stream.time_base)
                      if stream.start_time is not None and stream.time_base is not None else None)
            times: list[float | None] = []  # of every frame this pass decodes
            last_duration = 0.0
            for frame in _decode_video(container, stream, problems, packets):
                times.append(frame.time)
                if hold and problems:
                    break  # redo the held frames and the rest on one thread
                if len(times) <= index or (problems and not allow_partial):
                    continue  # handled in the first pass, or past the damage (only counted: refused below)
                if frame.duration and frame.time_base:
                    last_duration = float(frame.duration * frame.time_base)
                if index >= start and (index - start) % stride == 0:
                    origin, t = _frame_time(frame, origin, index, fps)
                    held.append((index, (_apply_rotation(_frame_rgb(frame), _rotation_of(frame, stream)), t)))
                    while len(held) > hold:
                        yield held.popleft()[1]
                        yielded += 1
                        if max_frames is not None and yielded >= max_frames:
                            return
                index += 1
            if hold and problems:
                if held:
                    index = held[0][0]
                held.clear()
                continue
            while held:
                yield held.popleft()[1]
                yielded += 1
                if max_frames is not None and yielded >= max_frames:
                    return
            lost = None if problems or stream.codec_context.name == "vp8" else packets.missing(times)
            if lost is not None:  # (VP8 may store invisible frames as packets of their own)
                problems.append(lost)
            if not problems:
                break
        end = _tagged_end(stream)
    finally:
        _close_input(container)

    total = len(times)  # frames that decode, damaged or not
    if total == 0:
        raise _undecodable(path, problems)
    last = times[-1]
    at = reason = None
    if problems:
        damage = problems[0]
        frame = damage.frame
        if damage.time is not None:  # not the decoder's output count (it lags): the frames shown before it
            frame = sum(1 for t in times if t is not None and t < damage.time - 1e-9)
        at = f"at frame {frame}" + ("" if damage.time is None else f" (about {damage.time:.2f} s)")
        reason = damage.reason
    elif (reason := _cut_short(expected, packets.count, end, last, last_duration, fps)) is not None:
        at = _after(total, last)
    if at is not None:
        if not allow_partial:
            raise _damaged(path, at, reason)
        log.warning("%s: truncated or damaged %s (%s); using the %d frames that decode", path, at, reason, total)
    if yielded == 0:
        raise _past_end(path, start, total)


def _cut_short(expected: int | None, count: int, end: float | None, last: float | None, last_duration: float,
               fps: float) -> str | None:
    """Why a stream that decoded (or demuxed) ``count`` packets up to ``last`` seconds ends early, by its header:
    an mp4's sample table (``expected`` packets) or a Matroska ``DURATION`` (``end``); None when it does not."""
    if expected is not None and count < expected:  # the data ends before the sample table does
        return f"the header lists {expected} frames, the file holds {count}"
    if end is not None and last is not None and last + 2 * max(last_duration, 1 / fps) < end:
        return f"the stream lasts {end:.2f} s by its header"
    return None


def _damaged(path: Path, at: str, reason: str) -> InputError:
    return InputError(
        f"{path}: truncated or damaged {at}: {reason}; re-export or repair the file, or pass "
        "`allow_partial` to use the frames that decode"
    )


def check_packets(path: str | Path, start: int = 0, stride: int = 1, max_frames: int | None = None) -> None:
    """Refuse a truncated video before any frame is decoded (and before a model loads): one demuxing pass, no
    decoding, over what the selection needs. It finds what the container shows: the demuxer giving up (cut mid-file),
    an mp4 whose sample table lists more frames than the file holds, a Matroska/WebM stream that ends before its
    ``DURATION``. Damage inside a frame's data is found by :func:`read_frames` as it decodes. Raises the same
    :class:`InputError` as :func:`read_frames`; a folder of images, or anything that cannot be opened, is left to
    it."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        return
    try:
        container = _open_input(path)
    except InputError:
        return  # read_frames says why
    times: list[float] = []  # of the packets meant to be shown
    count, stop, last_duration = 0, None, 0.0
    try:
        if not container.streams.video:
            return  # read_frames says so
        stream = container.streams.video[0]
        expected = int(stream.frames) if stream.frames and _sample_table(container) else None
        fps = _stream_fps(stream)
        try:
            for packet in container.demux(stream):
                if packet.size:
                    count += 1
                    if not packet.is_discard and packet.pts is not None and packet.time_base is not None:
                        times.append(float(packet.pts * packet.time_base))
                        if packet.duration:
                            last_duration = float(packet.duration * packet.time_base)
        except av.FFmpegError as exc:
            stop = _ffmpeg_reason(exc)
        end = _tagged_end(stream)
    finally:
        container.close()
    if not times:
        return  # nothing to place the damage by: read_frames says what it finds
    times.sort()  # display order
    origin = (float(stream.start_time * stream.time_base)
              if stream.start_time is not None and stream.time_base is not None else times[0])
    last = times[-1] - origin
    reason = stop if stop is not None else _cut_short(expected, count, end, last, last_duration, fps)
    if reason is None:
        return
    if max_frames is not None and len(times) > start + stride * (max_frames - 1) + 1:
        return  # the selection ends before the damage (its last frame and one more are whole)
    raise _damaged(path, _after(len(times), last), reason)


def read_frames(
    path: str | Path, start: int = 0, stride: int = 1, max_frames: int | None = None, allow_partial: bool = False
) -> FrameReader:
    """Stream frames ``start, start+stride, ...`` (at most ``max_frames``) as ``HxWx3`` uint8 RGB.

    The path is checked and opened right away (bad input raises :class:`InputError`
    here); frames are then decoded one at a time as the iterator is consumed.  If
    the selection turns out to be empty (e.g. ``start`` past the end) the iterator
    raises :class:`InputError` when it is exhausted.  The iterator (a :class:`FrameReader`)
    records each frame's presentation time as it goes (``.times``), for variable-frame-rate sources.

    A truncated or damaged file (a packet that does not decode, or fewer frames than its header
    says) raises :class:`InputError` naming the frame and time where it breaks, once the frames
    before the damage have been yielded; with ``allow_partial`` every frame that decodes is
    yielded instead (damaged packets skipped, unreadable images of a folder skipped) and a warning
    is logged.  The damage is seen only if the selection reaches it.
    """
    path = Path(path)
    _check_selection(path, start, stride, max_frames)
    _check_exists(path)
    if path.is_dir():
        return FrameReader(_iter_folder(path, _folder_images(path), start, stride, max_frames, allow_partial),
                           tick=1 / DEFAULT_FOLDER_FPS, stride=stride)
    container = _open_input(path)
    stream = container.streams.video[0]
    tick = float(stream.time_base) if stream.time_base else 1e-3
    return FrameReader(_iter_container(path, container, start, stride, max_frames, allow_partial), tick=tick,
                       stride=stride)


def load_frames(
    path: str | Path, start: int = 0, stride: int = 1, max_frames: int | None = None, allow_partial: bool = False
) -> tuple[np.ndarray, VideoInfo]:
    """Read the selected frames into one ``[N,H,W,3]`` uint8 array, with the source's :class:`VideoInfo`."""
    path = Path(path)
    _check_selection(path, start, stride, max_frames)
    info = probe(path)
    frames = list(read_frames(path, start=start, stride=stride, max_frames=max_frames, allow_partial=allow_partial))
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise InputError(f"{path}: frame size changes mid-video ({sorted(shapes)}); re-encode it at one size")
    return np.stack(frames), info
