"""Test-time augmentation (``--tta flip``, issue 25.5): a model's probabilities averaged with
those of the left-right mirror image, the flip fit trains with. Exports stay single-pass.
"""
from __future__ import annotations

import numpy as np

TTA = ("none", "flip")


def mirrored(images):
    """Batches of images (N, H, W, C), NumPy or tensors, mirrored left-right (np.fliplr of each)."""
    return images[:, :, ::-1, :]


def averaged(probs: np.ndarray, mirrored_probs: np.ndarray) -> np.ndarray:
    """The TTA probabilities: the mean of the image's and its mirror image's."""
    return (np.asarray(probs, np.float64) + np.asarray(mirrored_probs, np.float64)) / 2


def check(tta: str) -> str:
    """``tta`` when it is a known choice, else a ValueError naming the choices."""
    if tta not in TTA:
        raise ValueError(f"Unknown test-time augmentation {tta!r}. Valid values: {', '.join(TTA)}.")
    return tta
