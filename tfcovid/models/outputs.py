"""A model's logits -> probabilities -> decisions.

Probabilities: softmax over the binary task's two logits (the disease column), sigmoids for the
three-label task, after dividing the logits by the model's temperature when it is calibrated. Decisions: :func:`decisions`, the one rule that fit's evaluation, evaluate,
predict, explain, the plots and the exports all use (issue 23.1).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.special
from keras import ops


def probabilities(logits: np.ndarray, task: str, temperature: Sequence[float] = ()) -> np.ndarray:
    """Softmax over the binary task's 2 logits, sigmoid per label for the multilabel task, of
    the logits divided by the model's ``temperature`` (issue 23.5: binary one, three-label one
    per label; empty: not calibrated, the logits as they are)."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(temperature):
        logits = logits / np.asarray(temperature, dtype=np.float64)
    if task == "binary":
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
    return scipy.special.expit(logits)  # 1 / (1 + exp(-x)) without overflow warnings


def temperatures(calibration: dict | None) -> tuple[float, ...]:
    """The temperature(s) of a ``calibration`` record (results.calibration) as a tuple; () when
    the model is not calibrated (no record, or method "none")."""
    if not calibration or calibration.get("method") != "temperature":
        return ()
    t = calibration["temperature"]
    return tuple(float(v) for v in (t if isinstance(t, list) else [t]))


def decisions(probs, task: str, thresholds: Sequence[float], positive_index: int = 0):
    """The decision rule: 0/1 per output, shape (n, outputs), as a tensor (keras ops, so the
    SavedModel's graph runs the same code as the NumPy paths; :func:`decide` gives an array).

    Binary: the disease class (output ``positive_index``) when its probability is at least
    ``thresholds[0]``, else the other class (at 0.5 this is the argmax, ties to the disease).
    Three-label: label i when its probability is at least ``thresholds[i]``.
    """
    thresholds = [float(t) for t in thresholds]
    if task == "binary":
        (t,) = thresholds
        index = ops.where(probs[:, positive_index] >= t, positive_index, 1 - positive_index)
        return ops.one_hot(index, 2, dtype="int32")
    return ops.cast(probs >= thresholds, "int32")


def decide(probs, task: str, thresholds: Sequence[float], positive_index: int = 0) -> np.ndarray:
    """:func:`decisions` on NumPy probabilities: an int array (n, outputs) of 0/1."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[0] == 0:
        return np.zeros(probs.shape, np.int64)
    return np.asarray(decisions(probs, task, thresholds, positive_index)).astype(np.int64)
