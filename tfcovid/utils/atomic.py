"""Atomic file writes: a reader, or a process resumed after a kill, sees the old file or the
new one, never half of one.

The new content goes to a temporary file in the same folder (a rename across file systems is
not atomic), is flushed to disk, and is renamed over the old file with ``os.replace``.
"""
from __future__ import annotations

import csv
import errno
import io
import os
from pathlib import Path
from typing import Callable, Iterable

PARTIAL_PREFIX = ".partial-"

# A full disk and a full quota: the same remedy (free space), the same safe state (atomic writes
# leave the previous file). h5py and TensorFlow say it only in their messages.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "errno = 28")
DISK_FULL_RAISERS = ("tensorflow", "h5py", "keras")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` via ``write(temp_path)`` and rename it into place.

    The temporary file sits in the same folder (a rename across file systems is not atomic)
    and keeps the file's name as its ending, because Keras checks endings (``.keras``,
    ``.weights.h5``).
    """
    path = Path(path)
    tmp = path.with_name(PARTIAL_PREFIX + path.name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace the text file ``path`` atomically."""
    return atomic_save(path, lambda tmp: tmp.write_text(text))


def atomic_write_csv(path: str | Path, rows: Iterable[Iterable]) -> Path:
    """Replace the CSV file ``path`` atomically with ``rows`` (the header first)."""
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return atomic_write_text(path, out.getvalue())


def remove_partials(folder: Path) -> int:
    """Delete temporary files a killed process left behind; return how many."""
    removed = 0
    for tmp in Path(folder).rglob(PARTIAL_PREFIX + "*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def disk_full(err: BaseException | None) -> bool:
    """Whether ``err``, or an error it was raised from, says the disk (or the quota) is full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        # Only file-writing libraries' errors: tfcovid's own messages may quote an OSError.
        writer = isinstance(err, OSError) or type(err).__module__.split(".")[0] in DISK_FULL_RAISERS
        if writer and any(text in str(err)[:10_000] for text in DISK_FULL_TEXTS):
            return True
        # What it was raised from; not what it was raised while handling with "from None"
        err = err.__cause__ if err.__cause__ is not None else (
            None if err.__suppress_context__ else err.__context__)
    return False
