"""Writing videos (H.264 by default) with the source's audio trimmed to the edited range."""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import av
import numpy as np

from tokenflow.errors import InputError

from .probe import _check_exists, _one_line

log = logging.getLogger('tokenflow.io')


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


def _as_rate(fps: float | Fraction | int, what: str = "fps") -> Fraction:
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


#: Time base of a variable-frame-rate output (MPEG's 90 kHz clock): fine enough for any source's timestamps.
VFR_TIME_BASE = Fraction(1, 90000)


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

    Variable frame rate: with ``time_base`` (e.g. :data:`VFR_TIME_BASE`, 1/90000 s) every
    :meth:`write` passes the frame's presentation ``time`` in seconds (and optionally how long it
    is shown); the frames keep those times, shifted so that the first one is at 0, to the nearest
    tick of ``time_base``.  ``fps`` is then only the nominal rate stored in the stream.  Without
    it frame ``i`` is shown at ``i / fps``.
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
        time_base: Fraction | None = None,
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
        self.time_base = None if time_base is None else Fraction(time_base)
        self._first_time: float | None = None
        self._last_pts: int | None = None
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
            if self.time_base is not None:
                container_options["movie_timescale"] = str(self.time_base.denominator)
            elif self.rate.denominator != 1 and timescale <= 1_000_000:
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
            stream.codec_context.time_base = self.time_base or 1 / self.rate
            if self.time_base is not None:
                stream.time_base = self.time_base
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
            container = av.open(str(source), mode="r", metadata_errors="replace")
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

    def write(self, frame: np.ndarray, time: float | None = None, duration: float | None = None) -> None:
        """Encode one ``height x width x 3`` uint8 RGB frame; ``time`` (seconds) and ``duration`` only with a
        ``time_base`` (see the class)."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer is closed")
        if (time is None) != (self.time_base is None):
            raise ValueError("pass time= to write() exactly when the writer has a time_base")
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
        if self.time_base is None:
            video_frame.pts = self.frames_written
            video_frame.time_base = 1 / self.rate
        else:
            if self._first_time is None:
                self._first_time = float(time)
            pts = round((float(time) - self._first_time) / self.time_base)
            if self._last_pts is not None and pts <= self._last_pts:
                raise ValueError(f"frame times must increase: {time} s comes after the previous frame's")
            self._last_pts = pts
            video_frame.pts = pts
            video_frame.time_base = self.time_base
            if duration is not None:
                video_frame.duration = max(1, round(float(duration) / self.time_base))
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
