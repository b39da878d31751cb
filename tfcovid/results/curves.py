"""Plots of how probabilities become decisions (issue 23.5): the reliability diagram (before and
after temperature scaling), the precision-recall curve, the operating point on the ROC and PR
curves, and these figures as TensorBoard images.

One curve (or panel) per decision threshold: the binary task's disease class, or each label of
the three-label task (results.operating_point.columns). A curve needs both classes present.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from sklearn import calibration as skc
from sklearn import metrics as skm

from tfcovid.results.operating_point import columns
from tfcovid.results.uncertainty import ECE_BINS
from tfcovid.results.uncertainty import expected_calibration_error as ece


def curves(y_true, probs, task: str, names: Sequence[str], positive: str | None,
           thresholds=None) -> list[tuple[str, np.ndarray, np.ndarray, float | None]]:
    """[(name, is_positive, score, threshold or None)] for the outputs with both classes."""
    found = columns(y_true, probs, task, names, positive if positive in names else names[0])
    # One threshold for all (a report's single number) or one per output.
    cuts = (list(np.broadcast_to(np.ravel(thresholds).astype(float), (len(found),)))
            if thresholds is not None else [None] * len(found))
    return [(n, p, s, t) for (n, p, s), t in zip(found, cuts) if 0 < p.sum() < len(p)]


def mark_roc(ax, is_pos, score, threshold: float, color) -> None:
    """The operating point on a ROC curve: (1 - specificity, sensitivity) at ``threshold``."""
    hit = score >= threshold
    ax.plot([hit[~is_pos].mean()], [hit[is_pos].mean()], "o", ms=7, mfc="none", mew=1.8, color=color,
            label=f"operating point {threshold:.3g}")


def plot_pr(y_true, probs, task: str, names: Sequence[str], path: str | Path, positive: str | None = None,
            thresholds=None, title: str = "") -> Path | None:
    """Precision-recall curve(s) with average precision, the operating point marked; None when
    no curve is defined."""
    found = curves(y_true, probs, task, names, positive, thresholds)
    if not found:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.4), layout="constrained")
    for i, (name, is_pos, score, t) in enumerate(found):
        precision, recall, _ = skm.precision_recall_curve(is_pos, score)
        color = f"C{i}"
        ax.step(recall, precision, where="post", lw=1.8, color=color,
                label=f"{name} (AP {skm.average_precision_score(is_pos, score):.3f})")
        if t is not None and (score >= t).any():
            hit = score >= t
            ax.plot([hit[is_pos].mean()], [is_pos[hit].mean()], "o", ms=7, mfc="none", mew=1.8,
                    color=color, label=f"operating point {t:.3g}")
    unit_axes(ax, "recall (sensitivity)", "precision (positive predictive value)", "lower left")
    ax.set_title(title or "Precision-recall", fontsize=10)
    return save(fig, path)


def plot_reliability(y_true, probs, task: str, names: Sequence[str], path: str | Path,
                     positive: str | None = None, before=None, title: str = "") -> Path | None:
    """Reliability diagram per output (sklearn's calibration_curve, ECE_BINS equal-width bins):
    fraction positive against mean probability, with ECE; ``before``: the probabilities
    before temperature scaling, drawn dashed beside them."""
    after = curves(y_true, probs, task, names, positive)
    if not after:
        return None
    earlier = {n: s for n, _, s, _ in curves(y_true, before, task, names, positive)} if before is not None else {}
    fig, axes = plt.subplots(1, len(after), figsize=(4.2 * len(after), 4.2), squeeze=False,
                             layout="constrained")
    for ax, (name, is_pos, score, _) in zip(axes[0], after):
        shown = ([("before calibration", earlier[name], "s--", "#999999")] if name in earlier else []) + \
                [("calibrated" if earlier else "model", score, "o-", "#1f77b4")]
        for label, s, style, color in shown:
            true, pred = skc.calibration_curve(is_pos, s, n_bins=ECE_BINS, strategy="uniform")
            ax.plot(pred, true, style, color=color, ms=4, label=f"{label} (ECE {ece(is_pos, s):.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfectly calibrated")
        unit_axes(ax, "mean predicted probability", "fraction positive", "upper left")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title or "Reliability", fontsize=10)
    return save(fig, path)


def unit_axes(ax, xlabel: str, ylabel: str, legend: str) -> None:
    """The [0, 1] x [0, 1] axes of a ROC, PR or reliability plot: labels, limits, grid, legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=8)


def save(fig, path) -> Path:
    """Write ``fig`` to the PNG ``path`` and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def to_tensorboard(log_dir: str | Path, pngs: Sequence[Path], step: int) -> None:
    """The PNGs as TensorBoard images (tag: the file name), beside the training images that
    training.callbacks.TensorBoardImages writes to ``log_dir``."""
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        for png in pngs:
            image = tf.image.decode_png(Path(png).read_bytes(), channels=4)[None]
            tf.summary.image(Path(png).stem, image, step=step,
                             description=f"{Path(png).name}, as in the run's plots/ folder.")
    writer.close()
