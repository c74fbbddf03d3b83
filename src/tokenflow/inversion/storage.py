"""Latents on disk: a safetensors file written in row ranges over several runs, and tensors read from one lazily,
a few frames at a time."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..correspondence import consecutive_runs

__all__ = ["LazyLatents", "SafetensorsWriter", "write_safetensors", "lazy_tensors"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}



def _unwrap(x):
    if isinstance(x, LazyLatents):
        return x.load()
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


class LazyLatents:
    """One ``[N, ...]`` tensor of a safetensors file, read on demand, frames first.

    Indexing the first axis (an int, a slice, a list, range or 1-D tensor of frame indices, or a tuple starting with
    one) opens the file with ``safetensors.safe_open`` (memory-mapped) and copies out only those frames, so
    ``latents[frames]`` costs ``len(frames)`` frames of host memory. Any other use loads the whole tensor first:
    torch functions and operators accept it (``__torch_function__``), so it stands in where a tensor is expected.
    Each read reopens the file, so nothing stays mapped between reads.
    """

    def __init__(self, path: str | Path, name: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.path = Path(path)
        self.name = name
        self.shape = torch.Size(shape)
        self.dtype = dtype

    device = torch.device("cpu")
    ndim = property(lambda self: len(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyLatents({str(self.path)!r}, {self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def _read(self, runs: list[tuple[int, int]]) -> torch.Tensor:
        from safetensors import safe_open

        if not runs:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                part = f.get_slice(self.name)
                if tuple(part.get_shape()) != tuple(self.shape):
                    raise RuntimeError(
                        f"{self.path}: tensor {self.name!r} changed on disk ({part.get_shape()} instead of "
                        f"{list(self.shape)}); rerun the inversion"
                    )
                parts = [part[a:z] for a, z in runs]
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.path}: the latents file was removed while in use; rerun (the inversion is recomputed)"
            ) from None
        # safetensors hands out views of its memory map: copy, so that no mapping outlives the read (a file
        # replaced or truncated later cannot fault a tensor already returned, and no file pages stay resident)
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts)

    def load(self) -> torch.Tensor:
        """The whole tensor."""
        return self._read([(0, self.shape[0])]) if self.shape[0] else self._read([])

    def __getitem__(self, index):
        rest = ()
        if isinstance(index, tuple):
            index, rest = (index[0], index[1:]) if index else (slice(None), ())
        n = self.shape[0]
        squeeze = False
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            index = index.nonzero().flatten()
        if isinstance(index, torch.Tensor) and index.ndim == 0:
            index = int(index)
        if isinstance(index, int):
            squeeze, positions = True, [index]
        elif isinstance(index, slice):
            start, stop, step = index.indices(n)
            positions = list(range(start, stop, step))
        elif isinstance(index, (list, range, torch.Tensor)) and all(
            isinstance(i, int) for i in (index.tolist() if isinstance(index, torch.Tensor) else index)
        ):
            positions = index.tolist() if isinstance(index, torch.Tensor) else list(index)
            if isinstance(index, torch.Tensor) and index.ndim != 1:
                return self.load()[(index, *rest)]
        else:
            return self.load()[(index, *rest)] if rest else self.load()[index]
        for i, p in enumerate(positions):
            if not -n <= p < n:
                raise IndexError(f"index {p} is out of bounds for {n} frames of {self.name!r}")
            positions[i] = p % n
        out = self._read(consecutive_runs(positions))
        if squeeze:
            out = out[0]
        return out[(slice(None),) * (0 if squeeze else 1) + rest] if rest else out

    # Everything else: the whole tensor.
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_unwrap(args), **_unwrap(kwargs or {}))

    def __array__(self, dtype=None, copy=None):
        array = self.load().numpy()
        return array if dtype is None else array.astype(dtype)

    def contiguous(self) -> torch.Tensor:
        return self.load()

    def clone(self) -> torch.Tensor:
        return self.load()

    def numpy(self):
        return self.load().numpy()

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.load().to(*args, **kwargs)

    def float(self) -> torch.Tensor:
        return self.load().float()

    def __neg__(self):
        return -self.load()


def _binary(name: str):
    def method(self, other):
        return getattr(self.load(), name)(_unwrap(other))

    method.__name__ = name
    return method


for _name in ("add", "sub", "mul", "truediv", "pow", "matmul"):
    for _form in (f"__{_name}__", f"__r{_name}__"):
        setattr(LazyLatents, _form, _binary(_form))


def lazy_tensors(path: str | Path, names: Callable[[str], bool]) -> tuple[dict[str, LazyLatents], dict[str, str]]:
    """Lazy views of the tensors of a safetensors file whose names pass ``names``, and the file's metadata."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for name in f.keys():
            if names(name):
                part = f.get_slice(name)
                dtype = part.get_dtype()
                if dtype not in _DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, not a float latent")
                out[name] = LazyLatents(path, name, tuple(part.get_shape()), _DTYPES[dtype])
    return out, metadata


class SafetensorsWriter:
    """A safetensors file laid out in advance and filled in by row ranges, in any order, over several runs.

    ``layout``: name -> (shape, dtype), written in that order. :meth:`create` writes the header (with ``reserve``
    spare bytes, so :meth:`set_metadata` can rewrite it in place later) and sizes the file for every tensor; the
    file is a valid safetensors file from then on (unwritten rows read as zeros). :meth:`matches` tells whether an
    existing file has this very layout, so an interrupted writer can reopen it and go on.
    """

    def __init__(
        self,
        path: str | Path,
        layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
        reserve: int = 1024,
    ):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this machine is not")
        self.path = Path(path)
        self.layout = {k: (tuple(int(d) for d in shape), dtype) for k, (shape, dtype) in layout.items()}
        self.entries: dict[str, dict] = {}
        offset = 0
        for name, (shape, dtype) in self.layout.items():
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            self.entries[name] = dict(
                dtype=_DTYPE_NAMES[dtype], shape=list(shape), data_offsets=[offset, offset + size]
            )
            offset += size
        self.data_size = offset
        header = self._header(metadata or {})
        self.header_size = -(-(len(header) + reserve) // 8) * 8
        self.metadata = dict(metadata or {})
        self._file = None

    def _header(self, metadata: Mapping[str, str]) -> bytes:
        content = {"__metadata__": dict(metadata)} if metadata else {}
        content.update(self.entries)
        return json.dumps(content, separators=(",", ":")).encode()

    def _header_block(self, metadata: Mapping[str, str]) -> bytes:
        header = self._header(metadata)
        if len(header) > self.header_size:
            raise ValueError(f"{self.path}: a {len(header)}-byte header does not fit the {self.header_size} reserved")
        return self.header_size.to_bytes(8, "little") + header + b" " * (self.header_size - len(header))

    @property
    def total_size(self) -> int:
        return 8 + self.header_size + self.data_size

    def create(self) -> "SafetensorsWriter":
        """Create (or overwrite) the file with its header, sized for all tensors, and open it for writing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(self._header_block(self.metadata))
            f.truncate(self.total_size)
        return self.open()

    def matches(self) -> bool:
        """Whether the file exists with exactly this layout (names, shapes, dtypes, offsets, size); if so, its header
        room (set by whoever created it) is adopted."""
        try:
            with open(self.path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if size > self.header_size + (1 << 20):  # not a header this layout could have (garbage, other file)
                    return False
                header = json.loads(f.read(size))
            if not isinstance(header, dict) or os.path.getsize(self.path) != 8 + size + self.data_size:
                return False
        except (OSError, ValueError):
            return False
        header.pop("__metadata__", None)
        if header != self.entries:
            return False
        self.header_size = size
        return True

    def open(self) -> "SafetensorsWriter":
        if self._file is None:
            self._file = open(self.path, "r+b")
        return self

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (``[r, *shape[1:]]``, or the whole tensor for a 0-d one) at row ``start`` of ``name``."""
        shape, dtype = self.layout[name]
        rows = rows.detach().to("cpu", dtype).contiguous()
        if tuple(rows.shape[1:]) != tuple(shape[1:]) and not (not shape and rows.numel() == 1):
            raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit {name!r} of shape {shape}")
        row_bytes = torch.Size(shape[1:]).numel() * rows.element_size() if shape else rows.element_size()
        begin, end = self.entries[name]["data_offsets"]
        offset = begin + start * row_bytes
        data = rows.reshape(-1).view(torch.uint8).numpy()
        if offset + data.nbytes > end:
            raise ValueError(f"rows {start}..{start + len(rows)} are outside {name!r} of shape {shape}")
        self._file.seek(8 + self.header_size + offset)
        self._file.write(memoryview(data))

    def set_metadata(self, metadata: Mapping[str, str]) -> None:
        """Rewrite the header in place with new metadata (must fit the reserved room)."""
        block = self._header_block(metadata)
        self.metadata = dict(metadata)
        self._file.seek(0)
        self._file.write(block)

    def sync(self) -> None:
        """Flush to disk: what was written survives a crash from here on."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "SafetensorsWriter":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor | LazyLatents],
    metadata: Mapping[str, str] | None = None,
    chunk_bytes: int = 64 << 20,
) -> Path:
    """Write tensors (or :class:`LazyLatents`) to a safetensors file, ``chunk_bytes`` at a time, atomically.

    Unlike ``safetensors.torch.save_file`` it never holds more than one chunk: lazy inputs stream from disk to disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with SafetensorsWriter(tmp, layout, metadata, reserve=0).create() as writer:
            for name, tensor in tensors.items():
                if tensor.ndim == 0:
                    writer.write(name, 0, tensor[()] if isinstance(tensor, LazyLatents) else tensor)
                    continue
                row = max(1, torch.Size(tensor.shape[1:]).numel() * torch.empty((), dtype=tensor.dtype).element_size())
                step = max(1, chunk_bytes // row)
                for start in range(0, tensor.shape[0], step):
                    writer.write(name, start, tensor[start : start + step])
            writer.sync()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
