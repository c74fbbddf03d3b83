"""The inversion cache: inverted latents on disk, keyed by a content hash, written resumably."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..correspondence import consecutive_runs
from ..errors import InputError
from ..io.space import check_free_space
from ..events import CancelToken, Cancelled, ProgressCallback, Tracker, as_progress
from ..backbones import Backbone, TextConditioning
from .check import _log_psnr, _psnr_from_error, _reconstruction_error, check_sample
from .ddim import _invert_batch, _inversion_bar
from .source import SourceLatents
from .storage import (INDEX, CorruptLatents, LatentStore, Shard, finish_store, parse_shard_name, replace_folder,
                      shard_name, timestep_name, write_latents, write_shard)

logger = logging.getLogger("tokenflow.inversion")

__all__ = ["InversionCache"]

#: The entry's index, info and reconstruction record, with room to spare.
_MARGIN_BYTES = 2**20


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
    """Inverted latents on disk, keyed by a content hash: one latents store (:mod:`.storage`) per entry.

    A finished entry is the folder ``<key>/`` (an index and safetensors shards, checksummed); it appears at once
    (a rename) and loads lazily. An inversion in progress lives in ``<key>.partial/``: each finished batch of frames
    is one shard there, so a rerun after an interruption skips it; inside a batch, the latents so far are saved as
    a checkpoint shard once ``checkpoint_seconds`` have passed since the previous one (an interruption loses at most
    that much work). A lock file (``<key>.lock``) keeps two processes from working on the same key at once.

    Entries of tokenflow < 0.3 (one ``<key>.safetensors`` file) are read as they are; their unfinished inversions
    (``<key>.partial`` files) are discarded with one log line.
    """

    checkpoint_seconds: float = 30.0

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from platformdirs import user_cache_dir

            root = Path(user_cache_dir("tokenflow")) / "inversions"
        self.root = Path(root)

    @staticmethod
    def key(frames, model: Backbone, prompt: str, grid: list[int], save: list[int], refinements: int = 0,
            stored: list[int] | None = None) -> str:
        """``frames``: a uint8 ``[N,H,W,3]`` tensor or a :class:`~tokenflow.io.FrameStore` (whose hash
        of the same bytes was taken as it was written: the same key either way). ``refinements``: the fixed-point
        scheme's iterations (plain DDIM, 0, keeps the keys of earlier releases); ``stored``: the timesteps a strided
        entry keeps (None: all saved ones, the keys of earlier releases)."""
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
                    **({"refinements": refinements} if refinements else {}),
                    **({"stored": list(stored)} if stored is not None else {}),
                ),
                sort_keys=True,
                default=str,
            ).encode()
        )
        return digest.hexdigest()[:32]

    def path(self, key: str) -> Path:
        """The finished entry's folder."""
        return self.root / key

    def partial_path(self, key: str) -> Path:
        """The folder of an inversion in progress."""
        return self.root / f"{key}.partial"

    def _legacy_path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def location(self, key: str) -> Path:
        """Where the finished entry for ``key`` is: its folder, or the single file an older release wrote."""
        legacy = self._legacy_path(key)
        return legacy if legacy.exists() and not self.path(key).is_dir() else self.path(key)

    def entries(self) -> list[Path]:
        """The finished entries (folders, and single files of older releases), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if (p.is_dir() and (p / INDEX).exists()) or (p.is_file() and p.suffix == ".safetensors"))

    def load(self, key: str) -> SourceLatents | None:
        """The finished entry, its noisy latents read on demand; None when absent. A damaged entry (checksums,
        sizes, tensors) is reported once, removed and None returned, so it is recomputed."""
        path = self.location(key)
        if not path.exists():
            return None
        try:
            store = LatentStore.open(path)
            store.verify()
            noisy = store.timesteps()
            if "clean" not in store.columns or not noisy:
                raise CorruptLatents("no inverted latents in it")
            info = store.info
            return SourceLatents(clean=store.columns["clean"].load(), noisy=noisy,
                                 reconstruction_psnr=info.get("reconstruction_psnr"), info=info)
        except (CorruptLatents, OSError) as exc:  # a damaged cache entry is recomputed, never fatal
            logger.warning("inversion cache entry %s is damaged and is recomputed (%s)", path, exc)
            _remove(path)
            return None

    def store(self, key: str, source: SourceLatents) -> Path:
        """Write ``source`` (in memory or lazy) as the entry for ``key``, streaming, atomically."""
        tensors = {"clean": source.clean}
        noisy = getattr(source.noisy, "stored", source.noisy)  # a strided entry stays strided
        tensors.update({timestep_name(t): v for t, v in sorted(noisy.items())})
        info = dict(source.info, reconstruction_psnr=source.reconstruction_psnr)
        path = write_latents(self.path(key), tensors, info)
        self._legacy_path(key).unlink(missing_ok=True)
        return path

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
        refinements: int = 0,
        check_frames: int | None = None,
        stored: list[int] | None = None,
    ) -> SourceLatents:
        """Encode, invert and (optionally) reconstruct ``frames`` into the entry for ``key``, resumably.

        Each batch's clean latents and its latents at every saved timestep become one shard of
        ``<key>.partial/`` when the batch is done, so a rerun after an interruption (any exception, a kill, a crash)
        skips it; inside a batch, the latents so far are saved as the batch's checkpoint every
        ``checkpoint_seconds``, and a rerun continues the batch's inversion from there. Batches are those of an
        uninterrupted run and DDIM inversion is a deterministic chain, so the result is the same, bit for bit.
        ``stored``: the saved timesteps the entry keeps (default: all of ``save``; a strided entry,
        :mod:`.strided`). Returns :meth:`load` of the finished entry.
        """
        n = frames.shape[0]
        stored = list(save) if stored is None else sorted(stored)
        partial = self._open_partial(key, model, frames, save, stored)
        done = [list(span) for span in partial.done]
        if done:
            logger.info("inversion: resuming %s, %d of %d frames already inverted", partial.folder,
                        sum(z - a for a, z in done), n)
        todo = _todo(n, batch_size, done)
        partial.check_space(sum(z - a for a, z in todo), max((z - a for a, z in todo), default=0), self.root)
        initial = (n - sum(z - a for a, z in todo)) * len(grid)
        checkpoint = partial.checkpoint
        if checkpoint is not None and checkpoint[:2] in [list(span) for span in todo]:
            initial += (checkpoint[1] - checkpoint[0]) * (grid.index(checkpoint[2]) + 1)
        progress = as_progress(progress)
        bar = _inversion_bar(n, len(grid), initial, progress, cancel)
        for a, z in todo:
            kept: dict[str, torch.Tensor] = {}
            resume = None
            last = [time.monotonic(), None]  # when the last checkpoint was written; the last timestep saved
            if checkpoint is not None and checkpoint[:2] == [a, z]:
                # interrupted inside this batch: continue from its last checkpointed timestep
                kept = partial.read_checkpoint()
                t = checkpoint[2]
                resume = (t, kept[timestep_name(t)])
                last[1] = t
                logger.info("inversion: resuming frames %d-%d from timestep %d", a, z - 1, t)
            else:
                kept["clean"] = model.encode_frames(frames[a:z], batch_size)

            def on_saved(t: int, x: torch.Tensor, a=a, z=z, kept=kept, last=last) -> None:
                if last[1] is not None and last[1] not in stored:  # kept only to resume from
                    del kept[timestep_name(last[1])]
                kept[timestep_name(t)] = x
                last[1] = t
                if time.monotonic() - last[0] >= self.checkpoint_seconds and t != save[-1]:
                    partial.write_checkpoint(a, z, t, kept)
                    last[0] = time.monotonic()

            try:
                _invert_batch(model, kept["clean"], cond, grid, save, on_saved, bar.update, resume=resume,
                              refinements=refinements)
            except BaseException as exc:
                # Ctrl-C, SIGTERM (the CLI raises a BaseException), a cancel: keep the timesteps finished so far
                # for the next run; after a failure of the computation itself they are not to be trusted
                t = last[1]
                if (isinstance(exc, Cancelled) or not isinstance(exc, Exception)) and t is not None \
                        and t != save[-1] and partial.checkpoint != [a, z, t]:
                    partial.write_checkpoint(a, z, t, kept)
                raise
            if last[1] is not None and last[1] not in stored:
                del kept[timestep_name(last[1])]
            partial.write_batch(a, z, kept)
        psnr_value = None
        sample = check_sample(n, check_frames) if reconstruct else []
        if sample:
            psnr_value = self._reconstruct(partial, model, cond, batch_size, progress, cancel, sample, save)
        info = dict(info or {}, reconstruction_psnr=psnr_value, check_frames=len(sample),
                    batches=sorted(partial.done))
        path = partial.finish(self.path(key), info)
        self._legacy_path(key).unlink(missing_ok=True)
        source = self.load(key)
        if source is None:
            raise RuntimeError(f"{path}: the inversion just written cannot be read back")
        return source

    def _open_partial(self, key, model, frames, save, stored) -> "_PartialEntry":
        folder = self.partial_path(key)
        if folder.is_file():  # an unfinished inversion of tokenflow < 0.3: another layout
            logger.info("inversion: discarding %s, an unfinished inversion of an older tokenflow", folder)
            folder.unlink()
            (self.root / f"{key}.progress.json").unlink(missing_ok=True)
        return _PartialEntry(folder, model, frames, save, stored)

    def _reconstruct(self, partial: "_PartialEntry", model, cond, batch_size, progress, cancel,
                     sample: list[int], save: list[int]) -> float:
        """The reconstruction check of the frames in ``sample``, batch by batch; each batch's error is recorded
        (``[i, j, error, values]``, positions in the sample), so an interrupted check resumes."""
        n = len(sample)
        done = [entry for entry in partial.reconstructed if entry[1] <= n]
        todo = _todo(n, batch_size, done)
        source = None
        if todo:
            store = partial.store()
            source = SourceLatents(clean=store.columns["clean"], noisy=store.timesteps())  # lazy: a batch at a time
        bar = Tracker("reconstruction", n, progress, cancel, initial=n - sum(z - a for a, z in todo))
        for a, z in todo:
            error, count = _reconstruction_error(model, source, cond, sample[a:z], path=sorted(save, reverse=True))
            done.append([a, z, error, count])
            partial.record_reconstruction(done)
            bar.update(z - a)
        value = _psnr_from_error(sum(e[2] for e in done), sum(e[3] for e in done))
        _log_psnr(value, n if n < partial.frames else None)
        return value


class _PartialEntry:
    """``<key>.partial/``: the finished batches' shards, at most one checkpoint of a batch in progress
    (``checkpoint.safetensors``: its latents so far) and the reconstruction's per-batch errors
    (``reconstruction.json``). Shards that do not fit the run (other latent shapes or timesteps) are discarded
    on opening."""

    CHECKPOINT = "checkpoint.safetensors"
    RECONSTRUCTION = "reconstruction.json"

    def __init__(self, folder: Path, model: Backbone, frames, save: list[int], stored: list[int]):
        self.folder = folder
        self.frames = frames.shape[0]
        self.names = {"clean", *(timestep_name(t) for t in stored)}  # a finished batch's shard
        self.checkpoint_names = {"clean", *(timestep_name(t) for t in save)}  # and the timestep it resumes from
        self.done: list[tuple[int, int]] = []
        self.checkpoint: list[int] | None = None
        self.reconstructed: list[list] = []
        self._shape = None
        if folder.is_dir():
            self._scan()
        if not self.done and self.checkpoint is None:
            shutil.rmtree(folder, ignore_errors=True)
            self.reconstructed = []
        folder.mkdir(parents=True, exist_ok=True)
        if self._shape is None:
            self._shape = tuple(model.encode_frames(frames[:1]).shape[1:])

    def _fits(self, path: Path, span: tuple[int, int] | None, complete: bool) -> LatentStore | None:
        """The shard at ``path`` (frames ``span``; a checkpoint: None) when it belongs to this inversion."""
        try:
            store = LatentStore.from_shards([Shard(path, 0, -1)])  # on its own: its rows from 0
        except CorruptLatents as exc:
            logger.info("inversion: discarding %s (%s)", path, exc)
            return None
        names = set(store.columns)
        shapes = {tuple(c.shape[1:]) for c in store.columns.values()}
        ok = (
            "clean" in names
            and names <= (self.names if complete else self.checkpoint_names)
            and (names == self.names or not complete)
            and len(shapes) == 1
            and (self._shape is None or shapes == {self._shape})
            and (span is None or (store.frames == span[1] - span[0] and span[1] <= self.frames))
        )
        if not ok:
            logger.info("inversion: discarding %s (it does not fit this inversion)", path)
            return None
        self._shape = shapes.pop()
        return store

    def _scan(self) -> None:
        for path in sorted(self.folder.iterdir()):
            span = parse_shard_name(path.name)
            if span is None:
                continue
            if self._fits(path, span, complete=True) is None or _overlaps(span, self.done):
                path.unlink()
                continue
            self.done.append(span)
        checkpoint = self.folder / self.CHECKPOINT
        if checkpoint.exists():
            store = self._fits(checkpoint, None, complete=False)
            try:
                a, z, t = (int(v) for v in store.info["checkpoint"])
                if store.frames != z - a or z > self.frames or timestep_name(t) not in store.columns \
                        or _overlaps((a, z), self.done):
                    raise ValueError("it does not fit this inversion")
                self.checkpoint = [a, z, t]
            except (AttributeError, ValueError, KeyError, TypeError) as exc:
                if store is not None:
                    logger.info("inversion: discarding %s (%s)", checkpoint, exc)
                checkpoint.unlink(missing_ok=True)
        try:
            self.reconstructed = json.loads((self.folder / self.RECONSTRUCTION).read_text())
        except (OSError, ValueError):
            self.reconstructed = []

    def check_space(self, frames: int, batch: int, root: Path) -> None:
        """Before inverting ``frames`` more frames: :class:`~tokenflow.errors.InputError` naming `cache_dir` when
        ``root``'s filesystem cannot take their shards (float32 latents at every saved timestep, the clean ones
        too) plus one batch's checkpoint and the entry's small files."""
        if not frames:
            return
        per_frame = len(self.names) * math.prod(self._shape) * 4
        try:
            check_free_space(root, (frames + batch) * per_frame + _MARGIN_BYTES, "cache_dir")
        except InputError:
            if not self.done and self.checkpoint is None:
                shutil.rmtree(self.folder, ignore_errors=True)  # nothing of this entry is kept
            raise

    def write_checkpoint(self, a: int, z: int, t: int, kept: dict[str, torch.Tensor]) -> None:
        write_shard(self.folder, a, z, kept, info={"checkpoint": [a, z, t]}, name=self.CHECKPOINT)
        self.checkpoint = [a, z, t]

    def read_checkpoint(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / self.CHECKPOINT))

    def write_batch(self, a: int, z: int, kept: dict[str, torch.Tensor]) -> None:
        write_shard(self.folder, a, z, kept)
        (self.folder / self.CHECKPOINT).unlink(missing_ok=True)
        self.checkpoint = None
        self.done.append((a, z))

    def store(self) -> LatentStore:
        return LatentStore.from_shards([Shard(self.folder / shard_name(a, z), a, z) for a, z in self.done])

    def record_reconstruction(self, done: list[list]) -> None:
        tmp = self.folder / f".{self.RECONSTRUCTION}.tmp"
        tmp.write_text(json.dumps(done))
        os.replace(tmp, self.folder / self.RECONSTRUCTION)

    def finish(self, path: Path, info: dict) -> Path:
        """Index the shards and move the folder to ``path``: the finished entry."""
        (self.folder / self.RECONSTRUCTION).unlink(missing_ok=True)
        finish_store(self.folder, info)
        replace_folder(self.folder, path)
        return path


def _overlaps(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(a < span[1] and span[0] < z for a, z in spans)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _model_fingerprint(model_id: str) -> str:
    """Sizes and modification times of a local model's files, so an overwritten local model misses the cache."""
    path = Path(model_id)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return ";".join(f"{p.relative_to(path.parent)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
