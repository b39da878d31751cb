"""Up-front checks (issue 8, section 5): output folder, free disk, batch size. No training."""

import errno
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from tfcovid.training import preflight
from tfcovid.training.preflight import PreflightError

# --- output folder ---


def test_missing_out_is_checked_and_nothing_is_left_behind(tmp_path):
    out = tmp_path / "a" / "b" / "runs"
    assert preflight.check_output_dir(out) == out
    assert not (tmp_path / "a").exists()  # the probe's folders are removed again


def test_existing_out_keeps_its_content_and_no_probe(tmp_path):
    (tmp_path / "old-run").mkdir()
    assert preflight.check_output_dir(tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old-run"]


def test_relative_out_comes_back_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert preflight.check_output_dir("runs") == tmp_path / "runs"


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("x")
    with pytest.raises(PreflightError, match=rf"--out {tmp_path / 'runs'} is a file, not a folder"):
        preflight.check_output_dir(tmp_path / "runs")


def test_out_below_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PreflightError, match=rf"cannot be created: {tmp_path / 'notes.txt'} is a file"):
        preflight.check_output_dir(tmp_path / "notes.txt" / "runs")


@pytest.mark.parametrize("err, reason", [
    (PermissionError(errno.EACCES, "Permission denied", "/x/probe"), r"Permission denied \(writing /x/probe\)"),
    (PermissionError(errno.EPERM, "Operation not permitted"), "Permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
])
def test_unwritable_out_is_reported_with_the_reason(tmp_path, monkeypatch, err, reason):
    def refuse(folder):
        raise err

    monkeypatch.setattr(preflight, "_write_probe", refuse)
    out = tmp_path / "new" / "runs"
    with pytest.raises(PreflightError, match=rf"--out {out}: cannot write in {out}: {reason}\. "
                                             "Choose another --out"):
        preflight.check_output_dir(out)
    assert not (tmp_path / "new").exists()


def test_a_real_os_failure_is_caught(tmp_path):
    # Works as root too: a folder name over the file system's 255-byte limit.
    with pytest.raises(PreflightError, match="cannot write in .*File name too long"):
        preflight.check_output_dir(tmp_path / ("x" * 300) / "runs")


_AS_NOBODY = """
import os, sys
from tfcovid.training import preflight
os.setgid(65534); os.setuid(65534)  # root writes through mode bits; nobody does not
try:
    preflight.check_output_dir(sys.argv[1])
except preflight.PreflightError as err:
    print(err)
"""


def test_read_only_folder_by_permissions():
    """A real permission failure: directly, or as user nobody when the tests run as root."""
    import subprocess
    import sys
    import tempfile

    parent = Path(tempfile.mkdtemp(prefix="tfcovid-perm-", dir="/tmp"))
    locked = parent / "locked"
    locked.mkdir()
    parent.chmod(0o755)
    locked.chmod(0o555)
    expected = rf"cannot write in {locked}: Permission denied"
    try:
        if os.geteuid() != 0:
            with pytest.raises(PreflightError, match=expected):
                preflight.check_output_dir(locked / "runs")
        else:
            done = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(locked / "runs")],
                                  capture_output=True, text=True, timeout=60)
            assert re.search(expected, done.stdout), done.stdout + done.stderr
    finally:
        locked.chmod(0o700)
        shutil.rmtree(parent)


# --- checkpoint size ---

VGG16_BINARY = 17_474_700  # DESIGN.md: VGG16 binary at 224 px
VGG16_HEAD = 25088 * 110 + 110 + 110 * 2 + 2  # Dense(110) on the 7x7x512 flatten, Dense(2)
MIB64 = 64 * 2**20


@pytest.mark.parametrize("trainable, optimizer, momentum, expected", [
    # 4 copies x 4 bytes x (weights + slots x trainable) + 64 MiB
    (VGG16_BINARY, "sgd", 0.9, 4 * 4 * (VGG16_BINARY + VGG16_BINARY) + MIB64),  # 626,299,264
    (VGG16_BINARY, "sgd", 0.0, 4 * 4 * VGG16_BINARY + MIB64),
    (VGG16_BINARY, "adam", 0.9, 4 * 4 * (VGG16_BINARY + 2 * VGG16_BINARY) + MIB64),
    (VGG16_HEAD, "adam", 0.9, 4 * 4 * (VGG16_BINARY + 2 * VGG16_HEAD) + MIB64),
])
def test_checkpoint_bytes_formula_for_vgg16(trainable, optimizer, momentum, expected):
    assert preflight.checkpoint_bytes(VGG16_BINARY, trainable, optimizer, momentum) == expected


def test_checkpoint_bytes_numbers():
    assert preflight.checkpoint_bytes(VGG16_BINARY, VGG16_BINARY, "sgd", 0.9) == 626_299_264
    assert preflight.checkpoint_bytes(VGG16_BINARY, VGG16_BINARY, "adam", 0.9) == 905_894_464
    assert VGG16_HEAD == 2_760_012


def test_one_copy_matches_a_real_keras_file_with_adam(tmp_path):
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dense(128)])
    model.layers[0].trainable = False
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(np.zeros((4, 64)), np.zeros((4, 128)), epochs=1, verbose=0)  # creates the slots
    model.save(tmp_path / "m.keras")
    total, trainable = model.count_params(), 256 * 128 + 128
    copy = (preflight.checkpoint_bytes(total, trainable, "adam", 0.9) - MIB64) // 4
    assert 0.9 * copy < (tmp_path / "m.keras").stat().st_size <= 1.05 * copy


# --- free disk ---

Usage = namedtuple("Usage", "total used free")


def test_too_little_disk_names_both_sizes_and_the_folder(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(preflight.shutil, "disk_usage",
                        lambda p: asked.append(p) or Usage(10**12, 10**12 - 10**8, 10**8))
    with pytest.raises(PreflightError, match=rf"needs about 0\.84 GB for checkpoints \(best, last, "
                                             rf"backup\), only 0\.10 GB free on {tmp_path}; free "
                                             "space or choose another --out"):
        preflight.check_free_disk(tmp_path / "runs" / "not-yet", 840_000_000)
    assert asked == [tmp_path]  # the nearest folder that exists


def test_enough_disk_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**12, 0, 10**9))
    preflight.check_free_disk(tmp_path, 10**9)  # exactly enough
    with pytest.raises(PreflightError):
        preflight.check_free_disk(tmp_path, 10**9 + 1)


def test_real_disk_usage_is_read(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    preflight.check_free_disk(tmp_path, 1)
    with pytest.raises(PreflightError, match="GB free on"):
        preflight.check_free_disk(tmp_path, free * 1000)


# --- batch size ---

def test_batch_larger_than_train_split():
    with pytest.raises(PreflightError, match=r"^--batch-size 64 is larger than the train split "
                                             r"\(10 images\); use --batch-size 10 or less\.$"):
        preflight.check_batch_size({"train": 10, "validation": 100, "test": 100}, 64)


def test_batch_equal_to_train_split_is_fine():
    preflight.check_batch_size({"train": 64}, 64)


def test_small_validation_and_test_splits_are_fine():
    # Evaluation takes a partial batch, so only the train split must hold a whole batch.
    preflight.check_batch_size({"train": 100, "validation": 5, "test": 3}, 60)
    with pytest.raises(PreflightError, match="train split"):
        preflight.check_batch_size({"train": 59, "validation": 5, "test": 3}, 60)
