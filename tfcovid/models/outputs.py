"""A model's logits -> probabilities: softmax over the binary task's two logits (the disease
column), sigmoids for the three-label task.
"""
from __future__ import annotations

import numpy as np
import scipy.special


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    """Softmax over the binary task's 2 logits, sigmoid per label for the multilabel task."""
    logits = np.asarray(logits, dtype=np.float64)
    if task == "binary":
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
    return scipy.special.expit(logits)  # 1 / (1 + exp(-x)) without overflow warnings
