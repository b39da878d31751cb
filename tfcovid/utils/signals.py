"""Signals as exceptions: SIGTERM and Ctrl-C become :class:`Interrupted`, raised where it is safe.

Used by training (at batch boundaries) and by ``prepare`` (between records). No TensorFlow.
"""
from __future__ import annotations

import signal
import threading

# The signals that stop work cleanly: SIGTERM (schedulers, `kill`) and SIGINT (Ctrl-C).
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RuntimeError):
    """Training was stopped by a signal; the last completed epoch is on disk."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def install_handlers(signals, handler) -> dict:
    """Set ``handler`` for ``signals`` (only the main thread can); the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class RaiseOnSignal:
    """SIGTERM / SIGINT (Ctrl-C) raise :class:`Interrupted` at once, for work after training
    (evaluating the splits) that writes nothing until its one atomic write: there is no batch
    boundary to wait for, and nothing half-written to protect. Without it SIGTERM ended the
    process silently and Ctrl-C gave a KeyboardInterrupt traceback."""

    def __init__(self):
        self._previous: dict = {}
        self.received: int | None = None

    def __enter__(self):
        self._previous = install_handlers(SIGNALS, self._handle)
        return self

    def __exit__(self, exc_type, *exc):
        restore_handlers(self._previous)
        self._previous = {}
        if exc_type is None and self.received is not None:
            # The handler's exception was swallowed: it ran inside a finalizer (__del__), where
            # Python prints "Exception ignored" and goes on. The signal still stops the work.
            raise Interrupted(self.received)
        return False

    def _handle(self, signum, frame):
        self.received = signum
        restore_handlers(self._previous)  # a second signal: the usual handler
        raise Interrupted(signum)


class DeferSignals:
    """SIGTERM / SIGINT (Ctrl-C) are recorded, and :meth:`check` raises :class:`Interrupted` at
    the next safe point (a batch boundary, the next record written), outside any file write.
    A second signal gets the previous handler (Ctrl-C twice stops at once)."""

    def __init__(self):
        super().__init__()
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        self._previous = install_handlers(SIGNALS, self._handle)
        return self

    def __exit__(self, *exc):
        restore_handlers(self._previous)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        self.received = signum
        restore_handlers(self._previous)

    def check(self, *args, **kwargs) -> None:
        if self.received is not None:
            raise Interrupted(self.received)
