"""``tfcovid calibrate RUN --operating-point SPEC [--calibrate temperature|none]``: choose a
model's operating point again, on its validation split (never on test), after fitting (or
removing) its temperature there when asked, and record both in the model.

A separate command rather than an ``evaluate`` flag: evaluate only reads a model, so scoring the
test split can never move the threshold it is scored at; calibrate always chooses on validation
and writes the model (docs/operating-points.md). For a run's last checkpoint it also rescores
every split of metrics.json and redraws their confusion matrices at the new point.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

from tfcovid.inference import evaluate
from tfcovid.models.outputs import probabilities, temperatures
from tfcovid.results import (
    calibration,
    model_card,
    operating_point,
    plots,
    scores,
    uncertainty,
)
from tfcovid.utils import run_lock
from tfcovid.utils.atomic import atomic_write_text
from tfcovid.weights import metadata


def calibrate(run_or_model, spec: str | None = None, data=None, checkpoint: str = "last",
              batch_size: int = 32, task: str | None = None, labels=None, log=print,
              max_pixels: int | None = None, method: str | None = None) -> dict:
    """Fit (``method="temperature"``), remove (``"none"``) or keep (None) the model's
    temperature on the validation split, then choose ``spec`` there on the calibrated
    probabilities (None: the model's own method again), embed both in the model and (for a
    run's last checkpoint) rescore metrics.json's splits; return the operating point.

    Raises:
        OperatingPointError: a bad spec, or a validation split without positives or negatives.
        CalibrationError: the temperature cannot be fitted (no images, non-finite outputs).
        EvaluateError, metadata.ModelInfoError, data.DataError: as ``evaluate``.
    """
    # The lock before the model is read: a fit ending while it loads would otherwise have its
    # last epoch overwritten by the older weights calibrate read (and it refuses at once).
    _, run_dir = metadata.model_file(run_or_model, checkpoint)
    with _lock(run_dir):
        trained = metadata.load(run_or_model, checkpoint, task, labels)
        return _calibrate(trained, spec, data, batch_size, log, max_pixels, method)


@contextlib.contextmanager
def _lock(run_dir: Path | None):
    """The run's training lock (utils.run_lock), held while calibrate writes its checkpoint,
    metrics.json and plots: a fit training in it would overwrite them at its next epoch."""
    if run_dir is None:
        yield
        return
    lock = run_lock.RunLock(run_dir)
    try:
        lock.acquire()
    except run_lock.RunLocked as err:
        busy = str(err).split(";")[0]
        raise evaluate.EvaluateError(f"{busy}; calibrate writes the checkpoint and metrics.json that it "
                                     "rewrites at every epoch.") from None
    try:
        yield
    finally:
        lock.release()


def _calibrate(trained, spec, data, batch_size, log, max_pixels, method) -> dict:
    """``calibrate`` on a loaded model, the run (if any) locked."""
    exp = evaluate.run_config(trained.run_dir)
    root = evaluate.data_root(data, exp, trained)
    _, validation = evaluate.scan_split(root, "validation", trained, exp, log, max_pixels)
    logits = evaluate.predict_logits(trained, validation, batch_size)
    found = trained.calibration if method is None else (
        calibration.record(logits, validation.labels, trained.task, trained.outputs, trained.positive)
        if method == "temperature" else None)
    found = found if temperatures(found) else None
    probs = probabilities(logits, trained.task, temperatures(found))
    spec = spec if spec is not None else trained.operating_point.get("method", "threshold")
    point = operating_point.choose(validation.labels, probs, trained.task, spec, trained.outputs,
                                   trained.positive, trained.threshold, "validation")
    info = {**(metadata.read_embedded(trained.path) or _info(trained)), "operating_point": point}
    info.pop("calibration", None)
    metadata.embed(trained.path, {**info, **({"calibration": found} if found else {})})
    if found:
        log(calibration.describe(found) + (" (the model's, kept)" if method is None else ""))
    log(f"Recorded the operating point{' and the temperature' if method == 'temperature' else ''} in {trained.path}")
    trained = dataclasses.replace(trained, thresholds=tuple(point["thresholds"]), operating_point=point,
                                  temperature=temperatures(found), calibration=found or {"method": "none"})
    if evaluate.run_checkpoint(trained) == "last" and (trained.run_dir / "metrics.json").is_file():
        _rescore(trained, root, exp, batch_size, log, max_pixels, {"validation": logits})
    elif trained.run_dir is not None:
        log(f"{trained.run_dir / 'metrics.json'} describes last.keras: left as it is.")
    return point


def _info(trained) -> dict:
    """The embedded info of a model that has none (a run from before tfcovid embedded it)."""
    return {"format": metadata.FORMAT_VERSION, "task": trained.task, "outputs": list(trained.outputs),
            "positive": trained.positive, "image_size": trained.image_size, "threshold": trained.threshold}


def _rescore(trained, root: Path, exp, batch_size: int, log, max_pixels, known: dict) -> None:
    """metrics.json's splits, and their plots in RUN/plots, at the model's new operating point
    and temperature (``known``: logits already predicted, by split)."""
    path, out = trained.run_dir / "metrics.json", trained.run_dir / "plots"
    summary = json.loads(path.read_text())
    for split in list(summary.get("splits", {})):
        _, chosen = evaluate.scan_split(root, split, trained, exp, lambda line: None, max_pixels)
        logits = known[split] if split in known else evaluate.predict_logits(trained, chosen, batch_size)
        probs = probabilities(logits, trained.task, trained.temperature)
        report = summary["splits"][split] = scores.report(trained.task, chosen.labels, probs, trained.outputs,
                                                          trained.positive, trained.thresholds,
                                                          **uncertainty.settings(exp))
        if out.is_dir() and split in ("validation", "test"):  # as fit draws them (results.plots)
            plots.save_split_plots(out, split, report, trained.task, chosen.labels, probs, trained.outputs,
                                   trained.positive, trained.run_dir.name,
                                   probabilities(logits, trained.task) if trained.temperature else None)
        elif out.is_dir():
            plots.plot_confusion(report, trained.task, out / f"{split}_confusion.png",
                                 f"{trained.run_dir.name} — {split}")
    summary["operating_point"] = trained.operating_point
    summary.pop("calibration", None)
    summary.update({"calibration": trained.calibration} if trained.temperature else {})
    atomic_write_text(path, json.dumps(summary, indent=2))
    for _, why in model_card.refresh([trained.run_dir])[1]:  # the card: the new point and figures
        log(f"note: {why}")
    log(f"Rescored {', '.join(summary['splits'])} in {path} at the new operating point.")
