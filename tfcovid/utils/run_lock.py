"""One training process per run directory: an OS file lock that dies with its process.

``fit`` holds an exclusive ``flock`` on ``RUN/.lock`` (which holds its PID) while it trains, so
a second ``fit --resume`` of the same run cannot write the same temporary files and leave broken
checkpoints. The kernel drops the lock when the holder exits, however it exits (SIGKILL, the
OOM killer), so a killed run is never locked for good. ``calibrate``, which rewrites the run's
checkpoint and metrics.json, takes it too. Readers (evaluate, predict, export,
explain) take no lock. No TensorFlow.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory; the message names the run and its PID."""


class RunLock:
    """The exclusive lock on ``folder``; :meth:`acquire` takes it, :meth:`release` drops it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock without waiting and write this process's PID into the lock file.

        Raises:
            RunLocked: another process holds it.
            OSError: the lock file cannot be created (a read-only or full file system).
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLocked(self._refusal()) from None
            # The previous holder unlinks the file as it releases it: a lock on an unlinked
            # file guards nothing, so take it again on the file that is there now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (removing the lock file first, while still holding it)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # the run directory may be gone (a half-made run is removed)
            pass
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def holder(self) -> int | None:
        """The PID written in the lock file (None while the holder has not written it yet)."""
        for _ in range(20):  # the holder writes its PID just after taking the lock
            try:
                text = self.path.read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                return int(text)
            time.sleep(0.05)
        return None

    def _refusal(self) -> str:
        pid = self.holder()
        who, stop = (f"process {pid}", f" (or stop it: kill {pid})") if pid else ("another process", "")
        return (f"{self.folder} is in use: {who} is training in it. Wait for it to end{stop}; two "
                "processes training one run would overwrite each other's checkpoints.")
