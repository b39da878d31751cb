"""Nothing lost: atomic writes, SIGKILL / SIGTERM / Ctrl-C and resume, seeded determinism.

The kill tests run `tfcovid fit` as a real process (ResNet18 at 16 px on 16 tiny images,
about 15 s each) and compare weights tensor by tensor with an uninterrupted run.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import yaml

from tfcovid import config
from tfcovid.utils import atomic, signals
from tfcovid.data import demo
from tfcovid.training import finish, run_state, train


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """16 train images (8 per class): 8 steps per epoch at batch 2, so kills land mid-epoch."""
    return demo.make_demo_data(tmp_path_factory.mktemp("data") / "binary", "binary", per_class=8,
                               image_size=(40, 72))


def _config(tree, out: Path, seed: int = 3, epochs: int = 3, freeze: str = "none") -> dict:
    """freeze "all" (only the head trains: a cheaper fit) where the test is about the process,
    not the weights."""
    return {"out": str(out),
            "data": {"dir": str(tree), "image_size": 16},
            "model": {"backbone": "resnet18", "freeze": freeze, "weights": "none"},
            "train": {"epochs": epochs, "batch_size": 2, "optimizer": "adam", "lr": 1e-3,
                      "seed": seed, "deterministic": True}}


def _write_config(tmp_path: Path, tree, out: Path, **kw) -> Path:
    path = tmp_path / f"config-{out.name}.yaml"
    path.write_text(yaml.safe_dump(_config(tree, out, **kw)))
    return path


def _start(args, tmp_path):
    log = open(tmp_path / f"log-{time.monotonic_ns()}.txt", "w+")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "tfcovid.cli", "fit", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    return proc, log


def _output(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def _wait_for_epochs(out: Path, n: int, proc, timeout: float = 240) -> Path:
    """Wait until a run under ``out`` has committed ``n`` epochs; return the run directory."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for state_file in out.glob("*/backup/state.json"):
            if json.loads(state_file.read_text())["epochs_done"] >= n:
                return state_file.parent.parent
        assert proc.poll() is None, "fit ended before it was interrupted"
        time.sleep(0.02)
    raise AssertionError(f"no epoch committed under {out} in {timeout} s")


def _weights(run: Path) -> list:
    import keras

    model = keras.models.load_model(run / "checkpoints" / "last.keras", compile=False)
    return model.get_weights()


def _max_diff(a: list, b: list) -> float:
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def _history_epochs(run: Path) -> list[str]:
    return [line.split(",")[0] for line in (run / "history.csv").read_text().strip().splitlines()[1:]]


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_save_keeps_the_old_file_when_the_writer_dies(tmp_path):
    path = tmp_path / "metrics.json"
    atomic.atomic_write_text(path, '{"ok": 1}')

    def dies_halfway(tmp):
        tmp.write_text('{"half')
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_save(path, dies_halfway)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp file left


def test_resume_cleans_partials_and_rebuilds_history_from_the_commit(tmp_path):
    """What a kill between a checkpoint write and the commit leaves behind is put right."""
    run = tmp_path / "run"
    (run / "backup").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".partial-last.keras").write_bytes(b"half a zip")
    rows = [{"epoch": 0, "loss": 0.7, "val_loss": 0.6}, {"epoch": 1, "loss": 0.5, "val_loss": 0.55}]
    # history.csv already has epoch 2's row, but the kill came before epoch 2 was committed.
    (run / "history.csv").write_text(run_state.history_csv(rows + [{"epoch": 2, "loss": 0.4, "val_loss": 0.5}]))

    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.save_weights(str(run / "backup" / "epoch-0002.weights.h5"))
    state = {"epochs_done": 2, "best": 0.55, "monitor": "val_loss", "weights": "epoch-0002.weights.h5",
             "history": rows, "seconds": [1.0, 1.5]}
    (run / "backup" / "state.json").write_text(json.dumps(state))
    restored = run_state.RunState(run)
    assert restored.restore(model) == 2
    assert not (run / "checkpoints" / ".partial-last.keras").exists()
    assert _history_epochs(run) == ["0", "1"] and restored.seconds == [1.0, 1.5]


def test_a_missing_backup_weights_file_is_named(tmp_path):
    run = tmp_path / "run"
    (run / "backup").mkdir(parents=True)
    (run / "backup" / "state.json").write_text(json.dumps(
        {"epochs_done": 1, "best": None, "weights": "epoch-0001.weights.h5", "history": [], "seconds": []}))
    with pytest.raises(ValueError, match="epoch-0001.weights.h5 .* is missing"):
        run_state.RunState(run).restore(None)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_seeded_deterministic_runs_give_the_same_weights(binary_tree, tmp_path):
    runs = []
    for name, seed, epochs, freeze in (("a", 3, 2, "none"), ("b", 3, 2, "none"), ("c", 4, 1, "all")):
        exp = config.from_dict(_config(binary_tree, tmp_path / name, seed=seed, epochs=epochs, freeze=freeze))
        runs.append(train.fit(exp, log=lambda s: None))
    a, b, c = (_weights(run) for run in runs)
    assert _max_diff(a, b) == 0.0
    assert _max_diff(a, c) > 1e-4  # another seed (length, freeze): another run, so the comparison can fail


def test_training_batches_come_in_a_fixed_order_by_default(binary_tree):
    """Every parallel map of the training pipeline keeps its order unless asked not to: with
    order left to the scheduler, two seeded runs of the demo differed from epoch 1 under load
    (issue 27.8); with it fixed they give equal histories without --deterministic."""
    import tensorflow as tf

    from tfcovid.data import datasets, folders

    split = folders.scan(binary_tree).splits["train"]

    def orders(**kw):
        ds = datasets.dataset(split, 24, 3, training=True, aug=config.AugmentConfig(), seed=5,
                              epoch=tf.Variable(0, dtype=tf.int64), **kw)
        graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        return [n.attr["deterministic"].s.decode() for n in nodes if "deterministic" in n.attr]

    assert orders() and set(orders()) == {"true"}
    assert set(orders(deterministic=False)) == {"false"}  # the opt-out reaches the same maps


def test_shuffle_and_augmentation_are_keyed_on_the_epoch(binary_tree):
    """The train pipeline's epoch k is the same in any process, whatever ran before it."""
    import tensorflow as tf

    from tfcovid.data import datasets, folders

    split = folders.scan(binary_tree).splits["train"]

    def epoch_batches(k):
        epoch = tf.Variable(k, dtype=tf.int64)
        ds = datasets.dataset(split, 24, 3, training=True, aug=config.AugmentConfig(), seed=5,
                          epoch=epoch, deterministic=True)
        return [(x.numpy(), y.numpy()) for x, y in ds]

    first, again, other = epoch_batches(1), epoch_batches(1), epoch_batches(2)
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert any(not np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(first, other))
    assert sum(len(y) for _, y in first) == len(split)


# ----------------------------------------------------------------------------- kills


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tree, tmp_path):
    reference, log_ref = _start(["--config", str(_write_config(tmp_path, tree, tmp_path / "ref"))], tmp_path)
    killed, log = _start(["--config", str(_write_config(tmp_path, tree, tmp_path / "kill"))], tmp_path)
    run = _wait_for_epochs(tmp_path / "kill", 1, killed)
    time.sleep(0.3)  # into epoch 2
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert json.loads((run / "backup" / "state.json").read_text())["epochs_done"] in (1, 2)
    assert not (run / "metrics.json").exists()

    resumed, log_resumed = _start(["--resume", str(run)], tmp_path)
    assert resumed.wait(300) == 0, _output(log_resumed)
    assert reference.wait(300) == 0, _output(log_ref)
    assert "resuming after epoch" in _output(log_resumed)
    assert "the backup's weights (the run started from random initialisation" in _output(log_resumed)
    assert _history_epochs(run) == ["0", "1", "2"]  # each epoch exactly once
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    (ref_run,) = (tmp_path / "ref").iterdir()
    assert _max_diff(_weights(run), _weights(ref_run)) < 1e-6
    assert not list(run.rglob(atomic.PARTIAL_PREFIX + "*"))
    seconds = json.loads((run / "backup" / "state.json").read_text())["seconds"]
    assert len(seconds) == 3 and json.loads((run / "metrics.json").read_text())["train_seconds"] == \
        pytest.approx(sum(seconds), abs=0.01)  # time of both sessions
    exp = config.from_dict(config.load_yaml(run / "config.yaml"))
    with pytest.raises(train.TrainingError, match="has finished"):
        train.fit(exp, run_dir=run, log=lambda s: None)


def test_ctrl_c_stops_at_the_next_batch_and_restores_the_handler():
    import keras

    class CtrlC(keras.callbacks.Callback):
        batches = []

        def on_train_batch_end(self, batch, logs=None):
            self.batches.append(batch)
            if batch == 2:
                os.kill(os.getpid(), signal.SIGINT)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((20, 3), "float32"), np.zeros((20, 1), "float32")
    stop = run_state.StopOnSignal()
    # Python's own handler, or SIG_IGN where the suite runs as a shell's background job.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(signals.Interrupted) as caught:
        with stop:
            model.fit(x, y, batch_size=2, epochs=3, callbacks=[CtrlC(), stop], verbose=0)
    assert CtrlC.batches == [0, 1, 2]  # stopped at the batch the signal arrived in
    assert caught.value.exit_code == 130 and caught.value.name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)])
def test_sigterm_stops_cleanly_and_prints_the_resume_command(tree, tmp_path, sig, code):
    out = tmp_path / "runs"
    proc, log = _start(["--config", str(_write_config(tmp_path, tree, out, epochs=30, freeze="all"))], tmp_path)
    run = _wait_for_epochs(out, 1, proc)
    proc.send_signal(sig)
    assert proc.wait(120) == code
    text = _output(log)
    assert f"tfcovid fit --resume {run}" in text and signal.Signals(sig).name in text
    assert "Traceback" not in text
    state = json.loads((run / "backup" / "state.json").read_text())
    assert state["epochs_done"] >= 1 and (run / "backup" / state["weights"]).is_file()
    done = state["epochs_done"]
    assert (f"Epochs 1-{done} are saved in {run}" if done > 1 else f"Epoch 1 is saved in {run}") in text
    # Every saved epoch printed its result line (the progress bar runs before the stop).
    assert len(re.findall(r"(?m)^\d+/\d+ - .*val_loss: ", text)) >= done, text[-3000:]
    assert _history_epochs(run) == [str(e) for e in range(done)]
    assert (run / "checkpoints" / "last.keras").is_file() and not (run / "metrics.json").exists()
    assert not list(run.rglob(atomic.PARTIAL_PREFIX + "*"))


def test_best_checkpoint_is_last_of_its_epoch_and_survives_later_epochs(tmp_path):
    # best.keras is written as a second name (hard link) of last.keras when an epoch improves;
    # a later, worse epoch must replace last.keras without touching best.keras.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head_logits")(inputs))
    model.compile(optimizer="sgd", loss="mse")
    state = run_state.RunState(tmp_path)
    state.set_model(model)
    state.on_train_begin()
    ckpt = tmp_path / "checkpoints"
    for epoch, val_loss in enumerate((0.5, 0.9)):
        state.on_epoch_begin(epoch)
        model.layers[-1].kernel.assign(np.full((3, 2), float(epoch), "float32"))
        state.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
        if epoch == 0:
            assert (ckpt / "best.keras").read_bytes() == (ckpt / "last.keras").read_bytes()
    best = keras.saving.load_model(ckpt / "best.keras")
    last = keras.saving.load_model(ckpt / "last.keras")
    np.testing.assert_array_equal(best.layers[-1].kernel.numpy(), np.zeros((3, 2)))
    np.testing.assert_array_equal(last.layers[-1].kernel.numpy(), np.ones((3, 2)))
    assert state.state["best"] == 0.5 and not list(ckpt.glob(atomic.PARTIAL_PREFIX + "*"))


def _stat(pid) -> tuple[str, int] | None:
    """(state, parent pid) of a live process (Linux /proc), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    stats = {int(e.name): _stat(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()}
    return [p for p, st in stats.items() if st and st[1] == pid and st[0] != "Z"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_resample_workers_end_with_a_stopped_or_killed_fit(tree, tmp_path):
    """data.resample_processes: a fit stopped by SIGTERM exits as usual (143, resumable) and a
    SIGKILLed one leaves no worker process behind (each ends when its task pipe closes)."""
    from tfcovid.data.opencv import process_pool

    assert process_pool.available() and Path("/proc").is_dir()  # Linux, as this project's machines
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGKILL, -9)):
        out = tmp_path / f"runs-{sig.name}"
        cfg = _config(tree, out, epochs=30, freeze="all")
        cfg["data"]["resample_processes"] = 2
        path = tmp_path / f"config-{sig.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc, log = _start(["--config", str(path)], tmp_path)
        _wait_for_epochs(out, 1, proc)
        # the two workers (the CLI's stderr filter, tf_import.py, is a child too: left out)
        helpers = [p for p in _children(proc.pid) if "tf_import.py" not in _cmdline(p)]
        assert len(helpers) == 2, _output(log)

        def alive():
            return [p for p in helpers if (_stat(p) or ("Z",))[0] != "Z"]

        proc.send_signal(sig)
        assert proc.wait(120) == code
        end = time.monotonic() + 30
        while alive() and time.monotonic() < end:
            time.sleep(0.1)
        assert alive() == [], f"{sig.name}: workers outlived the fit"
        if sig == signal.SIGTERM:
            assert "tfcovid fit --resume" in _output(log) and "Traceback" not in _output(log)


@pytest.fixture(scope="module")
def stopped_in_evaluation(tree, tmp_path_factory):
    """One 1-epoch fit stopped by SIGTERM while [6/6] evaluates its first split: training has
    ended, metrics.json is not written. Tests resume copies of its run (one fit, not one each)."""
    exp = config.from_dict(_config(tree, tmp_path_factory.mktemp("stopped") / "runs", epochs=1, freeze="all"))
    real, calls = finish.evaluate_split, []

    def evaluate_then_signal(*args, **kwargs):
        calls.append(args[1].name)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread, right away
        time.sleep(5)  # not reached: the handler raises
        return real(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finish, "evaluate_split", evaluate_then_signal)
        with pytest.raises(train.Interrupted) as caught:
            train.fit(exp, log=lambda line: None)
    return SimpleNamespace(run=next(Path(exp.out).iterdir()), caught=caught.value, calls=calls,
                           handler_restored=signal.getsignal(signal.SIGTERM) is before)


def _copy_run(run: Path, where: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, where / run.name))


def test_a_signal_during_the_final_evaluation_says_how_to_finish(stopped_in_evaluation, tmp_path):
    """SIGTERM while [6/6] evaluates the splits: a clean Interrupted with the resume command
    (it ended the process silently), then --resume evaluates and finishes without training."""
    stopped, run = stopped_in_evaluation, stopped_in_evaluation.run
    assert stopped.handler_restored  # the usual handler is back
    assert stopped.calls == ["train"] and stopped.caught.exit_code == 143
    message = str(stopped.caught)
    assert message.startswith(f"Evaluation stopped by SIGTERM. Training has finished (1 epoch, saved in {run}")
    assert f"tfcovid fit --resume {run}" in message
    assert not (run / "metrics.json").exists() and (run / "checkpoints" / "last.keras").is_file()
    assert json.loads((run / "backup" / "state.json").read_text())["epochs_done"] == 1

    run = _copy_run(run, tmp_path)
    lines = []
    assert train.fit(config.resolve(run / "config.yaml"), run_dir=run, log=lines.append) == run
    assert "[5/6] Training: done before (1 epoch); nothing left to train" in lines
    assert (run / "metrics.json").is_file()
    assert set(json.loads((run / "metrics.json").read_text())["splits"]) == {"train", "validation", "test"}


def test_resume_refuses_other_data_and_takes_a_moved_copy(tree, stopped_in_evaluation, tmp_path):
    """--resume RUN --data DIR: the same files in a new place continue; other data (another
    count, other names) is refused with what changed, instead of training on it silently."""
    import shutil

    run = _copy_run(stopped_in_evaluation.run, tmp_path)  # a run whose training has ended, without metrics.json
    assert not (run / "metrics.json").exists()
    recorded = json.loads((run / "backup" / "state.json").read_text())["data"]
    assert recorded["train"]["images"] == 16 and recorded["class_names"] == ["infected", "normal"]

    other = tmp_path / "other"
    shutil.copytree(tree, other)
    (next((other / "train" / "normal").iterdir())).unlink()
    resumed = config.resolve(run / "config.yaml")
    with pytest.raises(train.TrainingError) as err:
        train.fit(dataclasses.replace(resumed, data=dataclasses.replace(resumed.data, dir=str(other))),
                  run_dir=run, log=lambda line: None)
    assert f"The data at {other} is not what {run} trained on: train 16 -> 15 images" in str(err.value)
    renamed = tmp_path / "renamed"
    shutil.copytree(tree, renamed)
    first = next((renamed / "train" / "normal").iterdir())
    first.rename(first.with_name("zz-" + first.name))
    with pytest.raises(train.TrainingError, match="train: other file names"):
        train.fit(dataclasses.replace(resumed, data=dataclasses.replace(resumed.data, dir=str(renamed))),
                  run_dir=run, log=lambda line: None)
    assert not (run / "metrics.json").exists()

    moved = tmp_path / "moved"
    shutil.copytree(tree, moved)
    assert train.fit(dataclasses.replace(resumed, data=dataclasses.replace(resumed.data, dir=str(moved))),
                     run_dir=run, log=lambda line: None) == run
    assert (run / "metrics.json").is_file()


def test_raise_on_signal_stops_even_when_a_finalizer_swallows_its_exception():
    """The handler raises at once; where that lands in a __del__ (Python prints "Exception
    ignored" and goes on), the block still ends with Interrupted when it is left."""
    import gc

    class SignalsWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside __del__

    before = signal.getsignal(signal.SIGTERM)
    reached = []
    with pytest.raises(signals.Interrupted) as caught:
        with signals.RaiseOnSignal():
            SignalsWhenCollected()  # collected at once: its __del__ swallows the exception
            gc.collect()
            reached.append("after")  # the work goes on ...
    assert reached == ["after"] and caught.value.name == "SIGTERM"  # ... and still stops
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(signals.Interrupted):  # the ordinary case: raised where it came
        with signals.RaiseOnSignal():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            reached.append("not reached")
    assert reached == ["after"]


def test_a_signal_before_training_removes_the_half_made_run(tree, tmp_path, monkeypatch):
    """Ctrl-C during the file check (or anything else before training) stops at once with a
    message, not a KeyboardInterrupt traceback, and leaves no run holding only config.yaml."""
    from tfcovid.data import checks

    exp = config.from_dict(_config(tree, tmp_path / "runs", epochs=1))

    def interrupted_check(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # not reached

    monkeypatch.setattr(checks, "verify", interrupted_check)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(train.Interrupted) as caught:
        train.fit(exp, log=lambda line: None)
    assert signal.getsignal(signal.SIGINT) is before
    assert caught.value.exit_code == 130
    assert str(caught.value).startswith("Stopped by SIGINT before training started; nothing to keep: removed ")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())



def test_a_signal_while_fit_writes_its_results_says_what_is_kept(tmp_path, monkeypatch):
    """A SIGTERM after [6/6]'s plots said "Stopped by SIGTERM before training started" (seen
    by a user on a finished 1-epoch run); now: evaluation's message until metrics.json is
    written, after it that the run is complete and how to write the card and plots again."""
    import types as pytypes

    from tfcovid.training import stops

    def stop(*args):
        raise signals.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(finish, "_write_results", stop)
    run = pytypes.SimpleNamespace(dir=tmp_path, exp=pytypes.SimpleNamespace(train=pytypes.SimpleNamespace(epochs=3)))
    with pytest.raises(stops.Interrupted) as caught:
        finish.write_results(run, None, None, [], {})
    assert caught.value.exit_code == 143
    assert str(caught.value).startswith(f"Evaluation stopped by SIGTERM. Training has finished (3 epochs, saved in {tmp_path}")
    assert "metrics.json is not written" in str(caught.value)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(stops.Interrupted) as caught:
        finish.write_results(run, None, None, [], {})
    assert str(caught.value) == (
        f"Writing the results stopped by SIGTERM. The run is complete (3 epochs; metrics.json written in "
        f"{tmp_path}) but MODEL_CARD.md or plots/ may be missing: `tfcovid report {tmp_path}` writes the "
        f"card again, `tfcovid evaluate {tmp_path}` a split's plots.")
