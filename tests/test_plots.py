"""Plots: curves from history.csv, confusion matrices, ROC, and the plots/ + TensorBoard images of a real fit."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from tfcovid import config
from tfcovid.results import scores, plots
from tfcovid.training import train


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_history_curves_have_one_panel_per_metric_with_train_and_validation(tmp_path):
    csv = tmp_path / "history.csv"
    csv.write_text("epoch,accuracy,f1,loss,val_accuracy,val_f1,val_loss\n"
                   "0,0.5,0.4,0.9,0.55,0.5,0.8\n1,0.7,0.6,0.6,0.65,0.6,0.7\n2,0.8,0.75,0.4,0.7,0.7,0.65\n")
    hist = plots.read_history(csv)
    assert hist["val_loss"] == [0.8, 0.7, 0.65] and hist["epoch"] == [0, 1, 2]
    out = plots.plot_history(csv, tmp_path / "curves.png", "run")
    w, h = _png_size(out)
    assert w > 2 * h  # three panels side by side: loss, accuracy, f1


def test_history_without_epochs_is_a_clear_error(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,loss,val_loss\n")
    with pytest.raises(ValueError, match="no epochs"):
        plots.plot_history(tmp_path / "history.csv", tmp_path / "c.png")


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_binary_confusion_figure_shows_counts_and_row_normalised_values():
    y = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
    report = scores.binary_report(y, probs, ["infected", "normal"])
    fig = plots.confusion_figure(report, "binary")
    counts, normalised = fig.axes[0], fig.axes[1]
    # Rows true, columns predicted: infected 2 right 1 wrong; normal 1 wrong 1 right.
    assert _texts(counts) == ["2", "1", "1", "1"]
    assert _texts(normalised) == ["0.67", "0.33", "0.50", "0.50"]
    assert [t.get_text() for t in counts.get_yticklabels()] == ["infected", "normal"]


def test_multilabel_confusion_figure_has_a_row_of_panels_per_label():
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 1]])
    probs = np.array([[0.9, 0.1, 0.8], [0.2, 0.7, 0.1], [0.6, 0.2, 0.9], [0.3, 0.1, 0.7]])
    report = scores.multilabel_report(y, probs, ["covid-19", "normal", "pneumonia"])
    fig = plots.confusion_figure(report, "multilabel")
    assert len(fig.axes) == 6
    # covid-19: tn 1, fp 1, fn 1, tp 1 -> [[1, 1], [1, 1]].
    assert _texts(fig.axes[0]) == ["1", "1", "1", "1"]
    assert fig.axes[0].get_title() == "covid-19: counts"
    assert _texts(fig.axes[4]) == ["1", "0", "0", "3"]  # pneumonia: all 3 positives found


def test_roc_legend_carries_sklearn_auc_and_is_skipped_with_one_class(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0] * 10 + [1] * 10)
    p0 = np.clip(0.6 - 0.3 * y + rng.normal(0, 0.2, 20), 0, 1)
    probs = np.stack([p0, 1 - p0], axis=1)
    path = plots.plot_roc(y, probs, "binary", ["infected", "normal"], tmp_path / "roc.png", "infected")
    assert path.is_file() and _png_size(path)[0] > 200
    auc = skm.roc_auc_score(y == 0, p0)
    fig_auc = scores.binary_report(y, probs, ["infected", "normal"])["roc_auc"]
    assert auc == pytest.approx(fig_auc)
    assert plots.plot_roc(np.zeros(4, int), probs[:4], "binary", ["infected", "normal"],
                          tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def _image_tags(logdir):
    import tensorflow as tf

    tags = {}
    for event_file in sorted(logdir.glob("events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(str(event_file)):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.mark.slow
def test_fit_writes_plots_and_tensorboard_images(binary_tree, tmp_path):
    exp = config.resolve(None, {"data.dir": str(binary_tree), "data.image_size": 32,
                                "model.backbone": "resnet18", "model.weights": "none", "model.freeze": "all",
                                "train.epochs": 2, "train.batch_size": 4, "train.optimizer": "adam",
                                "out": str(tmp_path)})
    lines = []
    run = train.fit(exp, log=lines.append)
    plots_dir = run / "plots"
    expected = ["curves.png", "train_confusion.png", "validation_confusion.png",
                "test_confusion.png"]
    for name in expected:
        assert _png_size(plots_dir / name)[0] > 200, name
    summary = json.loads((run / "metrics.json").read_text())
    for split in ("validation", "test"):  # ROC needs both classes; the demo splits have both
        assert (plots_dir / f"{split}_roc.png").is_file()
    assert not (plots_dir / "train_roc.png").exists()
    assert summary["splits"]["test"]["n"] == 4
    tags = _image_tags(run / "tensorboard" / "images")
    assert tags["augmented_training_images"] == [0]
    assert tags["validation_confusion_matrix"] == [0, 1]  # one per epoch
    for split in ("validation", "test"):  # the decision plots, once, at the last epoch (issue 23.5)
        for kind in ("roc", "pr", "reliability"):
            assert tags[f"{split}_{kind}"] == [2] and (plots_dir / f"{split}_{kind}.png").is_file()
    assert any("Plots: 10 files" in line for line in lines)
