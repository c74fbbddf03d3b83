"""Tests for tokenflow.video: probing, frame selection, sizing, writing with audio, bad input."""

from __future__ import annotations

import logging
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data
from PIL import Image

from tokenflow.errors import InputError
from tokenflow.io import (
    VFR_TIME_BASE,
    VideoInfo,
    VideoWriter,
    check_packets,
    contact_sheet,
    frame_spans,
    load_frames,
    probe,
    read_frames,
    resize_frames,
    side_by_side,
    working_size,
    write_video,
)
from tokenflow.testing import make_pan_clip, pan_frames

from conftest import VFR_TIMES, frame_times, write_rotated_clip, write_vfr_clip

N, W, H, SHIFT, FPS = 16, 192, 128, 6, 10


def photo_crop(i: int, width: int = W, height: int = H, shift: int = SHIFT) -> np.ndarray:
    """Frame i of the default pan, computed straight from the photo (independent of pan_frames)."""
    photo = skimage.data.astronaut()
    top = (photo.shape[0] - height) // 2
    return photo[top : top + height, i * shift : i * shift + width]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    paths = {
        "mkv": root / "pan.mkv",  # lossless FFV1: exact pixels
        "mp4": root / "pan.mp4",  # H.264, no audio
        "mp4_audio": root / "pan_audio.mp4",  # H.264 + AAC tone, 2 s
        "gif": root / "pan.gif",
        "png": root / "frames",
    }
    make_pan_clip(paths["mkv"])
    make_pan_clip(paths["mp4"])
    make_pan_clip(paths["mp4_audio"], num_frames=20, audio=True)
    make_pan_clip(paths["gif"])
    make_pan_clip(paths["png"])
    return paths


def decoded_audio(path: Path) -> tuple[np.ndarray, int, str]:
    """All audio samples of the first audio stream (mono mix), its rate and codec name.

    Also checks that the audio starts with the video (at t = 0), not delayed or early.
    """
    with av.open(str(path)) as container:
        assert container.streams.audio, f"{path} has no audio stream"
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
        assert abs(float(frames[0].pts * frames[0].time_base)) < 0.05
        chunks = [frame.to_ndarray().reshape(frame.samples, -1).mean(axis=1)
                  if not frame.format.is_planar else frame.to_ndarray().mean(axis=0)
                  for frame in frames]
        return np.concatenate(chunks).astype(np.float64), stream.sample_rate, stream.codec_context.name


def write_clip_with_audio(path: Path, seconds: float, signal, audio_codec: str = "aac", fps: int = 10) -> None:
    """A small clip whose audio is signal(t) (t in seconds), written with PyAV directly."""
    rate = 44100
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream(audio_codec, rate=rate, layout="mono")
        t = np.arange(round(seconds * rate)) / rate
        frame = av.AudioFrame.from_ndarray(signal(t).astype(np.float32)[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
        for i in range(round(seconds * fps)):
            image = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 8 % 256, np.uint8), format="rgb24")
            image.pts = i
            container.mux(video.encode(image))
        container.mux(video.encode(None))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


# ----------------------------------------------------------------------------- reading


def test_pan_clip_motion_is_exact(clips):
    frames, info = load_frames(clips["mkv"])
    assert frames.shape == (N, H, W, 3) and frames.dtype == np.uint8
    for i in (0, 1, 7, 15):
        np.testing.assert_array_equal(frames[i], photo_crop(i))
    # frame i+1 is frame i moved left by SHIFT pixels
    np.testing.assert_array_equal(frames[1:, :, :-SHIFT], frames[:-1, :, SHIFT:])
    assert info.width == W and info.height == H and info.fps == pytest.approx(FPS)
    assert info.rotation == 0 and not info.has_audio


def test_probe_mp4(clips):
    info = probe(clips["mp4"])
    assert isinstance(info, VideoInfo)
    assert (info.width, info.height, info.num_frames, info.has_audio, info.rotation) == (W, H, N, False, 0)
    assert info.fps == pytest.approx(FPS)
    assert info.path == clips["mp4"]
    assert probe(clips["mp4_audio"]).has_audio


def test_mp4_roundtrip_content(clips):
    frames, info = load_frames(clips["mp4"])
    assert frames.shape == (N, H, W, 3)
    assert info.num_frames == N
    ref = pan_frames()
    # lossy but close; a wrong frame (off by one shift) would be far off
    assert np.abs(frames.astype(int) - ref).mean() < 4
    assert np.abs(frames[1:].astype(int) - ref[:-1]).mean() > 10


@pytest.mark.parametrize(
    "start, stride, max_frames",
    [(0, 1, None), (3, 1, None), (0, 2, None), (1, 3, None), (2, 4, 2), (5, 1, 3), (15, 1, None), (0, 20, None)],
)
def test_selection_picks_the_right_frames(clips, start, stride, max_frames):
    frames, _ = load_frames(clips["mkv"], start=start, stride=stride, max_frames=max_frames)
    expected = list(range(start, N, stride))[: max_frames if max_frames else None]
    assert len(frames) == len(expected)
    for got, i in zip(frames, expected):
        np.testing.assert_array_equal(got, photo_crop(i))


def test_read_frames_streams_lazily(clips):
    it = read_frames(clips["mkv"], start=4, stride=5)
    assert iter(it) is it  # an iterator, not a list
    first = next(it)
    np.testing.assert_array_equal(first, photo_crop(4))
    rest = list(it)
    assert [f.shape for f in rest] == [(H, W, 3)] * 2  # frames 9 and 14


def test_folder_of_pngs(clips):
    info = probe(clips["png"])
    assert (info.width, info.height, info.num_frames, info.fps, info.has_audio) == (W, H, N, 10.0, False)
    frames, _ = load_frames(clips["png"], start=1, stride=5)
    assert len(frames) == 3  # frames 1, 6, 11 (16 is past the end)
    for got, i in zip(frames, (1, 6, 11)):
        np.testing.assert_array_equal(got, photo_crop(i))


def test_folder_sorts_numbers_numerically(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for value in (1, 2, 10):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / f"f{value}.png")
    (folder / "notes.txt").write_text("not a frame")
    frames, info = load_frames(folder)
    assert info.num_frames == 3
    assert [int(f[0, 0, 0]) for f in frames] == [1, 2, 10]


def test_gif(clips):
    frames, info = load_frames(clips["gif"])
    assert frames.shape == (N, H, W, 3)
    assert info.fps == pytest.approx(10.0)
    ref = pan_frames()
    assert np.abs(frames.astype(int) - ref).mean() < 12  # palette-quantized


def test_webm(tmp_path):
    path = tmp_path / "pan.webm"
    make_pan_clip(path, num_frames=6)
    frames, info = load_frames(path, stride=2)
    assert frames.shape == (3, H, W, 3)
    assert info.fps == pytest.approx(FPS)
    assert np.abs(frames.astype(int) - pan_frames(num_frames=6)[::2]).mean() < 6


@pytest.mark.parametrize("ccw, rotation", [(-90, 90), (90, 270), (180, 180)])
def test_rotation_metadata_is_applied(tmp_path, ccw, rotation):
    path = tmp_path / f"rot{rotation}.mp4"
    ref = write_rotated_clip(path, ccw, width=W, height=H)  # as a phone would store it

    info = probe(path)
    assert info.rotation == rotation
    assert (info.width, info.height) == ((H, W) if rotation in (90, 270) else (W, H))
    frames, _ = load_frames(path)
    upright = np.rot90(ref, k=-rotation // 90, axes=(1, 2))  # clockwise by `rotation`
    assert frames.shape == upright.shape
    err = np.abs(frames.astype(int) - upright).mean()
    assert err < 4
    if rotation != 180:  # the opposite quarter turn has the same shape but must not match
        wrong = np.rot90(ref, k=rotation // 90, axes=(1, 2))
        assert np.abs(frames.astype(int) - wrong).mean() > 4 * err + 10
    # OpenCV's own FFmpeg build auto-rotates too: an independent opinion on the direction
    cv2 = pytest.importorskip("cv2")
    capture = cv2.VideoCapture(str(path))
    ok, bgr = capture.read()
    auto_rotates = capture.get(cv2.CAP_PROP_ORIENTATION_AUTO)
    capture.release()
    if ok and auto_rotates:
        assert bgr.shape == frames[0].shape
        assert np.abs(bgr[..., ::-1].astype(int) - frames[0]).mean() < 1


# ----------------------------------------------------------------------------- sizing


@pytest.mark.parametrize(
    "size_in, size, expected",
    [
        ((1920, 1080), 512, (904, 512)),
        ((1080, 1920), 512, (512, 904)),  # portrait
        ((512, 512), 512, (512, 512)),
        ((384, 256), 512, (768, 512)),  # upscaled
        ((384, 256), 256, (384, 256)),
        ((640, 480), 512, (680, 512)),  # 682.7 -> 683 -> 680
        ((1000, 333), 100, (296, 96)),
    ],
)
def test_working_size(size_in, size, expected):
    assert working_size(*size_in, size) == expected


def test_working_size_multiple_and_errors():
    assert working_size(1920, 1080, 512, multiple=64) == (896, 512)
    with pytest.raises(InputError, match="`size` 4"):
        working_size(640, 480, 4)


def test_resize_identity_is_bit_exact():
    frames = pan_frames(num_frames=3)
    out = resize_frames(frames, W, H)
    assert out is frames or np.array_equal(out, frames)
    assert np.array_equal(resize_frames(frames[0], W, H), frames[0])


def test_resize_keeps_aspect_by_center_crop():
    frame = np.zeros((64, 128, 3), np.uint8)
    frame[:, 32:96] = 255  # white center band, black sides
    out = resize_frames(frame[None], 32, 32)
    assert out.shape == (1, 32, 32, 3)
    # cover-scale to 64x32 then crop the center 32 columns: all white (Lanczos rings a little at the
    # crop edges). Squashing would show black sides.
    assert out[:, :, 2:-2].min() >= 250 and out.min() >= 200
    out = resize_frames(frame[None], 64, 16)  # wider target: scale 0.5 -> 64x32, crop 16 center rows
    assert out.shape == (1, 16, 64, 3)
    assert out[0, :, :12].max() <= 5 and out[0, :, 20:44].min() >= 250 and out[0, :, 52:].max() <= 5


def test_resize_downscale_matches_pil():
    frames = pan_frames(num_frames=2)
    out = resize_frames(frames, W // 2, H // 2)
    expected = np.asarray(Image.fromarray(frames[1]).resize((W // 2, H // 2), Image.LANCZOS))
    np.testing.assert_array_equal(out[1], expected)


# ----------------------------------------------------------------------------- writing


def test_write_and_read_back(tmp_path, clips):
    frames, _ = load_frames(clips["mkv"], stride=2)
    out = tmp_path / "sub" / "out.mp4"
    write_video(out, frames, fps=5)
    back, info = load_frames(out)
    assert back.shape == frames.shape
    assert info.fps == pytest.approx(5.0) and info.num_frames == len(frames) and not info.has_audio
    assert np.abs(back.astype(int) - frames).mean() < 4
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"


@pytest.mark.parametrize("fps", [Fraction(30000, 1001), 30000 / 1001, 12 / 5, Fraction(25, 3)])
def test_fractional_fps_is_preserved(tmp_path, fps):
    path = tmp_path / "frac.mp4"
    frames = pan_frames(num_frames=6, width=64, height=48)
    write_video(path, frames, fps=fps)
    info = probe(path)
    assert info.fps == pytest.approx(float(fps), rel=1e-6)
    assert info.num_frames == 6
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert float(stream.duration * stream.time_base) == pytest.approx(6 / float(fps), rel=1e-4)


def test_audio_is_copied_and_trimmed(tmp_path, clips):
    src = clips["mp4_audio"]  # 20 frames at 10 fps, 2 s of AAC tone
    start, stride, n = 5, 2, 5
    frames, info = load_frames(src, start=start, stride=stride, max_frames=n)
    out = tmp_path / "edited.mp4"
    write_video(out, frames, fps=info.fps / stride, audio_from=src,
                audio_start=start / info.fps, audio_end=(start + n * stride) / info.fps)
    samples, rate, codec = decoded_audio(out)
    assert codec == "aac"
    assert len(samples) / rate == pytest.approx(1.0, abs=0.06)  # 5 frames at 5 fps
    assert rms(samples[rate // 10 : -rate // 10]) > 0.1  # the tone survived
    out_info = probe(out)
    assert out_info.num_frames == n and out_info.fps == pytest.approx(5.0)


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])  # mkv has no edit lists to hide extra packets
def test_audio_trim_takes_the_right_part(tmp_path, ext):
    src = tmp_path / "half.mp4"  # silence for 1 s, then a loud tone for 1 s
    write_clip_with_audio(src, 2.0, lambda t: np.where(t >= 1.0, 0.3 * np.sin(2 * np.pi * 440 * t), 0.0))
    frames, _ = load_frames(src)
    loud, quiet = tmp_path / f"loud{ext}", tmp_path / f"quiet{ext}"
    write_video(loud, frames[10:], fps=10, audio_from=src, audio_start=1.0, audio_end=2.0)
    write_video(quiet, frames[:10], fps=10, audio_from=src, audio_start=0.0, audio_end=1.0)
    loud_samples, rate, _ = decoded_audio(loud)
    quiet_samples, _, _ = decoded_audio(quiet)
    assert len(loud_samples) / rate == pytest.approx(1.0, abs=0.06)
    assert len(quiet_samples) / rate == pytest.approx(1.0, abs=0.06)
    assert rms(loud_samples[rate // 20 : rate // 2]) > 0.15
    assert rms(quiet_samples[rate // 20 : rate * 8 // 10]) < 0.01


def test_audio_in_a_codec_mp4_cannot_hold_is_transcoded(tmp_path):
    src = tmp_path / "flac.mkv"
    write_clip_with_audio(src, 2.0, lambda t: 0.3 * np.sin(2 * np.pi * 330 * t), audio_codec="flac")
    with av.open(str(src)) as container:
        assert container.streams.audio[0].codec_context.name == "flac"
    frames, _ = load_frames(src, start=4, max_frames=8)
    out = tmp_path / "out.mp4"
    write_video(out, frames, fps=10, audio_from=src, audio_start=0.4, audio_end=1.2)
    samples, rate, codec = decoded_audio(out)
    assert codec == "aac"
    assert len(samples) / rate == pytest.approx(0.8, abs=0.06)
    assert rms(samples[rate // 10 : -rate // 10]) > 0.15


def test_source_without_audio_gives_video_only(tmp_path, clips):
    out = tmp_path / "out.mp4"
    write_video(out, pan_frames(num_frames=4), fps=10, audio_from=clips["mp4"])
    assert not probe(out).has_audio


def test_writer_streams_and_checks_frames(tmp_path):
    path = tmp_path / "w.mp4"
    with VideoWriter(path, fps=10, width=64, height=48) as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
        with pytest.raises(ValueError, match="shape"):
            writer.write(np.zeros((48, 60, 3), np.uint8))
        writer.write(np.full((48, 64, 3), 200, np.uint8))
        assert writer.frames_written == 2
    frames, _ = load_frames(path)
    assert frames.shape == (2, 48, 64, 3)
    assert frames[0].mean() < 5 and abs(frames[1].mean() - 200) < 5


def test_writer_rejects_unknown_container(tmp_path):
    with pytest.raises(InputError, match=r"out\.xyz"):
        VideoWriter(tmp_path / "out.xyz", fps=10, width=64, height=48)


def test_writer_failure_leaves_no_partial_file(tmp_path):
    path = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(path, fps=10, width=64, height=48) as writer:
            writer.write(np.zeros((48, 64, 3), np.uint8))
            raise RuntimeError("model crashed")
    assert not path.exists()


# ----------------------------------------------------------------------------- previews


def test_side_by_side():
    a = np.zeros((10, 20, 3), np.uint8)
    b = np.full((10, 30, 3), 255, np.uint8)
    out = side_by_side(a, b)
    assert out.shape == (10, 50, 3)
    assert out[:, :20].max() == 0 and out[:, 20:].min() == 255


def test_contact_sheet_has_two_rows():
    top = [np.full((20, 30, 3), 10 * i, np.uint8) for i in range(16)]
    bottom = [np.full((20, 30, 3), 250 - 10 * i, np.uint8) for i in range(16)]
    sheet = contact_sheet(top, bottom, columns=4, gap=4)
    assert isinstance(sheet, Image.Image)
    assert sheet.size == (4 * 30 + 3 * 4, 2 * 20 + 4)
    px = np.asarray(sheet)
    # evenly spaced picks 0, 5, 10, 15: top row shows the source, bottom row the edit
    assert [int(px[10, c * 34 + 15, 0]) for c in range(4)] == [0, 50, 100, 150]
    assert [int(px[24 + 10, c * 34 + 15, 0]) for c in range(4)] == [250, 200, 150, 100]


# ----------------------------------------------------------------------------- bad input


def assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message


def test_missing_path(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(InputError) as exc:
        load_frames(path)
    assert_one_line_naming(exc, path)
    assert "no such file" in str(exc.value)
    with pytest.raises(InputError):
        read_frames(path)  # raised on the call, before iterating
    with pytest.raises(InputError):
        probe(path)


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(InputError) as exc:
        load_frames(path)
    assert_one_line_naming(exc, path)


@pytest.mark.parametrize("keep", ["header", "no_frames"])
def test_truncated_mp4_without_frames(tmp_path, clips, keep):
    data = clips["mp4"].read_bytes()
    mdat = data.find(b"mdat")  # faststart: moov comes first, then the frame data
    assert mdat > 0
    cut = mdat // 2 if keep == "header" else mdat + 4
    path = tmp_path / f"cut_{keep}.mp4"
    path.write_bytes(data[:cut])
    with pytest.raises(InputError) as exc:
        load_frames(path)
    assert_one_line_naming(exc, path)


def test_truncated_mkv_is_refused_saying_where_it_breaks(tmp_path, clips):
    data = clips["mkv"].read_bytes()
    path = tmp_path / "cut.mkv"
    path.write_bytes(data[: len(data) // 2])  # the demuxer just stops: no error, the header's duration tells
    with pytest.raises(InputError) as exc:
        load_frames(path)
    assert_one_line_naming(exc, path)
    message = str(exc.value)
    assert "truncated or damaged after frame" in message and "`allow_partial`" in message


def test_truncated_file_with_allow_partial_returns_what_decodes(tmp_path, clips, caplog):
    data = clips["mkv"].read_bytes()
    path = tmp_path / "cut.mkv"
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="tokenflow.io"):
        frames, _ = load_frames(path, allow_partial=True)
    assert 1 <= len(frames) < N
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, photo_crop(i))
    assert any("truncated" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_truncated_mp4_with_some_frames_is_refused_or_warns(tmp_path, clips, caplog):
    data = clips["mp4"].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as exc:
        load_frames(path)
    assert_one_line_naming(exc, path)
    assert "truncated or damaged" in str(exc.value) and "`allow_partial`" in str(exc.value)
    with caplog.at_level(logging.WARNING, logger="tokenflow.io"):
        frames, info = load_frames(path, allow_partial=True)
    assert 1 <= len(frames) < N
    assert any("truncated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("args, suffix", [(["-ss", "1.25", "-c", "copy"], ".mp4"),  # an edit list hides frames
                                          (["-ss", "1.25", "-t", "1.0", "-c", "copy"], ".mov"),
                                          (["-c:v", "mpeg4"], ".avi"),  # its header counts one frame more
                                          (["-c", "copy"], ".ts")])  # no frame count at all
def test_whole_files_made_by_ffmpeg_are_not_taken_for_truncated(tmp_path, caplog, args, suffix):
    import subprocess

    ffmpeg = pytest.importorskip("imageio_ffmpeg").get_ffmpeg_exe()
    src = tmp_path / "long.mp4"
    make_pan_clip(src, num_frames=40, fps=10, audio=True)
    out = tmp_path / f"made{suffix}"
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-i", str(src), *args, str(out)] if "-ss" not in args else
                   [ffmpeg, "-loglevel", "error", "-y", *args[:2], "-i", str(src), *args[2:], str(out)], check=True)
    check_packets(out)  # nothing missing by the container either
    with caplog.at_level(logging.WARNING, logger="tokenflow.io"):
        frames, _ = load_frames(out)
    assert len(frames) >= 10
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


@pytest.mark.parametrize("kind, keep", [("mkv", 0.5), ("mkv", 0.9), ("mp4", 0.67), ("mp4", 0.9)])
def test_a_cut_file_is_refused_from_its_packets_alone(tmp_path, clips, kind, keep):
    # what the runner checks before the model loads: the same refusal as decoding gives, without decoding
    data = clips[kind].read_bytes()
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError) as scanned:
        check_packets(path)
    assert_one_line_naming(scanned, path)
    assert "truncated or damaged after frame" in str(scanned.value) and "`allow_partial`" in str(scanned.value)
    with pytest.raises(InputError) as decoded:
        load_frames(path)
    if kind == "mkv":  # FFV1 frames are whole packets: both find the same frame
        assert str(scanned.value) == str(decoded.value)
    check_packets(path, max_frames=1)  # a selection that ends well before the cut is left to run
    check_packets(clips[kind])  # the whole file passes


def damage_packet(src: Path, dst: Path, k: int, zero_tail: bool = False) -> float:
    """Copy ``src``'s video packets into ``dst`` (same container type), packet ``k`` (decode order) replaced by
    random bytes of its size: a bit error the decoder reports; with ``zero_tail`` its second half zeroed instead
    (the headers intact: bytes lost on disk, which H.264's decoder conceals without an error). Returns the
    damaged packet's presentation time in seconds."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for i, packet in enumerate(p for p in inp.demux(stream) if p.size):
            if i == k:
                data = bytes(packet)
                when = float(packet.pts * packet.time_base)
                if zero_tail:
                    bad = data[: len(data) // 2] + bytes(len(data) - len(data) // 2)
                else:
                    bad = np.random.default_rng(0).integers(0, 256, packet.size, np.uint8).tobytes()
                noise = av.Packet(bad)
                noise.pts, noise.dts, noise.time_base = packet.pts, packet.dts, packet.time_base
                noise.is_keyframe = packet.is_keyframe
                packet = noise
            packet.stream = copy
            out.mux(packet)
    return when


def test_a_damaged_frame_mid_video_is_refused_naming_it_or_skipped_with_allow_partial(tmp_path, clips, caplog):
    path = tmp_path / "damaged.mkv"
    damage_packet(clips["mkv"], path, 5)  # FFV1: frame 5 is lost; the next ones may be off until a keyframe
    with pytest.raises(InputError) as exc:
        list(read_frames(path))
    assert_one_line_naming(exc, path)
    assert "damaged at frame 5 (about 0.50 s)" in str(exc.value)
    with caplog.at_level(logging.WARNING, logger="tokenflow.io"):
        frames, _ = load_frames(path, allow_partial=True)
    assert len(frames) == N - 1
    for i in range(5):
        np.testing.assert_array_equal(frames[i], photo_crop(i))
    assert any("frame 5" in r.getMessage() for r in caplog.records)
    # a selection that ends before the damage never reaches it: no error
    assert len(load_frames(path, max_frames=5)[0]) == 5


def test_damage_the_decoder_conceals_is_refused_naming_the_frame_or_kept_with_allow_partial(tmp_path, clips, caplog,
                                                                                           capfd):
    # H.264 decodes zeroed slice data without raising, painting a guess over the damage (smeared blocks, carried
    # into every later frame that refers to it); only FFmpeg's log says so
    path = tmp_path / "zeroed.mp4"
    # packet 3 is the P-frame shown as frame 3 (x264's B-frames make decode order differ from display order; no
    # frame shown before it refers to it)
    when = damage_packet(clips["mp4"], path, 3, zero_tail=True)
    frame = round(when * 10)  # the clip's 10 fps from t = 0
    assert frame == 3
    with pytest.raises(InputError) as exc:
        list(read_frames(path))
    assert_one_line_naming(exc, path)
    assert f"damaged at frame {frame} ({'about'} {when:.2f} s)" in str(exc.value)
    assert "error while decoding" in str(exc.value)  # FFmpeg's own words
    # FFmpeg's messages are counted, never shown: not on stderr, not through `logging` (PyAV's "libav" loggers)
    assert av.logging.get_level() in (None, av.logging.PANIC)
    assert "error while decoding" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name.startswith("libav")]
    with caplog.at_level(logging.WARNING, logger="tokenflow.io"):
        frames, _ = load_frames(path, allow_partial=True)
    assert len(frames) == N  # every frame decodes, the damaged ones as the decoder concealed them
    good, _ = load_frames(clips["mp4"])
    assert not np.array_equal(frames[frame], good[frame])
    np.testing.assert_array_equal(frames[:frame], good[:frame])  # the frames before are untouched
    assert any(f"frame {frame}" in r.getMessage() for r in caplog.records)
    # a selection that ends before the damage never reaches it (frame 0 here: frames 1 and 2 come out of the decoder
    # only after packet 3, B-frames being sent after the frames they refer to)
    assert len(load_frames(path, max_frames=1)[0]) == 1


def test_reading_damaged_h264_over_and_over_never_deadlocks(tmp_path, pan_clip):
    """Frame-threaded H.264 workers that meet damage log an error through PyAV's log callback (it needs the GIL)
    while the reader frees the codec context (which waits for them holding the GIL). Found by the fuzz test: before
    the fix, every one of these three damaged clips hung within 100 reads (a C-level deadlock: Ctrl-C and alarms
    cannot end it), so the reads run in a child process with a time limit; 100 reads take about 2 s."""
    data = pan_clip.read_bytes()
    paths = []
    for fraction in (0.3, 0.4, 0.5):  # 700 zeroed bytes inside the frame data
        at = int(len(data) * fraction)
        paths.append(tmp_path / f"zeroed-{at}.mp4")
        paths[-1].write_bytes(data[:at] + bytes(700) + data[at + 700:])
    code = ("import sys\nfrom tokenflow.errors import InputError\nfrom tokenflow.io import load_frames, probe\n"
            "for path in sys.argv[1:]:\n    for _ in range(50):\n        for allow_partial in (False, True):\n"
            "            try:\n                probe(path)\n                load_frames(path, allow_partial=allow_partial)\n"
            "            except InputError:\n                pass\nprint('done')\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("reading damaged clips hung (decoder threads deadlocked with the GIL)")
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]


def test_unreadable_image_in_a_folder_is_refused_or_skipped(tmp_path, clips, caplog):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, image in enumerate(sorted(clips["png"].iterdir())[:4]):
        (folder / image.name).write_bytes(image.read_bytes()[: 100 if i == 2 else None])
    with pytest.raises(InputError, match="`allow_partial`"):
        load_frames(folder)
    with caplog.at_level(logging.WARNING, logger="tokenflow.io"):
        frames, _ = load_frames(folder, allow_partial=True)
    assert len(frames) == 3
    np.testing.assert_array_equal(frames[2], photo_crop(3))


def test_audio_only_and_frameless_files_are_one_line_errors(tmp_path):
    from conftest import audio_only as write_audio_only

    write_clip_with_audio(tmp_path / "with_video.mp4", 1.0, lambda t: 0.2 * np.sin(2 * np.pi * 440 * t))
    audio_only = write_audio_only(tmp_path / "with_video.mp4", tmp_path / "tone.m4a")
    frameless = tmp_path / "frameless.mkv"
    with av.open(str(frameless), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
        container.start_encoding()  # the header, then not one frame
    assert frameless.stat().st_size > 0
    for path, needle in ((audio_only, "no video stream (audio only)"), (frameless, "no frames")):
        for call in (probe, load_frames):
            with pytest.raises(InputError) as exc:
                call(path)
            assert_one_line_naming(exc, path)
            assert needle in str(exc.value)


def test_start_past_end(clips):
    path = clips["mp4"]
    with pytest.raises(InputError) as exc:
        load_frames(path, start=500)
    assert_one_line_naming(exc, path)
    assert f"`start` 500 is past the last frame ({N} frames)" in str(exc.value)
    with pytest.raises(InputError, match=r"`start` 16 is past the last frame \(16 frames\)"):
        load_frames(clips["png"], start=16)


@pytest.mark.parametrize("kwargs, option", [({"stride": 0}, "`stride`"), ({"max_frames": 0}, "`max_frames`"),
                                            ({"start": -1}, "`start`")])
def test_bad_selection(clips, kwargs, option):
    path = clips["mkv"]
    with pytest.raises(InputError) as exc:
        load_frames(path, **kwargs)
    assert_one_line_naming(exc, path)
    assert option in str(exc.value)


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(InputError) as exc:
        load_frames(folder)
    assert_one_line_naming(exc, folder)


def test_folder_with_mixed_sizes(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(folder / "b.png")
    with pytest.raises(InputError) as exc:
        load_frames(folder)
    assert_one_line_naming(exc, folder / "b.png")


def test_sample_clip_in_repo():
    path = Path(__file__).resolve().parent.parent / "examples" / "pan.mp4"
    if not path.exists():
        pytest.skip("examples/pan.mp4 not present")
    info = probe(path)
    assert (info.width, info.height, info.num_frames, info.has_audio) == (384, 256, 32, True)
    assert info.fps == pytest.approx(12.0)
    assert path.stat().st_size < 300_000


# ----------------------------------------------------------------------------- variable frame rate

@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_reading_records_each_frames_presentation_time(tmp_path, suffix):
    path = tmp_path / f"vfr{suffix}"
    write_vfr_clip(path)
    reader = read_frames(path, start=1, stride=2)
    frames = list(reader)
    assert len(frames) == len(reader.times) == 6
    np.testing.assert_allclose(reader.times, VFR_TIMES[1::2], atol=1e-3)
    assert reader.variable_times() == reader.times


@pytest.mark.parametrize("kind", ["mkv", "mp4", "mp4_audio", "gif", "png"])
def test_constant_rate_sources_are_not_variable(clips, kind):
    reader = read_frames(clips[kind], stride=3)
    frames = list(reader)
    assert reader.variable_times() is None
    np.testing.assert_allclose(np.diff(reader.times), 3 / FPS, atol=0.011)  # gif: centiseconds
    assert len(frames) == 6 if kind != "mp4_audio" else 7


@pytest.mark.parametrize("src_suffix, out_suffix", [(".mp4", ".mp4"), (".mkv", ".mp4"), (".mp4", ".mkv")])
def test_written_video_keeps_variable_frame_times(tmp_path, src_suffix, out_suffix):
    """read -> write with the recorded times: each output frame is shown when it was in the source (relative to
    the first selected frame), within one tick of the coarser time base."""
    src = tmp_path / f"vfr{src_suffix}"
    write_vfr_clip(src)
    start, stride = 2, 1
    reader = read_frames(src, start=start, stride=stride)
    frames = list(reader)
    times = reader.variable_times()
    assert times is not None
    out = tmp_path / f"out{out_suffix}"
    with VideoWriter(out, 10, W, H, time_base=VFR_TIME_BASE) as writer:
        for frame, (t, end) in zip(frames, frame_spans(times)):
            writer.write(frame, time=t, duration=end - t)
    got, tick = frame_times(out)
    expected = np.asarray(VFR_TIMES[start::stride]) - VFR_TIMES[start]
    assert len(got) == len(expected)
    np.testing.assert_allclose(got, expected, atol=max(tick, 1e-3) + 1e-9)
    # an evenly spaced write would put frame 3 (source 0.6 s) at 0.3 s: far outside the tolerance
    assert abs(got[3] - 0.3) > 0.1
    back = load_frames(out)[0]
    assert np.abs(back.astype(int) - pan_frames(num_frames=len(VFR_TIMES))[start:]).mean() < 4


def test_writer_with_a_time_base_needs_increasing_times(tmp_path):
    frame = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="increase"):
        with VideoWriter(tmp_path / "t.mp4", 10, 64, 48, time_base=VFR_TIME_BASE) as writer:
            writer.write(frame, time=0.5)
            writer.write(frame, time=0.5)
    assert not (tmp_path / "t.mp4").exists()
    with pytest.raises(ValueError, match="time"):
        with VideoWriter(tmp_path / "u.mp4", 10, 64, 48) as writer:
            writer.write(frame, time=0.5)


# ----------------------------------------------------------------------------- alpha, bit depth, chroma, rgb


def rgba_pan(num_frames: int = 4, width: int = 64, height: int = 48) -> np.ndarray:
    """The pan with an alpha ramp across each frame (0 at the left edge, 255 at the right), ``[N,H,W,4]``."""
    rgb = pan_frames(num_frames=num_frames, width=width, height=height)
    alpha = np.broadcast_to(np.linspace(0, 255, width).round().astype(np.uint8)[None, None, :, None],
                            (num_frames, height, width, 1))
    return np.concatenate([rgb, alpha], axis=-1)


def over_black(rgba: np.ndarray) -> np.ndarray:
    """The documented compositing, computed independently in floating point."""
    return np.round(rgba[..., :3] * (rgba[..., 3:4] / 255.0)).astype(np.uint8)


def test_rgba_png_folder_is_composited_over_black(tmp_path):
    from tokenflow.io import ALPHA_BACKGROUND

    assert ALPHA_BACKGROUND == (0, 0, 0)
    frames = rgba_pan()
    folder = tmp_path / "rgba"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame, "RGBA").save(folder / f"{i}.png")
    got, info = load_frames(folder)
    assert got.shape == (4, 48, 64, 3) and (info.width, info.height) == (64, 48)
    assert np.abs(got.astype(int) - over_black(frames)).max() <= 1
    assert got[:, :, 0].max() == 0  # fully transparent: the background, not the photo under it
    np.testing.assert_array_equal(got[:, :, -1], frames[:, :, -1, :3])  # opaque: untouched


def test_gif_transparency_is_composited_over_black(tmp_path):
    path = tmp_path / "t.gif"
    images = []
    for i in range(3):
        rgba = np.zeros((32, 48, 4), np.uint8)
        rgba[..., 1] = 180
        rgba[:, : 16 + 8 * i, 3] = 255  # the opaque part grows; the rest is the gif's transparent colour
        images.append(Image.fromarray(rgba, "RGBA"))
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0, disposal=2)
    got, _ = load_frames(path)
    assert got.shape == (3, 32, 48, 3)
    for i, frame in enumerate(got):
        assert np.abs(frame[:, : 16 + 8 * i].astype(int) - (0, 180, 0)).max() <= 2
        assert frame[:, 16 + 8 * i :].max() == 0


def test_vp9_webm_with_alpha_is_composited_over_black(tmp_path):
    path = tmp_path / "alpha.webm"
    frames = rgba_pan()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=10, options={"lossless": "1"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuva420p"
        for i, frame in enumerate(frames):
            image = av.VideoFrame.from_ndarray(frame, format="rgba")
            image.pts = i
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        if container.streams.video[0].metadata.get("alpha_mode") != "1":
            pytest.skip("this libvpx did not store an alpha channel")
    got, _ = load_frames(path)
    assert got.shape == (4, 48, 64, 3)
    expected = over_black(frames)
    assert np.abs(got.astype(int) - expected).mean() < 3  # 4:2:0 chroma
    assert got[:, :, 0].max() <= 4  # transparent: black, not the photo under it
    assert np.abs(got.astype(int) - frames[..., :3]).mean() > 20  # the alpha was not dropped


# (codec, pixel format, container, options, largest mean abs error): lossless 4:4:4 and rgb come back exact up to
# 8-bit YUV rounding; 4:2:0 loses chroma detail, as an 8-bit yuv420p clip does
DEPTHS = [
    ("libx264", "yuv444p10le", ".mp4", {"qp": "0"}, 0.1),
    ("ffv1", "yuv444p10le", ".mkv", {}, 0.1),
    ("ffv1", "yuv420p10le", ".mkv", {}, 3.0),
    ("libx264", "yuv420p10le", ".mkv", {"qp": "0"}, 3.0),
    ("libx264", "yuv444p", ".mp4", {"qp": "0"}, 0.6),
    ("libx264rgb", "rgb24", ".mkv", {"qp": "0"}, 0.0),
    ("ffv1", "gbrp10le", ".mkv", {}, 0.0),
    ("png", "rgb48be", ".mov", {}, 0.0),
    ("ffv1", "yuv444p16le", ".mkv", {}, 0.1),
]


@pytest.mark.parametrize("codec, pix_fmt, suffix, options, tolerance", DEPTHS, ids=[d[1] + d[2] for d in DEPTHS])
def test_high_bit_depth_444_and_rgb_sources_read_with_their_colours(tmp_path, codec, pix_fmt, suffix, options,
                                                                     tolerance):
    frames = pan_frames(num_frames=3, width=64, height=48)
    path = tmp_path / f"clip{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for i, frame in enumerate(frames):
            image = av.VideoFrame.from_ndarray(frame, format="rgb24")
            image.pts = i
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt in (pix_fmt, "gbrp")  # libx264rgb stores gbrp
    got, _ = load_frames(path)
    assert got.shape == frames.shape and got.dtype == np.uint8
    error = np.abs(got.astype(int) - frames)
    assert error.mean() <= tolerance
    assert np.abs(got.astype(int) - frames[..., ::-1]).mean() > 10  # swapped channels would show


def test_staged_frames_written_with_variable_times_keep_them(tmp_path):
    """The writer of staged frames (the ControlNet maps' control.mp4) takes a variable-frame-rate source's times."""
    from conftest import VFR_TIMES, frame_times

    from tokenflow.io import FrameStore
    from tokenflow.runner import _write_frames
    from tokenflow.testing import pan_frames

    store = FrameStore.write(tmp_path / "f.rgb", pan_frames(num_frames=len(VFR_TIMES), width=64, height=48))
    _write_frames(tmp_path / "vfr.mp4", store, 10, 4, times=VFR_TIMES)
    got, tick = frame_times(tmp_path / "vfr.mp4")
    np.testing.assert_allclose(got, VFR_TIMES, atol=max(tick, 1e-3) + 1e-9)
    _write_frames(tmp_path / "cfr.mp4", store, 10, 4)
    got, _ = frame_times(tmp_path / "cfr.mp4")
    np.testing.assert_allclose(got, np.arange(len(VFR_TIMES)) / 10, atol=1e-3)
