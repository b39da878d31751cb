"""Plots of a run: training curves, confusion matrices, ROC curves, and TensorBoard images.

Everything renders with matplotlib's Agg backend (no display needed, safe in threads of a
headless server) into PNG files, or into PNG bytes that TensorBoard shows as images.

* ``plot_history``: loss and accuracy/F1 (or Jaccard/F1) per epoch, train vs validation.
* ``plot_confusion``: counts and row-normalised matrices; one row of panels per label for
  the three-label task.
* ``plot_roc``: ROC curve(s) with AUC: the disease class (binary) or every label, with the
  operating point marked; PR curves and reliability diagrams are in ``results.curves``.
* ``write_run_plots``: what ``fit()`` calls once at the end to fill ``RUN/plots/``.
* ``TensorBoardImages`` (training.callbacks): a Keras callback writing a grid of augmented
  training images once and the validation confusion matrix every epoch.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from tfcovid.data import datasets
from tfcovid.models.outputs import probabilities, temperatures
from tfcovid.results import curves as decision_curves
from tfcovid.utils.text import plural

# Keras metric names in history.csv and how to title them.
_TITLES = {"loss": "Loss", "accuracy": "Accuracy", "jaccard": "Accuracy (sample Jaccard)",
           "f1": "F1"}


def read_history(path: str | Path) -> dict[str, list[float]]:
    """history.csv (Keras CSVLogger) -> {column: values}; empty cells become NaN."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                columns.setdefault(key, []).append(float("nan"))
    return columns


def plot_history(history_csv: str | Path, path: str | Path, title: str = "") -> Path:
    """Loss and every tracked metric per epoch, train vs validation, one panel each.

    Args:
        history_csv: the run's history.csv.
        path: PNG file to write.
        title: figure title (e.g. the run's name).
    """
    hist = read_history(history_csv)
    if not hist.get("epoch"):
        raise ValueError(f"{history_csv} has no epochs to plot.")
    epochs = np.asarray(hist["epoch"]) + 1  # CSVLogger counts from 0; people count from 1
    names = [k for k in hist if k != "epoch" and not k.startswith("val_")
             and k not in ("learning_rate", "lr")]
    names.sort(key=lambda k: (k != "loss", k))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes[0], names):
        ax.plot(epochs, hist[name], "o-", label="train", color="#1f77b4", ms=3)
        if f"val_{name}" in hist:
            ax.plot(epochs, hist[f"val_{name}"], "s-", label="validation", color="#d62728", ms=3)
        ax.set_title(_TITLES.get(name, name))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if name != "loss":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    return decision_curves.save(fig, path)


def _matrix_panel(ax, matrix, names, normalised: bool, title: str) -> None:
    matrix = np.asarray(matrix, dtype=float)
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalised else max(matrix.max(), 1))
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=30 if max(map(len, names)) > 6 else 0, ha="right")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    high = 0.5 if normalised else matrix.max() / 2
    for (i, j), v in np.ndenumerate(matrix):
        text = f"{v:.2f}" if normalised else f"{int(v)}"
        ax.text(j, i, text, ha="center", va="center", color="white" if v > high else "black")


def _normalise_rows(cm) -> np.ndarray:
    cm = np.asarray(cm, dtype=float)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def confusion_figure(report: dict, task: str, title: str = ""):
    """A matplotlib figure of a report's confusion matrices: counts | row-normalised.

    Binary: one 2x2 pair over the class names. Multilabel: one pair per label, each over
    (absent, present) of that label.
    """
    if task == "binary":
        pairs = [(report["class_names"], report["confusion_matrix"], "")]
    else:
        pairs = [(["no", "yes"], report["per_label"][name]["confusion_matrix"], f"{name}: ")
                 for name in report["labels"]]
    fig, axes = plt.subplots(len(pairs), 2, figsize=(7.4, 3.3 * len(pairs)), squeeze=False,
                             layout="constrained")
    for row, (names, cm, prefix) in zip(axes, pairs):
        _matrix_panel(row[0], cm, names, False, f"{prefix}counts")
        _matrix_panel(row[1], _normalise_rows(cm), names, True, f"{prefix}normalised by true class")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_confusion(report: dict, task: str, path: str | Path, title: str = "") -> Path:
    """Write :func:`confusion_figure` to ``path`` (PNG)."""
    return decision_curves.save(confusion_figure(report, task, title), path)


def plot_roc(y_true, probs, task: str, names: Sequence[str], path: str | Path,
             positive: str | None = None, title: str = "", thresholds=None) -> Path | None:
    """ROC curve(s) with AUC: the positive class (binary) or one curve per label.

    Args:
        y_true: binary: (n,) class indices; multilabel: (n, L) multi-hot.
        probs: (n, K) probabilities.
        task: "binary" or "multilabel".
        names: output names, column order.
        path: PNG file to write.
        positive: binary: the disease class (default: column 0).
        title: figure title.
        thresholds: the operating point (binary one, three-label one per label), marked on
            each curve; None: not marked.

    Returns:
        The path, or None when no curve is defined (every split sample of one class).
    """
    found = decision_curves.curves(y_true, probs, task, names, positive, thresholds)
    if not found:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.4), layout="constrained")
    for i, (name, truth, score, t) in enumerate(found):
        fpr, tpr, _ = skm.roc_curve(truth, score)
        ax.plot(fpr, tpr, lw=1.8, color=f"C{i}", label=f"{name} (AUC {skm.roc_auc_score(truth, score):.3f})")
        if t is not None:
            decision_curves.mark_roc(ax, truth, score, t, f"C{i}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    decision_curves.unit_axes(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)",
                              "lower right")
    ax.set_title(title or "ROC", fontsize=10)
    return decision_curves.save(fig, path)


def save_split_plots(out_dir: str | Path, split: str, report: dict, task: str, y_true, probs,
                     names: Sequence[str], positive: str | None = None,
                     title: str = "", before=None) -> list[Path]:
    """The plots of one evaluated split: ``<split>_confusion.png``, and where both classes are
    present ``<split>_roc.png`` and ``<split>_pr.png`` (the report's operating point marked)
    and ``<split>_reliability.png`` (``before``: the probabilities before calibration)."""
    out_dir = Path(out_dir)
    label = f"{title} — {split}" if title else split
    cuts = report.get("threshold")
    paths = [plot_confusion(report, task, out_dir / f"{split}_confusion.png", label),
             plot_roc(y_true, probs, task, names, out_dir / f"{split}_roc.png", positive, f"ROC — {label}", cuts),
             decision_curves.plot_pr(y_true, probs, task, names, out_dir / f"{split}_pr.png", positive, cuts,
                                     f"Precision-recall — {label}"),
             decision_curves.plot_reliability(y_true, probs, task, names, out_dir / f"{split}_reliability.png",
                                              positive, before, f"Reliability — {label}")]
    return [p for p in paths if p]


def write_run_plots(run: str | Path, model, exp, manifest, summary: dict, log=print) -> list[Path]:
    """Fill ``RUN/plots/``: curves, confusion matrices of every evaluated split, and for
    validation and test (the splits people choose models on; skipping train saves a pass) the
    ROC and PR curves at the operating point and the reliability diagram (before and after
    calibration when the run is calibrated); the latter also as TensorBoard images.

    Called once by ``fit()`` after metrics.json is written. Never fails the run: a plotting
    problem is logged, because the model and its numbers are already saved.
    """

    out = Path(run) / "plots"
    out.mkdir(exist_ok=True)
    task, names = summary["task"], list(summary["outputs"])
    temps = temperatures(summary.get("calibration"))
    title = Path(run).name
    written: list[Path] = []
    try:
        written.append(plot_history(Path(run) / "history.csv", out / "curves.png", title))
        for split, report in summary["splits"].items():
            if split not in ("validation", "test"):
                written.append(plot_confusion(report, task, out / f"{split}_confusion.png", f"{title} — {split}"))
                continue
            s = manifest.splits[split]
            ds = datasets.dataset(s, exp.data.image_size, exp.train.batch_size).map(lambda x, y: x)
            logits = model.predict(ds, verbose=0)
            probs, before = probabilities(logits, task, temps), probabilities(logits, task) if temps else None
            shown = save_split_plots(out, split, report, task, s.labels, probs, names,
                                     report.get("positive_class"), title, before)
            written += shown
            if (Path(run) / "tensorboard").is_dir():
                decision_curves.to_tensorboard(Path(run) / "tensorboard" / "images", shown[1:], exp.train.epochs)
    except (OSError, ValueError) as err:
        log(f"      warning: could not write every plot to {out}: {err}")
    log(f"      Plots: {plural(len(written), 'file')} in {out}")
    return written


def figure_png(fig) -> bytes:
    """Render a figure to PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def image_grid_figure(images, captions: Sequence[str], columns: int = 4):
    """A grid of uint8 images (N, H, W, 3) with one caption each."""
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.3 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions):
        ax.imshow(np.asarray(image, dtype=np.uint8))
        ax.set_title(caption, fontsize=8)
    return fig
