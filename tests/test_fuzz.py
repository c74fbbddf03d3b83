"""Fuzzing the read path: truncated, bit-flipped, spliced and garbled variants of small valid clips.

Whatever the bytes, reading either works (frames of one size, uint8 RGB) or raises :class:`InputError` with one line
naming the file; never another exception, never a hang. Through the CLI: exit 0 or 2, no traceback, no output
folder on failure. Hypothesis runs derandomized (the same examples every run) and keeps no example database;
``TOKENFLOW_FUZZ_EXAMPLES=5000`` runs that many new random examples instead (a deeper, slower search).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tokenflow.errors import InputError
from tokenflow.io import check_packets, load_frames, probe, read_frames
from tokenflow.testing import make_pan_clip

SEEDS = ("pan.mp4", "pan.mkv", "pan.webm", "pan.gif", "pan.mov")
DEEP = int(os.environ.get("TOKENFLOW_FUZZ_EXAMPLES", "0"))
EXAMPLES = DEEP or 240
HANG_SECONDS = 20  # one variant read twice; a few milliseconds normally


@lru_cache(maxsize=None)
def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tokenflow-fuzz-"))


@lru_cache(maxsize=None)
def seed_bytes(name: str) -> bytes:
    """A small valid clip (6 frames, 48x32) in that format, made once per session."""
    path = workdir() / name
    make_pan_clip(path, num_frames=6, width=48, height=32, shift=2, audio=name.endswith((".mp4", ".mkv")))
    return path.read_bytes()


# An edit: (kind, where as a fraction of the file, length in bytes, fill bytes)
EDIT = st.tuples(
    st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "duplicate", "zero"]),
    st.floats(0.0, 1.0, allow_nan=False),
    st.integers(1, 4096),
    st.binary(min_size=1, max_size=64),
)


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, where, length, fill in edits:
        if not out:
            break
        at = min(int(where * len(out)), len(out) - 1)
        span = bytes(fill * (length // len(fill) + 1))[:length]
        if kind == "truncate":
            del out[at:]
        elif kind == "flip":
            for i in range(min(length, 16)):
                j = (at + i * 97) % len(out)
                out[j] ^= 1 << (fill[i % len(fill)] % 8)
        elif kind == "overwrite":
            out[at : at + length] = span[: len(out) - at]
        elif kind == "insert":
            out[at:at] = span
        elif kind == "delete":
            del out[at : at + length]
        elif kind == "duplicate":
            out[at:at] = out[at : at + length]
        elif kind == "zero":
            out[at : at + length] = bytes(min(length, len(out) - at))
    return bytes(out)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"reading took over {HANG_SECONDS} s")


def read_variant(path: Path, allow_partial: bool) -> np.ndarray | None:
    """probe + every frame, as the runner reads; None when refused with one good InputError line."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    scanned = None
    try:
        info = probe(path)
        if not allow_partial:
            try:
                check_packets(path)  # the runner's check before the model loads
            except InputError as exc:
                scanned = exc
                assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
        frames, _ = load_frames(path, allow_partial=allow_partial)
    except InputError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, message
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    # the packet check never refuses what decoding takes whole
    assert scanned is None, f"check_packets refused a file that reads: {scanned}"
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[3] == 3 and len(frames) >= 1
    assert info.width >= 1 and info.height >= 1
    return frames


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not DEEP, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.sampled_from(SEEDS), edits=st.lists(EDIT, min_size=1, max_size=4), allow_partial=st.booleans())
def test_mutated_clips_read_or_raise_input_error_only(seed, edits, allow_partial):
    path = workdir() / f"variant{Path(seed).suffix}"
    path.write_bytes(mutate(seed_bytes(seed), edits))
    frames = read_variant(path, allow_partial)  # any exception but InputError fails the test
    event(f"{Path(seed).suffix}: {'refused' if frames is None else 'read'}")


def test_the_unmutated_seeds_read_whole():
    for seed in SEEDS:
        path = workdir() / f"whole{Path(seed).suffix}"
        path.write_bytes(seed_bytes(seed))
        frames = read_variant(path, allow_partial=False)
        assert frames is not None and frames.shape == (6, 32, 48, 3), seed


def test_selected_frames_of_a_mutated_clip_read_lazily_raise_only_input_error():
    """The streaming reader with a selection (as the runner uses it), over a fixed set of variants."""
    rng = random.Random(18)
    data = seed_bytes("pan.mp4")
    path = workdir() / "lazy.mp4"
    for _ in range(40):
        edits = [(rng.choice(["truncate", "overwrite", "flip", "zero"]), rng.random(), rng.randint(1, 2048),
                  bytes([rng.randrange(256)]))]
        path.write_bytes(mutate(data, edits))
        try:
            reader = read_frames(path, start=rng.randrange(3), stride=rng.randint(1, 2), max_frames=rng.choice([None, 2]))
            for frame in reader:
                assert frame.dtype == np.uint8 and frame.shape[2] == 3
            assert len(reader.times) >= 1
        except InputError as exc:
            assert "\n" not in str(exc)


# ----------------------------------------------------------------------------- through the CLI


def cli_variants() -> list[tuple[str, list, list[str]]]:
    """(id, edits, extra flags): with this seed one variant reads whole and five are refused (measured); the
    zeroed one again with --allow-partial, which edits the frames before the damage."""
    rng = random.Random(2026)
    kinds = ["truncate", "overwrite", "flip", "zero", "delete", "insert"]
    variants = [(kind, [(kind, rng.uniform(0.05, 0.95), rng.randint(16, 1024), bytes([rng.randrange(256)]))], [])
                for kind in kinds]
    return variants + [("zero-allow-partial", variants[3][1], ["--allow-partial"])]


def assert_cli_outcome(rc: int, err: str, out: Path) -> None:
    """Exit 0 with the edit written, or 2 with one error line and no output folder; never a traceback, and no
    staging folder left beside the output either way."""
    assert rc in (0, 2), err
    assert "Traceback" not in err, err
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tokenflow: error:"), err
        assert not out.exists()
    else:
        assert (out / "edited.mp4").is_file()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("kind, edits, extra", cli_variants(), ids=[v[0] for v in cli_variants()])
def test_the_cli_on_a_mutated_clip_exits_0_or_2_without_traceback(tiny_model_dir, pan_clip, tmp_path, capsys,
                                                                    kind, edits, extra):
    from tokenflow.cli import main

    clip = tmp_path / "mutated.mp4"
    clip.write_bytes(mutate(pan_clip.read_bytes(), edits))
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["edit", str(clip), "--prompt", "a robot", "--model", str(tiny_model_dir), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--size", "64", "--steps", "2", "--inversion-steps", "2",
               "--batch-size", "5", "--check-frames", "0", "--quiet", *extra])
    assert_cli_outcome(rc, capsys.readouterr().err, out)


CLI_EXAMPLES = DEEP or 200


def _cache_is_valid(cache: Path) -> list[str]:
    """What is wrong with an inversion cache folder: unfinished inversions left, entries that fail their checksums."""
    from tokenflow.inversion.storage import LatentStore

    wrong = []
    for entry in sorted(cache.iterdir()) if cache.exists() else []:
        if entry.name.endswith(".lock"):
            continue
        if entry.name.endswith(".partial"):
            wrong.append(f"{entry.name}: an unfinished inversion left behind")
            continue
        try:
            LatentStore.open(entry).verify()
        except Exception as exc:  # noqa: BLE001 - any failure to read back is what this looks for
            wrong.append(f"{entry.name}: {exc!r}")
    return wrong


@settings(max_examples=CLI_EXAMPLES, deadline=None, derandomize=not DEEP, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(edits=st.lists(EDIT, min_size=1, max_size=3), allow_partial=st.booleans())
def test_every_mutated_clip_through_the_cli_exits_0_or_2_leaving_a_valid_cache(tiny_model_dir, pan_clip, capfd,
                                                                              edits, allow_partial):
    """The issue's properties over 200 variants, as a user meets them: exit 0 or 2, never a traceback (on the
    file descriptor, so FFmpeg's or a C library's writes count too), one line and no output folder when refused,
    no staging folder either way, and an inversion cache shared by every run that stays valid."""
    from tokenflow.cli import main

    root = workdir() / "cli"
    root.mkdir(exist_ok=True)
    clip, out, cache = root / "mutated.mp4", root / "out", root / "cache"
    clip.write_bytes(mutate(pan_clip.read_bytes(), edits))
    shutil.rmtree(out, ignore_errors=True)
    capfd.readouterr()
    rc = main(["edit", str(clip), "--prompt", "a robot", "--model", str(tiny_model_dir), "--out", str(out),
               "--cache-dir", str(cache), "--size", "64", "--max-frames", "4", "--steps", "2",
               "--inversion-steps", "2", "--batch-size", "4", "--check-frames", "0", "--quiet",
               *(["--allow-partial"] if allow_partial else [])])
    assert_cli_outcome(rc, capfd.readouterr().err, out)
    assert _cache_is_valid(cache) == []
    event("edited" if rc == 0 else "refused")
