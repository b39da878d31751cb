"""TensorFlow's start-up lines filtered at TF_CPP_MIN_LOG_LEVEL (tfcovid.utils.tf_import)."""

import os
import subprocess
import sys

from tfcovid.utils import tf_import
from tfcovid.training import devices

# Lines as TensorFlow 2.21 writes them before its logging starts.
PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
INFO = ("I0000 00:00:1795822135.057183   14709 cudart_stub.cc:31] Could not find cuda drivers on your "
        "machine, GPU will not be used.\n")
WARN = "W0000 00:00:1795822135.057183   14709 some_file.cc:12] a warning\n"
ERROR = ("E0000 00:00:1795822177.261592   15657 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
         "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
LATER_INFO = "I1127 23:28:59.123456  14709 some_file.cc:7] after logging started\n"


def test_dropped_follows_tensorflows_levels():
    lines = [PREAMBLE, INFO, LATER_INFO, WARN, ERROR, "Traceback (most recent call last):\n", "Error: x\n"]
    kept = {level: [line for line in lines if not tf_import.dropped(line, level)] for level in range(4)}
    assert kept[0] == lines
    assert kept[1] == [WARN, ERROR, lines[5], lines[6]]
    assert kept[2] == [ERROR, lines[5], lines[6]]
    assert kept[3] == [lines[5], lines[6]]  # only what is not TensorFlow's log


def _run(code, **env):
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=environ)


def test_filtered_passes_other_lines_on_in_order():
    code = (
        "import os, sys\n"
        "from tfcovid.utils import tf_import\n"
        "with tf_import.filtered(lambda line: line.startswith('drop')):\n"
        "    os.write(2, b'keep 1\\ndrop 1\\n')\n"
        "    print('keep 2 (python)', file=sys.stderr, flush=True)\n"
        "    os.write(2, b'drop 2\\nkeep 3 no newline')\n"
        "os.write(2, b'\\nafter\\n')\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "keep 1\nkeep 2 (python)\nkeep 3 no newline\nafter\n"


def test_import_tensorflow_quiet_at_level_2_and_all_lines_at_level_0():
    code = ("from tfcovid.utils import tf_import\n"
            "tf = tf_import.import_tensorflow()\n"
            "print(tf.__name__, repr(tf_import.cuda_problem()))\n")
    everything = _run(code, TF_CPP_MIN_LOG_LEVEL="0")
    quiet_run = _run(code, TF_CPP_MIN_LOG_LEVEL="2")
    assert everything.returncode == 0 and quiet_run.returncode == 0, quiet_run.stderr
    assert everything.stdout.startswith("tensorflow ") and quiet_run.stdout.startswith("tensorflow ")
    assert PREAMBLE.strip() in everything.stderr  # TensorFlow 2.21 writes it whatever the level
    assert "I0000" in everything.stderr
    for line in quiet_run.stderr.splitlines():  # nothing level 2 drops
        assert not tf_import.dropped(line + "\n", 2), line
    assert "cuInit" not in quiet_run.stderr
    problem = quiet_run.stdout.split(" ", 1)[1].strip()
    if "failed call to cuInit: " in everything.stderr:  # a CUDA build without a usable driver
        said = everything.stderr.split("failed call to cuInit: ", 1)[1].splitlines()[0].strip()
        assert problem == repr(said)  # held back from stderr, kept for the device line
    else:
        assert problem == "None"


def test_device_line_says_why_there_is_no_gpu(monkeypatch):
    monkeypatch.setattr(devices, "_gpu", lambda: None)
    monkeypatch.setattr(tf_import, "_cuda_problem", None)
    assert devices.describe_device() == f"CPU ({os.cpu_count()} cores)"
    monkeypatch.setattr(tf_import, "_cuda_problem", "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
    assert devices.describe_device() == f"CPU ({os.cpu_count()} cores; no CUDA GPU: cuInit failed, UNKNOWN ERROR (303))"
