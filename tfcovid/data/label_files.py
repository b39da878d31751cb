"""Label files -> manifests: a CSV (path, label or one 0/1 column per label, optional patient_id
and split) or COVIDx's published ``train.txt``/``test.txt`` (``patient_id filename class
source``), read into the same :class:`Manifest` an ImageFolder tree gives, plus each image's
patient id. Rows with no split go to the ``unassigned`` split, which ``data.splits`` divides by
patient. Every problem is reported with its line; nothing is guessed (docs/own-data.md).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tfcovid.data import headers
from tfcovid.data.folders import SPLIT_ALIASES, _output_names, label_vectors
from tfcovid.data.types import BadFile, DataError, Manifest, Split
from tfcovid.utils.text import escape

UNASSIGNED = "unassigned"  # rows whose split the file does not give
COVIDX_FILES = ("train.txt", "val.txt", "test.txt")  # read together when one of them is named
SHOWN = 20  # problems listed in one error; the rest are counted


@dataclass(frozen=True)
class Row:
    """One image of a label file."""

    path: str  # absolute
    split: str  # train, validation, test or UNASSIGNED
    patient: str
    label: str  # the class (binary, or multilabel via data.label_map) or "a+b" (0/1 columns)
    vector: tuple[float, ...] | None  # multilabel 0/1 columns; None when ``label`` is a class
    where: str  # "labels.csv line 5"


def is_label_file(path) -> bool:
    """Whether ``--data`` names a label file (.csv, or a COVIDx .txt) rather than a folder."""
    text = str(path)
    return text.lower().endswith((".csv", ".txt")) and "://" not in text


def _split_name(value: str, where: str) -> str:
    value = value.strip().lower()
    if not value:
        return UNASSIGNED
    for split, aliases in SPLIT_ALIASES.items():
        if value in aliases:
            return split
    raise DataError(f"{where}: unknown split {value!r}. Use train, validation (or val) or test, or "
                    "leave it empty to have tfcovid split by patient.")


def _inside(base: Path, name: str, where: str) -> str:
    """``name`` resolved against ``base``; a DataError when it leads outside ``base``."""
    if not name:
        raise DataError(f"{where}: the path is empty.")
    path = os.path.normpath(os.path.join(base, name))
    if os.path.commonpath([str(base), path]) != str(base):
        raise DataError(f"{where}: {escape(name)} is outside {base}, the label file's folder. Paths "
                        "are relative to the label file; move the file or the images so they are under it.")
    return path


def _csv_rows(file: Path, labels: Sequence[str]) -> list[Row]:
    """The rows of a CSV label file (columns by name, paths relative to its folder)."""
    base = file.parent
    with open(file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        per_label = [name for name in labels if name in columns]
        if "path" not in columns or ("label" not in columns and not per_label):
            raise DataError(
                f"{file} has columns {columns}; a label file needs a 'path' column and a 'label' column "
                f"(or one 0/1 column per label: {', '.join(labels)}), optionally 'patient_id' and 'split'.")
        rows = []
        for record in reader:
            where = f"{file.name} line {reader.line_num}"
            if None in record:
                raise DataError(f"{where}: more fields than the {len(columns)} columns.")
            record = {k: (v or "").strip() for k, v in record.items()}
            path = _inside(base, record["path"], where)
            split = _split_name(record.get("split", ""), where)
            patient = record.get("patient_id", "") or path
            if "label" in columns:
                if not record["label"]:
                    raise DataError(f"{where}: the label is empty.")
                rows.append(Row(path, split, patient, record["label"], None, where))
                continue
            vector = tuple(_flag(record[name], name, where) for name in per_label)
            label = "+".join(n for n, v in zip(per_label, vector) if v) or "none"
            rows.append(Row(path, split, patient, label, vector, where))
    if "label" not in columns and tuple(per_label) != tuple(labels):
        missing = [n for n in labels if n not in per_label]
        raise DataError(f"{file} has 0/1 columns for {per_label} but not for {missing} (data.labels).")
    return rows


def _flag(value: str, name: str, where: str) -> float:
    if value not in ("0", "1"):
        raise DataError(f"{where}: column {name!r} is {value!r}; use 0 or 1.")
    return float(value)


def _covidx_rows(file: Path) -> list[Row]:
    """The rows of COVIDx label files: ``file`` and its published siblings (train.txt, val.txt,
    test.txt); the images of X.txt are in the folder X/ next to it. Class names are lower-cased
    (COVID-19 -> covid-19), so the study's label map applies."""
    names = [file.name] + ([n for n in COVIDX_FILES if n != file.name and (file.parent / n).is_file()]
                           if file.name in COVIDX_FILES else [])
    rows = []
    for name in names:
        stem = name[:-len(".txt")]
        split = _split_name(stem, name) if stem in ("train", "val", "test") else UNASSIGNED
        folder = file.parent / stem
        with open(file.parent / name, encoding="utf-8") as handle:
            for n, line in enumerate(handle, 1):
                where = f"{name} line {n}"
                fields = line.split()
                if not fields:
                    continue
                if len(fields) not in (3, 4):
                    raise DataError(f"{where}: {len(fields)} fields; a COVIDx label file has "
                                    "'patient_id filename class source' on each line.")
                patient, filename, label = fields[:3]
                rows.append(Row(_inside(folder, filename, where), split, patient, label.lower(), None, where))
    return rows


def read(file, task: str = "binary", labels: Sequence[str] = (),
         label_map: Mapping[str, Sequence[str]] | None = None) -> Manifest:
    """A label file as a :class:`Manifest`: splits by the file's split column (rows without one in
    ``UNASSIGNED``), patient ids in ``Manifest.patients``, missing or unusable files in
    ``Manifest.bad`` (with the line that lists them).

    Raises:
        DataError: the file is missing, a column is missing, or a line is wrong (named).
    """
    file = Path(file).expanduser().absolute()
    if not file.is_file():
        raise DataError(f"Label file not found: {file}. Pass --data FILE.csv (or a COVIDx train.txt), "
                        "a folder, or demo.")
    try:
        rows = _csv_rows(file, labels) if file.suffix.lower() == ".csv" else _covidx_rows(file)
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{file} cannot be read as a label file: {err}.") from None
    if not rows:
        raise DataError(f"{file} lists no images.")
    _check_duplicates(rows)
    return _manifest(file, rows, task, labels, label_map)


def _check_duplicates(rows: list[Row]) -> None:
    first: dict[str, Row] = {}
    repeated = []
    for row in rows:
        if row.path in first:
            repeated.append(f"  {row.where}: {escape(row.path)} is listed already on "
                            f"{first[row.path].where}")
        first.setdefault(row.path, row)
    if repeated:
        raise DataError("The same image is listed twice:\n" + _shown(repeated)
                        + "\nList each image once (with all of its labels).")


def _shown(lines: list[str]) -> str:
    more = len(lines) - SHOWN
    return "\n".join(lines[:SHOWN] + ([f"  ... and {more} more"] if more > 0 else []))


def _manifest(file: Path, rows: list[Row], task: str, labels: Sequence[str],
              label_map: Mapping[str, Sequence[str]] | None) -> Manifest:
    """Rows -> Manifest; files that are missing or not images go to ``bad`` with their line."""
    bad, kept = [], []
    for row in rows:
        reason = headers.quick_check(row.path) if os.path.lexists(row.path) else "file not found"
        if reason is None:
            kept.append(row)
        else:
            bad.append(BadFile(row.path, f"{reason} (listed on {row.where})",
                               "" if row.split == UNASSIGNED else row.split))
    class_names = tuple(sorted({r.label for r in rows}))
    label_map = {k: tuple(v) for k, v in (label_map or {}).items()}
    if rows[0].vector is not None:  # one 0/1 column per label: the labels are the columns
        output_names = tuple(labels)
    else:
        output_names = _output_names(task, labels, class_names, file)
        if task == "multilabel":
            _check_known(rows, label_map, labels)
    splits = {}
    for name in [*SPLIT_ALIASES, UNASSIGNED]:
        chosen = [r for r in kept if r.split == name]
        if not chosen:
            continue
        folders = tuple(r.label for r in chosen)
        if chosen[0].vector is not None:
            vectors = np.array([r.vector for r in chosen], np.float32)
        else:
            vectors = label_vectors(folders, task, class_names, output_names, label_map)
        splits[name] = Split(name, str(file.parent), tuple(r.path for r in chosen), vectors, folders)
    if not splits:
        splits[UNASSIGNED] = Split(UNASSIGNED, str(file.parent), (), _empty(task, output_names), ())
    return Manifest(str(file), task, class_names, output_names, splits, label_map, _notes(rows),
                    tuple(bad), {r.path: r.patient for r in rows})


def _empty(task: str, output_names) -> np.ndarray:
    return np.zeros((0,), np.int64) if task == "binary" else np.zeros((0, len(output_names)), np.float32)


def _check_known(rows: list[Row], label_map: Mapping, labels: Sequence[str]) -> None:
    """Multilabel classes with no data.label_map entry, each with the first line naming it."""
    unknown: dict[str, str] = {}
    for row in rows:
        if row.label not in label_map:
            unknown.setdefault(row.label, row.where)
    if unknown:
        raise DataError(
            "Unknown label(s), not in data.label_map: "
            + "; ".join(f"{label!r} ({where})" for label, where in unknown.items())
            + f". Known: {', '.join(label_map)}; add an entry mapping each to labels among "
            f"{', '.join(labels)}, or correct the file.")


def _notes(rows: list[Row]) -> tuple[str, ...]:
    if all(r.patient == r.path for r in rows):
        note = ("the label file has no patient_id column: each image counts as its own patient, so "
                "two images of one patient can land in different splits (add patient_id)")
        return (note,)
    return ()
