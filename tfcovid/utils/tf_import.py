"""TensorFlow's C++ start-up lines, kept to what ``TF_CPP_MIN_LOG_LEVEL`` asks for.

The variable (the CLI sets 2, keep warnings out, where the user has not set it) filters
TensorFlow's logs once its logging has started. TensorFlow 2.21's libraries each write a few
lines before that, whatever the level: "WARNING: All log messages before absl::InitializeLog()
is called are written to STDERR", then INFO lines on oneDNN and CUDA drivers, twice. And on a
machine without a working CUDA driver, the first GPU listing writes an ERROR line
("failed call to cuInit: ...") that the device line can say more calmly.

``import_tensorflow()`` imports TensorFlow and lists its GPUs with the process's stderr
(file descriptor 2, where C++ writes) going through a pipe: a thread passes every line on as
it comes, except those the level filters, and keeps the cuInit failure for
``devices.describe_device``. Nothing else is held back, so a crash during the import still
shows its output.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


# absl's prefix: severity letter, MMDD, time (before logging starts, 00:00:<epoch seconds>),
# thread, file:line]. TensorFlow's levels: 1 drops INFO, 2 WARNING too,
# 3 ERROR too.
_SEVERITY = re.compile(r"([IWE])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")


_LEVELS = {"I": 1, "W": 2, "E": 3}


_CUINIT = re.compile(r"failed call to cuInit: (.*)")


_cuda_problem: str | None = None


def cuda_problem() -> str | None:
    """Why TensorFlow found no CUDA device, as its cuInit failure said (None: no such failure,
    or TensorFlow was not imported through ``import_tensorflow``)."""
    return _cuda_problem


def level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as a number (0 where unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def dropped(line: str, min_level: int) -> bool:
    """Whether TensorFlow would not have written ``line`` at ``min_level`` had its logging
    started (absl's pre-start preamble goes with INFO)."""
    if line.rstrip("\r\n") == _PREAMBLE:
        return min_level >= 1
    match = _SEVERITY.match(line)
    return bool(match) and min_level >= _LEVELS[match.group(1)]


@contextlib.contextmanager
def filtered(drop, seen=None):
    """Run the block with file descriptor 2 going through a pipe; a thread writes each line on
    to the real stderr unless ``drop(line)``. ``seen(line)``, if given, sees every line first."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    read_end, write_end = os.pipe()

    def forward():
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "replace")
                if seen is not None:
                    seen(line)
                if not drop(line):
                    while raw:  # os.write may take part of it
                        raw = raw[os.write(saved, raw):]

    thread = threading.Thread(target=forward, name="tfcovid-stderr", daemon=True)
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the thread reads to its end
        thread.join(timeout=10)  # a child process still holding the pipe: stop waiting
        os.close(saved)


def import_tensorflow():
    """Import TensorFlow and list its GPUs, its start-up lines filtered (see the module's doc);
    returns the module. Once imported, it only returns it."""
    global _cuda_problem
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    min_level = level()
    problems = []

    def seen(line):
        match = _CUINIT.search(line)
        if match:
            problems.append(match.group(1).strip())

    def drop(line):
        return dropped(line, min_level) or (min_level >= 2 and bool(_CUINIT.search(line)))

    with filtered(drop, seen):
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    if problems and not gpus:
        _cuda_problem = problems[0]
    return tf
