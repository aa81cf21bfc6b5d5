"""Errors that are the user's to fix, not bugs.

Config, data and checkpoint code raise these with a message that names the field or file and
says what to do. ``star-mamba`` prints such an error as one line
(``star-mamba <cmd>: error: <message>``) and exits with code 2; ``--debug`` shows the traceback.
Any other exception is a bug: the command line lets it through with its traceback (exit 1).

Each class also derives from the builtin a caller would expect (``ValueError``,
``FileNotFoundError``, ``FloatingPointError``), so code that catches those keeps working.
"""
from __future__ import annotations


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
