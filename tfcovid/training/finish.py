"""Phase 6 of fit: evaluate every labeled split, choose the operating point on validation, and
write metrics.json, the plots and the results table."""
from __future__ import annotations

import filecmp
import json
import os
import time
from pathlib import Path

import numpy as np

from tfcovid.config import Experiment
from tfcovid.data import datasets, records, types
from tfcovid.data import folders as data_folders
from tfcovid.results import (
    calibration,
    model_card,
    operating_point,
    plots,
    scores,
    tables,
    uncertainty,
)
from tfcovid.training import distribute, inputs, stops
from tfcovid.training.context import BuiltModel, Run
from tfcovid.utils import atomic, signals
from tfcovid.weights import metadata


def evaluate_split(model, split: types.Split, exp: Experiment, manifest: types.Manifest,
                   batch_size: int | None = None) -> np.ndarray:
    """Predict one labeled split: its logits (n, outputs), before any temperature."""
    ds = datasets.dataset(split, exp.data.image_size, batch_size or exp.train.batch_size)
    return model.predict(ds.map(lambda x, y: x), verbose=0)


def positive_class(exp: Experiment, manifest: types.Manifest) -> str | None:
    """The binary task's disease class as the run records it; None for the three-label task."""
    return metadata.info_for(exp, manifest)["positive"]


def choose_operating_point(exp: Experiment, manifest: types.Manifest, validation_probs) -> dict:
    """train.operating_point on the validation split (never on test): the thresholds and the
    validation figures at them (results.operating_point)."""
    return operating_point.choose(manifest.splits["validation"].labels, validation_probs, exp.data.task,
                                  exp.train.operating_point, manifest.output_names,
                                  positive_class(exp, manifest), exp.train.threshold)


def evaluate(run: Run, data: inputs.Inputs, model) -> dict:
    """Phase 6: evaluate every labeled split with scikit-learn; return the reports by split."""
    exp, manifest = run.exp, data.manifest
    labeled = [name for name in data_folders.SPLIT_ALIASES if name in manifest.splits and manifest.splits[name].labeled]
    unlabeled = [name for name in data_folders.SPLIT_ALIASES if name in manifest.splits and name not in labeled]
    run.log("[6/6] Evaluating " + ", ".join(labeled) + "".join(
        f" ({name} has no class folders, so no labels: not evaluated; `tfcovid predict {run.dir} "
        f"{manifest.splits[name].dir}` predicts it)" for name in unlabeled))
    try:
        with signals.RaiseOnSignal():
            logits = {name: evaluate_split(model, manifest.splits[name], exp, manifest) for name in labeled}
    except records.READ_ERRORS as err:
        records.raise_if_damaged(manifest, err)
        raise
    except signals.Interrupted as err:
        raise stops.evaluation_interrupted(run.dir, err, exp.train.epochs) from None
    positive = positive_class(exp, manifest)
    # train.calibrate's temperature on validation first: the operating point is chosen on the
    # calibrated probabilities (results.calibration).
    probs, calibrated = calibration.fit_probabilities(exp.data.task, exp.train.calibrate,
                                                      manifest.splits["validation"].labels, logits,
                                                      manifest.output_names, positive)
    point = choose_operating_point(exp, manifest, probs["validation"])
    reports = {name: scores.report(exp.data.task, manifest.splits[name].labels, probs[name],
                                   manifest.output_names, positive, point["thresholds"],
                                   **uncertainty.settings(exp)) for name in labeled}
    return {"splits": reports, "operating_point": point, **({"calibration": calibrated} if calibrated else {})}


def write_results(run: Run, data: inputs.Inputs, built: BuiltModel, train_seconds: list[float],
                   results: dict) -> Path | None:
    """metrics.json, the plots and the results table; a non-chief worker's scratch copy is
    released instead of returned. A signal meanwhile says what is kept (it said "before training
    started")."""
    try:
        return _write_results(run, data, built, train_seconds, results)
    except signals.Interrupted as err:
        raise stops.results_interrupted(run.dir, err, run.exp.train.epochs) from None


def _write_results(run: Run, data: inputs.Inputs, built: BuiltModel, train_seconds: list[float],
                   results: dict) -> Path | None:
    exp, manifest = run.exp, data.manifest
    summary = {
        "task": exp.data.task,
        "outputs": list(manifest.output_names),
        "class_names": list(manifest.class_names),
        "epochs": exp.train.epochs,
        "train_seconds": round(sum(train_seconds), 2),
        "total_seconds": round(time.perf_counter() - run.t0, 2),
        "images": data.counts,
        "trainable_params": built.frozen.trainable_params,
        "total_params": built.frozen.total_params,
        "preprocessing": built.preprocessing,
        "precision": run.precision,
        "replicas": run.replicas,
        "workers": run.workers,
        "augment_on": data.augment_line,
        "augmentation": {"on": data.augment_on if exp.augment.enabled else "off",  # for scripts
                         "images": ("resident" if data.resident is not None else "streamed")
                         if data.augment_on == "device" else None},
        **results,  # splits, operating_point, calibration (when train.calibrate fitted one)
        # train.class_weight and data.sampling as they took effect (docs/imbalance.md)
        "imbalance": {"sampling": exp.data.sampling, "class_weight": exp.to_dict()["train"]["class_weight"],
                      "weights": None if data.class_weight is None
                      else dict(zip(manifest.output_names, data.class_weight))},
    }
    # The chosen operating point goes into the model metrics.json describes (last.keras), and
    # into best.keras when that holds the same weights (a hard link or copy of the last epoch's).
    last, best = run.dir / "checkpoints" / "last.keras", run.dir / "checkpoints" / "best.keras"
    same = best.is_file() and (os.path.samefile(best, last) or filecmp.cmp(best, last, shallow=False))
    for path in (last, best) if same else (last,):
        metadata.embed(path, metadata.info_for(exp, manifest, results["operating_point"], results.get("calibration")))
    atomic.atomic_write_text(run.dir / "metrics.json", json.dumps(summary, indent=2))
    model_card.write(run.dir)  # MODEL_CARD.md, from config.yaml and metrics.json (issue 23.7)
    plots.write_run_plots(run.dir, built.model, exp, manifest, summary, run.log)
    run.log(tables.format_run(exp.to_dict(), summary))
    if results.get("calibration"):
        run.log(calibration.describe(results["calibration"]))
    run.log(operating_point.describe(summary["operating_point"]))
    if run.scratch:  # a non-chief worker: its copy of the run is not needed
        distribute.release(run.scratch)
        return None
    return run.dir
