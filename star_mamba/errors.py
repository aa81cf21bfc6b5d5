"""Errors that are the user's to fix, not bugs.

Config, data and checkpoint code raise these with a message that names the field or file and
says what to do. ``star-mamba`` prints such an error as one line
(``star-mamba <cmd>: error: <message>``) and exits with code 2; ``--debug`` shows the traceback.
Each class is also a ``ValueError``, so code that catches ``ValueError`` keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """Something asked for cannot be done as asked; the message says what to change."""


class ConfigError(UserError, ValueError):
    """An unknown, ill-typed or impossible config value (``section.key`` named in the message)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or does not fit what it is used for."""
