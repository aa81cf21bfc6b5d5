"""The run folder a training run writes (``run.output_dir``), opened by ``start_run``:

- **One run at a time.** :class:`RunLock` holds an exclusive ``flock`` on ``<folder>/.lock``
  for as long as the run lives; a second run on the folder stops at its start with one line
  naming the PID and host holding it. The kernel drops the lock when its process ends, however
  it ends (SIGKILL included), so the file a dead run leaves behind never blocks the next one.
  (flock works on local file systems and on NFS v4; one lock per folder, taken by rank 0.)
- **No stray temporary files.** ``*.tmp`` files (a save cut short by a kill) are removed.
- **Fresh files for a fresh start.** When a training run starts from scratch (nothing to resume,
  or ``run.resume=never``) the metrics, log and TensorBoard files of an earlier run in the
  folder (one that died before its first checkpoint, say) are moved aside as
  ``<name>.<n>.old``, so the new run does not append to them; nothing is deleted.
"""
from __future__ import annotations

import fcntl
import os
import re
import socket
from pathlib import Path
from typing import Optional

from .. import checkpoint as ckpt
from ..errors import UserError

LOCK = ".lock"
RUN_FILES = ("metrics.jsonl", "log.txt", "tensorboard")  # what a fresh start moves aside
HOLDER_BYTES = 256  # more than a "pid N on HOST" line takes


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.lock`` (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock, or raise a :class:`UserError` naming the folder and its holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, HOLDER_BYTES).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"run.output_dir {self.folder} is in use by another run "
                            f"({holder or 'holder unknown'}, lock {self.path}); wait for it to "
                            "end or choose another run.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file does); the file stays, for the next run to lock."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None


def remove_stray_tmp(folder: Path) -> list[str]:
    """Remove the ``*.tmp`` files in ``folder`` (saves cut short); their names."""
    stray = sorted(p for p in Path(folder).glob("*.tmp") if p.is_file())
    for p in stray:
        p.unlink()
    return [p.name for p in stray]


def starts_fresh(folder: Path, resume: str) -> bool:
    """Whether a training run with ``run.resume=resume`` starts from scratch in ``folder``:
    ``never``, or ``auto`` with no checkpoint there (an explicit path resumes; ``auto`` with
    only unreadable checkpoints is refused later, with nothing moved)."""
    return resume == "never" or (resume == "auto" and not ckpt.resume_candidates(folder))


def move_aside(folder: Path) -> list[str]:
    """Rename the :data:`RUN_FILES` in ``folder`` to ``<name>.<n>.old``, one ``n`` for them all
    (1 more than any used before); the new names."""
    folder = Path(folder)
    present = [name for name in RUN_FILES if (folder / name).exists()]
    if not present:
        return []
    used = [int(m.group(1)) for p in folder.iterdir()
            if (m := re.fullmatch(r".+\.(\d+)\.old", p.name))]
    n = max(used, default=0) + 1
    for name in present:
        os.replace(folder / name, folder / f"{name}.{n}.old")
    return [f"{name}.{n}.old" for name in present]
