"""Class imbalance (issue 23.3): train.class_weight in the losses, data.sampling balanced in the
train pipeline, demo-data --imbalance, and one tiny fit recording both keys."""

import json
from dataclasses import replace

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from tfcovid import config
from tfcovid.config import ConfigError
from tfcovid.config.schema import AugmentConfig
from tfcovid.data import class_weights, demo, folders, pipeline, sampling, types
from tfcovid.training import losses, train
from tfcovid.weights import metadata

LOGITS = np.array([[2.0, -1.0, 0.5], [-3.0, 0.2, 4.0], [0.0, 7.0, -6.0]], np.float32)
TARGETS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], np.float32)
POS_WEIGHT = np.array([3.0, 0.5, 9.0])


def _terms(x=LOGITS, y=TARGETS, w=POS_WEIGHT):
    """float64 reference: per-label weighted BCE and the focal factors, from the formula."""
    p = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    bce = -(w * y * np.log(p) + (1 - y) * np.log(1 - p))
    return p, bce


# ----------------------------------------------------------------------------------- the losses

def test_weighted_bce_is_the_formula_and_keras_bce_at_weight_one():
    _, bce = _terms()
    loss = losses.get_loss("bce", class_weight=list(POS_WEIGHT))
    np.testing.assert_allclose(float(loss(TARGETS, LOGITS)), bce.mean(axis=1).mean(), rtol=1e-6)
    ones = losses.get_loss("bce", class_weight=[1.0, 1.0, 1.0])
    reference = keras.losses.BinaryCrossentropy(from_logits=True)
    np.testing.assert_allclose(float(ones(TARGETS, LOGITS)), float(reference(TARGETS, LOGITS)), rtol=1e-6)
    # A positive weight moves positives only: the all-negative row is the plain BCE.
    y = np.zeros_like(TARGETS)
    np.testing.assert_allclose(float(loss(y, LOGITS)), float(reference(y, LOGITS)), rtol=1e-6)


def test_weighted_bce_is_finite_at_extreme_logits():
    x = np.array([[80.0, -80.0, 0.0]], np.float32)
    value = float(losses.get_loss("bce", class_weight=[9.0, 9.0, 9.0])(np.array([[0, 1, 1]], np.float32), x))
    np.testing.assert_allclose(value, (80.0 + 9 * 80.0 + 9 * np.log(2)) / 3, rtol=1e-5)


def test_focal_pos_weight_multiplies_the_positive_term_under_alpha_and_gamma():
    p, bce = _terms()
    alpha, gamma = 0.25, 2.0
    pt = TARGETS * p + (1 - TARGETS) * (1 - p)
    at = TARGETS * alpha + (1 - TARGETS) * (1 - alpha)
    expected = (at * (1 - pt) ** gamma * bce).sum()  # summed over labels and batch
    loss = losses.get_loss("focal", alpha=alpha, gamma=gamma, reduction="sum", class_weight=list(POS_WEIGHT))
    np.testing.assert_allclose(float(loss(TARGETS, LOGITS)), expected, rtol=1e-5)
    plain = losses.get_loss("focal", alpha=alpha, gamma=gamma, reduction="sum")
    ones = losses.get_loss("focal", alpha=alpha, gamma=gamma, reduction="sum", class_weight=[1.0] * 3)
    np.testing.assert_allclose(float(ones(TARGETS, LOGITS)), float(plain(TARGETS, LOGITS)), rtol=1e-6)


def test_weighted_ce_is_keras_class_weight_semantics():
    logits = np.array([[1.0, 2.0], [0.3, -1.0], [2.0, 2.0], [-4.0, 4.0]], np.float32)
    labels = np.array([0, 1, 1, 0])
    w = np.array([5.0, 0.5])
    log_softmax = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))
    expected = np.mean(-w[labels] * log_softmax[np.arange(4), labels])  # divided by the batch, not sum(w)
    loss = losses.get_loss("ce", class_weight=list(w))
    np.testing.assert_allclose(float(loss(labels, logits)), expected, rtol=1e-6)
    keras_weighted = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        labels, logits, sample_weight=w[labels])
    np.testing.assert_allclose(float(loss(labels, logits)), float(keras_weighted), rtol=1e-6)


@pytest.mark.parametrize("weights", [[0.0, 1.0], [-1.0, 2.0], [np.nan, 1.0], [np.inf, 1.0], []])
def test_losses_refuse_weights_that_are_not_positive(weights):
    for name in ("ce", "bce", "focal"):
        with pytest.raises(ValueError, match="finite numbers > 0"):
            losses.get_loss(name, class_weight=weights)


def test_weighted_losses_survive_get_config():
    for name in ("ce", "bce", "focal"):
        loss = losses.get_loss(name, class_weight=[2.0, 0.5, 1.5][: 2 if name == "ce" else 3])
        again = type(loss).from_config(loss.get_config())
        y = np.array([0, 1, 1]) if name == "ce" else TARGETS
        x = LOGITS[:, :2] if name == "ce" else LOGITS
        np.testing.assert_allclose(float(again(y, x)), float(loss(y, x)), rtol=1e-7)


# ------------------------------------------------------------------ weights from the train split

def _split(labels, folders_=()):
    labels = np.asarray(labels)
    return types.Split("train", "/data/train", tuple(f"{i}.png" for i in range(len(labels))), labels,
                       tuple(folders_))


def test_balanced_weights_binary_are_sklearns_and_multilabel_are_neg_over_pos():
    binary = _split([0, 0, 1, 1, 1, 1, 1, 1])
    assert class_weights.resolve("balanced", "binary", binary, ("infected", "normal")) == (8 / 4, 8 / 12)
    multi = _split([[1, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]])
    assert class_weights.resolve("balanced", "multilabel", multi, ("covid-19", "normal", "pneumonia")) == (
        3 / 2, 3 / 2, 2 / 3)
    assert class_weights.resolve("none", "binary", binary, ("infected", "normal")) is None
    assert class_weights.resolve({"normal": 0.25}, "binary", binary, ("infected", "normal")) == (1.0, 0.25)


def test_unknown_names_and_empty_labels_are_named():
    binary = _split([0, 0, 1])
    with pytest.raises(types.DataError, match=r"'infectd'.*infected, normal"):
        class_weights.resolve({"infectd": 3}, "binary", binary, ("infected", "normal"))
    with pytest.raises(types.DataError, match=r"no images of class 'normal'"):
        class_weights.resolve("balanced", "binary", _split([0, 0, 0]), ("infected", "normal"))
    multi = _split([[0, 1, 0], [0, 0, 1]])
    with pytest.raises(types.DataError, match=r"no positive images of label 'covid-19'"):
        class_weights.resolve("balanced", "multilabel", multi, ("covid-19", "normal", "pneumonia"))
    with pytest.raises(types.DataError, match=r"no negative images of label 'normal'"):
        class_weights.resolve("balanced", "multilabel", _split([[1, 1, 0], [0, 1, 1]]),
                              ("covid-19", "normal", "pneumonia"))


@pytest.mark.parametrize("value, ok", [
    ({"infected": 0}, False), ({"infected": -1}, False), ({"infected": 1e-9}, True),
    ({"infected": 1000}, True), ({"infected": 1000.001}, False), ({"infected": float("nan")}, False),
    ({"infected": True}, False), ({}, False), ("sometimes", False), ("BALANCED", True), (None, True),
    (["infected"], False)])
def test_class_weight_config_edges(value, ok):
    assignments = {"train": {"class_weight": value}}
    if ok:
        exp = config.resolve(None, {}, assignments)
        assert exp.train.class_weight in ("balanced", "none") or exp.train.class_weight == {
            k: float(v) for k, v in value.items()}
    else:
        with pytest.raises(ConfigError, match="'train.class_weight'"):
            config.resolve(None, {}, assignments)


def test_sampling_and_label_names_checked_in_the_config():
    with pytest.raises(ConfigError, match=r"'data.sampling': 'oversample'. Valid values: natural, balanced"):
        config.resolve(None, {"data.sampling": "oversample"})
    with pytest.raises(ConfigError, match=r"\['covid'\] not in data.labels"):
        config.resolve(None, {"data.task": "multilabel"}, config.parse_assignments(["train.class_weight={covid: 2}"]))
    exp = config.resolve(None, {"data.task": "multilabel"}, config.parse_assignments(
        ["train.class_weight={covid-19: 9}", "data.sampling=balanced"]))
    again = config.from_dict(yaml.safe_load(yaml.safe_dump(exp.to_dict())))
    assert again.train.class_weight == {"covid-19": 9.0} and again.data.sampling == "balanced"


# ---------------------------------------------------------------------------- balanced sampling

def test_balanced_order_proportions_repeats_and_keys():
    group_of = np.repeat([0, 1, 2], [50, 150, 800])
    order = sampling.balanced_order(group_of, [0, 3])
    assert len(order) == 1000
    counts = np.bincount(group_of[order], minlength=3)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 1000  # 333 or 334 per group
    seen = np.bincount(order, minlength=1000)
    assert set(seen[:50]) <= {6, 7}  # the small group cycles through fresh permutations
    assert set(seen[50:200]) <= {2, 3}
    assert seen[200:].max() == 1 and (seen[200:] == 1).sum() in (333, 334)
    np.testing.assert_array_equal(order, sampling.balanced_order(group_of, [0, 3]))
    assert not np.array_equal(order, sampling.balanced_order(group_of, [0, 4]))
    # Another epoch key draws another subset of the large group.
    other = sampling.balanced_order(group_of, [0, 4])
    assert set(order[order >= 200]) != set(other[other >= 200])


def test_groups_are_classes_for_binary_and_folders_for_three_labels():
    split = _split([[1, 0, 1], [0, 1, 0], [0, 0, 1]], ("covid-19", "normal", "pneumonia"))
    np.testing.assert_array_equal(sampling.groups(split, "multilabel"), [0, 1, 2])
    np.testing.assert_array_equal(sampling.groups(_split([1, 0, 1]), "binary"), [1, 0, 1])


@pytest.fixture(scope="module")
def imbalanced_tree(tmp_path_factory):
    return demo.make_demo_data(tmp_path_factory.mktemp("data") / "imbalanced", "binary", per_class=8,
                               image_size=(16, 24), imbalance=(1, 4))


def test_pipeline_epochs_are_balanced_and_keyed_on_seed_and_epoch(imbalanced_tree):
    train_split = folders.scan(imbalanced_tree, "binary").splits["train"]  # 2 infected, 8 normal
    assert np.bincount(train_split.labels).tolist() == [2, 8]
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = pipeline.dataset(train_split, 16, 5, training=True, aug=AugmentConfig(), seed=3, epoch=epoch,
                          groups=sampling.groups(train_split, "binary"))

    def one_epoch(e):
        epoch.assign(e)
        images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
        return np.concatenate(images), np.concatenate(labels)

    first, labels = one_epoch(0)
    assert np.bincount(labels).tolist() == [5, 5]  # 10 slots, 5 per class
    again, labels_again = one_epoch(0)
    np.testing.assert_array_equal(first, again)  # same (seed, epoch): the same batches
    np.testing.assert_array_equal(labels, labels_again)
    assert not np.array_equal(first, one_epoch(1)[0])
    # A repeated image gets its own augmentation in each of its slots.
    s = replace(pipeline._stages(train_split, 16, 5, True, AugmentConfig(), None, 2.0),
                groups=sampling.groups(train_split, "binary"))
    rows = list(pipeline._one_epoch(s, tf.constant([3, 0], tf.int64)).as_numpy_iterator())
    index = np.array([r[0] for r in rows])
    plans = np.stack([r[1] for r in rows])
    repeated = np.flatnonzero(index == index[train_split.labels[index] == 0][0])
    assert len(repeated) >= 2 and not np.array_equal(plans[repeated[0]], plans[repeated[1]])


def test_prepared_records_refuse_balanced_sampling():
    split = types.Split("train", "/prepared/train", ("a.png",), np.array([0]))
    sampling.refuse_records(split, "balanced")  # an ImageFolder split: fine
    shards = type("RecordSplit", (), {"shards": ("s0.tfrecord",), "dir": "/prepared/train"})()
    with pytest.raises(types.DataError, match=r"data.sampling balanced is not supported for a prepared"):
        sampling.refuse_records(shards, "balanced")
    sampling.refuse_records(shards, "natural")


# ------------------------------------------------------------------------- the imbalanced demo

def test_demo_imbalance_counts_are_exact(tmp_path):
    out = demo.make_demo_data(tmp_path / "d", "multilabel", per_class=12, image_size=(16, 20), imbalance=(1, 3))
    counts = {split: {c: len(list((out / split / c).iterdir())) for c in demo.DEMO_CLASSES["multilabel"]}
              for split in demo.SPLITS}
    expected = {"covid-19": 4, "normal": 12, "pneumonia": 12}
    assert counts["train"] == expected
    assert counts["validation"] == counts["test"] == {"covid-19": 2, "normal": 3, "pneumonia": 3}
    assert json.loads((out / "demo.json").read_text())["counts"] == counts
    assert demo.minority_count(100, (1, 9)) == 11 and demo.minority_count(400, (1, 9)) == 44


@pytest.mark.parametrize("text, ok", [("1:9", (1, 9)), ("1:1", (1, 1)), ("0:9", None), ("9:1", None),
                                      ("1:0", None), ("a:b", None), ("1-9", None), ("", None)])
def test_parse_imbalance(text, ok):
    if ok:
        assert demo.parse_imbalance(text) == ok
    else:
        with pytest.raises(ValueError, match="--imbalance"):
            demo.parse_imbalance(text)


# ----------------------------------------------------------------------------- one tiny real fit

@pytest.mark.slow
def test_tiny_fit_records_both_keys(imbalanced_tree, tmp_path):
    exp = config.resolve(None, {
        "data.dir": str(imbalanced_tree), "data.image_size": 16, "model.backbone": "resnet18",
        "model.weights": "none", "model.freeze": "all", "train.epochs": 1, "train.batch_size": 2,
        "out": str(tmp_path),
        "data.sampling": "balanced"}, {"train": {"class_weight": {"infected": 4}}})
    lines = []
    run = train.fit(exp, log=lines.append)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["sampling"] == "balanced" and saved["train"]["class_weight"] == {"infected": 4.0}
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["imbalance"] == {"sampling": "balanced", "class_weight": {"infected": 4.0},
                                    "weights": {"infected": 4.0, "normal": 1.0}}
    assert any("class weights (given, from the train split): infected 4, normal 1" in line for line in lines)
    loaded = metadata.load(run, "best")  # a model trained with the weighted loss reloads
    assert loaded.outputs == ("infected", "normal") and loaded.model.output_shape == (None, 2)
