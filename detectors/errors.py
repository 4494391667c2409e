"""The errors a user can cause, kept apart from bugs.

The tools print a :class:`UserError` as one line, ``error: <message>``, and exit with status 2; any
other exception is a bug and keeps its traceback. Each class also derives from the builtin type a
caller would catch (``ValueError``, ``FileNotFoundError``), so library code can catch either.
Messages name the file, key or value at fault.
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "UserError",
    "OptionError",
    "CheckpointError",
    "DataError",
    "DataNotFoundError",
    "unknown_key_message",
    "check_known_keys",
]


class UserError(Exception):
    """Base of the errors caused by what the user gave (an option, a file, a path)."""


class OptionError(UserError, ValueError):
    """An unknown or invalid option (config key, keyword argument, command-line value)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


class DataError(UserError, ValueError):
    """A data or results file that is not what it claims to be (names the file and the record)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset, annotation or image file that does not exist."""


def unknown_key_message(where: str, key: str, valid: Iterable[str]) -> str:
    """``unknown key 'model.box_los'; did you mean 'box_loss'? valid keys: ...``."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {where + '.' if where else ''}{key}{hint} (valid keys: {', '.join(valid)})"


def check_known_keys(where: str, keys: Iterable[str], valid: Iterable[str]) -> None:
    """Raise :class:`OptionError` for the first key of ``keys`` not in ``valid``."""
    valid = set(valid)
    for key in keys:
        if key not in valid:
            raise OptionError(unknown_key_message(where, key, valid))
