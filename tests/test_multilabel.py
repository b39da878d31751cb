"""The three-label study: configs, label scheme, loss reduction, and a real 2-epoch fit per loss."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tfcovid import config
from tfcovid.data import folders as data_folders, types
from tfcovid.weights import metadata
from tfcovid.training import compile, inputs, train
from tfcovid.config import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "part2"

# DESIGN.md, Part 2: backbone, loss, epochs; learning rates from the study's code.
STUDY_PART2 = {
    "vgg16_bce": ("vgg16", "bce", 15, 1e-3),
    "vgg16_focal": ("vgg16", "focal", 25, 1e-4),
    "resnet18_bce": ("resnet18", "bce", 20, 1e-3),
    "resnet18_focal": ("resnet18", "focal", 22, 5e-5),
}


def test_part2_configs_are_the_study_rows():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(STUDY_PART2)
    for stem, (backbone, loss, epochs, lr) in STUDY_PART2.items():
        exp = config.resolve(CONFIGS / f"{stem}.yaml", {"data.dir": "/data/part2"})
        d, m, t = exp.data, exp.model, exp.train
        assert (m.backbone, t.loss, t.epochs, t.lr) == (backbone, loss, epochs, pytest.approx(lr))
        assert (t.optimizer, t.momentum, t.batch_size, d.image_size) == ("sgd", 0.9, 60, 224)
        assert (m.weights, m.freeze, d.task, t.threshold) == ("imagenet", "none", "multilabel", 0.5)
        assert d.labels == ("covid-19", "normal", "pneumonia")
        assert dict(d.label_map) == {"covid-19": ("covid-19", "pneumonia"), "normal": ("normal",),
                                     "pneumonia": ("pneumonia",)}
        if loss == "focal":
            assert (t.focal_alpha, t.focal_gamma, t.focal_reduction) == (0.25, 2.0, "sum")


def test_study_folder_to_label_vectors():
    exp = config.resolve(None, {"data.task": "multilabel"})
    vectors = data_folders.label_vectors(["covid-19", "normal", "pneumonia"], "multilabel", (),
                                 exp.data.labels, exp.data.label_map)
    np.testing.assert_array_equal(vectors, [[1, 0, 1], [0, 1, 0], [0, 0, 1]])


def test_user_defined_fourth_label_end_to_end(multilabel_tree, tmp_path):
    # A user adds tuberculosis in YAML, no code: the scan yields 4-column multi-hot labels.
    tree = tmp_path / "tb"
    shutil.copytree(multilabel_tree, tree, ignore=shutil.ignore_patterns("masks"))
    for split in ("train", "validation", "test"):
        shutil.copytree(tree / split / "pneumonia", tree / split / "tb")
    cfg = tmp_path / "tb.yaml"
    cfg.write_text(
        f"data:\n  dir: {tree}\n  task: multilabel\n"
        "  labels: [covid-19, normal, pneumonia, tuberculosis]\n"
        "  label_map:\n    covid-19: [covid-19, pneumonia]\n    normal: [normal]\n"
        "    pneumonia: [pneumonia]\n    tb: [tuberculosis]\n")
    exp = config.resolve(cfg, {})
    manifest = inputs.load_manifest(exp)
    split = manifest.splits["train"]
    assert manifest.output_names == ("covid-19", "normal", "pneumonia", "tuberculosis")
    assert split.labels.shape == (16, 4)
    tb = [i for i, f in enumerate(split.folders) if f == "tb"]
    np.testing.assert_array_equal(split.labels[tb], [[0, 0, 0, 1]] * 4)
    # Without the mapping for the new folder, the error names it and shows the fix.
    cfg.write_text(cfg.read_text().replace("    tb: [tuberculosis]\n", ""))
    with pytest.raises(types.DataError, match=r"\['tb'\] have no entry in data.label_map"):
        inputs.load_manifest(config.resolve(cfg, {}))


def test_focal_reduction_setting():
    exp = config.resolve(None, {"data.task": "multilabel", "train.loss": "focal"})
    assert exp.train.focal_reduction == "sum"
    exp = config.resolve(None, {"data.task": "multilabel", "train.loss": "focal"},
                         config.parse_assignments(["train.focal_reduction=mean"]))
    assert exp.train.focal_reduction == "mean"
    with pytest.raises(ConfigError, match="train.focal_reduction.*Valid values: sum, mean"):
        config.resolve(None, {}, config.parse_assignments(["train.focal_reduction=avg"]))


def test_set_overrides_any_key_with_yaml_values():
    sets = config.parse_assignments([
        "data.demo_per_class=8", "augment.crop_scale=[0.5, 1]", "train.focal_alpha=null",
        "train.jit_compile=false", "train.lr=1e-4", "name=123"])
    exp = config.resolve(None, {"data.task": "multilabel", "train.lr": 0.01}, sets)
    assert exp.data.demo_per_class == 8 and exp.augment.crop_scale == (0.5, 1.0)
    assert exp.train.focal_alpha is None and exp.train.jit_compile == "false"
    assert exp.train.lr == 0.01  # a named flag wins over --set
    assert exp.name == "123"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.parse_assignments(["train.lr"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'.*Did you mean 'lr'"):
        config.resolve(None, {}, config.parse_assignments(["train.lrr=3"]))


def test_multilabel_demo_preset():
    exp = config.resolve(None, {"data.task": "multilabel", "train.loss": "focal"})
    assert exp.data.dir == "demo" and exp.model.weights == "none" and exp.train.loss == "focal"
    assert exp.data.labels == ("covid-19", "normal", "pneumonia")
    # ResNet18 (BatchNorm) learns from scratch within the 5-minute CPU budget; VGG16 does not.
    assert (exp.model.backbone, exp.train.optimizer, exp.train.lr, exp.train.epochs) == (
        "resnet18", "adam", 5e-4, 8)
    assert (exp.data.image_size, exp.data.demo_per_class) == (48, 160)
    assert config.resolve(None, {"data.task": "multilabel", "model.backbone": "vgg16"}).model.backbone == "vgg16"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_two_epoch_multilabel_fit(loss, multilabel_tree, tmp_path):
    exp = config.resolve(None, {
        "data.dir": str(multilabel_tree), "data.task": "multilabel", "data.image_size": 32,
        "model.backbone": "resnet18", "model.weights": "none", "model.freeze": "all", "train.loss": loss,
        "train.epochs": 2, "train.batch_size": 4, "train.optimizer": "adam", "train.lr": 1e-3,
        "out": str(tmp_path)})
    lines = []
    run = train.fit(exp, log=lines.append)
    with open(run / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert len(history) == 2
    assert {"jaccard", "f1", "loss", "val_jaccard", "val_f1", "val_loss"} <= set(history[0])
    assert all(np.isfinite(float(row["loss"])) for row in history)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["task"] == "multilabel"
    assert summary["outputs"] == ["covid-19", "normal", "pneumonia"]
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        report = summary["splits"][split]
        assert report["n"] == n and 0.0 <= report["jaccard_samples"] <= 1.0
        assert sum(report["per_label"][lab]["support"] for lab in summary["outputs"]) == n * 4 // 3
    # The checkpoints know what they predict, even when copied out of the run directory.
    copy = tmp_path / "copied.keras"
    shutil.copy(run / "checkpoints" / "last.keras", copy)
    trained = metadata.load(copy)
    assert trained.run_dir is None and trained.task == "multilabel"
    assert trained.outputs == ("covid-19", "normal", "pneumonia") and trained.image_size == 32
    model = metadata.load(run, "best").model
    assert model.name == "tfcovid_resnet18_multilabel"
    assert any(f"loss {loss}" in line for line in lines)
    table = [line for line in "\n".join(lines).splitlines() if line.startswith("| ResNet18 |")]
    assert table and table[0].split(" | ")[1] == {"bce": "BCE with logits", "focal": "focal"}[loss]


def test_compiled_loss_reduction():
    # Focal is summed over the batch (the study's), BCE averaged (PyTorch's default).
    import keras

    from tfcovid.models import build_model

    for loss, reduction, expected in (("focal", "sum", "sum"), ("focal", "mean", "sum_over_batch_size"),
                                      ("bce", "sum", "sum_over_batch_size")):
        exp = config.resolve(None, {"data.task": "multilabel", "train.loss": loss},
                             config.parse_assignments([f"train.focal_reduction={reduction}"]))
        model = build_model("resnet18", 3, 16)
        compile.compile_model(model, exp, 0)
        assert isinstance(model.loss, keras.losses.Loss) and model.loss.reduction == expected
