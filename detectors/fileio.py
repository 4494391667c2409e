"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A reader (or a run resumed after a crash) sees either the old file or the complete new one, never
half a file. The result gets the permissions an ordinary ``open(path, "w")`` would give (0666 less
the process umask), not the 0600 of the temporary file. With ``durable=True`` the data and the
rename are also flushed to the disk (fsync of the file, then of its folder), so a power loss
cannot leave a name pointing at unwritten blocks: used for checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

__all__ = ["atomic_write", "atomic_json", "atomic_text", "current_umask", "default_file_mode"]


def current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0666 less the current umask: the mode ``open(path, "w")`` gives a new file."""
    return 0o666 & ~current_umask()


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], *, durable: bool = False) -> None:
    """Call ``write(tmp_path)``, then rename the result onto ``path``: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_json(path: str, obj, **dump_kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, **dump_kwargs)

    atomic_write(path, write)


def atomic_text(path: str, text: str, *, durable: bool = False) -> None:
    """Write ``text`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write, durable=durable)
