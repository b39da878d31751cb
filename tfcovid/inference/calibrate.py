"""``tfcovid calibrate RUN --operating-point SPEC``: choose a model's operating point again, on
its validation split (never on test), and record it in the model.

A separate command rather than an ``evaluate`` flag: evaluate only reads a model, so scoring the
test split can never move the threshold it is scored at; calibrate always chooses on validation
and writes the model (docs/operating-points.md). For a run's last checkpoint it also rescores
every split of metrics.json and redraws their confusion matrices at the new point.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tfcovid.inference import evaluate
from tfcovid.results import model_card, operating_point, plots, scores, uncertainty
from tfcovid.utils.atomic import atomic_write_text
from tfcovid.weights import metadata


def calibrate(run_or_model, spec: str, data=None, checkpoint: str = "last", batch_size: int = 32,
              task: str | None = None, labels=None, log=print, max_pixels: int | None = None) -> dict:
    """Choose ``spec`` on the validation split, embed it in the model and (for a run's last
    checkpoint) rescore metrics.json's splits at it; return the operating point.

    Raises:
        OperatingPointError: a bad spec, or a validation split without positives or negatives.
        EvaluateError, metadata.ModelInfoError, data.DataError: as ``evaluate``.
    """
    trained = metadata.load(run_or_model, checkpoint, task, labels)
    exp = evaluate.run_config(trained.run_dir)
    root = evaluate.data_root(data, exp, trained)
    _, validation = evaluate.scan_split(root, "validation", trained, exp, log, max_pixels)
    probs = evaluate.predict_split(trained, validation, batch_size)
    point = operating_point.choose(validation.labels, probs, trained.task, spec, trained.outputs,
                                   trained.positive, trained.threshold, "validation")
    metadata.embed(trained.path, {**(metadata.read_embedded(trained.path) or _info(trained)),
                                  "operating_point": point})
    log(f"Recorded the operating point in {trained.path}")
    if evaluate.run_checkpoint(trained) == "last" and (trained.run_dir / "metrics.json").is_file():
        _rescore(trained, point, root, exp, batch_size, log, max_pixels)
    elif trained.run_dir is not None:
        log(f"{trained.run_dir / 'metrics.json'} describes last.keras: left as it is.")
    return point


def _info(trained) -> dict:
    """The embedded info of a model that has none (a run from before tfcovid embedded it)."""
    return {"format": metadata.FORMAT_VERSION, "task": trained.task, "outputs": list(trained.outputs),
            "positive": trained.positive, "image_size": trained.image_size, "threshold": trained.threshold}


def _rescore(trained, point: dict, root: Path, exp, batch_size: int, log, max_pixels) -> None:
    """metrics.json's splits, and plots/<split>_confusion.png, at the new operating point."""
    path = trained.run_dir / "metrics.json"
    summary = json.loads(path.read_text())
    trained = dataclasses.replace(trained, thresholds=tuple(point["thresholds"]), operating_point=point)
    for split in list(summary.get("splits", {})):
        _, chosen = evaluate.scan_split(root, split, trained, exp, lambda line: None, max_pixels)
        probs = evaluate.predict_split(trained, chosen, batch_size)
        summary["splits"][split] = scores.report(trained.task, chosen.labels, probs, trained.outputs,
                                                 trained.positive, trained.thresholds, **uncertainty.settings(exp))
        if (trained.run_dir / "plots").is_dir():
            plots.plot_confusion(summary["splits"][split], trained.task,
                                 trained.run_dir / "plots" / f"{split}_confusion.png",
                                 f"{trained.run_dir.name} — {split}")
    summary["operating_point"] = point
    atomic_write_text(path, json.dumps(summary, indent=2))
    for _, why in model_card.refresh([trained.run_dir])[1]:  # the card: the new point and figures
        log(f"note: {why}")
    log(f"Rescored {', '.join(summary['splits'])} in {path} at the new operating point.")
