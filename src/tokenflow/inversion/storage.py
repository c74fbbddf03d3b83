"""Latents on disk: a folder of safetensors shards, each holding every tensor for a run of consecutive frames, and a
JSON index; read back a few frames at a time.

One format for the inversion cache and for ``tokenflow edit --save-latents``. Tensor names: ``clean`` (the
encoded frames), ``t<T>`` (the inverted latents at timestep T), ``final`` (edited latents). A single safetensors
file with those names (the cache of tokenflow < 0.3, a ``latents.safetensors`` of older releases, whose inverted
latents are named ``source_t<T>``) opens the same way, as a store of one shard.

Shards are written whole with ``safetensors.torch.save_file`` (so a half-written shard never has the final name),
the index last: a folder without ``index.json`` is unfinished. The index records each shard's size and SHA-256,
so a damaged store is detected before use (:meth:`LatentStore.verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..correspondence import consecutive_runs

__all__ = ["LatentColumn", "LatentStore", "CorruptLatents", "write_shard", "write_latents", "load_latents",
           "shard_name", "timestep_name"]

INDEX = "index.json"
FORMAT = "tokenflow-latents"
_SHARD = re.compile(r"^frames-(\d+)-(\d+)\.safetensors$")
_LEGACY_TIMESTEP = re.compile(r"^source_t(\d+)$")  # --save-latents of tokenflow < 0.3


class CorruptLatents(ValueError):
    """A latents store that is not what its index says (truncated, modified, missing shards)."""


def timestep_name(t: int) -> str:
    return f"t{int(t)}"


def shard_name(start: int, stop: int) -> str:
    """The file name of the shard holding frames ``[start, stop)``."""
    return f"frames-{start:06d}-{stop:06d}.safetensors"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    match = _SHARD.match(name)
    return (int(match[1]), int(match[2])) if match else None


@dataclass(frozen=True)
class Shard:
    path: Path
    start: int
    stop: int


class LatentColumn:
    """One ``[N, ...]`` tensor of a store, spread over shards of consecutive frames.

    Indexing the first axis (an int, a slice, a list, range or 1-D tensor of frame indices, or a tuple starting with
    one) reads only those frames' rows from the shards that hold them (``safetensors.safe_open``, memory-mapped and
    unmapped again, so nothing stays resident between reads). :meth:`load` reads the whole tensor. It is not a
    tensor: arithmetic needs an explicit read (``column[:]``), so no code loads a long video's latents by accident.
    """

    def __init__(self, name: str, shards: Sequence[Shard], shape: tuple[int, ...], dtype: torch.dtype,
                 stored_name: str | None = None):
        self.name = name
        self.stored_name = stored_name or name  # the name in the files (an older release's, when it differs)
        self.shards = list(shards)
        self.shape = torch.Size(shape)
        self.dtype = dtype

    device = torch.device("cpu")
    ndim = property(lambda self: len(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = self.shards[0].path.parent if self.shards else "?"
        return f"LatentColumn({self.name!r} in {str(where)!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def _read(self, positions: list[int]) -> torch.Tensor:
        from safetensors import safe_open

        parts = []
        for a, z in consecutive_runs(positions):
            for shard in self.shards:
                lo, hi = max(a, shard.start), min(z, shard.stop)
                if lo >= hi:
                    continue
                try:
                    with safe_open(str(shard.path), framework="pt") as f:
                        # a copy: no view of the memory map outlives the read
                        parts.append(f.get_slice(self.stored_name)[lo - shard.start : hi - shard.start].clone())
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"{shard.path}: the latents file was removed while in use; rerun (the inversion is recomputed)"
                    ) from None
        if not parts:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.to(self.dtype)

    def load(self) -> torch.Tensor:
        """The whole tensor."""
        return self._read(list(range(self.shape[0])))

    def __getitem__(self, index) -> torch.Tensor:
        rest = ()
        if isinstance(index, tuple):
            index, rest = (index[0], index[1:]) if index else (slice(None), ())
        n = self.shape[0]
        if isinstance(index, torch.Tensor):
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            index = int(index) if index.ndim == 0 else index.tolist()
        squeeze = isinstance(index, int)
        if squeeze:
            positions = [index]
        elif isinstance(index, slice):
            positions = list(range(*index.indices(n)))
        elif isinstance(index, (list, range)) and all(isinstance(i, int) for i in index):
            positions = list(index)
        else:
            raise TypeError(f"{self!r}: index the frames with an int, a slice or a list of ints, not {index!r}")
        for i, p in enumerate(positions):
            if not -n <= p < n:
                raise IndexError(f"index {p} is out of bounds for {n} frames of {self.name!r}")
            positions[i] = p % n
        out = self._read(positions)
        if squeeze:
            out = out[0]
        return out[(slice(None),) * (0 if squeeze else 1) + rest] if rest else out


class LatentStore:
    """A latents folder (``index.json`` and shards) or a single safetensors file, opened for reading.

    ``columns``: name -> :class:`LatentColumn`; ``info``: the metadata the writer recorded.
    """

    def __init__(self, path: Path, columns: dict[str, LatentColumn], info: dict, index: dict | None):
        self.path = path
        self.columns = columns
        self.info = info
        self._index = index

    @classmethod
    def open(cls, path: str | Path) -> "LatentStore":
        """Open a folder written by :func:`write_latents` or a single safetensors file; raises
        :class:`CorruptLatents` when it is neither (or its index does not describe its shards)."""
        path = Path(path)
        if path.is_dir():
            try:
                index = json.loads((path / INDEX).read_text())
                if index.get("format") != FORMAT:
                    raise ValueError(f"format {index.get('format')!r}")
                shards = [Shard(path / s["file"], int(s["start"]), int(s["stop"])) for s in index["shards"]]
                columns = {name: LatentColumn(name, shards, tuple(spec["shape"]), _dtype(spec["dtype"]))
                           for name, spec in index["tensors"].items()}
            except FileNotFoundError:
                raise CorruptLatents(f"{path}: no {INDEX} (an unfinished or foreign folder)") from None
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptLatents(f"{path}/{INDEX}: not a tokenflow latents index ({exc})") from None
            return cls(path, columns, index.get("info", {}), index)
        return cls.from_shards([Shard(path, 0, -1)])

    @classmethod
    def from_shards(cls, shards: Sequence[Shard]) -> "LatentStore":
        """A store over shard files without an index (an unfinished folder, a single file: ``stop=-1`` takes the
        row count from the file). Every shard must hold the same tensor names, shapes past the first axis and
        dtypes, and together they cover frames 0 to the last one without a gap."""
        from safetensors import SafetensorError, safe_open

        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        resolved, info = [], {}
        for shard in sorted(shards, key=lambda s: s.start):
            try:
                with safe_open(str(shard.path), framework="pt") as f:
                    names = list(f.keys())
                    these = {}
                    for name in names:
                        part = f.get_slice(name)
                        these[_canonical(name)] = (tuple(part.get_shape()), _dtype(part.get_dtype()), name)
                    info = json.loads((f.metadata() or {}).get("info", "{}"))
            except (OSError, SafetensorError, ValueError) as exc:
                raise CorruptLatents(f"{shard.path}: not a readable safetensors file ({exc})") from None
            rows = {shape[0] if shape else 0 for shape, _, _ in these.values()}
            stop = shard.stop if shard.stop >= 0 else shard.start + (next(iter(rows)) if len(rows) == 1 else 0)
            if rows != {stop - shard.start} or stop <= shard.start:  # also: no tensors, or 0-d ones
                raise CorruptLatents(f"{shard.path}: its tensors do not all hold frames {shard.start}-{stop - 1}")
            shape_tail = {k: (s[1:], d) for k, (s, d, _) in these.items()}
            if specs is None:
                specs = shape_tail
            elif specs != shape_tail:
                raise CorruptLatents(f"{shard.path}: other tensors than the store's first shard")
            resolved.append((Shard(shard.path, shard.start, stop), {k: v[2] for k, v in these.items()}))
        if not resolved:
            raise CorruptLatents("no latent shards")
        expected = 0
        for shard, _ in resolved:
            if shard.start != expected:
                raise CorruptLatents(f"{shard.path}: frames {expected}-{shard.start - 1} are missing")
            expected = shard.stop
        columns = {}
        for name, (tail, dtype) in (specs or {}).items():
            stored = {names[name] for _, names in resolved}
            if len(stored) != 1:
                raise CorruptLatents(f"{resolved[0][0].path.parent}: shards name {name!r} differently")
            columns[name] = LatentColumn(name, [s for s, _ in resolved], (expected, *tail), dtype, stored.pop())
        return cls(resolved[0][0].path if len(resolved) == 1 else resolved[0][0].path.parent, columns, info, None)

    @property
    def frames(self) -> int:
        return next(iter(self.columns.values())).shape[0] if self.columns else 0

    def timesteps(self) -> dict[int, LatentColumn]:
        """The inverted latents by timestep."""
        return {int(name[1:]): c for name, c in self.columns.items() if re.fullmatch(r"t\d+", name)}

    def verify(self) -> None:
        """Check every shard against the index (size, SHA-256, tensors); raises :class:`CorruptLatents`.
        A single file (no index) is checked for a readable header and consistent tensors only."""
        if self._index is None:
            return
        for entry in self._index["shards"]:
            path = self.path / entry["file"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CorruptLatents(f"{path}: missing") from None
            if size != entry["bytes"]:
                raise CorruptLatents(f"{path}: {size} bytes, the index says {entry['bytes']} (truncated?)")
            if _sha256(path) != entry["sha256"]:
                raise CorruptLatents(f"{path}: its checksum does not match the index (modified or damaged)")
        LatentStore.from_shards([Shard(self.path / s["file"], s["start"], s["stop"]) for s in self._index["shards"]])


def _canonical(name: str) -> str:
    match = _LEGACY_TIMESTEP.match(name)
    return timestep_name(int(match[1])) if match else name


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _dtype(name: str) -> torch.dtype:
    if name in _DTYPES:
        return _DTYPES[name]
    for dtype in _DTYPES.values():
        if str(dtype) == name:
            return dtype
    raise ValueError(f"dtype {name}: not a floating-point latent")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(folder: str | Path, start: int, stop: int, tensors: Mapping[str, torch.Tensor],
                info: dict | None = None, name: str | None = None) -> Path:
    """Write frames ``[start, stop)`` of every tensor as one shard of ``folder``, atomically (a temporary file,
    then a rename); ``name`` overrides the shard's file name (a checkpoint)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or shard_name(start, stop))
    for key, value in tensors.items():
        if value.shape[0] != stop - start:
            raise ValueError(f"{key}: {value.shape[0]} rows for frames {start}-{stop - 1}")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"info": json.dumps(info or {}, default=str)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def finish_store(folder: str | Path, info: dict | None = None) -> Path:
    """Write the index of the shards in ``folder`` (checking that they cover the frames once, with one set of
    tensors); the folder is a finished store from then on."""
    folder = Path(folder)
    shards = []
    for path in folder.iterdir():
        span = parse_shard_name(path.name)
        if span is not None:
            shards.append(Shard(path, *span))
    store = LatentStore.from_shards(shards)
    index = {
        "format": FORMAT,
        "version": 1,
        "frames": store.frames,
        "tensors": {name: {"shape": list(c.shape), "dtype": str(c.dtype)} for name, c in store.columns.items()},
        "shards": [{"file": s.path.name, "start": s.start, "stop": s.stop, "bytes": s.path.stat().st_size,
                    "sha256": _sha256(s.path)} for s in sorted(shards, key=lambda s: s.start)],
        "info": info or {},
    }
    tmp = folder / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1, default=str))
    os.replace(tmp, folder / INDEX)
    return folder


def write_latents(path: str | Path, tensors: Mapping[str, torch.Tensor | LatentColumn], info: dict | None = None,
                  frames_per_shard: int = 8) -> Path:
    """Write tensors that share their first axis (frames) as a finished store at ``path``, ``frames_per_shard``
    frames at a time (lazy columns stream from disk to disk), atomically: the folder appears whole or not at all,
    replacing what was there."""
    path = Path(path)
    counts = {t.shape[0] for t in tensors.values()}
    if len(counts) != 1:
        raise ValueError(f"latents to store must share their frame count, got {sorted(counts)}")
    n = counts.pop()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        for start in range(0, n, frames_per_shard):
            stop = min(start + frames_per_shard, n)
            write_shard(staging, start, stop, {k: v[start:stop] for k, v in tensors.items()})
        finish_store(staging, info)
        replace_folder(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def replace_folder(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing whatever ``dst`` was (a file, a folder)."""
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    os.replace(src, dst)


def load_latents(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a latents store (folder or single file), checked and read whole: for notebooks and tests."""
    store = LatentStore.open(path)
    store.verify()
    return {name: column.load() for name, column in store.columns.items()}
