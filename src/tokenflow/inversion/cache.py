"""The inversion cache: inverted latents on disk, keyed by a content hash, written resumably."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..correspondence import consecutive_runs
from ..events import CancelToken, ProgressCallback, Tracker, as_progress
from ..backbones import Backbone, TextConditioning
from .check import _log_psnr, _psnr_from_error, _reconstruction_error
from .ddim import _invert_batch, _inversion_bar
from .source import SourceLatents
from .storage import SafetensorsWriter, lazy_tensors, write_safetensors

logger = logging.getLogger("tokenflow.inversion")

__all__ = ["InversionCache"]


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


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (``filelock``: flock on POSIX, msvcrt on Windows)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process working on the same inversion (%s)", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


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
    def key(frames, model: Backbone, prompt: str, grid: list[int], save: list[int]) -> str:
        """``frames``: a uint8 ``[N,H,W,3]`` tensor or a :class:`~tokenflow.io.FrameStore` (whose hash
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
            tensors, meta = lazy_tensors(path, lambda k: k == "clean" or k.startswith("t"))
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
        model: Backbone,
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
                    tensors, _ = lazy_tensors(writer.path, lambda k: k == "clean" or k == f"t{current[2]}")
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
            tensors, _ = lazy_tensors(writer.path, lambda k: True)
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
