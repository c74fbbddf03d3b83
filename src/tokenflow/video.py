"""Video input and output: probing, streaming frame reads, resizing, H.264 writing with audio.

Everything that touches a video file goes through this module.  Frames are always
``HxWx3`` ``uint8`` RGB numpy arrays with the container's rotation metadata applied,
so a portrait phone clip comes out upright.

Reading supports anything FFmpeg (through PyAV) can demux and decode -- mp4, mov,
webm, mkv, avi, gif -- and a folder of images (png/jpg/jpeg/bmp/webp, sorted by
name, numbers compared numerically).  Frames are decoded one at a time, so a long
video is never held in memory unless the caller asks for it with :func:`load_frames`.

Writing (:class:`VideoWriter`, :func:`write_video`) encodes H.264 (libx264, yuv420p)
and can carry over the audio of the source clip, trimmed to the edited range.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import av
import numpy as np
from PIL import Image, ImageOps

from tokenflow.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "VideoInfo",
    "VideoWriter",
    "contact_sheet",
    "load_frames",
    "make_pan_clip",
    "pan_frames",
    "probe",
    "read_frames",
    "resize_frames",
    "side_by_side",
    "working_size",
    "write_video",
]

#: Image files that a frame folder may hold.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Frame rate assumed for a folder of images (and for a video that does not state one).
DEFAULT_FOLDER_FPS = 10.0

# Output suffix -> (video codecs to try in order, pixel format, audio codecs stored as-is,
# audio codec used when the source's audio has to be transcoded).
_MP4_AUDIO = frozenset({"aac", "mp3", "alac", "ac3", "eac3"})
_MKV_AUDIO = frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac", "vorbis", "pcm_s16le"})
_OUTPUT_FORMATS: dict[str, tuple[tuple[str, ...], frozenset[str], str]] = {
    ".mp4": (("libx264", "h264", "mpeg4"), _MP4_AUDIO, "aac"),
    ".m4v": (("libx264", "h264", "mpeg4"), _MP4_AUDIO, "aac"),
    ".mov": (("libx264", "h264", "mpeg4"), _MP4_AUDIO, "aac"),
    ".mkv": (("libx264", "h264", "mpeg4"), _MKV_AUDIO, "aac"),
    ".webm": (("libvpx-vp9", "libvpx"), frozenset({"opus", "vorbis"}), "libopus"),
}
# Lossless codecs (used by make_pan_clip for exact-motion test clips) and their pixel format.
_RGB_PIX_FMT = {"ffv1": "bgr0", "png": "rgb24", "qtrle": "rgb24"}


def _one_line(text: object) -> str:
    """Collapse whitespace so an error message stays on one line."""
    return " ".join(str(text).split())


def _natural_key(name: str) -> list[object]:
    """Sort key that orders 'frame2' before 'frame10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------- probing


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
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({_one_line(exc)}); replace or remove it") from exc


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path")


def _open_input(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as exc:
        reason = _one_line(getattr(exc, "strerror", None) or exc)
        raise InputError(
            f"{path}: not a readable video ({reason}); check that it is an mp4/mov/webm/mkv/avi/gif file"
        ) from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({_one_line(exc)}); check the path and its permissions") from exc
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: has no video stream; pass a video file")
    return container


def _decode_video(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, problems: list[str]
) -> Iterator[av.VideoFrame]:
    """Decode a video stream packet by packet, skipping packets the decoder rejects.

    A truncated or damaged file then still yields every frame that decodes; what went
    wrong is appended to ``problems`` (the caller decides whether to warn or fail).
    """
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError as exc:  # the demuxer gave up: flush what the decoder holds
            problems.append(_one_line(exc))
            packet = None
        try:
            frames = stream.decode(packet)
        except av.FFmpegError as exc:
            problems.append(_one_line(exc))
            frames = []
        yield from frames
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


def _undecodable(path: Path, problems: list[str]) -> InputError:
    detail = f" ({problems[0]})" if problems else ""
    return InputError(f"{path}: no frame could be decoded{detail}; the file is corrupt or truncated, re-export it")


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
        problems: list[str] = []
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
        container.close()


# ----------------------------------------------------------------------------- reading


def _check_selection(path: Path, start: int, stride: int, max_frames: int | None) -> None:
    if start < 0:
        raise InputError(f"{path}: --start {start} is negative; use 0 or more")
    if stride < 1:
        raise InputError(f"{path}: --stride {stride} is not allowed; use --stride 1 or more")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"{path}: --max-frames {max_frames} selects nothing; use 1 or more")


def _past_end(path: Path, start: int, total: int) -> InputError:
    return InputError(
        f"{path}: --start {start} is past the last frame ({total} frames); choose a smaller --start"
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


# ----------------------------------------------------------------------------- sizing


def working_size(width: int, height: int, size: int, multiple: int = 8) -> tuple[int, int]:
    """Size to process a ``width x height`` video at: short side ``size``, both sides multiples of ``multiple``.

    Each side is scaled by ``size / min(width, height)``, rounded, then rounded down
    to a multiple of ``multiple`` (:func:`resize_frames` center-crops the remainder).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if size < multiple:
        raise InputError(f"--size {size} is smaller than {multiple}; choose --size {multiple} or more")
    if width < 1 or height < 1:
        raise InputError(f"video size {width}x{height} is empty; check the input video")
    scale = size / min(width, height)
    out_w = (round(width * scale) // multiple) * multiple
    out_h = (round(height * scale) // multiple) * multiple
    return int(out_w), int(out_h)


def _resize_cover(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if (w, h) == (width, height):
        return frame
    scale = max(width / w, height / h)
    new_w = max(width, round(w * scale))
    new_h = max(height, round(h * scale))
    img = Image.fromarray(frame)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.LANCZOS)
    left = (new_w - width) // 2
    top = (new_h - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize frames (``[N,H,W,3]`` or one ``HxWx3``) to cover ``width x height``, then center-crop.

    The aspect ratio is kept (no stretching).  Frames that already have the target
    size are returned unchanged, bit for bit.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    if frames.ndim == 3:
        return _resize_cover(frames, width, height)
    if frames.ndim != 4:
        raise ValueError(f"frames must be [N,H,W,3] or [H,W,3], got shape {frames.shape}")
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = _resize_cover(frame, width, height)
    return out


# ----------------------------------------------------------------------------- writing


def _as_rate(fps: float | Fraction | int, what: str = "--fps") -> Fraction:
    """Exact frame rate: 29.97002997... becomes 30000/1001, 12/5 stays 12/5."""
    try:
        rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1_000_000)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"{what} {fps!r} is not a number; pass a positive frame rate") from exc
    if rate <= 0:
        raise InputError(f"{what} {fps} is not positive; pass a positive frame rate")
    return rate


@lru_cache(maxsize=None)
def _available_encoder(candidates: tuple[str, ...]) -> str:
    for i, name in enumerate(candidates):
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - PyAV raises different types for unknown codecs
            continue
        if i > 0:
            log.warning("encoder %s is not available in this PyAV build; using %s", candidates[0], name)
        return name
    raise RuntimeError(f"none of the video encoders {', '.join(candidates)} is available in this PyAV build")


def _audio_origin(container: av.container.InputContainer, audio: av.audio.stream.AudioStream) -> float:
    """Seconds that count as t=0 of the source: the start of its video (else of its audio)."""
    reference = container.streams.video[0] if container.streams.video else audio
    if reference.start_time is not None and reference.time_base is not None:
        return float(reference.start_time * reference.time_base)
    return 0.0


class VideoWriter:
    """Encode frames one at a time into an H.264 video, optionally with the source's audio.

    Use as a context manager::

        with VideoWriter("out.mp4", fps=info.fps / stride, width=w, height=h,
                         audio_from=src, audio_start=s, audio_end=e) as out:
            for frame in frames:
                out.write(frame)

    ``fps`` may be fractional (``Fraction(30000, 1001)`` or ``29.97002997``); it is
    kept exact in the container's time base.  On close the encoder is flushed and,
    if ``audio_from`` has an audio stream, its packets that lie in
    ``[audio_start, audio_end)`` seconds of the source are copied into the output
    (stored as-is when the output container can hold that codec, e.g. AAC in mp4;
    otherwise transcoded to AAC).

    Keyword-only extras: ``codec`` overrides the video encoder (e.g. ``"ffv1"`` for
    lossless .mkv test clips) and ``crf`` sets libx264's quality (lower is better).
    """

    def __init__(
        self,
        path: str | Path,
        fps: float | Fraction,
        width: int,
        height: int,
        audio_from: str | Path | None = None,
        audio_start: float = 0.0,
        audio_end: float | None = None,
        *,
        codec: str | None = None,
        crf: int = 18,
    ) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in _OUTPUT_FORMATS:
            raise InputError(
                f"{self.path}: cannot write {suffix or 'a file without extension'}; "
                f"use one of {', '.join(_OUTPUT_FORMATS)}"
            )
        if width < 1 or height < 1:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        self.rate = _as_rate(fps)
        self.width = int(width)
        self.height = int(height)
        self.frames_written = 0
        self._audio_start = float(audio_start)
        self._audio_end = None if audio_end is None else float(audio_end)
        self._closed = False
        self._tone_hz: float | None = None
        self._tone_stream = None
        self._audio_in = None
        self._audio_in_stream = None
        self._audio_out = None
        self._audio_copy = False
        self._audio_origin = 0.0

        video_codecs, self._audio_fits, self._audio_codec = _OUTPUT_FORMATS[suffix]
        codec_name = codec or _available_encoder(video_codecs)
        pix_fmt = _RGB_PIX_FMT.get(codec_name, "yuv420p")
        # 4:2:0 chroma needs even sides; odd frames get one replicated edge row/column.
        self._pad = (
            (self.width % 2, self.height % 2) if pix_fmt.startswith("yuv420") else (0, 0)
        )

        self.path.parent.mkdir(parents=True, exist_ok=True)
        container_options = {}
        if suffix in (".mp4", ".m4v", ".mov"):
            container_options["movflags"] = "+faststart"
            # Edit lists are stored in the movie timescale (default 1/1000 s), which would cut
            # a 30000/1001 fps clip short by a fraction of a frame; use one that fits the rate.
            timescale = math.lcm(1000, self.rate.numerator)
            if self.rate.denominator != 1 and timescale <= 1_000_000:
                container_options["movie_timescale"] = str(timescale)
        self._container = av.open(str(self.path), mode="w", container_options=container_options)
        try:
            options: dict[str, str] = {}
            if codec_name == "libx264" or (codec_name == "h264" and codec is None):
                options = {"crf": str(int(crf)), "preset": "medium"}
            elif codec_name.startswith("libvpx"):
                options = {"crf": str(int(crf) + 14), "b": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"}
            stream = self._container.add_stream(codec_name, rate=self.rate, options=options)
            stream.width = self.width + self._pad[0]
            stream.height = self.height + self._pad[1]
            stream.pix_fmt = pix_fmt
            stream.codec_context.time_base = 1 / self.rate
            if codec_name == "mpeg4":
                stream.codec_context.bit_rate = int(stream.width * stream.height * float(self.rate) * 0.4)
            self._video = stream
            if audio_from is not None:
                self._setup_audio(Path(audio_from))
        except BaseException:
            self._abort()
            raise

    # -- audio -----------------------------------------------------------------------

    def _setup_audio(self, source: Path) -> None:
        if self._audio_end is not None and self._audio_end <= self._audio_start:
            log.warning("%s: empty audio range [%.3f, %.3f) s; writing video only", source, self._audio_start,
                        self._audio_end)
            return
        _check_exists(source)
        if source.is_dir():
            log.info("%s: a folder of images has no audio; writing video only", source)
            return
        try:
            container = av.open(str(source), mode="r")
        except av.FFmpegError as exc:
            raise InputError(f"{source}: cannot read audio ({_one_line(exc)}); check the file") from exc
        if not container.streams.audio:
            container.close()
            log.info("%s: no audio track; writing video only", source)
            return
        stream = container.streams.audio[0]
        origin = _audio_origin(container, stream)
        if stream.duration is not None and stream.time_base is not None:
            end = float((stream.start_time or 0) * stream.time_base) + float(stream.duration * stream.time_base)
            if self._audio_start >= end - origin:
                container.close()
                log.warning("%s: audio ends at %.3f s, before %.3f s; writing video only", source, end - origin,
                            self._audio_start)
                return
        self._audio_in = container
        self._audio_in_stream = stream
        self._audio_origin = origin
        name = stream.codec_context.name
        if name in self._audio_fits:
            self._audio_copy = True
            self._audio_out = self._container.add_stream_from_template(stream)
            log.debug("copying %s audio from %s", name, source)
        else:
            layout = "stereo" if stream.channels >= 2 else "mono"
            rate = stream.sample_rate or 48000
            if self._audio_codec == "libopus" and rate not in (8000, 12000, 16000, 24000, 48000):
                rate = 48000
            self._audio_out = self._container.add_stream(self._audio_codec, rate=rate, layout=layout)
            log.info("transcoding %s audio from %s to %s", name, source, self._audio_codec)

    def _copy_audio(self) -> None:
        stream = self._audio_in_stream
        tb = stream.time_base
        start, end = self._audio_start, self._audio_end
        shift = round((start + self._audio_origin) / tb)
        copied = 0
        try:
            for packet in self._audio_in.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                t = float(packet.pts * tb) - self._audio_origin
                if end is not None and t >= end - 1e-6:
                    break
                # Keep the packet that ends exactly at `start`: AAC needs it to decode the next one.
                if t + float((packet.duration or 0) * tb) < start - 1e-6:
                    continue
                packet.pts -= shift
                if packet.dts is not None:
                    packet.dts -= shift
                packet.stream = self._audio_out
                self._container.mux(packet)
                copied += 1
        except av.FFmpegError as exc:
            log.warning("%s: audio copy stopped early (%s)", self._audio_in.name, _one_line(exc))
        log.debug("copied %d audio packets", copied)

    def _transcode_audio(self) -> None:
        stream = self._audio_in_stream
        start, end = self._audio_start, self._audio_end
        layout = self._audio_out.layout.name
        to_float = av.AudioResampler(format="fltp", layout=layout, rate=stream.sample_rate)
        position = 0  # samples written
        next_t: float | None = None
        try:
            for frame in self._audio_in.decode(stream):
                rate = frame.sample_rate
                if frame.pts is not None and frame.time_base is not None:
                    t0 = float(frame.pts * frame.time_base) - self._audio_origin
                else:
                    t0 = next_t if next_t is not None else 0.0
                next_t = t0 + frame.samples / rate
                if next_t <= start:
                    continue
                if end is not None and t0 >= end:
                    break
                chunks = [f.to_ndarray() for f in to_float.resample(frame)]
                if not chunks:
                    continue
                samples = np.concatenate(chunks, axis=1)
                i0 = max(0, round((start - t0) * rate))
                i1 = samples.shape[1] if end is None else min(samples.shape[1], round((end - t0) * rate))
                if i1 <= i0:
                    continue
                out = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, i0:i1]), format="fltp",
                                                 layout=layout)
                out.sample_rate = rate
                out.pts = position
                out.time_base = Fraction(1, rate)
                position += i1 - i0
                self._container.mux(self._audio_out.encode(out))
        except av.FFmpegError as exc:
            log.warning("%s: audio transcode stopped early (%s)", self._audio_in.name, _one_line(exc))
        self._container.mux(self._audio_out.encode(None))

    def _add_tone(self, freq: float = 440.0, sample_rate: int = 44100, amplitude: float = 0.2) -> None:
        """Add a sine-tone track as long as the video (encoded on close). Call before :meth:`write`."""
        if self.frames_written:
            raise RuntimeError("_add_tone must be called before the first frame is written")
        codec = self._audio_codec
        if codec == "libopus":
            sample_rate = 48000
        self._tone_hz = float(freq)
        self._tone_amplitude = float(amplitude)
        self._tone_stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")

    def _encode_tone(self) -> None:
        stream = self._tone_stream
        rate = stream.codec_context.sample_rate
        total = round(self.frames_written / self.rate * rate)
        block = 4096
        for begin in range(0, total, block):
            t = np.arange(begin, min(total, begin + block)) / rate
            wave = (self._tone_amplitude * np.sin(2 * np.pi * self._tone_hz * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = begin
            frame.time_base = Fraction(1, rate)
            self._container.mux(stream.encode(frame))
        self._container.mux(stream.encode(None))

    # -- video -----------------------------------------------------------------------

    def write(self, frame: np.ndarray) -> None:
        """Encode one ``height x width x 3`` uint8 RGB frame."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer is closed")
        frame = np.asarray(frame)
        if frame.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frame.dtype}")
        if frame.shape != (self.height, self.width, 3):
            raise ValueError(
                f"frame shape {frame.shape} does not match the writer's {self.height}x{self.width}x3"
            )
        if self._pad != (0, 0):
            frame = np.pad(frame, ((0, self._pad[1]), (0, self._pad[0]), (0, 0)), mode="edge")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts = self.frames_written
        video_frame.time_base = 1 / self.rate
        self._container.mux(self._video.encode(video_frame))
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder, add the audio and finish the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.frames_written == 0:
                raise ValueError(f"{self.path}: no frames were written")
            self._container.mux(self._video.encode(None))
            if self._tone_stream is not None:
                self._encode_tone()
            if self._audio_out is not None:
                if self._audio_copy:
                    self._copy_audio()
                else:
                    self._transcode_audio()
            self._container.close()
        except BaseException:
            self._abort()
            raise
        finally:
            if self._audio_in is not None:
                self._audio_in.close()
        log.debug("wrote %d frames to %s", self.frames_written, self.path)

    def _abort(self) -> None:
        """Close everything after a failure and remove the unfinished file."""
        self._closed = True
        for container in (self._container, self._audio_in):
            if container is None:
                continue
            try:
                container.close()
            except Exception:  # noqa: BLE001 - already failing; the first error matters
                pass
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float | Fraction,
    audio_from: str | Path | None = None,
    audio_start: float = 0.0,
    audio_end: float | None = None,
) -> None:
    """Write frames (an array or any iterable of ``HxWx3`` uint8) to an H.264 video; see :class:`VideoWriter`."""
    iterator = iter(frames)
    try:
        first = np.asarray(next(iterator))
    except StopIteration:
        raise ValueError(f"{path}: no frames to write") from None
    if first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"frames must be HxWx3, got shape {first.shape}")
    height, width = first.shape[:2]
    with VideoWriter(path, fps, width, height, audio_from=audio_from, audio_start=audio_start,
                     audio_end=audio_end) as writer:
        writer.write(first)
        for frame in iterator:
            writer.write(frame)


# ----------------------------------------------------------------------------- previews


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two ``HxWx3`` frames next to each other; ``right`` is resized to ``left``'s height if needed."""
    left = np.asarray(left)
    right = np.asarray(right)
    if right.shape[0] != left.shape[0]:
        new_w = max(1, round(right.shape[1] * left.shape[0] / right.shape[0]))
        right = np.asarray(Image.fromarray(right).resize((new_w, left.shape[0]), Image.LANCZOS))
    return np.concatenate([left, right], axis=1)


def _evenly_spaced(frames: Sequence[np.ndarray], count: int) -> list[np.ndarray]:
    n = len(frames)
    if n == 0:
        raise ValueError("contact_sheet needs at least one frame in each row")
    count = min(count, n)
    picks = np.linspace(0, n - 1, count).round().astype(int)
    return [np.asarray(frames[i]) for i in picks]


def contact_sheet(
    top: Sequence[np.ndarray], bottom: Sequence[np.ndarray], columns: int = 4, gap: int = 4
) -> Image.Image:
    """Two-row overview: ``columns`` evenly spaced source frames on top, edited frames below.

    Every cell has the size of the first edited frame; cells are separated by
    ``gap`` white pixels.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = [_evenly_spaced(top, columns), _evenly_spaced(bottom, columns)]
    cell_h, cell_w = rows[1][0].shape[:2]
    ncols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (ncols * cell_w + (ncols - 1) * gap, 2 * cell_h + gap), "white")
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            cell = Image.fromarray(resize_frames(np.ascontiguousarray(frame), cell_w, cell_h))
            sheet.paste(cell, (c * (cell_w + gap), r * (cell_h + gap)))
    return sheet


# ----------------------------------------------------------------------------- sample clips


def pan_frames(
    num_frames: int = 16,
    width: int = 192,
    height: int = 128,
    shift: int = 6,
    image: str = "astronaut",
    *,
    top: int | None = None,
) -> np.ndarray:
    """Frames of a horizontal camera pan across a scikit-image sample photo, ``[N,H,W,3]`` uint8.

    Frame ``i`` is the ``width x height`` crop at x offset ``i * shift`` and y offset
    ``top`` (default: vertically centered), so frame ``i+1`` is frame ``i`` moved
    left by ``shift`` pixels.  The photo is scaled up first if it is too small for
    the whole pan.
    """
    import skimage.data  # heavy import, only needed here

    loader = getattr(skimage.data, image, None)
    if loader is None or not callable(loader):
        raise InputError(f"image {image!r}: not a scikit-image sample photo; try astronaut, coffee or chelsea")
    photo = np.asarray(loader())
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    photo = photo[..., :3].astype(np.uint8)
    need_w = width + (num_frames - 1) * shift
    ph, pw = photo.shape[:2]
    if pw < need_w or ph < height:
        scale = max(need_w / pw, height / ph)
        size = (max(need_w, math.ceil(pw * scale)), max(height, math.ceil(ph * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.LANCZOS))
        ph, pw = photo.shape[:2]
    if top is None:
        top = (ph - height) // 2
    elif not 0 <= top <= ph - height:
        raise InputError(f"top {top}: the crop must lie inside the {pw}x{ph} photo; use 0..{ph - height}")
    return np.stack([photo[top : top + height, i * shift : i * shift + width] for i in range(num_frames)])


def make_pan_clip(
    path: str | Path,
    num_frames: int = 16,
    width: int = 192,
    height: int = 128,
    shift: int = 6,
    fps: float = 10,
    audio: bool = False,
    image: str = "astronaut",
    *,
    top: int | None = None,
    crf: int = 18,
) -> None:
    """Write a test clip: a camera pan across a public-domain scikit-image photo (see :func:`pan_frames`).

    The extension picks the format: ``.mp4``/``.mov`` H.264, ``.mkv`` lossless FFV1
    (exact pixels, for motion tests), ``.webm`` VP9, ``.gif``, or no extension for a
    folder of PNGs.  With ``audio=True`` a 440 Hz sine tone as long as the clip is
    added (AAC; Opus in .webm; ignored for gif and folders).
    """
    path = Path(path)
    frames = pan_frames(num_frames, width, height, shift, image, top=top)
    suffix = path.suffix.lower()
    if suffix == "":
        if audio:
            log.warning("%s: a folder of PNGs cannot hold audio; writing frames only", path)
        path.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(path / f"frame_{i:04d}.png")
        return
    if suffix == ".gif":
        if audio:
            log.warning("%s: a gif cannot hold audio; writing frames only", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / float(fps)), loop=0)
        return
    codec = "ffv1" if suffix == ".mkv" else None
    with VideoWriter(path, fps, width, height, codec=codec, crf=crf) as writer:
        if audio:
            writer._add_tone()
        for frame in frames:
            writer.write(frame)
