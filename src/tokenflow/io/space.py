"""Where a run writes: checked before the heavy work (a folder that cannot be written, too little free space), and
a full disk while writing turned into one line."""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from pathlib import Path

from tokenflow.errors import InputError

from .probe import VideoInfo, _one_line
from .size import working_size

log = logging.getLogger("tokenflow.io")

#: What writing to a full disk (or past a quota or a file-size limit) raises.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})

#: Headroom beyond the staged frames: the encoded videos, previews, run.json.
MARGIN_BYTES = 32 * 2**20

_MB = 2**20


def check_writable(folder: Path, option: str, target: Path | None = None, create: bool = False) -> None:
    """Whether the run can write in ``folder``: a scratch file is made (and removed) there, or, when it does not
    exist yet and ``create`` is false, in its nearest existing parent; with ``create`` the folder is made.
    :class:`InputError` naming ``option`` (a field name) when that fails: a path under a file, no permission, a
    read-only filesystem; or when ``target`` (the folder the run will put there) exists and is not a folder."""
    folder = Path(folder)
    if target is not None and target.exists() and not target.is_dir():
        raise InputError(f"{target}: is a file, not an output folder; choose another `{option}`")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe_in = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if probe_in is None:
            return
        if not probe_in.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe_in} is a file", str(probe_in))
        with tempfile.TemporaryFile(dir=probe_in):
            pass
    except OSError as exc:
        reason = _one_line(exc.strerror or exc)
        raise InputError(
            f"{folder}: cannot write there ({reason}); choose another `{option}` or fix the folder's permissions"
        ) from exc


def staged_bytes(info: VideoInfo, start: int, stride: int, max_frames: int | None, size: int | None,
                 copies: int = 1, frame_size: tuple[int, int] | None = None, extra_per_frame: int = 0) -> int:
    """About how many bytes a run stages: ``copies`` uint8 RGB copies of the selected frames at the working size
    (``frame_size`` (width, height) when known, else the short side ``size``, else 512: SD's) and
    ``extra_per_frame`` bytes a frame (its latents on disk), plus :data:`MARGIN_BYTES`. A video that does not state
    its frame count counts as its ``max_frames`` frames, else one."""
    if info.num_frames:
        count = len(range(start, info.num_frames, max(1, stride)))
        count = min(count, max_frames) if max_frames else count
    else:
        count = max_frames or 1
    if frame_size is not None:
        width, height = frame_size
    else:
        try:
            width, height = working_size(info.width, info.height, size or 512)
        except InputError:  # a bad `size` is reported by the run itself
            return count * extra_per_frame + MARGIN_BYTES
    return count * (copies * width * height * 3 + extra_per_frame) + MARGIN_BYTES


def check_free_space(folder: Path, need: int, option: str) -> None:
    """:class:`InputError` naming ``option`` when ``folder``'s filesystem has less than ``need`` bytes free."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)  # the filesystem it will be on
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # nothing to measure: the writes themselves will tell
    if free < need:
        raise InputError(
            f"{folder}: {free / _MB:.0f} MB free, the run needs about {need / _MB:.0f} MB there; free some space "
            f"or choose another `{option}`"
        )


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, PyAV's included) says the disk, a quota or the file-size limit is full."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def out_of_space_error(exc: OSError, folder: Path, option: str) -> InputError:
    """One line for a write that ran out of space: which file (else ``folder``), and what to do."""
    where = exc.filename or folder
    reason = _one_line(exc.strerror or exc)
    return InputError(
        f"{where}: {reason} while writing; the run stopped and left the earlier output as it was: free some space "
        f"or choose another `{option}`"
    )
