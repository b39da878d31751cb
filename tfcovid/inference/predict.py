"""Run a trained model on image files and folders: a table, the study's CSV, and the failures.

``predict`` walks folders recursively, decodes every image it can, predicts them in batches and
reports the ones it could not read (by name, with the reason) without stopping. Rows are sorted
by file name. Binary: softmax probabilities per class and the predicted class. Three-label: the
0/1 per label (``filename,covid-19,normal,pneumonia``; ``csv_format="study"``: the study's own
file, ``filename,covid,normal,pneumonia``), probabilities in the table. Names are shown escaped
in the table and written to the CSV with formula-like cells neutralised (``tfcovid.utils.text``).
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfcovid import config
from tfcovid.data import (
    augment,
    bounds,
    checks,
    decode,
    dicom,
    folders,
    signatures,
    tiff,
)
from tfcovid.models import tta as test_time
from tfcovid.models.outputs import decide, probabilities
from tfcovid.utils.atomic import atomic_write_text
from tfcovid.utils.text import csv_text, escape, not_utf8, plural
from tfcovid.weights.metadata import Trained


@dataclass
class Predictions:
    """What ``predict`` found: one row per readable image, sorted by name, and the failures."""

    task: str
    outputs: tuple[str, ...]
    threshold: float | tuple[float, ...]  # the operating point: one number, or one per label
    names: list[str] = field(default_factory=list)  # file names as written in the CSV
    paths: list[str] = field(default_factory=list)
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (n, outputs)
    predicted: list = field(default_factory=list)  # binary: class name; multilabel: 0/1 tuple
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    skipped: list[str] = field(default_factory=list)  # files in folders that are not images
    tta: str = "none"  # test-time augmentation: "flip" averages each image's and its mirror's


def find_images(inputs: Sequence[str | Path]) -> tuple[list[tuple[str, Path]], list[tuple[str, str]], list[str]]:
    """Expand files and folders (recursively) into (name, path) pairs, one per file.

    Names are unique. One folder and no other (existing) input: a file is named by its path
    relative to that folder (so the study's ``Test/`` folder gives bare file names). Otherwise
    every file is named by its path as given: a file argument as written, a file found in a
    folder as the folder argument joined with its path inside it (``A/x.jpg``, ``B/x.jpg``),
    so equal names in different folders stay apart. A file reached twice (given directly and inside a given
    folder, or in two nested folders) is listed once, under the name it was first reached by.

    Returns:
        (images, missing, skipped): images to read; (name, reason) for arguments that do not
        exist; files found in folders without an image extension.
    """
    unique: dict[Path, str] = {}  # "Test", "Test/" and "./Test" are one input
    for arg in inputs:
        unique.setdefault(Path(arg).expanduser().resolve(), str(arg))
    roots = [(arg, Path(arg).expanduser()) for arg in unique.values()]
    existing = [root for _, root in roots if root.exists()]  # a missing one gives no rows
    bare = len(existing) == 1 and existing[0].is_dir()
    images: dict[Path, str] = {}
    missing, skipped = [], {}
    for arg, root in roots:
        if root.is_dir():
            visited = {os.path.realpath(root)}  # links are followed, each folder read once
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                real = {d: os.path.realpath(os.path.join(dirpath, d)) for d in dirnames}
                dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and real[d] not in visited]
                visited.update(real[d] for d in dirnames)
                for name in sorted(f for f in filenames if not f.startswith(".")):
                    path = Path(dirpath) / name
                    if path.suffix.lower() in folders.IMAGE_EXTENSIONS:
                        inside = path.relative_to(root)
                        images.setdefault(path.resolve(), (inside if bare else Path(arg) / inside).as_posix())
                    else:
                        skipped.setdefault(path.resolve(), str(path))
        elif root.is_file():
            images.setdefault(root.resolve(), arg)
        else:
            missing.append((arg, "no such file or folder"))
    return [(name, path) for path, name in images.items()], missing, list(skipped.values())


def read_file(path: Path) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None), or (None, why it cannot be read): a named pipe, socket or
    device is refused unopened (reading a pipe waits forever), as fit's file check does; so is a
    name that is not UTF-8 (issue 22.7)."""
    reason = checks.not_regular(path) or not_utf8(path)
    if reason is not None:
        return None, reason
    try:
        return path.read_bytes(), None
    except OSError as err:
        return None, f"cannot read the file: {err.strerror or err}"


def pixel_limit(trained: Trained, max_pixels: int | None = None) -> int:
    """``max_pixels`` when given, else the run's ``data.max_pixels`` (its config.yaml), else
    the default: the limit ``fit`` applied, so what trained is predicted too."""
    if max_pixels is not None:
        return int(max_pixels)
    saved = trained.run_dir / "config.yaml" if trained.run_dir is not None else None
    try:
        if saved is not None and saved.is_file():
            return config.from_dict(config.load_yaml(saved)).data.max_pixels
    except (config.ConfigError, OSError):  # the model loaded without it: the default limit
        pass
    return config.DataConfig().max_pixels


def load(path: Path, max_pixels: int, setting: str = "--max-pixels"):
    """(the file's bytes, its decoded pixels, None) or (bytes or None, None, why it cannot be
    used): the one bounded way predict and explain read an image. The bytes read are the
    bytes decoded, and only after ``bounds.problem`` found them within ``max_pixels``."""
    raw, problem = read_file(path)
    if raw is not None:
        problem = bounds.problem(raw, max_pixels, setting)
    if problem is not None:
        return raw, None, problem
    image, problem = _decode(raw)
    return raw, image, problem


def resizer(size: int):
    # One traced function for every image size and channel count: resize, make RGB uint8.
    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
    def resize(image):
        return decode.to_rgb_uint8(augment.resize_eval(image, size), size)

    return resize


def _decode(raw: bytes):
    """Decode eagerly, so a damaged file's error is TensorFlow's own one-line reason (a DICOM
    file's: ``data.dicom``'s and a TIFF's ``data.tiff``'s, decoded directly, the same pixels ``decode_image`` gives)."""
    if signatures.is_dicom(raw) or signatures.is_tiff(raw):  # Python decoders, direct
        try:
            return tf.constant((dicom if signatures.is_dicom(raw) else tiff).to_uint8(raw)), None
        except (dicom.DicomError, tiff.TiffError) as err:
            return None, str(err)
    try:
        return decode.decode_image(tf.constant(raw)), None
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as err:
        return None, "damaged image data: " + tf_error_reason(err)


def tf_error_reason(err) -> str:
    """A TensorFlow error's first line, without its op and function names."""
    reason = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]|\s+name:.*$", "", getattr(err, "message", str(err)))
    lines = reason.strip().splitlines()
    return lines[0].strip() if lines else "cannot decode"


def predict(trained: Trained, inputs: Sequence[str | Path], threshold: float | None = None,
            batch_size: int = 32, log=None, max_pixels: int | None = None, tta: str = "none") -> Predictions:
    """Predict every image under ``inputs``.

    Args:
        trained: from :func:`tfcovid.weights.metadata.load`.
        inputs: image files and/or folders (walked recursively).
        threshold: decision threshold; None uses the model's operating point (its recorded
            thresholds, see docs/operating-points.md). Binary: the disease class is predicted
            when its probability is at least this. Three-label: a label is set when its
            probability is at least this (a number given here applies to every label).
        batch_size: images per forward pass.
        log: optional callable for progress lines.
        max_pixels: larger images are refused before decoding (``tfcovid.data.bounds``); None:
            the run's ``data.max_pixels`` (see :func:`pixel_limit`).
        tta: "flip" averages each image's probabilities with its mirror image's (models.tta).

    Returns:
        Predictions, rows sorted by file name. Unreadable files are in ``failed``.
    """
    if threshold is not None and not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"Bad threshold {threshold}: use a number between 0 and 1 (exclusive).")
    thresholds = trained.thresholds if threshold is None else (float(threshold),) * len(trained.thresholds)
    found, failed, skipped = find_images(inputs)
    shown = thresholds[0] if len(set(thresholds)) == 1 else tuple(thresholds)
    out = Predictions(trained.task, trained.outputs, shown, failed=failed, skipped=skipped,
                      tta=test_time.check(tta))
    resize = resizer(trained.image_size)
    limit = pixel_limit(trained, max_pixels)
    pixels, names, paths, probs = [], [], [], []

    def flush():
        if pixels:
            batch = np.stack(pixels)
            batch_probs = probabilities(trained.model.predict_on_batch(batch), trained.task, trained.temperature)
            if tta == "flip":
                mirror = trained.model.predict_on_batch(test_time.mirrored(batch))
                batch_probs = test_time.averaged(batch_probs, probabilities(mirror, trained.task, trained.temperature))
            probs.append(batch_probs)
            pixels.clear()

    for i, (name, path) in enumerate(sorted(found)):
        _, image, problem = load(path, limit)
        if problem is not None:
            failed.append((name, problem))
            continue
        pixels.append(resize(image).numpy())
        names.append(name)
        paths.append(str(path))
        if len(pixels) == batch_size:
            flush()
            if log:
                log(f"predicted {len(names)} of {plural(len(found), 'image')}")
    flush()
    out.names, out.paths = names, paths
    out.probs = np.concatenate(probs) if probs else np.zeros((0, len(trained.outputs)))
    decided = decide(out.probs, trained.task, thresholds, trained.positive_index)
    if trained.task == "binary":
        out.predicted = [trained.outputs[int(row.argmax())] for row in decided]
    else:
        out.predicted = [tuple(int(v) for v in row) for row in decided]
    out.failed.sort()
    return out


# The study's three-label CSV: its own column names, in this order, for tfcovid's labels.
STUDY_COLUMNS = {"covid-19": "covid", "normal": "normal", "pneumonia": "pneumonia"}
CSV_FORMATS = ("labels", "study")


def csv_format_problem(task: str, outputs: Sequence[str], csv_format: str) -> str | None:
    """Why a model's predictions cannot be written in ``csv_format`` (None: they can)."""
    if csv_format == "study" and (task != "multilabel" or tuple(outputs) != tuple(STUDY_COLUMNS)):
        return (f"--csv-format study writes the study's three-label file (filename,"
                f"{','.join(STUDY_COLUMNS.values())}) and needs a three-label model with the labels "
                f"{', '.join(STUDY_COLUMNS)}; this is a {task} model with outputs "
                f"{', '.join(map(escape, outputs))}. Use --csv-format labels.")
    return None


def write_csv(result: Predictions, path: str | Path, csv_format: str = "labels") -> Path:
    """Write the CSV: binary ``filename,<class>...,predicted`` (probabilities); three-label
    ``filename,<label>...`` with 0/1 per label, or (``csv_format="study"``) the study's file,
    ``filename,covid,normal,pneumonia`` with ``\n`` line ends; with test-time augmentation the
    labels format ends in a ``tta`` column (``flip``), the study's stays as it is. Text cells that a spreadsheet
    would run as a formula (``=``, ``+``, ``-``, ``@``, tab, CR first) get a leading ``'``."""
    if (problem := csv_format_problem(result.task, result.outputs, csv_format)) is not None:
        raise ValueError(problem)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [csv_text(name) for name in result.names]
    if result.task == "binary":
        rows = [["filename", *map(csv_text, result.outputs), "predicted"]]
        rows += [[name, *(f"{v:.6f}" for v in p), csv_text(pred)]
                 for name, p, pred in zip(names, result.probs, result.predicted)]
    else:
        header = STUDY_COLUMNS.values() if csv_format == "study" else map(csv_text, result.outputs)
        rows = [["filename", *header]]
        rows += [[name, *pred] for name, pred in zip(names, result.predicted)]
    if result.tta != "none" and csv_format == "labels":  # recorded with the probabilities they give
        rows = [[*rows[0], "tta"], *([*row, result.tta] for row in rows[1:])]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n" if csv_format == "study" else "\r\n").writerows(rows)
    atomic_write_text(path, text.getvalue())
    return path


def format_table(result: Predictions) -> str:
    """A plain-text table: file, probability per output, predicted class or labels."""
    header = ["file", *result.outputs, "predicted"]
    rows = []
    for name, p, pred in zip(result.names, result.probs, result.predicted):
        if result.task == "binary":
            label = pred
        else:
            label = "+".join(o for o, v in zip(result.outputs, pred) if v) or "(none)"
        rows.append([escape(name), *(f"{v:.3f}" for v in p), escape(label)])
    header = [escape(h) for h in header]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        str(c).ljust(w) if i in (0, len(r) - 1) else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
