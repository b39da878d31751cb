"""What a run keeps on disk so that a kill at any moment loses at most the epoch in progress.

Every file a run rewrites is written whole to a temporary file in the same folder, flushed to
disk, and then renamed over the old one (``os.replace`` is atomic), so a reader — or a resumed
run — sees the old file or the new one, never half of one. At the end of each epoch
:class:`RunState` writes, in this order:

1. ``checkpoints/last.keras``, and ``checkpoints/best.keras`` when the monitored value improved
   (the model's task and label names are put into the file before it is renamed into place);
2. ``backup/epoch-NNNN.weights.h5``: weights and optimizer state after epoch NNNN;
3. ``backup/state.json``, the commit point: epochs completed, the best value so far, every
   epoch's metrics and duration, and which weights file belongs to them;
4. ``history.csv``, rebuilt from ``state.json``; older backup weights are removed.

A kill before step 3 leaves the previous epoch committed: ``tfcovid fit --resume`` restores
it and runs the lost epoch again (rewriting 1 and 2). A kill after it loses nothing.
``history.csv`` is rebuilt from ``state.json`` on resume, so it holds each epoch exactly once.

SIGTERM and Ctrl-C (:class:`StopOnSignal`) stop training at the next batch boundary without
committing the partial epoch, and ``fit`` prints the command that resumes the run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import keras

from tfcovid.utils.atomic import atomic_save, atomic_write_text, remove_partials
from tfcovid.utils.signals import DeferSignals

STATE_FILE = "state.json"


def load_state(run: str | Path) -> dict | None:
    """The committed state of a run (None before its first epoch completed)."""
    path = Path(run) / "backup" / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:  # cannot happen through atomic_save; say so if it does
        raise ValueError(f"{path} is damaged ({err}); the run cannot be resumed.") from None
    return state


def history_csv(rows: list[dict]) -> str:
    """The rows as Keras's CSVLogger writes them: ``epoch`` then the metric names, sorted."""
    keys = sorted({k for row in rows for k in row if k != "epoch"})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for row in rows:
        writer.writerow([row["epoch"], *(row.get(k, "") for k in keys)])
    return out.getvalue()


def _finite(logs: dict, key: str = "loss") -> bool:
    value = logs.get(key)
    return value is None or math.isfinite(float(value))


class RunState(keras.callbacks.Callback):
    """Checkpoints, the resume backup and history.csv, written atomically at each epoch's end.

    Args:
        run: the run directory.
        embed: called with each new ``.keras`` file before it is renamed into place (writes
            the model's task and label names into it).
        monitor: the value whose minimum (``mode`` "max": maximum) picks ``best.keras``.
        data: the train and validation splits' ``data_signature``, committed with each epoch
            so that a resume can tell whether it is given the same data.
    """

    def __init__(self, run: str | Path, embed: Callable[[Path], None] | None = None,
                 monitor: str = "val_loss", data: dict | None = None, mode: str = "min"):
        super().__init__()
        self.mode = mode
        self.data = data  # what the run trains on (``data_signature``), kept in every commit
        self.run = Path(run)
        self.backup = self.run / "backup"
        self.checkpoints = self.run / "checkpoints"
        self.embed = embed or (lambda path: None)
        self.monitor = monitor
        self.state = {"epochs_done": 0, "best": None, "monitor": monitor, "weights": None,
                      "history": [], "seconds": []}

    # ------------------------------------------------------------------ resume
    def restore(self, model: keras.Model) -> int:
        """Load the committed state into ``model``; return the epoch to start from.

        Temporary files of a killed process are removed, and history.csv is rebuilt from the
        committed epochs (dropping a row written after the last commit, adding one lost
        before its file was rewritten).
        """
        self.backup.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        remove_partials(self.run)
        state = load_state(self.run)
        if state is None:
            return 0
        weights = self.backup / state["weights"]
        if not weights.is_file():
            raise ValueError(f"{weights} named by {self.backup / STATE_FILE} is missing; the run "
                             "cannot be resumed.")
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(str(weights))
        self.state = state
        atomic_write_text(self.run / "history.csv", history_csv(state["history"]))
        return int(state["epochs_done"])

    @property
    def seconds(self) -> list[float]:
        """Each completed epoch's duration (validation included), across resumes."""
        return list(self.state["seconds"])

    # ------------------------------------------------------------------ callback
    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if not _finite(logs):  # the NaN guard stops the run; keep the last good epoch
            return
        seconds = time.perf_counter() - self._start
        value = logs.get(self.monitor)
        best = self.state["best"]
        improved = value is not None and math.isfinite(value) and (
            best is None or (value > best if self.mode == "max" else value < best))

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        last = self._save_model(self.checkpoints / "last.keras")
        if improved:  # the same bytes: a second name for the file, not a second save
            atomic_save(self.checkpoints / "best.keras", lambda tmp: _link_or_copy(last, tmp))
        weights_name = f"epoch-{epoch + 1:04d}.weights.h5"
        self.backup.mkdir(parents=True, exist_ok=True)
        atomic_save(self.backup / weights_name, lambda tmp: self.model.save_weights(str(tmp)))

        state = dict(self.state)
        state.update(
            epochs_done=epoch + 1,
            best=value if improved else best,
            weights=weights_name,
            history=[row for row in state["history"] if row["epoch"] < epoch] + [{"epoch": epoch, **logs}],
            seconds=state["seconds"][:epoch] + [round(seconds, 3)],
        )
        if self.data is not None:
            state["data"] = self.data
        atomic_write_text(self.backup / STATE_FILE, json.dumps(state, indent=1))  # the commit
        self.state = state
        atomic_write_text(self.run / "history.csv", history_csv(state["history"]))
        for old in self.backup.glob("epoch-*.weights.h5"):
            if old.name != weights_name:
                old.unlink(missing_ok=True)

    def _save_model(self, path: Path) -> Path:
        def write(tmp: Path) -> None:
            self.model.save(str(tmp))
            self.embed(tmp)

        return atomic_save(path, write)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy where the file system has no hard links).

    Safe for checkpoints because they are never changed in place: the next epoch's last.keras
    is a new file renamed over the name, so best.keras keeps the old content.
    """
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class StopOnSignal(DeferSignals, keras.callbacks.Callback):
    """Turn SIGTERM / SIGINT (Ctrl-C) into a clean stop at the next batch or epoch boundary, so
    the last committed epoch stays intact (see :class:`~tfcovid.utils.signals.DeferSignals`)."""

    on_train_batch_end = on_test_batch_end = on_epoch_begin = on_epoch_end = DeferSignals.check


def data_signature(manifest) -> dict:
    """What the run trains on, by split: the class folders, the image count and a digest of
    the sorted file names relative to the data's root (so a moved copy of the data matches)."""
    root = str(manifest.root).rstrip("/") + "/"
    signature = {"class_names": list(manifest.class_names)}
    for name in ("train", "validation"):
        split = manifest.splits.get(name)
        if split is None:
            continue
        names = sorted(p[len(root):] if p.startswith(root) else p for p in map(str, split.paths))
        digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        signature[name] = {"images": len(names), "files": digest}
    return signature


def data_changes(recorded: dict | None, current: dict) -> list[str]:
    """How ``current`` differs from the ``recorded`` signature, in words ([] when it does not,
    or when the run recorded none: runs from before this check)."""
    if not recorded:
        return []
    changes = []
    if recorded.get("class_names") != current.get("class_names"):
        changes.append(f"class folders {recorded.get('class_names')} -> {current.get('class_names')}")
    for name in ("train", "validation"):
        was, now = recorded.get(name) or {}, current.get(name) or {}
        if was.get("images") != now.get("images"):
            changes.append(f"{name} {was.get('images')} -> {now.get('images')} images")
        elif was.get("files") != now.get("files"):
            changes.append(f"{name}: other file names ({now.get('images')} images, as before)")
    return changes
