"""Probing videos and frame folders: size, rotation, fps, frame count, audio."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import av
import av.logging
import numpy as np
from PIL import Image, ImageOps

from tokenflow.errors import InputError

log = logging.getLogger('tokenflow.io')


#: Image files that a frame folder may hold.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


#: Frame rate assumed for a folder of images (and for a video that does not state one).
DEFAULT_FOLDER_FPS = 10.0


#: Transparent and translucent pixels (a webm/vp9 with alpha, an RGBA png, a gif's transparent colour, ProRes 4444,
#: ...) are composited over this background: black, the colour FFmpeg leaves when it drops an alpha channel.
ALPHA_BACKGROUND = (0, 0, 0)


# Pixel formats that carry alpha (pal8: a palette may hold transparent entries, as a gif's does).
_ALPHA_FORMAT = re.compile(r"^(yuva|rgba|bgra|argb|abgr|gbrap|ya\d|pal8)")


def _over_background(rgba: np.ndarray) -> np.ndarray:
    """``HxWx4`` uint8 RGBA composited over :data:`ALPHA_BACKGROUND`, ``HxWx3`` uint8 (opaque pixels unchanged)."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    background = np.asarray(ALPHA_BACKGROUND, np.uint16)
    return ((rgb * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)


def _frame_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as ``HxWx3`` uint8 RGB (any bit depth and chroma layout, through swscale with the frame's
    colour matrix); alpha, where there is some, composited over :data:`ALPHA_BACKGROUND`."""
    if _ALPHA_FORMAT.match(frame.format.name):
        return _over_background(frame.to_ndarray(format="rgba"))
    return frame.to_ndarray(format="rgb24")


def _one_line(text: object) -> str:
    """Collapse whitespace so an error message stays on one line."""
    return " ".join(str(text).split())


def _natural_key(name: str) -> list[object]:
    """Sort key that orders 'frame2' before 'frame10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@dataclass
class VideoInfo:
    """What :func:`probe` learns about a video file or a folder of frames."""

    path: Path
    width: int  # display width, after rotation metadata is applied
    height: int  # display height, after rotation metadata is applied
    fps: float  # average frame rate of the source (10.0 for a folder of images)
    num_frames: int | None  # the container's frame count, None when it does not say
    has_audio: bool
    rotation: int  # clockwise degrees applied for display: 0, 90, 180 or 270


def _folder_images(folder: Path) -> list[Path]:
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not files:
        raise InputError(
            f"{folder}: folder has no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}); "
            "put the frames there or pass a video file"
        )
    return sorted(files, key=lambda p: _natural_key(p.name))


def _load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                return _over_background(np.asarray(img.convert("RGBA")))
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({_one_line(exc)}); replace or remove it") from exc


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path")


def _open_input(path: Path) -> av.container.InputContainer:
    try:
        # metadata that is not UTF-8 (a damaged or odd file) is read with replacement characters, not refused
        container = av.open(str(path), mode="r", metadata_errors="replace")
    except av.error.EOFError as exc:
        raise InputError(
            f"{path}: ends before its first frame (no frames: an empty or truncated video); re-export it"
        ) from exc
    except av.FFmpegError as exc:
        reason = _one_line(getattr(exc, "strerror", None) or exc)
        raise InputError(
            f"{path}: not a readable video ({reason}); check that it is an mp4/mov/webm/mkv/avi/gif file"
        ) from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({_one_line(exc)}); check the path and its permissions") from exc
    if not container.streams.video:
        only = " (audio only)" if container.streams.audio else ""
        container.close()
        raise InputError(f"{path}: has no video stream{only}; pass a video file")
    if container.streams.video[0].codec_context is None:
        container.close()
        raise InputError(f"{path}: its video codec cannot be decoded by this FFmpeg build; re-encode it (e.g. to H.264)")
    return container


def _close_input(container: av.container.InputContainer) -> None:
    """Close a container whose video was being decoded.

    A frame-threaded decoder's workers may still be decoding packets sent ahead, and one that meets damage logs an
    error through PyAV's log callback, which needs the GIL (see :func:`_ffmpeg_errors`). Freeing the codec context
    (on close or when the stream is dropped) waits for those workers while holding the GIL: a deadlock (the fuzz test
    hung in about one damaged read in ten). Flushing first waits for them with the GIL released, so they are idle
    when the context is freed."""
    for stream in container.streams.video:
        try:
            stream.codec_context.flush_buffers()
        except av.FFmpegError:  # nothing left to wait for
            pass
    container.close()


@dataclass
class Damage:
    """Where a video stops decoding cleanly: after ``frame`` good frames, about ``time`` seconds into the stream
    (None when unknown), and FFmpeg's ``reason``."""

    frame: int
    time: float | None
    reason: str

    def __str__(self) -> str:
        return self.reason


def _ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's words for an error, without the errno and the function name PyAV adds."""
    return _one_line(getattr(exc, "strerror", None) or exc)


def _packet_time(packet: av.Packet | None) -> float | None:
    try:
        if packet is not None and packet.pts is not None and packet.time_base is not None:
            return float(packet.pts * packet.time_base)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        pass
    return None


# FFmpeg's own VP8/VP9 decoders ignore the alpha plane that WebM stores beside each frame; libvpx's read it.
_LIBVPX_DECODERS = {"vp8": "libvpx", "vp9": "libvpx-vp9"}


def _alpha_decoder(stream: av.video.stream.VideoStream):
    """The ``decode`` of a libvpx decoder for a WebM stream with alpha (``alpha_mode`` 1), else None."""
    name = _LIBVPX_DECODERS.get(stream.codec_context.name)
    if name is None or (stream.metadata or {}).get("alpha_mode") != "1":
        return None
    try:
        context = av.CodecContext.create(name, "r")
    except (av.FFmpegError, ValueError) as exc:
        log.warning("%s is not available (%s): the alpha channel is ignored", name, _one_line(exc))
        return None
    return context.decode


@dataclass
class PacketLog:
    """The non-empty packets a decoding pass demuxed: how many, and the times of those meant to be shown."""

    count: int = 0
    shown: list = None

    def __post_init__(self):
        self.shown = [] if self.shown is None else self.shown

    def missing(self, frame_times: list) -> Damage | None:
        """Where a packet meant to be shown gave no frame (frame threading can swallow the decoder's error)."""
        if len(frame_times) >= len(self.shown):
            return None
        decoded = set(frame_times)
        lost = [t for t in self.shown if t is not None and t not in decoded]
        what = f"{len(self.shown) - len(frame_times)} packet(s) gave no frame"
        if not lost:
            return Damage(len(frame_times), None, what)
        return Damage(sum(1 for t in frame_times if t is not None and t < lost[0]), lost[0], what)


_error_log_lock = threading.Lock()


@contextlib.contextmanager
def _ffmpeg_errors() -> Iterator[Callable[[], tuple[int, str, str]]]:
    """A function giving (how many error messages FFmpeg has logged, the last one's source and text), counted from any thread
    (a decoder's workers log from theirs) while the context lasts. H.264 and others conceal damaged slices and say
    so only there ("error while decoding MB ..."), the way ``ffmpeg -v error -i FILE -f null -`` checks a file.

    PyAV counts FFmpeg's errors once its log callback is installed; its default level (None) installs none. Level
    PANIC installs it and still passes nothing on to :mod:`logging` (FFmpeg's messages are not the user's: the
    damage is reported in our own words). It stays installed: putting None back races with a decoder's worker
    thread that is still logging (PyAV's callback then compares the level with None and prints a traceback).
    A level the user set is left as it is."""
    with _error_log_lock:
        if av.logging.get_level() is None:
            av.logging.set_level(av.logging.PANIC)

    def errors() -> tuple[int, str, str]:
        count, last = av.logging.get_last_error()
        return (count, "", "") if last is None else (count, last[1], _one_line(last[2]))

    yield errors


def _decode_video(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, problems: list[Damage],
    log_packets: PacketLog | None = None,
) -> Iterator[av.VideoFrame]:
    """Decode a video stream packet by packet, skipping packets the decoder rejects.

    A truncated or damaged file then still yields every frame that decodes; what went
    wrong is appended to ``problems`` (the caller decides whether to warn or fail): a packet the demuxer or
    decoder refuses, an error FFmpeg logs while decoding (damage it concealed). ``log_packets`` records the packets demuxed.
    """
    with _ffmpeg_errors() as errors:
        yield from _decode_packets(container, stream, problems, log_packets, errors)


def _decode_packets(container, stream, problems: list[Damage], log_packets: PacketLog | None, errors):
    seen = errors()[0]
    decode = _alpha_decoder(stream) or stream.decode
    packets = container.demux(stream)
    count = 0
    last_time = None
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError as exc:  # the demuxer gave up: flush what the decoder holds
            problems.append(Damage(count, last_time, _ffmpeg_reason(exc)))
            packet = None
        if log_packets is not None and packet is not None and packet.size:
            log_packets.count += 1
            if not packet.is_discard:  # an edit list's hidden frames decode but are not shown
                log_packets.shown.append(_packet_time(packet))
        try:
            frames = decode(packet)
        except av.FFmpegError as exc:
            when = _packet_time(packet)
            problems.append(Damage(count, last_time if when is None else when, _ffmpeg_reason(exc)))
            frames = []
        logged, source, last_message = errors()
        if logged > seen and not problems and source != container.format.name:
            # decoded with damage concealed; on one decoding thread the error is logged while its packet decodes
            # (frame threading may log it later, between calls: the caller decodes again on one thread then).
            # The demuxer's own messages (a file that ends early) are left to the checks of the packets read.
            when = _packet_time(packet)
            problems.append(Damage(count, last_time if when is None else when, f"FFmpeg: {last_message}"))
        seen = logged
        for frame in frames:
            count += 1
            last_time = frame.time
            yield frame
        if packet is None:
            break


def _rotation_of(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> int:
    """Clockwise degrees (0/90/180/270) a decoded frame must be turned for display.

    PyAV reports the display matrix as a counter-clockwise angle (FFmpeg's
    ``av_display_rotation_get``); the legacy ``rotate`` tag is clockwise.
    """
    ccw = getattr(frame, "rotation", None)
    if ccw:
        degrees = -float(ccw)
    else:
        tag = stream.metadata.get("rotate") if stream.metadata else None
        try:
            degrees = float(tag) if tag is not None else 0.0
        except ValueError:
            degrees = 0.0
    return int(round(degrees / 90.0)) % 4 * 90


def _apply_rotation(rgb: np.ndarray, rotation: int) -> np.ndarray:
    if rotation == 0:
        return rgb
    # np.rot90 with positive k turns counter-clockwise; we need clockwise.
    return np.ascontiguousarray(np.rot90(rgb, k=-(rotation // 90)))


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and rate > 0:
            return float(rate)
    log.info("no frame rate stored for stream %d; assuming %.1f fps", stream.index, DEFAULT_FOLDER_FPS)
    return DEFAULT_FOLDER_FPS


def _undecodable(path: Path, problems: list[Damage]) -> InputError:
    if not problems:
        return InputError(f"{path}: its video stream has no frames; pass a video with at least one frame")
    return InputError(
        f"{path}: no frame could be decoded ({problems[0].reason}); the file is corrupt or truncated, re-export it"
    )


def probe(path: str | Path) -> VideoInfo:
    """Describe a video file or a folder of images without reading all of it.

    Decodes the first frame of a video (to learn its rotation); raises
    :class:`InputError` for a missing path, a file that is not a video, or a video
    whose first frame cannot be decoded.
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        images = _folder_images(path)
        first = _load_image(images[0])
        return VideoInfo(
            path=path,
            width=int(first.shape[1]),
            height=int(first.shape[0]),
            fps=DEFAULT_FOLDER_FPS,
            num_frames=len(images),
            has_audio=False,
            rotation=0,
        )
    container = _open_input(path)
    try:
        stream = container.streams.video[0]
        problems: list[Damage] = []
        first = next(_decode_video(container, stream, problems), None)
        if first is None:
            raise _undecodable(path, problems)
        rotation = _rotation_of(first, stream)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(
            path=path,
            width=int(width),
            height=int(height),
            fps=_stream_fps(stream),
            num_frames=int(stream.frames) if stream.frames else None,
            has_audio=bool(container.streams.audio),
            rotation=rotation,
        )
    finally:
        _close_input(container)
