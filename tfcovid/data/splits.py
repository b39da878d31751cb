"""Train/validation/test by patient: the splits a label file does not give are made here, seeded
and stratified by class, with no patient in two splits (scikit-learn's StratifiedGroupKFold),
and written to the run as ``splits.csv`` so that evaluation repeats them exactly.

``data.split: patient`` keeps the splits the file gives. Test: the file's test rows; when the
file gives no split at all, a ``data.test_fraction`` share of the patients. Validation: the
file's validation rows; when it has none, a ``data.validation_fraction`` share of the remaining
(train and unassigned) patients, or with ``data.folds K`` fold ``data.fold`` of K folds of them.
``data.split: given`` uses the file's splits only.
"""
from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from tfcovid.data.label_files import UNASSIGNED
from tfcovid.data.types import DataError, Manifest, Split
from tfcovid.utils.atomic import atomic_write_text

FILE = "splits.csv"
ORDER = ("train", "validation", "test")


def _pool(manifest: Manifest, names) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, labels, classes) of the named splits, concatenated."""
    parts = [manifest.splits[n] for n in names if n in manifest.splits]
    paths = [p for s in parts for p in s.paths]
    labels = np.concatenate([s.labels for s in parts]) if parts else None
    return paths, labels, [f for s in parts for f in s.folders]


def _folds(classes, groups, k: int, seed: int) -> list[np.ndarray]:
    """The K folds' row indices: whole patients, each class spread over the folds."""
    if len(set(groups)) < k:
        raise DataError(f"Splitting by patient into {k} parts needs at least {k} patients; the data "
                        f"has {len(set(groups))}. Use fewer folds or larger data.validation_fraction / data.test_fraction.")
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class with fewer patients than folds: still split, less even
        warnings.simplefilter("ignore", UserWarning)
        return [held for _, held in folds.split(np.zeros(len(classes)), classes, groups)]


def _carve(rows: list[int], classes, groups, parts: int, fold: int, seed: int) -> tuple[list[int], list[int]]:
    """``rows`` divided into (the rest, one of ``parts`` folds by patient)."""
    held = _folds([classes[i] for i in rows], [groups[i] for i in rows], parts, seed)[fold]
    chosen = set(held.tolist())
    return [r for j, r in enumerate(rows) if j not in chosen], [r for j, r in enumerate(rows) if j in chosen]


def _parts(fraction: float) -> int:
    """Folds that make one of them about ``fraction`` of the patients (0.15 -> 7: 14 %)."""
    return max(2, round(1 / fraction))


def assign(manifest: Manifest, data, seed: int, saved: Path | None = None) -> Manifest:
    """The manifest with train/validation/test as ``data.split`` says (see the module).

    Args:
        manifest: from ``label_files.read`` (or a folder tree, returned as it is when it needs
            nothing made).
        data: a ``config.DataConfig`` (split, validation_fraction, test_fraction, folds, fold).
        seed: ``train.seed``: the same seed and file give the same splits.
        saved: a run's ``splits.csv``: the splits are read from it instead (evaluate, resume).
    """
    if saved is not None and saved.is_file():
        return from_file(manifest, saved)
    given = [n for n in ORDER if n in manifest.splits]
    if not manifest.patients:  # a folder tree
        if data.folds:
            raise DataError("Cross-validation (data.folds) needs a label file with patient ids: the "
                            "folds are made by patient. Pass --data FILE.csv (docs/own-data.md).")
        return manifest
    unassigned = UNASSIGNED in manifest.splits and len(manifest.splits[UNASSIGNED])
    if data.split == "given":
        if unassigned or data.folds:
            why = (f"{unassigned} image(s) have no split" if unassigned
                   else "cross-validation (data.folds) makes the validation splits")
            raise DataError(f"{manifest.root}: {why}, but data.split is given. Give every row a split, "
                            "or use --set data.split=patient to split by patient.")
        return manifest
    pool_names = [UNASSIGNED, "train"] + (["validation"] if data.folds else [])
    paths, labels, classes = _pool(manifest, pool_names)
    groups = [manifest.patients[p] for p in paths]
    rows, made = list(range(len(paths))), {}
    if "test" not in manifest.splits and len(given) == 0:
        rows, made["test"] = _carve(rows, classes, groups, _parts(data.test_fraction), 0, seed)
    if data.folds:
        rows, made["validation"] = _carve(rows, classes, groups, data.folds, data.fold, seed)
    elif "validation" not in manifest.splits:
        rows, made["validation"] = _carve(rows, classes, groups, _parts(data.validation_fraction), 0, seed)
    made["train"] = rows
    splits = {n: s for n, s in manifest.splits.items() if n not in pool_names and n not in made}
    for name, chosen in made.items():
        splits[name] = Split(name, manifest.splits[next(iter(manifest.splits))].dir,
                             tuple(paths[i] for i in chosen), labels[chosen],
                             tuple(classes[i] for i in chosen))
    notes = tuple(_missing_classes(made, classes))
    return replace(manifest, splits={n: splits[n] for n in ORDER if n in splits},
                   problems=manifest.problems + notes)


def _missing_classes(made: dict, classes: list[str]) -> list[str]:
    """A note for each made split that lacks a class: too few patients to stratify."""
    everything = sorted(set(classes))
    notes = []
    for name, chosen in made.items():
        missing = [c for c in everything if c not in {classes[i] for i in chosen}]
        if missing and name != "train":
            notes.append(f"the {name} split made by patient has no images of {', '.join(missing)}: too "
                         "few patients of that class to stratify (its figures for that class are missing)")
    return notes


def rows(manifest: Manifest) -> list[tuple[str, str, str, str]]:
    """(path relative to the label file's folder, split, patient id, class) of every image."""
    base = os.path.dirname(manifest.root)
    return [(os.path.relpath(p, base), name, manifest.patients.get(p, ""), folder)
            for name, split in manifest.splits.items() for p, folder in zip(split.paths, split.folders)]


def write(manifest: Manifest, run: Path) -> Path | None:
    """The run's ``splits.csv`` (path, split, patient_id, class), for a label file's data."""
    if not manifest.patients:
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "split", "patient_id", "class"])
    writer.writerows(rows(manifest))
    return atomic_write_text(Path(run) / FILE, buffer.getvalue())


def from_file(manifest: Manifest, saved: Path) -> Manifest:
    """The manifest's images in the splits a run's ``splits.csv`` gives; a DataError when the label
    file and ``splits.csv`` list different images (the data changed since the run)."""
    base = os.path.dirname(manifest.root)
    with open(saved, newline="", encoding="utf-8") as handle:
        wanted = {os.path.normpath(os.path.join(base, r["path"])): r["split"] for r in csv.DictReader(handle)}
    paths, labels, classes = _pool(manifest, list(manifest.splits))
    listed = set(paths) | {b.path for b in manifest.bad}
    extra, missing = sorted(set(wanted) - listed), sorted(listed - set(wanted))
    if extra or missing:
        first = (extra or missing)[0]
        raise DataError(f"{manifest.root} and {saved} list different images ({len(extra)} only in "
                        f"{saved.name}, {len(missing)} only in the label file, e.g. {first}): the data "
                        "changed since the run. Evaluate on the data the run was trained on.")
    splits = {}
    for name in ORDER:
        chosen = [i for i, p in enumerate(paths) if wanted[p] == name]
        if chosen:
            splits[name] = Split(name, base, tuple(paths[i] for i in chosen), labels[chosen],
                                 tuple(classes[i] for i in chosen))
    return replace(manifest, splits=splits)


def describe_counts(manifest: Manifest) -> str:
    """"train: infected 40, normal 38; validation: ..." (images per split and class)."""
    counts = manifest.counts()
    return "; ".join(f"{name}: " + ", ".join(f"{c} {n:,}" for c, n in sorted(per.items()))
                     for name, per in counts.items())
