"""Phase 5's callbacks for issue 25's recipes (docs/beyond.md#recipes): the learning rate in
history.csv, early stopping on a validation metric, and the weight average (EMA) swapped in
wherever weights are validated or saved. Each continues exactly after ``--resume``.
"""
from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from tfcovid.config import Experiment
from tfcovid.utils.atomic import atomic_save
from tfcovid.utils.text import plural


def monitor(exp: Experiment) -> tuple[str, str]:
    """(metric, "min" or "max") that picks ``best.keras``: the early-stopping metric, else
    the validation loss (the study's choice)."""
    metric = exp.train.early_stopping if exp.train.early_stopping != "none" else "val_loss"
    return metric, "min" if metric.endswith("loss") else "max"


def describe(exp: Experiment) -> str:
    """The recipe for phase 5's log line: "" for the study's (constant rate, no EMA, no early stop)."""
    t, parts = exp.train, []
    if t.schedule != "constant" or t.warmup_epochs:
        parts.append(f"{t.schedule} schedule" + (f" after {plural(t.warmup_epochs, 'warm-up epoch')}"
                                                 if t.warmup_epochs else ""))
    if t.ema:
        parts.append(f"weight EMA {t.ema:g}")
    if t.early_stopping != "none":
        parts.append(f"early stopping on {t.early_stopping} (patience {t.patience})")
    return "".join(f", {part}" for part in parts)


class LearningRateLog(keras.callbacks.Callback):
    """``learning_rate`` in each epoch's logs (so in history.csv): the rate after the epoch's last
    step, the value Keras's TensorBoard shows as ``epoch_learning_rate``."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(np.asarray(self.model.optimizer.learning_rate))


class EarlyStop(keras.callbacks.EarlyStopping):
    """Keras's EarlyStopping that continues a resumed run's count and writes why it stopped
    into the run's next commit (``state.json``; metrics.json's ``early_stopping``).

    Restoring the best epoch is done from ``best.keras`` after fit (:func:`restore_best`), which
    works across resumes, instead of Keras's in-memory copy.
    """

    def __init__(self, exp: Experiment, state):
        metric, mode = monitor(exp)
        super().__init__(monitor=metric, mode=mode, patience=exp.train.patience, restore_best_weights=False)
        self.state = state  # run_state.RunState: its committed history and the next commit

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._set_monitor_op()
        for row in self.state.state["history"]:  # the epochs before a resume, as they went
            value = row.get(self.monitor)
            if value is None:
                continue
            self.wait += 1
            if self._is_improvement(value, self.best):
                self.best, self.best_epoch, self.wait = value, row["epoch"], 0

    def on_epoch_end(self, epoch, logs=None):
        before = self.model.stop_training  # another callback's stop (the NaN guard) is not ours
        super().on_epoch_end(epoch, logs)
        last = epoch == self.params["epochs"] - 1  # patience out at the end: every epoch ran anyway
        if not before and self.model.stop_training and self.stopped_epoch == epoch and not last:
            self.state.state["early_stopping"] = summary(self.monitor, self.patience, epoch, self.best_epoch,
                                                         self.best)


def summary(metric: str, patience: int, stopped: int | None, best_epoch: int | None, best) -> dict:
    """metrics.json's ``early_stopping``, epochs counted from 1 as the log counts them."""
    out = {"metric": metric, "patience": patience, "stopped_early": stopped is not None,
           "stopped_epoch": None if stopped is None else stopped + 1,
           "best_epoch": None if best_epoch is None else best_epoch + 1,
           "best": None if best is None else float(best)}
    out["reason"] = (f"{metric} did not improve for {plural(patience, 'epoch')} after epoch {best_epoch + 1} "
                     f"(best {float(best):.4g})" if stopped is not None else "ran every epoch")
    return out


class SwapEMA(keras.callbacks.SwapEMAWeights):
    """The weight average in the model while validating and from each epoch's end to the next
    epoch's start (so the checkpoints and the backup hold it), the raw weights while training.

    ``resumed``: the backup holds an epoch's end, averaged weights in the model. Keras makes
    the average final only after the last epoch; an early stop makes it final too, or fit's end
    (``finalize_variable_values``) would put the raw weights back.
    """

    def __init__(self, resumed: bool):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = resumed

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.model.stop_training and epoch != self.params["epochs"] - 1:
            self._finalize_ema_values()


def callbacks(exp: Experiment, state, resumed: bool) -> list[keras.callbacks.Callback]:
    """The recipe's callbacks, placed before RunState: early stopping decides, the average is
    swapped in, the rate is logged, then the epoch is committed."""
    out: list[keras.callbacks.Callback] = []
    if exp.train.early_stopping != "none":
        out.append(EarlyStop(exp, state))
    if exp.train.ema:
        out.append(SwapEMA(resumed))
    return [*out, LearningRateLog()]


def stopped_early(state) -> dict | None:
    """The committed early stop of a run (None: it has not stopped early)."""
    return state.state.get("early_stopping")


def restore_best(exp: Experiment, run_dir: Path, model: keras.Model, log) -> None:
    """With early stopping and ``restore_best``: the best epoch's weights (best.keras) go into
    the model that [6/6] evaluates, and become ``last.keras`` too (what metrics.json describes)."""
    if exp.train.early_stopping == "none" or not exp.train.restore_best:
        return
    best, last = run_dir / "checkpoints" / "best.keras", run_dir / "checkpoints" / "last.keras"
    if not best.is_file() or (last.is_file() and best.samefile(last)):
        return
    model.load_weights(str(best))
    atomic_save(last, lambda tmp: tmp.write_bytes(best.read_bytes()))
    log(f"      restored the best epoch's weights ({exp.train.early_stopping}): checkpoints/best.keras")


def results(exp: Experiment, run_dir: Path) -> dict:
    """What metrics.json records of the recipe: ``early_stopping`` when it was on."""
    if exp.train.early_stopping == "none":
        return {}
    state_file = run_dir / "backup" / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("early_stopping"):
        return {"early_stopping": {**state["early_stopping"], "restored_best": exp.train.restore_best}}
    metric, _ = monitor(exp)
    rows = [row for row in state.get("history", []) if row.get(metric) is not None]
    pick = min if metric.endswith("loss") else max
    best = pick(rows, key=lambda row: row[metric]) if rows else None
    out = summary(metric, exp.train.patience, None, best and best["epoch"], best and best[metric])
    return {"early_stopping": {**out, "restored_best": exp.train.restore_best}}
