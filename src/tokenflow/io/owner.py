"""Which process a scratch folder belongs to, so that a later run can remove the folders of runs that were killed
without a chance to clean up (SIGKILL, the OOM killer, a power cut): an owner record (pid and host) in the folder,
and the test of whether that owner is gone."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

__all__ = ["OWNER", "write_owner", "dead_owner"]

OWNER = "owner.json"


def write_owner(folder: Path) -> None:
    """Record this process as ``folder``'s owner."""
    (Path(folder) / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def dead_owner(folder: Path) -> int | None:
    """The pid of ``folder``'s owner when it was a process of this machine that is gone; ``None`` when the folder
    has no readable record, or its owner is alive or on another machine (then it is not ours to remove)."""
    try:
        owner = json.loads((Path(folder) / OWNER).read_text())
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if owner.get("host") != socket.gethostname() or _alive(pid):
        return None
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):  # someone else's process, or not a pid: leave it be
        return True
    return True
