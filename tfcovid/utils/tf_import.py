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

Later lines are no better: the image decoders' notes on a damaged file (libjpeg's "Premature
end of JPEG data", raw libjpeg, libpng and OpenCV messages), which tfcovid reports itself by
name, and TensorFlow Lite's "INFO: Created ... XNNPACK delegate". A CLI command runs with
``filtered_command()``: the same filter, those notes counted as warnings, in a separate
process (the last lines of a crash still come out).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading

_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


# absl's prefix: severity letter, MMDD, time (before logging starts, 00:00:<epoch seconds>),
# thread, file:line]. TensorFlow's levels: 1 drops INFO, 2 WARNING too,
# 3 ERROR too.
_SEVERITY = re.compile(r"([IWE])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")


_LEVELS = {"I": 1, "W": 2, "E": 3}


# Lines the image libraries write about a damaged image, which tfcovid reports itself by name:
# warnings, whatever their severity says. TensorFlow's decoders (absl lines from these files),
# libjpeg's own messages (TensorFlow's decoder prints them raw), libpng's and OpenCV's imgcodecs.
_CODEC_SOURCES = re.compile(r" (jpeg_mem|jpeg_handle|png_io|gif_io|decode_image_op)\.cc:\d+\] ")
_CODEC_LINE = re.compile(
    r"(Improper call to JPEG library in state \d+|Bogus [\w ]+?( \d+| 0x[\da-f]+)?"
    r"|Corrupt JPEG data: .+|Premature end of JPEG file|Invalid JPEG file structure: .+"
    r"|Not a JPEG file: starts with 0x[\da-f]+ 0x[\da-f]+|(Huffman|Quantization|Arithmetic) table "
    r"0x[\da-f]+ was not defined|Unsupported marker type 0x[\da-f]+|Unsupported JPEG (process|data "
    r"precision).*|Invalid (SOS parameters for sequential JPEG|progressive parameters .+|component ID "
    r"\d+ in SOS)|Inconsistent progression sequence .+|Empty (input file|JPEG image .+)"
    r"|Maximum supported image dimension is \d+ pixels|Sampling factors too large for interleaved scan"
    r"|Huffman code size table overflow|Missing Huffman code table entry|Didn't expect more than one "
    r"scan|Warning: (unknown JFIF revision number|thumbnail image size does not match) .+"
    r"|DCT coefficient out of range|Component index \d+: mismatching sampling ratio .+"
    r"|libpng (error|warning): .+|\[ ?(WARN|ERROR):\d+@[\d.]+\] global (loadsave|grfmt_\w+|bitstrm)\.cpp.*)\r?\n?")


# TensorFlow Lite's own logger ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.").
_TFLITE = re.compile(r"(INFO|WARNING|ERROR): ")


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
    if match:
        severity = match.group(1)
        if severity == "E" and _CODEC_SOURCES.search(match.group(0)):
            severity = "W"  # a decoder's note on a damaged image
        return min_level >= _LEVELS[severity]
    if _CODEC_LINE.fullmatch(line):
        return min_level >= _LEVELS["W"]
    match = _TFLITE.match(line)
    return bool(match) and min_level >= _LEVELS[match.group(1)[0]]


@contextlib.contextmanager
def _through_pipe(start_reader):
    """Run the block with file descriptor 2 going into a pipe. ``start_reader(read_end, saved)``
    starts what reads the pipe (it owns ``read_end``; ``saved`` is the real stderr) and returns a
    function that waits for it to finish, or None if it could not start (stderr left as it is)."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    wait = start_reader(read_end, saved)
    if wait is not None:
        os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end here closes: the reader reads to its end
        if wait is not None:
            wait()
        os.close(saved)


@contextlib.contextmanager
def filtered(drop, seen=None):
    """Run the block with file descriptor 2 going through a pipe; a thread writes each line on
    to the real stderr unless ``drop(line)``. ``seen(line)``, if given, sees every line first."""

    def start_thread(read_end, saved):
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
        return lambda: thread.join(timeout=10)  # a child process still holding the pipe: stop waiting

    with _through_pipe(start_thread):
        yield


@contextlib.contextmanager
def filtered_command():
    """Run a whole command with file descriptor 2 going through a separate process that drops
    what :func:`dropped` drops at ``TF_CPP_MIN_LOG_LEVEL`` (nothing at 0: no filter then). A
    process, not a thread, so that the last lines of a crash or an abort still come out: it
    reads until every writer has closed the pipe, the command's child processes included."""
    min_level = level()
    if min_level == 0:
        yield
        return

    def start_process(read_end, saved):
        try:
            forwarder = subprocess.Popen([sys.executable, "-I", "-S", __file__, str(min_level)],
                                         stdin=read_end, stdout=saved, stderr=saved)
        except OSError:
            forwarder = None
        os.close(read_end)
        if forwarder is None:
            return None

        def wait():  # its last lines out before the command's exit; a child process still
            # holding the pipe (a worker) keeps it going, on its own, a while
            with contextlib.suppress(subprocess.TimeoutExpired):
                forwarder.wait(timeout=2)
        return wait

    with _through_pipe(start_process):
        yield


def _forward(min_level: int) -> None:
    """The forwarding process: stdin to stdout, line by line, without the dropped lines (and a
    blank line right after one, as OpenCV ends its messages). Always reads to the end, so the
    command never blocks on a full pipe; Ctrl-C is for the command, which says how it stopped."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    writing, after_dropped = True, False
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", "replace")
        drop = dropped(line, min_level) or (after_dropped and not line.strip())
        after_dropped = drop
        while writing and not drop and raw:
            try:
                raw = raw[os.write(1, raw):]
            except OSError:  # stderr closed: keep draining
                writing = False


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


if __name__ == "__main__":  # the forwarding process of filtered_command (python -I -S this file)
    _forward(int(sys.argv[1]))
