"""Errors that are the user's to fix, not bugs.

Config, data and checkpoint code raise these with a message that names the field or file and
says what to do. ``star-mamba`` prints such an error as one line
(``star-mamba <cmd>: error: <message>``) and exits with code 2; ``--debug`` shows the traceback.
Any other exception is a bug: the command line lets it through with its traceback (exit 1).

Each class also derives from the builtin a caller would expect (``ValueError``,
``FileNotFoundError``, ``FloatingPointError``, ``OSError``), so code that catches those keeps
working. :func:`writing` turns a failed write (full disk, read-only folder, a file in the way)
into an :class:`OutputError` naming the path. :class:`Interrupted` is no error: a run stopped
by SIGINT/SIGTERM after saving (exit code 130/143).
"""
from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator, Optional


class UserError(Exception):
    """Something asked for cannot be done as asked; the message says what to change."""


class ConfigError(UserError, ValueError):
    """An unknown, ill-typed or impossible config value (``section.key`` named in the message)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or does not fit what it is used for."""


class DataError(UserError, ValueError):
    """Data that cannot be used as asked: unreadable or mis-shaped files, too few images, too
    many unreadable ones."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs is not there (the message names it)."""


class DivergedError(UserError, FloatingPointError):
    """Training stopped on non-finite losses; the message says what to change."""


class BackendError(UserError, RuntimeError):
    """A selective-scan backend that this machine cannot run (``model.scan_backend``)."""


class UnreadableImagesError(DataError, RuntimeError):
    """More unreadable images than ``data.max_bad_fraction`` allows (or none readable at all)."""


class OutputError(UserError, OSError):
    """A file or folder the run must write cannot be: a full disk, a read-only or forbidden
    folder, a file where a folder should be (the message names the path; see :func:`writing`)."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM at a step boundary, its checkpoint saved
    (``engine/signals.py``). A ``KeyboardInterrupt``, so code that lets those through does;
    the command line exits with :attr:`exit_code` (128 + the signal: 130, 143) and no traceback."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# errno -> what it means for the path that could not be written
UNWRITABLE = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "over the file size limit, as good as a full disk",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EEXIST: "a file is in the way (a folder is needed there)",
    errno.ENOTDIR: "a file is in the way (a folder is needed there)",
    errno.EISDIR: "a folder is in the way (a file is needed there)",
}


def unwritable(error: BaseException, path, what: str, then: str = "") -> Optional[OutputError]:
    """An :class:`OutputError` naming ``path`` when ``error``, or an error in its chain (torch
    wraps a failed write in a RuntimeError), is an ``OSError`` in :data:`UNWRITABLE`; else None.
    ``what`` names the path (``checkpoint``); ``then`` says what holds meanwhile."""
    seen = error
    while seen is not None and not (isinstance(seen, OSError) and seen.errno in UNWRITABLE):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    code = errno.errorcode[seen.errno]
    return OutputError(f"cannot write {what} {path}: {UNWRITABLE[seen.errno]} ({code})"
                       + (f"; {then}" if then else ""))


@contextmanager
def writing(path, what: str, then: str = "") -> Iterator[None]:
    """Turn a failed write to ``path`` (:func:`unwritable`) into one :class:`OutputError` line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        error = unwritable(e, path, what, then)
        if error is None:
            raise
        raise error from e
