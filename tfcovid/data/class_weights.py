"""``train.class_weight`` resolved on the train split (no TensorFlow): one weight per model output.

Binary task: one weight per class (the model's 2 softmax outputs), multiplying each image's
cross-entropy by its class's weight, as Keras's ``fit(class_weight=...)`` does. ``balanced`` is
scikit-learn's ``compute_class_weight("balanced")``: n_images / (2 * n_class).
Three-label task: one positive weight per label, multiplying the positive term of that label's
BCE or focal loss. ``balanced`` is n_negative / n_positive per label (PyTorch's ``pos_weight``
recipe). A mapping gives weights by name; names it leaves out keep 1. docs/imbalance.md.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from tfcovid.data.types import DataError, Split
from tfcovid.utils.text import shown


def resolve(setting: str | Mapping[str, float], task: str, train: Split,
            output_names: tuple[str, ...]) -> tuple[float, ...] | None:
    """The weights, in the model's output order, or None for ``none`` (the unweighted losses).

    Raises:
        DataError: a name that is no class (binary) or label (three-label) of the data, or a class
            or label with no positive train image under ``balanced``; the message names it.
    """
    if isinstance(setting, str) and setting == "none":
        return None
    if isinstance(setting, Mapping):
        unknown = [name for name in setting if name not in output_names]
        if unknown:
            what = "classes (class folders)" if task == "binary" else "labels"
            raise DataError(f"train.class_weight names {shown(unknown)}, which the data does not have: its "
                            f"{what} are {', '.join(output_names)}.")
        return tuple(float(setting.get(name, 1.0)) for name in output_names)
    labels = np.asarray(train.labels)
    if task == "binary":
        counts = np.bincount(labels.astype(np.int64), minlength=len(output_names))
        _refuse_empty(counts, output_names, "class", "images")
        return tuple(float(w) for w in compute_class_weight(
            "balanced", classes=np.arange(len(output_names)), y=labels))
    positives = labels.sum(axis=0).astype(np.int64)
    _refuse_empty(positives, output_names, "label", "positive images")
    _refuse_empty(len(labels) - positives, output_names, "label", "negative images")
    return tuple(float(w) for w in (len(labels) - positives) / positives)


def _refuse_empty(counts: np.ndarray, names, what: str, images: str) -> None:
    empty = [name for name, n in zip(names, counts) if n == 0]
    if empty:
        raise DataError(f"train.class_weight balanced: the train split has no {images} of {what} "
                        f"{shown(empty[0])}, so its weight (a ratio of counts) is undefined. Add such images "
                        "to train/, or give the weights by name: --set 'train.class_weight={name: weight}'.")


def describe(weights: tuple[float, ...] | None, setting, task: str, output_names) -> str:
    """The log line: ``class weights (balanced): infected 5, normal 0.556``."""
    if weights is None:
        return "class weights: none"
    how = setting if isinstance(setting, str) else "given"
    what = "class weights" if task == "binary" else "positive weights per label"
    return f"{what} ({how}, from the train split): " + ", ".join(
        f"{name} {w:.4g}" for name, w in zip(output_names, weights))
