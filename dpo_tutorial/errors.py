"""The errors a user can act on. Each names the bad input and what was expected, in one line; the
``dpo-tutorial`` command prints them as ``dpo-tutorial CMD: error: ...`` and exits 2 (:class:`UserError`).

Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """An input cannot be used as given; the message says which and what to do (base of the classes below)."""


class ConfigError(UserError):
    """A configuration value is invalid; the message names the field, the value and what is expected."""


class DataError(UserError):
    """The dataset cannot be used; the message names the source, column or value and what was expected."""


class ModelError(UserError):
    """A model folder or hub id cannot be used; the message says what to do."""


class FolderError(UserError):
    """An output folder cannot be used (a file, not ours, not writable); the message names it and the way out."""
