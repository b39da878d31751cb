"""Choosing the operating point (the decision threshold of each disease output) on validation
data, never on test (issue 23.2).

``choose`` turns a spec (``config.operating_point``: a number, ``youden``, ``sensitivity:S``,
``specificity:S``) and one split's labels and probabilities into the record that goes into the
model's metadata and ``metrics.json``: the thresholds, how they were chosen and the figures at
them. The candidates are scikit-learn's ``roc_curve`` thresholds (every distinct score; a
sample is positive when its score is >= the threshold, as ``models.outputs.decisions`` decides).
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from tfcovid.config import operating_point as spec_syntax
from tfcovid.utils.text import plural

_EPS = 1e-12  # tpr/specificity are ratios of counts: 19/20 must reach a target of 0.95


class OperatingPointError(ValueError):
    """The operating point cannot be chosen; the message names the split, label and what to do."""


def columns(y_true, probs, task: str, outputs, positive: str | None):
    """[(label, is_positive (n,) bool, score (n,))] per decision threshold: the binary task's
    disease class, or each label of the three-label task."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if task == "binary":
        pos = list(outputs).index(positive)
        return [(positive, y_true.reshape(-1) == pos, probs[:, pos])]
    return [(name, y_true[:, i] > 0, probs[:, i]) for i, name in enumerate(outputs)]


def figures(is_pos: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    """Sensitivity and specificity at ``threshold`` (None where a class is absent), and counts."""
    hit = score >= threshold
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    return {"threshold": float(threshold),
            "sensitivity": float(hit[is_pos].mean()) if n_pos else None,
            "specificity": float((~hit[~is_pos]).mean()) if n_neg else None,
            "positives": n_pos, "negatives": n_neg}


def threshold_for(kind: str, value: float | None, is_pos: np.ndarray, score: np.ndarray) -> float:
    """The threshold of one output for a data-chosen ``kind`` (both classes must be present),
    in (0, 1): a score of exactly 0 becomes the smallest positive number."""
    return max(float(_candidate(kind, value, is_pos, score)), float(np.nextafter(0.0, 1.0)))


def _candidate(kind: str, value: float | None, is_pos: np.ndarray, score: np.ndarray) -> float:
    fpr, tpr, thr = skm.roc_curve(is_pos, score, drop_intermediate=False)
    # Index 0 is roc_curve's +inf ("nothing positive"); a stored threshold is a finite score.
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    if kind == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])  # ties: the highest threshold
    if kind == "sensitivity":  # tpr rises as the threshold falls: the highest that reaches it
        return float(thr[int(np.flatnonzero(tpr >= value - _EPS)[0])])
    ok = np.flatnonzero(1.0 - fpr >= value - _EPS)  # specificity: the lowest that keeps it
    if ok.size:
        return float(thr[ok[-1]])
    above = float(np.nextafter(thr[0], np.inf))  # only "nothing positive" keeps it: above every score
    if above >= 1.0:
        raise OperatingPointError(f"specificity {value:g} cannot be reached: negatives score 1.0")
    return above


def choose(y_true, probs, task: str, spec, outputs, positive: str | None = None,
           threshold: float = 0.5, split: str = "validation") -> dict:
    """The operating point ``spec`` on one split (``validation`` unless a fixed number).

    Returns:
        {"method": the spec, "chosen_on": ``split`` (None for a fixed number), "thresholds":
        [one per decision: binary 1, three-label one per label], "figures": {label: threshold,
        sensitivity, specificity, positives, negatives on ``split``}, "split": ``split``}.

    Raises:
        OperatingPointError: a bad spec, or a split without positives or negatives of a label
            (the threshold would be arbitrary), naming the split and label.
    """
    try:
        kind, value = spec_syntax.parse(spec, threshold)
    except ValueError as err:
        raise OperatingPointError(str(err)) from None
    chosen, shown = [], {}
    for label, is_pos, score in columns(y_true, probs, task, outputs, positive):
        if kind == "fixed":
            t = value
        else:
            missing = [c for c, n in (("positive", is_pos.sum()), ("negative", (~is_pos).sum())) if not n]
            if missing:
                raise OperatingPointError(
                    f"Cannot choose the operating point {spec} on the {split} split: it has no "
                    f"{' and no '.join(missing)} images of {label!r} ({plural(len(score), 'image')} "
                    "in all). Add some, or use a fixed number, e.g. --operating-point 0.5.")
            try:
                t = threshold_for(kind, value, is_pos, score)
            except OperatingPointError as err:
                raise OperatingPointError(f"Cannot choose the operating point {spec} on the {split} "
                                          f"split for {label!r}: {err}. Use a lower target.") from None
        chosen.append(t)
        shown[label] = figures(is_pos, score, t) if len(score) else {"threshold": t}
    return {"method": str(spec), "chosen_on": None if kind == "fixed" else split,
            "thresholds": chosen, "split": split, "figures": shown}


def fixed(thresholds, method: str = "threshold") -> dict:
    """The record of thresholds set by hand (no figures): a model from before issue 23, or
    ``predict --threshold``."""
    return {"method": method, "chosen_on": None, "thresholds": [float(t) for t in thresholds],
            "split": None, "figures": {}}


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def describe(point: dict) -> str:
    """One line per output: threshold, and the split's sensitivity/specificity at it."""
    how = (f"{point['method']}, chosen on {point['chosen_on']}" if point.get("chosen_on")
           else f"{point['method']} (fixed)")
    lines = [f"Operating point: {how}"]
    for label, f in point.get("figures", {}).items():
        at = (f"; {point['split']}: sensitivity {_pct(f.get('sensitivity'))}, specificity "
              f"{_pct(f.get('specificity'))}" if "sensitivity" in f else "")
        lines.append(f"  {label}: threshold {f['threshold']:.4g}{at}")
    return "\n".join(lines)
