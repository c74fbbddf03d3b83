"""Deterministic DDIM inversion of every frame (the "preprocess") and its on-disk cache.

The source latents x_t^src it produces depend only on (frames, size, model, inversion prompt, steps, dtype), so
they are cached under a hash of those: a second edit of the same video with a new prompt costs no inversion.

Long videos: through a cache, the inversion streams. Each batch of frames is encoded, inverted and written into a
preallocated safetensors file (``<key>.partial``) at its place in every saved timestep's tensor, and recorded as
done in ``<key>.progress.json``; host memory holds one batch, not frames x timesteps. An interrupted inversion
resumes from its last finished batch. The finished entry is opened lazily (:class:`LazyLatents`): the editor's
``source.noisy[t][frames]`` reads just those frames from disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .correspondence import consecutive_runs
from .events import CancelToken, ProgressCallback, Tracker, as_progress
from .models import StableDiffusionModel, TextConditioning

logger = logging.getLogger(__name__)

__all__ = [
    "SourceLatents",
    "LazyLatents",
    "InversionCache",
    "SafetensorsWriter",
    "write_safetensors",
    "inversion_grid",
    "ddim_invert",
    "ddim_reconstruct",
    "invert_frames",
]

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


def _lazy_tensors(path: str | Path, names: Callable[[str], bool]) -> tuple[dict[str, LazyLatents], dict[str, str]]:
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


@dataclass
class SourceLatents:
    """Clean latents of the frames and their DDIM-inverted latents at each saved timestep (CPU, float32).

    ``noisy`` maps a timestep to its ``[N, C, h, w]`` latents: tensors in memory, or :class:`LazyLatents` read
    from disk on demand (:meth:`InversionCache.load`, ``from_file(..., lazy=True)``). Either way
    ``noisy[t][frames]`` gives those frames' latents as a tensor.
    """

    clean: torch.Tensor  # [N, C, h, w]
    noisy: Mapping[int, torch.Tensor | LazyLatents]  # t -> [N, C, h, w]
    reconstruction_psnr: float | None = None
    info: dict = field(default_factory=dict)

    @property
    def noisiest(self) -> int:
        return max(self.noisy)

    @property
    def lazy(self) -> bool:
        """Whether the noisy latents are read from disk on demand."""
        return any(isinstance(v, LazyLatents) for v in self.noisy.values())

    @classmethod
    def from_file(cls, path: str | Path, lazy: bool = False) -> "SourceLatents":
        """Load ``clean`` and ``source_t<T>`` tensors from a ``latents.safetensors`` written by ``--save-latents``.

        ``lazy``: keep the noisy latents on disk and read them frame by frame on demand (long videos).
        """
        from safetensors.torch import load_file

        try:
            if lazy:
                tensors, _ = _lazy_tensors(path, lambda k: k.startswith("source_t") or k == "clean")
                if "clean" in tensors:
                    tensors["clean"] = tensors["clean"].load()
            else:
                tensors = load_file(str(path))
            noisy = {int(k[len("source_t") :]): v for k, v in tensors.items() if k.startswith("source_t")}
        except ValueError as exc:
            raise ValueError(f"{path}: not a latents file ({exc})") from exc
        if "clean" not in tensors or not noisy:
            raise ValueError(f"{path}: expected 'clean' and 'source_t<T>' tensors (tokenflow edit --save-latents)")
        return cls(clean=tensors["clean"], noisy=noisy)

    def __post_init__(self):
        shapes = {tuple(v.shape) for v in self.noisy.values()} | {tuple(self.clean.shape)}
        if len(shapes) != 1:
            raise ValueError(f"source latents must all have one shape, got {sorted(shapes)}")


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


def _timesteps(model: StableDiffusionModel, steps: int) -> list[int]:
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def inversion_grid(model: StableDiffusionModel, steps: int, inversion_steps: int) -> tuple[list[int], list[int]]:
    """(ascending timesteps the inversion visits, timesteps whose latents are saved).

    The grid is the inversion schedule joined with the editing schedule, so any ``steps``/``inversion_steps`` pair
    works (the reference crashes late when they do not nest); when they nest it equals the reference's grid.
    Saved: every editing timestep and the noisiest one.
    """
    edit = set(_timesteps(model, steps))
    grid = sorted(set(_timesteps(model, inversion_steps)) | edit)
    return grid, sorted(edit | {grid[-1]})


def _epsilon(model: StableDiffusionModel, output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The model output as predicted noise (v-prediction models predict ``sqrt(a) eps - sqrt(1-a) x0``)."""
    if model.prediction_type == "epsilon":
        return output
    if model.prediction_type == "v_prediction":
        return alpha**0.5 * output + (1 - alpha) ** 0.5 * x
    raise ValueError(f"prediction type {model.prediction_type!r} is not supported; use an epsilon or v model")


@torch.no_grad()
def _invert_batch(
    model: StableDiffusionModel,
    latents: torch.Tensor,
    cond: TextConditioning,
    grid: list[int],
    save: list[int],
    on_saved: Callable[[int, torch.Tensor], None],
    on_step: Callable[[int], None] | None = None,
    resume: tuple[int, torch.Tensor] | None = None,
) -> None:
    """DDIM-invert one batch of latents along ``grid``; ``on_saved(t, x)`` receives each saved timestep's latents
    (CPU, float32) as soon as they exist. ``resume=(t, x_t)``: continue from the latents at grid timestep ``t``
    (a deterministic chain: the same numbers as an uninterrupted run)."""
    scheduler = model.make_scheduler()
    alphas = scheduler.alphas_cumprod
    saved = set(save)
    first = 0 if resume is None else grid.index(resume[0]) + 1
    x = (latents if resume is None else resume[1]).to(model.device, torch.float32)
    text = cond.rows([0] * x.shape[0])
    for i in range(first, len(grid)):
        t = grid[i]
        a_t = alphas[t].to(model.device)
        a_prev = (alphas[grid[i - 1]] if i > 0 else scheduler.final_alpha_cumprod).to(model.device)
        out = model.predict(x, t, text)
        eps = _epsilon(model, out, x, a_t)
        pred_x0 = (x - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
        x = a_t**0.5 * pred_x0 + (1 - a_t) ** 0.5 * eps
        if t in saved:
            on_saved(t, x.cpu())
        if on_step is not None:
            on_step(x.shape[0])


def _inversion_bar(frames: int, steps: int, initial: int, progress, cancel=None) -> Tracker:
    """Progress counted per frame and inversion step, reported in frames (frames/s, ETA); cancellable per step."""
    return Tracker("inversion", frames * steps, as_progress(progress), cancel, initial=initial, divisor=steps)


@torch.no_grad()
def ddim_invert(
    model: StableDiffusionModel,
    latents: torch.Tensor,
    cond: TextConditioning,
    grid: list[int],
    save: list[int],
    batch_size: int = 8,
    progress: bool | ProgressCallback | None = True,
    cancel: CancelToken | None = None,
) -> dict[int, torch.Tensor]:
    """DDIM inversion (Song et al., 2021, eq. 13 run backwards), each frame independently, guidance 1.

    For t ascending: ``x0 = (x - sqrt(1-a_prev) eps) / sqrt(a_prev)``, ``x = sqrt(a_t) x0 + sqrt(1-a_t) eps``
    with ``eps = unet(x, t, cond)`` and ``a_prev`` the previous grid point's (``final_alpha_cumprod`` first).
    Frames are streamed through the device a batch at a time; results come back to the CPU in float32, all in
    memory (:func:`invert_frames` with a cache streams them to disk instead).
    """
    saved: dict[int, list[torch.Tensor]] = {t: [] for t in save}
    bar = _inversion_bar(latents.shape[0], len(grid), 0, progress, cancel)
    for start in range(0, latents.shape[0], batch_size):
        batch = latents[start : start + batch_size]
        _invert_batch(model, batch, cond, grid, save, lambda t, x: saved[t].append(x), bar.update)
    return {t: torch.cat(v) for t, v in saved.items()}


@torch.no_grad()
def _reconstruct_batch(
    model: StableDiffusionModel, top: torch.Tensor, cond: TextConditioning, path: list[int]
) -> torch.Tensor:
    """DDIM sampling of one batch from its noisiest latents ``top`` down ``path`` (descending) to t=0."""
    scheduler = model.make_scheduler()
    alphas = scheduler.alphas_cumprod
    x = top.to(model.device, torch.float32)
    text = cond.rows([0] * x.shape[0])
    for i, t in enumerate(path):
        a_t = alphas[t].to(model.device)
        a_next = (alphas[path[i + 1]] if i + 1 < len(path) else scheduler.final_alpha_cumprod).to(model.device)
        pred = model.predict(x, t, text)
        eps = _epsilon(model, pred, x, a_t)
        pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_next**0.5 * pred_x0 + (1 - a_next) ** 0.5 * eps
    return x.cpu()


@torch.no_grad()
def ddim_reconstruct(
    model: StableDiffusionModel,
    noisy: Mapping[int, torch.Tensor | LazyLatents],
    cond: TextConditioning,
    batch_size: int = 8,
) -> torch.Tensor:
    """Deterministic DDIM sampling from the noisiest saved latent down the saved timesteps to t=0, guidance 1."""
    path = sorted(noisy, reverse=True)
    top = noisy[path[0]]
    out = [
        _reconstruct_batch(model, top[start : start + batch_size], cond, path)
        for start in range(0, top.shape[0], batch_size)
    ]
    return torch.cat(out)


def _squared_error(a: torch.Tensor, b: torch.Tensor) -> int:
    """Sum of squared differences of two uint8 stacks, exact (int64)."""
    return int((a.to(torch.int64) - b.to(torch.int64)).pow(2).sum())


@torch.no_grad()
def _reconstruction_error(
    model: StableDiffusionModel,
    source: SourceLatents,
    cond: TextConditioning,
    start: int,
    stop: int,
) -> tuple[int, int]:
    """(squared error, values) of frames ``start:stop`` decoded after reconstruction vs the VAE round trip."""
    path = sorted(source.noisy, reverse=True)
    recon = _reconstruct_batch(model, source.noisy[path[0]][start:stop], cond, path)
    decoded = model.decode_latents(recon)
    reference = model.decode_latents(source.clean[start:stop])
    return _squared_error(decoded, reference), reference.numel()


def _psnr_from_error(squared_error: int, count: int) -> float:
    if squared_error == 0:
        return float("inf")
    return 10 * math.log10(255.0**2 * count / squared_error)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 frame stacks (the mean squared error over all frames)."""
    return _psnr_from_error(_squared_error(a, b), a.numel())


def reconstruction_psnr(
    model: StableDiffusionModel,
    source: SourceLatents,
    cond: TextConditioning,
    batch_size: int = 8,
    progress: bool | ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> float:
    """PSNR of the frames sampled back from the noisiest latents against the VAE round trip, a batch at a time."""
    n = source.clean.shape[0]
    bar = Tracker("reconstruction", n, as_progress(progress), cancel)
    error = count = 0
    for start in range(0, n, batch_size):
        e, c = _reconstruction_error(model, source, cond, start, min(start + batch_size, n))
        error, count = error + e, count + c
        bar.update(min(batch_size, n - start))
    return _psnr_from_error(error, count)


def _uncovered(start: int, stop: int, done: list[list[int]]) -> list[tuple[int, int]]:
    """The parts of ``[start, stop)`` not covered by the ``[a, z)`` ranges in ``done``."""
    covered = [False] * (stop - start)
    for entry in done:
        a, z = entry[0], entry[1]
        for i in range(max(a, start), min(z, stop)):
            covered[i - start] = True
    return consecutive_runs([start + i for i, c in enumerate(covered) if not c])


def _todo(n: int, batch_size: int, done: list[list[int]]) -> list[tuple[int, int]]:
    """The frame runs still to do: each batch of an uninterrupted run, less what ``done`` covers."""
    return [run for s in range(0, n, batch_size) for run in _uncovered(s, min(s + batch_size, n), done)]


def _log_psnr(value: float) -> None:
    logger.info("inversion reconstruction PSNR %.2f dB (against the VAE round trip)", value)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``); a no-op where it is not available."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process protection, the atomic rename still keeps entries whole
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process working on the same inversion (%s)", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class InversionCache:
    """Inverted latents on disk as safetensors, keyed by a content hash.

    Finished entries (``<key>.safetensors``) appear atomically (rename) and load lazily. An inversion in progress
    lives in ``<key>.partial`` + ``<key>.progress.json`` and resumes from its last checkpoint: the end of a batch
    of frames, or, inside a batch, the last saved timestep once ``checkpoint_seconds`` have passed since the
    previous checkpoint (so an interruption loses at most that much work). A lock file (``<key>.lock``) keeps two
    processes from working on the same key at once.
    """

    checkpoint_seconds: float = 30.0

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from platformdirs import user_cache_dir

            root = Path(user_cache_dir("tokenflow")) / "inversions"
        self.root = Path(root)

    @staticmethod
    def key(frames, model: StableDiffusionModel, prompt: str, grid: list[int], save: list[int]) -> str:
        """``frames``: a uint8 ``[N,H,W,3]`` tensor or a :class:`~tokenflow.framestore.FrameStore` (whose hash
        of the same bytes was taken as it was written: the same key either way)."""
        if hasattr(frames, "sha256"):
            digest = frames.sha256()
        else:
            digest = hashlib.sha256()
            digest.update(memoryview(torch.as_tensor(frames).contiguous().numpy()).cast("B"))  # no copy
        digest.update(str(tuple(frames.shape)).encode())
        digest.update(
            json.dumps(
                dict(
                    model=model.model_id,
                    fingerprint=_model_fingerprint(model.model_id),
                    revision=model.revision,
                    loras=[(str(p), s, _model_fingerprint(str(p))) for p, s in model.loras],
                    dtype=str(model.dtype),
                    scheduler={k: v for k, v in model.scheduler_config.items() if not k.startswith("_")},
                    prompt=prompt,
                    grid=grid,
                    save=save,
                    version=1,
                ),
                sort_keys=True,
                default=str,
            ).encode()
        )
        return digest.hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def partial_path(self, key: str) -> Path:
        return self.root / f"{key}.partial"

    def progress_path(self, key: str) -> Path:
        return self.root / f"{key}.progress.json"

    def load(self, key: str) -> SourceLatents | None:
        """The finished entry, its noisy latents as :class:`LazyLatents` (read on demand); None when absent or
        unreadable."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            tensors, meta = _lazy_tensors(path, lambda k: k == "clean" or k.startswith("t"))
            clean = tensors.pop("clean").load()
            noisy = {int(k[1:]): v for k, v in tensors.items()}
            info = json.loads(meta.get("info", "{}"))
            source = SourceLatents(clean=clean, noisy=noisy, reconstruction_psnr=info.get("reconstruction_psnr"),
                                   info=info)
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is recomputed, never fatal
            logger.warning("ignoring unreadable inversion cache entry %s (%s)", path, exc)
            return None
        if not noisy:
            logger.warning("ignoring inversion cache entry %s without inverted latents", path)
            return None
        return source

    def store(self, key: str, source: SourceLatents) -> Path:
        """Write ``source`` (in memory or lazy) as the entry for ``key``, streaming, atomically."""
        tensors = {"clean": source.clean}
        tensors.update({f"t{t}": v for t, v in sorted(source.noisy.items())})
        info = dict(source.info, reconstruction_psnr=source.reconstruction_psnr)
        return write_safetensors(self.path(key), tensors, metadata={"info": json.dumps(info, default=str)})

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the key's lock (other processes inverting the same frames wait); the lock file goes on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / f"{key}.lock"
        with _file_lock(lock):
            yield
            if self.path(key).exists():
                lock.unlink(missing_ok=True)

    def invert(
        self,
        key: str,
        model: StableDiffusionModel,
        frames: torch.Tensor,
        cond: TextConditioning,
        grid: list[int],
        save: list[int],
        *,
        batch_size: int = 8,
        reconstruct: bool = True,
        info: dict | None = None,
        progress: bool | ProgressCallback | None = True,
        cancel: CancelToken | None = None,
    ) -> SourceLatents:
        """Encode, invert and (optionally) reconstruct ``frames`` into the entry for ``key``, resumably.

        A batch's clean latents and its latents at every saved timestep go straight to ``<key>.partial``; when the
        batch is done the file is synced and the batch recorded in ``<key>.progress.json``, so a rerun after an
        interruption (any exception, a kill, a crash) skips it; inside a batch, a saved timestep is recorded the
        same way every ``checkpoint_seconds``, and a rerun continues the batch's inversion from there. Batches are
        those of an uninterrupted run and DDIM inversion is a deterministic chain, so the result is the same, bit
        for bit. Returns :meth:`load` of the finished entry.
        """
        n = frames.shape[0]
        partial, progress_file = self.partial_path(key), self.progress_path(key)
        state = self._read_progress(progress_file)
        writer, latent_shape = self._writer(key, model, frames, save, info or {}, state)
        if state is None or not writer.matches():
            if partial.exists() or progress_file.exists():
                logger.info("inversion: restarting %s (its partial file does not match)", partial)
            state = {"latent_shape": latent_shape, "inverted": [], "reconstructed": []}
            writer.create()
            self._write_progress(progress_file, state)
        else:
            done = sum(z - a for a, z in state["inverted"])
            logger.info("inversion: resuming %s, %d of %d frames already inverted", partial, done, n)
        try:
            writer.open()
            todo = _todo(n, batch_size, state["inverted"])
            done_frames = n - sum(z - a for a, z in todo)
            initial = done_frames * len(grid)
            if state.get("current") is not None:
                a, z, t = state["current"]
                initial += (z - a) * (grid.index(t) + 1)
            progress = as_progress(progress)
            bar = _inversion_bar(n, len(grid), initial, progress, cancel)
            for a, z in todo:
                resume = None
                current = state.get("current")
                if current is not None and current[:2] == [a, z]:
                    # interrupted inside this batch: continue from its last checkpointed timestep
                    writer.sync()
                    tensors, _ = _lazy_tensors(writer.path, lambda k: k == "clean" or k == f"t{current[2]}")
                    clean = tensors["clean"][a:z]
                    resume = (current[2], tensors[f"t{current[2]}"][a:z])
                    logger.info("inversion: resuming frames %d-%d from timestep %d", a, z - 1, current[2])
                else:
                    clean = model.encode_frames(frames[a:z], batch_size)
                    writer.write("clean", a, clean)
                last = [time.monotonic()]

                def on_saved(t: int, x: torch.Tensor, a=a, z=z, last=last) -> None:
                    writer.write(f"t{t}", a, x)
                    if time.monotonic() - last[0] >= self.checkpoint_seconds:
                        writer.sync()
                        state["current"] = [a, z, t]
                        self._write_progress(progress_file, state)
                        last[0] = time.monotonic()

                _invert_batch(model, clean, cond, grid, save, on_saved, bar.update, resume=resume)
                writer.sync()
                state["inverted"].append([a, z])
                state.pop("current", None)
                self._write_progress(progress_file, state)
            psnr_value = None
            if reconstruct:
                psnr_value = self._reconstruct(writer, model, cond, batch_size, state, progress_file, progress,
                                               cancel)
            writer.set_metadata({"info": json.dumps(dict(info or {}, reconstruction_psnr=psnr_value), default=str)})
            writer.sync()
        finally:
            writer.close()
        os.replace(partial, self.path(key))
        progress_file.unlink(missing_ok=True)
        source = self.load(key)
        if source is None:
            raise RuntimeError(f"{self.path(key)}: the inversion just written cannot be read back")
        return source

    def _writer(self, key, model, frames, save, info, state) -> tuple[SafetensorsWriter, list[int]]:
        """The partial file's writer; its latent shape comes from the progress file, else from encoding a frame."""
        shape = state.get("latent_shape") if state is not None else None
        if shape is None:
            shape = list(model.encode_frames(frames[:1]).shape[1:])
        layout = {"clean": ((frames.shape[0], *shape), torch.float32)}
        layout.update({f"t{t}": ((frames.shape[0], *shape), torch.float32) for t in save})
        metadata = {"info": json.dumps(dict(info, reconstruction_psnr=None), default=str)}
        return SafetensorsWriter(self.partial_path(key), layout, metadata, reserve=1024), shape

    def _reconstruct(self, writer, model, cond, batch_size, state, progress_file, progress, cancel) -> float:
        n = writer.layout["clean"][0][0]
        source = None
        todo = _todo(n, batch_size, state["reconstructed"])
        if todo:
            writer.sync()
            tensors, _ = _lazy_tensors(writer.path, lambda k: True)
            noisy = {int(k[1:]): v for k, v in tensors.items() if k.startswith("t")}
            source = SourceLatents(clean=tensors["clean"], noisy=noisy)  # lazy: one batch at a time
        bar = Tracker("reconstruction", n, progress, cancel, initial=n - sum(z - a for a, z in todo))
        for a, z in todo:
            error, count = _reconstruction_error(model, source, cond, a, z)
            state["reconstructed"].append([a, z, error, count])
            self._write_progress(progress_file, state)
            bar.update(z - a)
        error = sum(entry[2] for entry in state["reconstructed"])
        count = sum(entry[3] for entry in state["reconstructed"])
        value = _psnr_from_error(error, count)
        _log_psnr(value)
        return value

    @staticmethod
    def _read_progress(path: Path) -> dict | None:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or not {"inverted", "reconstructed"} <= set(state):
            return None
        return state

    @staticmethod
    def _write_progress(path: Path, state: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


def _model_fingerprint(model_id: str) -> str:
    """Sizes and modification times of a local model's files, so an overwritten local model misses the cache."""
    path = Path(model_id)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return ";".join(f"{p.relative_to(path.parent)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def invert_frames(
    model: StableDiffusionModel,
    frames: torch.Tensor,
    *,
    prompt: str = "",
    steps: int = 50,
    inversion_steps: int = 500,
    batch_size: int = 8,
    cache: InversionCache | None = None,
    reconstruct: bool = True,
    progress: bool | ProgressCallback | None = True,
    on_cache_hit: Callable[[Path], None] | None = None,
    cancel: CancelToken | None = None,
) -> SourceLatents:
    """Encode uint8 frames ``[N,H,W,3]`` and DDIM-invert them, through ``cache`` when given.

    With a cache the inversion streams to disk, resumes after an interruption and comes back lazy (host memory
    does not grow with frames x timesteps); without one, everything stays in memory. With ``reconstruct`` the
    latents are sampled back and decoded, and the PSNR against the VAE round trip is kept (a bad reconstruction
    predicts a bad edit).

    ``progress``: ``True`` for progress bars, or a callable receiving :class:`~tokenflow.events.ProgressEvent` objects
    (stages ``inversion`` and ``reconstruction``); ``cancel``: checked after every UNet call, raises
    :class:`~tokenflow.events.Cancelled` (a cached inversion resumes from its last checkpoint next time).
    """
    progress = as_progress(progress)
    grid, save = inversion_grid(model, steps, inversion_steps)
    cond = model.condition([prompt], height=frames.shape[1], width=frames.shape[2])
    info = dict(prompt=prompt, steps=steps, inversion_steps=inversion_steps, grid=grid, model=model.model_id)
    if cache is None:
        clean = model.encode_frames(frames, batch_size)
        noisy = ddim_invert(model, clean, cond, grid, save, batch_size, progress, cancel)
        source = SourceLatents(clean=clean, noisy=noisy, info=info)
        if reconstruct:
            source.reconstruction_psnr = reconstruction_psnr(model, source, cond, batch_size, progress, cancel)
            _log_psnr(source.reconstruction_psnr)
        return source

    key = InversionCache.key(frames, model, prompt, grid, save)

    def usable(hit: SourceLatents | None) -> bool:
        return hit is not None and (hit.reconstruction_psnr is not None or not reconstruct)

    hit = cache.load(key)
    if not usable(hit):
        with cache.lock(key):
            hit = cache.load(key)  # another process may have finished it meanwhile
            if hit is None:
                hit = cache.invert(key, model, frames, cond, grid, save, batch_size=batch_size,
                                   reconstruct=reconstruct, info=info, progress=progress, cancel=cancel)
                return hit
            if not usable(hit):  # inverted earlier without the reconstruction check: add it
                hit.reconstruction_psnr = reconstruction_psnr(model, hit, cond, batch_size, progress, cancel)
                _log_psnr(hit.reconstruction_psnr)
                cache.store(key, hit)
                return cache.load(key)
    logger.info("inversion cache hit: %s", cache.path(key))
    if on_cache_hit is not None:
        on_cache_hit(cache.path(key))
    return hit
