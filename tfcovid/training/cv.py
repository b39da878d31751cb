"""Cross-validation: ``fit`` once per fold (in this process, one after the other), then the mean
and standard deviation of each validation and test figure across the folds (``cv.json``).

The folds are made by patient from a label file (``data.folds``, ``data.fold``: see
``tfcovid.data.splits``); each fold's run lies in the cross-validation's folder as ``fold<i>``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from tfcovid.config import Experiment
from tfcovid.data import label_files
from tfcovid.data.types import DataError
from tfcovid.training import train
from tfcovid.utils import atomic

SKIPPED = ("n", "positive_index", "threshold")  # numbers in a report that are not figures


# A binary report stores an undefined sensitivity or specificity as 0.0 with a note
# (results.scores): such a fold is left out of that figure's mean, not averaged in as 0.
_UNDEFINED = re.compile(r": (sensitivity|specificity) is undefined")


def _undefined(report: dict) -> set[str]:
    found = {m.group(1) for note in report.get("notes", []) for m in [_UNDEFINED.search(note)] if m}
    return found | ({"recall"} if "sensitivity" in found else set())


def run(exp: Experiment, folds: int, log=print) -> Path:
    """Train ``folds`` runs, fold 0 .. folds-1 as validation; return the folder holding them and
    ``cv.json``."""
    if not label_files.is_label_file(exp.data.dir):  # checked before the cv folder is made
        raise DataError(f"Cross-validation needs a label file with patient ids (the folds are made by "
                        f"patient), not --data {exp.data.dir}. Pass --data FILE.csv (docs/own-data.md).")
    label = f"{exp.name}-cv{folds}" if exp.name else f"cv{folds}"
    folder = train.new_run_dir(dataclasses.replace(exp, name=label))
    runs = []
    for fold in range(folds):
        log(f"== Fold {fold + 1} of {folds} (validation: fold {fold}) ==")
        data = dataclasses.replace(exp.data, folds=folds, fold=fold)
        fold_exp = dataclasses.replace(exp, data=data, out=str(folder), name=f"fold{fold}")
        runs.append(train.fit(fold_exp, log=log))
    summary = summarise([json.loads((r / "metrics.json").read_text()) for r in runs])
    summary["runs"] = [str(r) for r in runs]
    atomic.atomic_write_text(folder / "cv.json", json.dumps(summary, indent=2))
    for line in describe(summary):
        log(line)
    return folder


def summarise(metrics: list[dict]) -> dict:
    """{"folds": K, split: {figure: {"mean", "std", "values"}}} for validation and test: every
    number of the splits' reports (std: the sample standard deviation, ddof=1)."""
    out: dict = {"folds": len(metrics)}
    for split in ("validation", "test"):
        reports = [m["splits"][split] for m in metrics if split in m.get("splits", {})]
        if len(reports) != len(metrics):
            continue
        figures = {}
        for key, value in reports[0].items():
            if key in SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            values = [float(r[key]) for r in reports
                      if isinstance(r.get(key), (int, float)) and key not in _undefined(r)]
            if values:  # std: None from one fold; folds_used: fewer folds than all had it defined
                figures[key] = {"mean": float(np.mean(values)),
                                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                                "values": values, **({"folds_used": len(values)} if len(values) < len(reports) else {})}
        out[split] = figures
    return out


def describe(summary: dict) -> list[str]:
    """One line per split: "validation: accuracy 0.875 ± 0.035, f1 ...", over K folds."""
    lines = [f"Cross-validation over {summary['folds']} folds (mean ± standard deviation):"]
    for split in ("validation", "test"):
        if split in summary:
            lines.append(f"  {split}: " + ", ".join(_figure(k, v) for k, v in summary[split].items()))
    return lines


def _figure(key: str, value: dict) -> str:
    spread = "" if value["std"] is None else f" ± {value['std']:.3f}"
    used = f" ({value['folds_used']} of the folds: undefined in the others)" if "folds_used" in value else ""
    return f"{key} {value['mean']:.3f}{spread}{used}"
