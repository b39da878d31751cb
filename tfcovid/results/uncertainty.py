"""Figures with their uncertainty (issue 23.4): average precision, Brier score, expected
calibration error, and percentile-bootstrap confidence intervals, for one decision's scores (the
binary task's disease class, or one label of the three-label task).

* **Bootstrap.** ``resamples`` resamples of the split's n images, drawn with replacement by
  ``numpy.random.default_rng(seed)``; every figure is computed on the same resamples (paired).
  A resample is held as counts (how often each image was drawn), so a figure over all resamples
  is one matrix product, not a loop: 1,000 resamples of 1,500 images take milliseconds
  (docs/performance.md). The interval is the percentile method: the 2.5th and 97.5th
  percentiles (linear interpolation, NumPy's and scipy.stats.bootstrap's default) of the
  figure's values over the resamples where it is defined. A resample without positives has no
  sensitivity and no AUC, one without negatives no specificity and no AUC: those resamples are
  skipped and ``resamples`` in each interval says how many were used; with none, the interval
  is None (as the figure itself is on a split with one class).
* **Brier score** ``mean((p - y)^2)`` of the probability ``p`` of the disease class (label),
  ``y`` 1 for its images, else 0 (scikit-learn's ``brier_score_loss``).
* **ECE** (expected calibration error) over ``ECE_BINS`` = 10 equal-width bins of ``p``:
  ``ECE = sum_b (n_b / n) * |mean(y in b) - mean(p in b)|``, empty bins left out. Bin b holds
  the probabilities in (b/10, (b+1)/10], the first also 0: scikit-learn's ``calibration_curve``
  (strategy "uniform") bins them the same way.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn import metrics as skm

CONFIDENCE = 0.95  # two-sided: the 2.5th and 97.5th percentiles
RESAMPLES = 1000  # the default of train.bootstrap_resamples
ECE_BINS = 10
_BLOCK = 2_000_000  # resample counts held at once (resamples x images), ~16 MB of int64


def settings(exp=None) -> dict:
    """The bootstrap of a run: {"resamples": train.bootstrap_resamples, "seed": train.seed};
    the defaults (1000, seed 0) without a run's config (a bare model)."""
    if exp is None:
        return {"resamples": RESAMPLES, "seed": 0}
    return {"resamples": int(exp.train.bootstrap_resamples), "seed": int(exp.train.seed)}


def described(resamples: int, seed: int) -> dict:
    """What metrics.json records of how its intervals and ECE were computed."""
    return {"bootstrap_resamples": int(resamples), "seed": int(seed), "confidence": CONFIDENCE,
            "interval": "percentile", "ece_bins": ECE_BINS}


def resample_indices(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The resamples as blocks of image indices, (b, n) each; the blocks' size depends on n only,
    so the same (n, resamples, seed) always gives the same resamples."""
    rng = np.random.default_rng(seed)
    per = max(1, _BLOCK // max(n, 1))
    for start in range(0, resamples, per):
        yield rng.integers(0, n, size=(min(per, resamples - start), n))


def counts_of(indices: np.ndarray) -> np.ndarray:
    """(b, n) indices -> (b, n) float counts: how often each image is in each resample."""
    b, n = indices.shape
    flat = (np.arange(b)[:, None] * n + indices).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (the figure is undefined on that resample)."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def auc_values(counts: np.ndarray, is_pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample (NaN without both classes): the Mann-Whitney statistic, the
    share of (positive, negative) pairs the score orders right, ties counting one half, which is
    the area under scikit-learn's ROC curve."""
    values, group = np.unique(score, return_inverse=True)
    b, k = counts.shape[0], values.size
    slots = (np.arange(b) * k)[:, None]

    def per_value(mask):  # (b, k): weight of the class's images at each distinct score
        return np.bincount((slots + group[mask]).ravel(), weights=counts[:, mask].ravel(),
                           minlength=b * k).reshape(b, k)

    pos, neg = per_value(is_pos), per_value(~is_pos)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored lower than each distinct score
    pairs = (pos * (below + 0.5 * neg)).sum(axis=1)
    return _ratio(pairs, pos.sum(axis=1) * neg.sum(axis=1))


def decision_values(counts: np.ndarray, is_pos: np.ndarray, hit: np.ndarray) -> dict:
    """Sensitivity, specificity and F1 of one decision on each resample (F1 0 where it has no
    positive and no predicted image, as scikit-learn's zero_division=0 reports it)."""
    n_pos = counts @ is_pos.astype(np.float64)
    n_all = counts.sum(axis=1)
    tp = counts @ (is_pos & hit).astype(np.float64)
    fp = counts @ (~is_pos & hit).astype(np.float64)
    fn = n_pos - tp
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {"sensitivity": _ratio(tp, n_pos), "specificity": _ratio(n_all - n_pos - fp, n_all - n_pos),
            "f1": np.nan_to_num(f1, nan=0.0)}


def interval(values: np.ndarray) -> dict | None:
    """The percentile interval of a figure's resampled values, skipping the NaN (undefined)
    ones: {"low", "high", "resamples": how many were used}; None when none was defined."""
    used = values[~np.isnan(values)]
    if used.size == 0:
        return None
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(used, [tail, 100 - tail])
    return {"low": float(low), "high": float(high), "resamples": int(used.size)}


def bootstrap(columns: dict, per_image: dict, n: int, resamples: int, seed: int) -> tuple[dict, dict]:
    """Intervals of every figure over the same resamples.

    Args:
        columns: {name: (is_pos (n,) bool, score (n,) float, hit (n,) bool)}: each decision's
            truth, probability and decision; gives "<name>" -> {sensitivity, specificity,
            f1, roc_auc} intervals.
        per_image: {figure: (n,) float}: figures that are a mean over images (accuracy, the
            sample-averaged Jaccard and F1); gives their intervals.
        n: images in the split. resamples, seed: the bootstrap; 0 resamples give no intervals.

    Returns:
        ({figure: interval} of ``per_image``, {name: {figure: interval}} of ``columns``).
    """
    if resamples <= 0:
        return {}, {}
    parts: dict = {}
    for block in resample_indices(n, resamples, seed):
        counts = counts_of(block)
        for figure, values in per_image.items():
            parts.setdefault(figure, []).append(counts @ values / n)
        for name, (is_pos, score, hit) in columns.items():
            for figure, values in decision_values(counts, is_pos, hit).items():
                parts.setdefault((name, figure), []).append(values)
            parts.setdefault((name, "roc_auc"), []).append(auc_values(counts, is_pos, score))
    means, by_column = {}, {}
    for key, blocks in parts.items():
        shown = interval(np.concatenate(blocks))
        if isinstance(key, tuple):
            by_column.setdefault(key[0], {})[key[1]] = shown
        else:
            means[key] = shown
    return means, by_column


def calibration_bins(is_pos: np.ndarray, score: np.ndarray, bins: int = ECE_BINS):
    """Per equal-width bin of ``score``: (images, sum of scores, positives); see the module's
    docstring for the edges (calibration_curve's)."""
    is_pos, score = np.asarray(is_pos), np.asarray(score, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], score)
    return (np.bincount(which, minlength=bins), np.bincount(which, weights=score, minlength=bins),
            np.bincount(which, weights=is_pos.astype(np.float64), minlength=bins))


def expected_calibration_error(is_pos: np.ndarray, score: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE = sum over bins of (n_b / n) |mean(y) - mean(p)| = sum_b |positives_b - sum(p)_b| / n."""
    _, total, positives = calibration_bins(is_pos, score, bins)
    return float(np.abs(positives - total).sum() / max(len(score), 1))


def point_figures(is_pos: np.ndarray, score: np.ndarray) -> dict:
    """Average precision (None without positives: no precision-recall curve), Brier score and ECE
    of one decision's probabilities."""
    y = is_pos.astype(np.int64)
    return {"average_precision": float(skm.average_precision_score(y, score)) if y.any() else None,
            "brier": float(skm.brier_score_loss(y, score, pos_label=1)),
            "ece": expected_calibration_error(is_pos, score)}


def per_sample_multilabel(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Each image's Jaccard index and F1 over its labels (0 with no true and no predicted label),
    whose means are scikit-learn's sample-averaged jaccard_score and f1 (zero_division=0)."""
    both = (y_true & y_pred).sum(axis=1).astype(np.float64)
    union = (y_true | y_pred).sum(axis=1).astype(np.float64)
    sizes = (y_true.sum(axis=1) + y_pred.sum(axis=1)).astype(np.float64)
    return {"accuracy": np.nan_to_num(_ratio(both, union)), "f1": np.nan_to_num(_ratio(2 * both, sizes))}
