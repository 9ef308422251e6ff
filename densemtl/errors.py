"""Errors that reach the user as one clear line instead of a traceback.

The CLI catches :class:`UserError` (and its subclasses), prints the message and exits with code 2.
Library code raises them for anything the user can fix: a bad config, a missing file, a wrong value.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override that cannot be loaded: names the key and the file."""


class DataError(UserError):
    """A dataset file that is missing, corrupt or inconsistent: names the file."""


class TrainingDiverged(UserError):
    """A non-finite loss: names the task; the last good checkpoint is kept."""

    exit_code = 3
