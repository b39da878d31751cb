"""TensorFlow's start-up lines filtered at TF_CPP_MIN_LOG_LEVEL (tfcovid.utils.tf_import)."""

import os
import shutil
import subprocess
import sys

import fake_run
import pytest

from tfcovid.training import devices
from tfcovid.utils import tf_import

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


# What the image libraries and TensorFlow Lite write (issue 27.3), as they write it.
LIBJPEG_E = "E0000 00:00:1796648500.719017    2403 jpeg_mem.cc:331] Premature end of JPEG data. Stopped at line 4/9\n"
LIBJPEG_RAW = ["Improper call to JPEG library in state 201\n", "Bogus Huffman table definition\n",
               "Corrupt JPEG data: premature end of data segment\n"]
LIBPNG = "libpng error: bad adaptive filter value\n"
OPENCV = ("[ERROR:0@5.945] global loadsave.cpp:1377 imdecode_ imdecode_(''): can't read header: OpenCV(5.1.0) "
          "/io/opencv/modules/imgcodecs/src/bitstrm.cpp:59: error: (-2:Unspecified error) Unexpected end of "
          "input stream in function 'readBlock'\n")
XNNPACK = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"


def test_image_library_notes_are_warnings_and_tflite_info_is_info():
    notes = [LIBJPEG_E, *LIBJPEG_RAW, LIBPNG, OPENCV]
    for line in notes:
        assert [tf_import.dropped(line, level) for level in range(4)] == [False, False, True, True], line
    assert [tf_import.dropped(XNNPACK, level) for level in range(4)] == [False, True, True, True]
    # Not notes: an ERROR from elsewhere stays until level 3; tfcovid's own lines and near misses stay.
    assert [tf_import.dropped(ERROR, level) for level in range(4)] == [False, False, False, True]
    for line in ["Error: 1 file under d cannot be used:\n", "Bogus\n", "Traceback (most recent call last):\n",
                 "  train/x.jpg: cannot be decoded as JPEG, truncated or corrupt\n", "INFO:root:python logging\n"]:
        assert not any(tf_import.dropped(line, level) for level in range(4)), line


def test_filtered_command_drops_notes_keeps_the_rest_and_the_last_lines_of_an_abort():
    lines = [LIBJPEG_E, "keep 1\n", LIBJPEG_RAW[0], OPENCV, "\n", "keep 2\n", "\n", XNNPACK, "last words\n"]
    code = ("import os\n"
            "from tfcovid.utils import tf_import\n"
            "with tf_import.filtered_command():\n"
            f"    os.write(2, {''.join(lines).encode()!r})\n"
            "    os.abort()  # a crash right after writing: the forwarding process still passes it on\n")
    quiet_run, everything = _run(code, TF_CPP_MIN_LOG_LEVEL="2"), _run(code, TF_CPP_MIN_LOG_LEVEL="0")
    assert quiet_run.returncode == everything.returncode == -6  # SIGABRT
    assert quiet_run.stderr == "keep 1\nkeep 2\n\nlast words\n"  # OpenCV's blank line after its note goes
    assert everything.stderr == "".join(lines)


def _file_check_output(data, tmp_path, level):
    args = [sys.executable, "-m", "tfcovid.cli", "fit", "--data", str(data), "--weights", "none", "--epochs",
            "1", "--batch-size", "2", "--out", str(tmp_path / f"runs{level}")]
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        environ["TF_CPP_MIN_LOG_LEVEL"] = level
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=environ, check=False)


@pytest.mark.slow
def test_fit_file_check_shows_damaged_jpegs_once_not_libjpegs_lines(binary_tree, tmp_path):
    """A truncated JPEG and one with a broken Huffman table: fit's file check lists them (and
    stops); libjpeg's lines are shown only at TF_CPP_MIN_LOG_LEVEL=0."""
    data = tmp_path / "data"
    shutil.copytree(binary_tree, data)
    jpegs = sorted((data / "train").rglob("*.jpg"))
    raw = jpegs[0].read_bytes()
    jpegs[0].write_bytes(raw[:len(raw) * 2 // 3])  # truncated
    raw = bytearray(jpegs[1].read_bytes())
    start = raw.index(b"\xff\xc4") + 5  # the first Huffman table's 16 code counts
    raw[start:start + 16] = b"\xff" * 16
    jpegs[1].write_bytes(bytes(raw))
    quiet_run, everything = _file_check_output(data, tmp_path, None), _file_check_output(data, tmp_path, "0")
    for out in (quiet_run, everything):
        assert out.returncode == 1 and "Error: 2 files under" in out.stderr, out.stderr
        assert f"train/{jpegs[0].parent.name}/{jpegs[0].name}: cannot be decoded as JPEG" in out.stderr
    notes = [line for line in everything.stderr.splitlines(keepends=True)
             if tf_import.dropped(line, 2) and not tf_import.dropped(line, 1)]
    assert any("jpeg_mem.cc" in line and "Premature end of JPEG data" in line for line in notes), everything.stderr
    assert "Bogus Huffman table definition\n" in notes  # libjpeg's own, raw
    assert not [line for line in notes if line in quiet_run.stderr], quiet_run.stderr
    assert "jpeg_mem.cc" not in quiet_run.stderr and "JPEG library" not in quiet_run.stderr


@pytest.mark.slow
def test_tflite_export_does_not_print_the_xnnpack_line(binary_tree, tmp_path):
    run = fake_run.make_run(tmp_path, binary_tree)
    outs = {}
    for level in ("2", "0"):
        environ = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": level}
        outs[level] = subprocess.run(
            [sys.executable, "-m", "tfcovid.cli", "export", str(run), str(tmp_path / f"tfl{level}"), "--format",
             "tflite"], capture_output=True, text=True, timeout=600, env=environ, check=False)
        assert outs[level].returncode == 0, outs[level].stderr
        assert "reloaded and checked" in outs[level].stdout
    assert "XNNPACK" not in outs["2"].stderr, outs["2"].stderr
    assert XNNPACK in outs["0"].stderr
