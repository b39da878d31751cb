"""A run's guards: one training process per run directory (issue 22.3), a full disk mid-run
(22.6), cheap checks before the weights (27.1), the skipped-file list when a run stops before
training (27.2) and counts in words (27.6)."""

import errno
import io
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from tfcovid import config
from tfcovid.cli import main
from tfcovid.data import checks
from tfcovid.data.types import DataError
from tfcovid.training import finish, inputs, preflight, run_state, train
from tfcovid.training.preflight import PreflightError
from tfcovid.utils import atomic, run_lock
from tfcovid.utils.text import plural
from tfcovid.weights import loading

HOLDER = """
import sys, time
from tfcovid.utils.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _exp(tree, out, **extra):
    flags = {"data.dir": str(tree), "data.image_size": 16, "model.backbone": "resnet18",
             "model.freeze": "none", "model.weights": "none", "train.epochs": 1,
             "train.batch_size": 2, "train.optimizer": "adam", "train.lr": 1e-3, "out": str(out)}
    flags.update(extra)
    return config.resolve(None, flags)


def _hold(run: Path) -> subprocess.Popen:
    """Another process holding the run's lock, as a training `fit` does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no clean-up runs in the holder
    proc.wait(timeout=30)


# ----------------------------------------------------------------------------- 22.3 the lock


def test_a_second_trainer_is_refused_with_the_holders_pid_until_it_is_killed(binary_tree, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    inputs.write_config(run, _exp(binary_tree, tmp_path))  # a run that --resume can read
    holder = _hold(run)
    try:
        with pytest.raises(run_lock.RunLocked, match=rf"^{run} is in use: process {holder.pid} is "
                                                     rf"training in it\. Wait for it to end \(or stop "
                                                     rf"it: kill {holder.pid}\)"):
            run_lock.RunLock(run).acquire()
        result = CliRunner().invoke(main, ["fit", "--resume", str(run)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert errors == [f"Error: {run} is in use: process {holder.pid} is training in it. Wait for it "
                          f"to end (or stop it: kill {holder.pid}); two processes training one run "
                          "would overwrite each other's checkpoints."]
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml"]  # nothing written
    finally:
        _kill(holder)
    with run_lock.RunLock(run) as lock:  # the kernel dropped the killed holder's lock
        assert lock.path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(run_lock.RunLocked, match=f"process {os.getpid()} "):  # one per run, here too
            run_lock.RunLock(run).acquire()
    assert not (run / ".lock").exists()  # released: the file goes with it


# ----------------------------------------------------------------------------- 22.6 full disk


@pytest.mark.parametrize("err, full", [
    (OSError(errno.ENOSPC, "No space left on device", "/r/last.keras"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError("Unable to synchronously create file (file write failed: errno = 28)"), True),  # h5py
    (tf.errors.ResourceExhaustedError(None, None, "/r/cache/x; No space left on device"), True),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (OSError(errno.EIO, "Input/output error"), False),
    (ValueError("no space here"), False),
    (DataError("Could not write the list: [Errno 28] No space left on device"), False),  # tfcovid's own
])
def test_disk_full_is_told_from_other_errors(err, full):
    assert atomic.disk_full(err) is full
    try:  # also when wrapped by another error
        try:
            raise err
        except Exception as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert atomic.disk_full(outer) is full


def test_an_error_raised_from_none_hides_the_full_disk_it_handled():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise DataError("3 files cannot be used: ... Could not write the list") from None
    except DataError as err:
        assert atomic.disk_full(err) is False  # its own message (the file list) is what counts


@pytest.mark.slow
def test_a_full_disk_keeps_epoch_1_and_a_locked_run_is_read_but_not_resumed(binary_tree, tmp_path,
                                                                              monkeypatch):
    """One run, three guards (one fit and one resume, to keep the suite short):

    1. ENOSPC while epoch 2's last.keras is written: a message, not a traceback, naming what
       happened, the epoch kept and the resume command (issue 22.6);
    2. another process holding the run: predict, evaluate and export read it; a resume is
       refused with the holder's PID (22.3);
    3. the holder SIGKILLed: the resume takes the lock, holds it while it trains and
       evaluates, finishes the run and lets the lock go.
    """
    real_save, calls = keras.Model.save, []

    def save_until_full(model, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) == 2:
            Path(filepath).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device", filepath)
        return real_save(model, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", save_until_full)
    inputs.write_config(tmp_path, _exp(binary_tree, tmp_path / "runs", **{"train.epochs": 2, "model.freeze": "all"}))
    result = CliRunner().invoke(main, ["fit", "--config", str(tmp_path / "config.yaml")])
    monkeypatch.setattr(keras.Model, "save", real_save)
    run = next((tmp_path / "runs").iterdir())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output[result.output.index("Error: "):] == (
        f"Error: No space left on the device holding {run} (writing {run / 'checkpoints' / 'last.keras'}). "
        f"Epoch 1 of 2 is saved in {run} (checkpoints/, backup/); the epoch being written is discarded. "
        f"Free space there, then resume with:\n  tfcovid fit --resume {run}\n")
    assert "images: train 8, validation 4, test 4)" in result.output  # issue 27.6: not a dict
    assert run_state.load_state(run)["epochs_done"] == 1
    assert not list(run.rglob(atomic.PARTIAL_PREFIX + "*"))  # the half-written file is gone
    assert not (run / ".lock").exists()  # the lock went with the process's fit

    holder = _hold(run)
    try:
        image = next((binary_tree / "test" / "normal").iterdir())
        predicted = CliRunner().invoke(main, ["predict", str(run), str(image), "--csv", str(tmp_path / "p.csv")])
        assert predicted.exit_code == 0, predicted.output
        assert f"Wrote 1 row to {tmp_path / 'p.csv'}" in predicted.output  # issue 27.6: not "1 rows"
        evaluated = CliRunner().invoke(main, ["evaluate", str(run), "--split", "test"])
        assert evaluated.exit_code == 0 and "test: 4 images;" in evaluated.output, evaluated.output
        exported = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "export")])
        assert exported.exit_code == 0, exported.output
        with pytest.raises(train.TrainingError, match=f"process {holder.pid} is training in it"):
            train.fit(config.resolve(run / "config.yaml"), run_dir=run, log=lambda line: None)
    finally:
        _kill(holder)

    real_evaluate, evaluated_splits = finish.evaluate_split, []

    def evaluate_while_locked(*args, **kwargs):
        with pytest.raises(run_lock.RunLocked, match=f"process {os.getpid()} is training in it"):
            run_lock.RunLock(run).acquire()
        evaluated_splits.append(args[1].name)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(finish, "evaluate_split", evaluate_while_locked)
    resumed = CliRunner().invoke(main, ["fit", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 1" in resumed.output and (run / "metrics.json").is_file()
    assert evaluated_splits == ["train", "validation", "test"] and not (run / ".lock").exists()
    assert [row["epoch"] for row in run_state.load_state(run)["history"]] == [0, 1]
    keras.models.load_model(run / "checkpoints" / "last.keras", compile=False)


def test_a_full_disk_before_training_leaves_nothing_and_says_so(binary_tree, tmp_path, monkeypatch):
    def full(run, exp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inputs, "write_config", full)
    with pytest.raises(train.TrainingError) as caught:
        train.fit(_exp(binary_tree, tmp_path / "runs"), log=lambda line: None)
    assert str(caught.value) == (f"No space left on the device holding {tmp_path / 'runs'}, before "
                                 "training started; nothing was written. Free space there (or choose "
                                 "another --out) and start again.")
    assert list((tmp_path / "runs").iterdir()) == []


def test_ctrl_c_while_the_data_is_scanned_is_a_message(binary_tree, tmp_path, monkeypatch):
    import signal
    import time

    def interrupted_scan(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # not reached

    monkeypatch.setattr(inputs, "load_manifest", interrupted_scan)
    with pytest.raises(train.Interrupted) as caught:
        train.fit(_exp(binary_tree, tmp_path / "runs"), log=lambda line: None)
    assert str(caught.value) == "Stopped by SIGINT before training started; nothing was written."
    assert caught.value.exit_code == 130 and not (tmp_path / "runs").exists()


Usage = namedtuple("Usage", "total used free")


def test_the_space_check_on_resume_counts_the_runs_checkpoints_and_never_advises_out(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "backup").mkdir()
    (run / "checkpoints" / "last.keras").write_bytes(b"x" * 300)
    os.link(run / "checkpoints" / "last.keras", run / "checkpoints" / "best.keras")  # counted once
    (run / "backup" / "epoch-0001.weights.h5").write_bytes(b"x" * 200)
    assert preflight.held_bytes(run) == 500
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**12, 0, 600))
    preflight.check_free_disk(run, 1100, resume=True)  # 600 free + 500 replaced: exactly enough
    with pytest.raises(PreflightError) as caught:
        preflight.check_free_disk(run, 1101, resume=True)
    assert str(caught.value).endswith(f"free space there, then resume again: tfcovid fit --resume {run}.")
    assert "--out" not in str(caught.value)
    with pytest.raises(PreflightError, match="choose another --out"):  # a new run: --out is the way
        preflight.check_free_disk(run, 601)


# ----------------------------------------------------------------------------- 27.1 / 27.2


def test_data_and_batch_are_checked_before_the_weights_are_fetched(binary_tree, tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(loading, "fetch_imagenet", lambda backbone: fetched.append(backbone))
    monkeypatch.chdir(tmp_path)
    imagenet = {"model.backbone": "vgg16", "model.weights": "imagenet", "data.image_size": 32}
    with pytest.raises(DataError, match=r"^Data folder not found: .*no/such/folder\. Pass --data DIR"):
        train.fit(_exp("no/such/folder", tmp_path / "runs", **imagenet), log=lambda line: None)
    with pytest.raises(PreflightError, match=r"--batch-size 9 is larger than the train split \(8 images\)"):
        train.fit(_exp(binary_tree, tmp_path / "runs", **imagenet, **{"train.batch_size": 9}),
                  log=lambda line: None)
    result = CliRunner().invoke(main, ["fit", "--data", "no/such/folder", "--epochs", "1"])
    assert result.exit_code == 1 and "Error: Data folder not found" in result.output, result.output
    assert "download" not in result.output and fetched == []
    assert not (tmp_path / "runs").exists()


def _with_bad_files(tree, root: Path) -> Path:
    """A copy of ``tree`` with two truncated JPEGs in train/ (one with a newline in its name)."""
    shutil.copytree(tree, root)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(buffer, "JPEG")
    for name in ("cut.jpg", "new\nline.jpg"):
        (root / "train" / "infected" / name).write_bytes(buffer.getvalue()[:300])
    return root


def test_a_batch_too_large_for_the_data_stops_before_the_file_check(binary_tree, tmp_path, monkeypatch):
    data = _with_bad_files(binary_tree, tmp_path / "data")
    monkeypatch.setattr(checks, "verify", lambda *a, **k: pytest.fail("checked every file first"))
    lines = []
    with pytest.raises(PreflightError, match=r"--batch-size 11 is larger than the train split \(10 images\)"):
        train.fit(_exp(data, tmp_path / "runs", **{"data.skip_bad": True, "train.batch_size": 11}),
                  log=lines.append)
    assert not any("Left out" in line for line in lines) and not (tmp_path / "runs").exists()


def test_the_left_out_files_are_printed_when_the_run_stops_before_training(binary_tree, tmp_path):
    """--skip-bad leaves two files out, then the batch (10) no longer fits the train split (8):
    the run goes, and the names it listed in its skipped.txt are printed, escaped."""
    data = _with_bad_files(binary_tree, tmp_path / "data")
    lines = []
    with pytest.raises(PreflightError, match=r"--batch-size 10 is larger than the train split \(8 images\)"):
        train.fit(_exp(data, tmp_path / "runs", **{"data.skip_bad": True, "train.batch_size": 10}),
                  log=lines.append)
    assert list((tmp_path / "runs").iterdir()) == []  # the run (and its skipped.txt) is removed
    at = lines.index("      the 2 unusable files that --skip-bad left out (its skipped.txt went with the run):")
    shown = lines[at + 1:at + 3]
    folder = data / "train" / "infected"
    assert [line.split(": ", 1)[0] for line in shown] == [f"        {folder}/cut.jpg",
                                                         f"        {folder}/new\\nline.jpg"]
    assert all("truncated or corrupt" in line for line in shown)


# ----------------------------------------------------------------------------- 27.6 wording


@pytest.mark.parametrize("n, text", [(0, "0 epochs"), (1, "1 epoch"), (2, "2 epochs"), (1000, "1,000 epochs")])
def test_plural(n, text):
    assert plural(n, "epoch") == text


def test_one_image_is_one_image():
    with pytest.raises(PreflightError, match=r"train split \(1 image\); use --batch-size 1 or less"):
        preflight.check_batch_size({"train": 1}, 2)
    assert inputs.describe_sizes({"train": 1200, "validation": 1, "test": 0}) == "train 1,200, validation 1, test 0"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_on_a_virtual_file_system_names_the_folder_and_what_to_do():
    with pytest.raises(PreflightError) as caught:
        preflight.check_output_dir("/proc/tfcovid-runs")
    assert str(caught.value) == (
        "--out /proc/tfcovid-runs: cannot create the folder /proc/tfcovid-runs: /proc takes no new "
        "folders (No such file or directory; a virtual file system such as /proc or /sys). Choose "
        "another --out, a folder on a disk (e.g. --out runs).")
