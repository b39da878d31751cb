"""Metrics for both tasks: scikit-learn reports and matching Keras training metrics.

Two halves that must agree:

* ``binary_report`` / ``multilabel_report`` turn labels and predicted probabilities
  into plain JSON-ready dicts (``metrics.json``), using scikit-learn so the numbers mean
  exactly what the study's numbers meant.
* ``SampleJaccard``, ``SampleF1`` and ``BinaryF1`` are stateful Keras metrics that
  compute the same quantities over an epoch inside ``model.compile``, so the TensorBoard
  curves and the final report agree (tests check them against scikit-learn).

Conventions (see DESIGN.md):

* The study's Part 1 F1 is scikit-learn's default binary F1 on ImageFolder indices, whose
  positive class is index 1 (``normal``). The binary report gives the disease-class F1 as
  ``f1`` and the study's one, labelled, as ``f1_study``.
* Part 2 "accuracy" is the sample-averaged Jaccard index. A sample with no true and no
  predicted label scores 0 (scikit-learn's ``zero_division=0``; its default ``"warn"``
  gives the same 0, with a warning), and it still counts in the mean.
* Everything undefined is 0 (``zero_division=0``) or ``None`` (ROC AUC with one class),
  never a warning or NaN, so tiny or degenerate evaluation sets report cleanly.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

from tfcovid.models.outputs import decide
from tfcovid.results import uncertainty

__all__ = [
    "binary_report",
    "multilabel_report",
    "report",
    "study_row",
]


def _floats(values) -> list:
    """Nested numpy array -> nested lists of plain Python floats."""
    return np.asarray(values, dtype=np.float64).tolist()


def _ints(values) -> list:
    """Nested numpy array -> nested lists of plain Python ints."""
    return np.asarray(values, dtype=np.int64).tolist()


def _auc_or_none(y_true_binary: np.ndarray, scores: np.ndarray):
    # roc_auc_score warns and returns NaN with one class present; None says "undefined"
    # and is valid JSON, which NaN is not.
    if np.unique(y_true_binary).size < 2:
        return None
    return float(skm.roc_auc_score(y_true_binary, scores))


def binary_report(y_true, probs, class_names, positive: str = "infected", threshold: float = 0.5,
                  resamples: int = uncertainty.RESAMPLES, seed: int = 0) -> dict:
    """Report for the binary task, from softmax probabilities.

    Args:
        y_true: (n,) integer class indices in ImageFolder order (sorted class names).
        probs: (n, 2) class probabilities; the prediction is the disease class when its
            probability is >= ``threshold`` (``models.outputs.decisions``; 0.5: the argmax).
        class_names: the two class names, index order (e.g. ``("infected", "normal")``).
        positive: name of the disease class. If it is not in ``class_names``, class
            index 0 is used and ``positive_class`` / ``notes`` say so.
        threshold: the operating point on the disease-class probability.
        resamples, seed: the bootstrap of the intervals (results.uncertainty); 0: none.

    Returns:
        A JSON-serialisable dict: ``n``, ``accuracy``; for the disease class ``f1``,
        ``precision``, ``recall``, ``sensitivity``, ``specificity`` (recall of the other
        class), ``roc_auc`` (``None`` unless both classes are present); the study's F1
        ``f1_study`` with ``f1_study_positive_class`` (class index 1);
        ``confusion_matrix`` (rows true, columns predicted) and its row-normalised
        ``confusion_matrix_normalized``; ``class_names``, ``positive_class``,
        ``positive_index``, ``threshold`` and ``notes``; of the disease class's probability
        ``average_precision``, ``brier``, ``ece``; ``intervals`` {accuracy, sensitivity,
        specificity, f1, roc_auc: {low, high, resamples} or None} and ``uncertainty`` (how).

    Raises:
        ValueError: on mismatched shapes, not exactly two classes, or labels out of range.
    """
    y_true, probs, class_names = _binary_inputs(y_true, probs, class_names)
    pos, notes = _binary_positive(y_true, class_names, positive)
    neg = 1 - pos
    y_pred = decide(probs, "binary", [threshold], pos).argmax(axis=1)

    # One call gives every per-class number; labels=[0, 1] keeps both rows even when a
    # class is absent, and column 1 of it is exactly sklearn's default binary F1.
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=[0, 1], average=None, zero_division=0
    )
    # normalize="true" leaves rows of absent classes at zero rather than NaN.
    cm = skm.confusion_matrix(y_true, y_pred, labels=[0, 1])
    cm_norm = skm.confusion_matrix(y_true, y_pred, labels=[0, 1], normalize="true")

    return {
        "n": int(y_true.size),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "positive_class": class_names[pos],
        "positive_index": int(pos),
        "threshold": float(threshold),
        "f1": float(f1[pos]),
        "precision": float(precision[pos]),
        "recall": float(recall[pos]),
        "sensitivity": float(recall[pos]),
        "specificity": float(recall[neg]),
        "f1_study": float(f1[1]),
        "f1_study_positive_class": class_names[1],
        "roc_auc": _auc_or_none(y_true == pos, probs[:, pos]),
        "confusion_matrix": _ints(cm),
        "confusion_matrix_normalized": _floats(cm_norm),
        "class_names": class_names,
        "notes": notes,
        **_binary_uncertainty(y_true == pos, probs[:, pos], y_pred == pos, resamples, seed),
    }


def _binary_uncertainty(is_pos, score, hit, resamples: int, seed: int) -> dict:
    """The binary report's average precision, Brier score, ECE and intervals (issue 23.4)."""
    means, columns = uncertainty.bootstrap({"disease": (is_pos, score, hit)},
                                           {"accuracy": (hit == is_pos).astype(np.float64)},
                                           is_pos.size, resamples, seed)
    return {**uncertainty.point_figures(is_pos, score), "intervals": {**means, **columns.get("disease", {})},
            "uncertainty": uncertainty.described(resamples, seed)}


def _binary_inputs(y_true, probs, class_names) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``binary_report``'s arguments checked: (n,) int64 labels, (n, 2) float64 probabilities,
    two class names as strings."""
    class_names = [str(c) for c in class_names]
    y_true = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if len(class_names) != 2:
        raise ValueError(
            f"binary_report needs exactly 2 class names. Received: class_names={class_names}"
        )
    if probs.ndim != 2 or probs.shape != (y_true.shape[0], 2):
        raise ValueError(
            "binary_report needs probs of shape (n, 2) matching y_true of shape (n,). "
            f"Received: probs.shape={probs.shape}, y_true.shape={y_true.shape}"
        )
    if y_true.size == 0:
        raise ValueError("binary_report received no samples (y_true is empty).")
    if not np.all(np.isin(y_true, (0, 1))):
        raise ValueError(
            "binary_report needs y_true class indices in {0, 1}. "
            f"Received values: {sorted(np.unique(y_true).tolist())}"
        )
    return y_true.astype(np.int64), probs, class_names


def _binary_positive(y_true: np.ndarray, class_names: list[str], positive: str) -> tuple[int, list[str]]:
    """The disease class's index (0 when ``positive`` is not a class) and notes on what is
    undefined."""
    notes = []
    if positive in class_names:
        pos = class_names.index(positive)
    else:
        pos = 0
        notes.append(
            f"positive class {positive!r} is not in class_names {class_names}; "
            f"used class index 0 ({class_names[0]!r})"
        )
    neg = 1 - pos
    for index, measure in ((pos, "sensitivity"), (neg, "specificity")):
        if not (y_true == index).any():  # e.g. --skip-bad left a test class folder empty
            notes.append(f"no {class_names[index]!r} images in this split: {measure} is "
                         "undefined (reported as 0.0)")
    return pos, notes


def multilabel_report(y_true, probs, labels, threshold: float | Sequence[float] = 0.5,
                      resamples: int = uncertainty.RESAMPLES, seed: int = 0) -> dict:
    """Report for the three-label task, from sigmoid probabilities.

    Args:
        y_true: (n, L) multi-hot 0/1 targets.
        probs: (n, L) per-label probabilities; a label is predicted when
            ``probs >= threshold`` (``models.outputs.decisions``).
        labels: the L label names, column order.
        threshold: decision threshold on the probabilities, one for all labels or one per label.
        resamples, seed: the bootstrap of the intervals (results.uncertainty); 0: none.

    Returns:
        A JSON-serialisable dict: ``n``, ``threshold`` (a number, or a list when the labels'
        differ), ``labels``, ``jaccard_samples``
        (the study's "accuracy", also as ``accuracy``), sample-averaged ``f1``,
        ``precision``, ``recall``, ``exact_match`` (subset accuracy), ``hamming_loss``
        and ``per_label``: {label: {f1, precision, recall, sensitivity, specificity,
        support, roc_auc, threshold, confusion_matrix [[tn, fp], [fn, tp]], average_precision,
        brier, ece, intervals {sensitivity, specificity, f1, roc_auc}}}; ``intervals``
        {accuracy, f1} (sample-averaged) and ``uncertainty`` (how).

    Raises:
        ValueError: on mismatched shapes, non-0/1 targets or a threshold outside (0, 1).
    """
    y_true, probs, labels, thresholds = _multilabel_inputs(y_true, probs, labels, threshold)
    y_pred = decide(probs, "multilabel", thresholds.tolist())

    jaccard = float(skm.jaccard_score(y_true, y_pred, average="samples", zero_division=0))
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, average="samples", zero_division=0
    )
    lab_p, lab_r, lab_f, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, average=None, labels=list(range(len(labels))), zero_division=0
    )
    mcm = skm.multilabel_confusion_matrix(y_true, y_pred)
    means, extra = _multilabel_uncertainty(y_true > 0, probs, y_pred > 0, labels, resamples, seed)

    per_label = {}
    for i, name in enumerate(labels):
        (tn, fp), (fn, tp) = mcm[i]
        per_label[name] = {
            "f1": float(lab_f[i]),
            "precision": float(lab_p[i]),
            "recall": float(lab_r[i]),
            "sensitivity": float(lab_r[i]),
            "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
            "support": int(tp + fn),
            "roc_auc": _auc_or_none(y_true[:, i], probs[:, i]),
            "threshold": float(thresholds[i]),
            "confusion_matrix": _ints(mcm[i]),
            **extra[name],
        }

    return {
        "n": int(y_true.shape[0]),
        "threshold": float(thresholds[0]) if np.all(thresholds == thresholds[0]) else _floats(thresholds),
        "labels": labels,
        "jaccard_samples": jaccard,
        "accuracy": jaccard,
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        "exact_match": float(skm.accuracy_score(y_true, y_pred)),
        "hamming_loss": float(skm.hamming_loss(y_true, y_pred)),
        "per_label": per_label,
        "intervals": means,
        "uncertainty": uncertainty.described(resamples, seed),
    }


def _multilabel_inputs(y_true, probs, labels, threshold):
    """``multilabel_report``'s arguments checked: (n, L) int64 targets, float64 probabilities,
    the label names as strings and one threshold per label."""
    labels = [str(c) for c in labels]
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if y_true.ndim != 2 or probs.shape != y_true.shape or y_true.shape[1] != len(labels):
        raise ValueError(
            "multilabel_report needs y_true and probs of shape (n, L) with L = len(labels). "
            f"Received: y_true.shape={y_true.shape}, probs.shape={probs.shape}, "
            f"labels={labels}"
        )
    if y_true.shape[0] == 0:
        raise ValueError("multilabel_report received no samples (y_true is empty).")
    if not np.all(np.isin(y_true, (0, 1))):
        raise ValueError(
            "multilabel_report needs multi-hot y_true with values 0/1. "
            f"Received values: {sorted(np.unique(y_true).tolist())}"
        )
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(labels),))
    if not np.all((thresholds > 0.0) & (thresholds < 1.0)):
        raise ValueError(f"threshold must be in (0, 1). Received: threshold={threshold}")
    return y_true.astype(np.int64), probs, labels, thresholds


def _multilabel_uncertainty(y_true, probs, y_pred, labels, resamples: int, seed: int) -> tuple[dict, dict]:
    """The three-label report's intervals of the sample-averaged figures, and per label its
    average precision, Brier score, ECE and intervals (issue 23.4)."""
    means, columns = uncertainty.bootstrap(
        {name: (y_true[:, i], probs[:, i], y_pred[:, i]) for i, name in enumerate(labels)},
        uncertainty.per_sample_multilabel(y_true, y_pred), y_true.shape[0], resamples, seed)
    return means, {name: {**uncertainty.point_figures(y_true[:, i], probs[:, i]),
                          "intervals": columns.get(name, {})} for i, name in enumerate(labels)}


def report(task: str, y_true, probs, outputs, positive: str | None, thresholds,
           resamples: int = uncertainty.RESAMPLES, seed: int = 0) -> dict:
    """The report of either task at an operating point (``thresholds``: binary one on the
    disease class, three-label one per label), as fit, evaluate and calibrate write it, with
    intervals from ``resamples`` bootstrap resamples seeded with ``seed``."""
    if task == "binary":
        (threshold,) = thresholds
        return binary_report(y_true, probs, outputs, positive, threshold, resamples, seed)
    return multilabel_report(y_true, probs, outputs, list(thresholds), resamples, seed)


_STUDY_COLUMNS = {
    # task -> (metric for "acc" x 100, metric for "F1", F1 scale): the study printed
    # Part 1 F1 as a fraction (0.955) and Part 2 F1 as a percentage (93).
    "binary": ("accuracy", "f1_study", 1.0),
    "multilabel": ("jaccard_samples", "f1", 100.0),
}


def study_row(metrics_by_split: dict, task: str) -> dict:
    """The study's table values per split: {split: (accuracy %, F1)}.

    Args:
        metrics_by_split: {split: report dict from ``binary_report`` / ``multilabel_report``}.
        task: ``"binary"`` -> (accuracy * 100, f1_study);
            ``"multilabel"`` -> (jaccard_samples * 100, f1 * 100).

    Returns:
        {split: (float, float)} in the order of ``metrics_by_split``.

    Raises:
        ValueError: on an unknown task.
    """
    if task not in _STUDY_COLUMNS:
        raise ValueError(f"Unknown task {task!r}; expected one of {sorted(_STUDY_COLUMNS)}.")
    acc_key, f1_key, f1_scale = _STUDY_COLUMNS[task]
    return {
        split: (float(m[acc_key]) * 100.0, float(m[f1_key]) * f1_scale)
        for split, m in metrics_by_split.items()
    }
