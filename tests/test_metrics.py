"""Tests for tfcovid.results.scores: hand-worked cases, scikit-learn agreement, degenerate input."""

import json
import warnings

import keras
import numpy as np
import pytest
from sklearn import metrics as skm

from tfcovid.training.epoch_metrics import BinaryF1, SampleF1, SampleJaccard
from tfcovid.results.scores import binary_report, multilabel_report, study_row

BINARY = ("infected", "normal")
LABELS = ("covid-19", "normal", "pneumonia")


def _assert_plain_json(obj):
    """Only built-in types all the way down (np.int64 etc. would break json or YAML)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) is str
            _assert_plain_json(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _assert_plain_json(v)
    else:
        assert obj is None or type(obj) in (bool, int, float, str), (obj, type(obj))
    json.dumps(obj)


def _logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1.0 - p)).astype(np.float32)


# ----------------------------------------------------------------- binary_report


def _binary_example():
    # 5 samples, infected = 0, normal = 1; argmax predictions [0, 0, 1, 1, 0].
    y = [0, 0, 0, 1, 1]
    p_inf = np.array([0.9, 0.8, 0.4, 0.3, 0.6])
    return y, np.stack([p_inf, 1 - p_inf], axis=1)


def test_binary_report_by_hand():
    y, probs = _binary_example()
    r = binary_report(y, probs, BINARY)
    # infected: tp=2 (s1, s2), fn=1 (s3), fp=1 (s5) -> P = R = F1 = 2/3.
    # normal:   tp=1 (s4), fn=1 (s5), fp=1 (s3) -> F1 = 1/2 (the study's F1);
    #           specificity = recall of normal = 1/2.
    # accuracy 3/5. AUC(infected): positives {.9,.8,.4} vs negatives {.3,.6}:
    #           5 of 6 pairs ordered correctly (only .4 < .6 fails).
    assert r["n"] == 5
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["positive_class"] == "infected" and r["positive_index"] == 0
    for key in ("f1", "precision", "recall", "sensitivity"):
        assert r[key] == pytest.approx(2 / 3)
    assert r["specificity"] == pytest.approx(0.5)
    assert r["f1_study"] == pytest.approx(0.5)
    assert r["f1_study_positive_class"] == "normal"
    assert r["roc_auc"] == pytest.approx(5 / 6)
    assert r["confusion_matrix"] == [[2, 1], [1, 1]]
    np.testing.assert_allclose(r["confusion_matrix_normalized"], [[2 / 3, 1 / 3], [0.5, 0.5]])
    assert r["class_names"] == ["infected", "normal"]
    assert r["notes"] == []
    _assert_plain_json(r)


def test_binary_report_f1_study_is_sklearn_default_f1():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    probs = rng.dirichlet([1, 1], 200)
    r = binary_report(y, probs, BINARY)
    pred = probs.argmax(1)
    assert r["f1_study"] == pytest.approx(skm.f1_score(y, pred), abs=1e-12)
    assert r["f1"] == pytest.approx(skm.f1_score(y, pred, pos_label=0), abs=1e-12)
    assert r["roc_auc"] == pytest.approx(skm.roc_auc_score(y == 0, probs[:, 0]), abs=1e-12)


def test_binary_report_unknown_positive_falls_back_to_index_0():
    y, probs = _binary_example()
    r = binary_report(y, probs, ("covid", "healthy"))
    assert r["positive_class"] == "covid" and r["positive_index"] == 0
    assert "'infected'" in r["notes"][0]
    assert r["f1"] == pytest.approx(2 / 3)


def test_binary_report_positive_at_index_1():
    y, probs = _binary_example()
    r = binary_report(y, probs, ("normal", "infected"), positive="infected")
    # Same data, names swapped: disease is now index 1, so f1 == f1_study == 1/2.
    # ROC AUC is unchanged: the positive class and its scores flip together.
    assert r["positive_index"] == 1
    assert r["f1"] == pytest.approx(0.5) and r["f1_study"] == pytest.approx(0.5)
    assert r["specificity"] == pytest.approx(2 / 3)
    assert r["roc_auc"] == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    "bad",
    [
        dict(y_true=[0, 1], probs=[[1, 0], [0, 1]], class_names=("a", "b", "c")),
        dict(y_true=[0, 1], probs=[[1, 0, 0], [0, 1, 0]], class_names=BINARY),
        dict(y_true=[0, 2], probs=[[1, 0], [0, 1]], class_names=BINARY),
        dict(y_true=[], probs=np.zeros((0, 2)), class_names=BINARY),
    ],
)
def test_binary_report_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="Received|no samples"):
        binary_report(**bad)


# ------------------------------------------------------------- multilabel_report

# Columns (covid-19, normal, pneumonia).
#   s1 true [1,0,1] pred [1,0,1]  J = 1    F1 = 1
#   s2 true [0,1,0] pred [0,1,1]  J = 1/2  F1 = 2*1/(1+2) = 2/3   (0.5 >= 0.5 predicts)
#   s3 true [0,0,1] pred [0,0,0]  J = 0    F1 = 0
#   s4 true [0,0,0] pred [0,0,0]  J = 0    F1 = 0   (empty/empty is 0 in sklearn, and counts)
# Jaccard = 1.5/4 = 0.375, F1 = (5/3)/4 = 5/12,
# precision = (1 + 1/2 + 0 + 0)/4 = 0.375, recall = (1 + 1 + 0 + 0)/4 = 0.5,
# exact match = 2/4 (s1, s4), hamming = 2 wrong cells / 12 = 1/6.
ML_TRUE = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
ML_PROBS = np.array(
    [[0.9, 0.2, 0.8], [0.1, 0.7, 0.5], [0.2, 0.3, 0.3], [0.1, 0.4, 0.1]], dtype=np.float32
)


def test_multilabel_report_by_hand():
    r = multilabel_report(ML_TRUE, ML_PROBS, LABELS)
    assert r["n"] == 4 and r["threshold"] == 0.5
    assert r["jaccard_samples"] == pytest.approx(0.375)
    assert r["accuracy"] == r["jaccard_samples"]
    assert r["f1"] == pytest.approx(5 / 12)
    assert r["precision"] == pytest.approx(0.375)
    assert r["recall"] == pytest.approx(0.5)
    assert r["exact_match"] == pytest.approx(0.5)
    assert r["hamming_loss"] == pytest.approx(1 / 6)
    # covid-19 and normal are each perfect: one positive, three negatives.
    for name in ("covid-19", "normal"):
        pl = r["per_label"][name]
        assert pl["confusion_matrix"] == [[3, 0], [0, 1]]
        assert pl["f1"] == pl["specificity"] == pl["roc_auc"] == 1.0
        assert pl["support"] == 1
    # pneumonia: true [1,0,1,0], pred [1,1,0,0] -> tn=1 fp=1 fn=1 tp=1.
    # AUC: positives {.8,.3} vs negatives {.5,.1}: 3 of 4 pairs ordered.
    pn = r["per_label"]["pneumonia"]
    assert pn["confusion_matrix"] == [[1, 1], [1, 1]]
    for key in ("f1", "precision", "recall", "sensitivity", "specificity"):
        assert pn[key] == pytest.approx(0.5)
    assert pn["support"] == 2
    assert pn["roc_auc"] == pytest.approx(0.75)
    _assert_plain_json(r)


def test_multilabel_report_matches_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    y = (rng.random((120, 3)) < 0.4).astype(int)
    probs = rng.random((120, 3))
    y[:10] = 0
    probs[:5] = 0.1  # empty true and empty prediction
    r = multilabel_report(y, probs, LABELS, threshold=0.6)
    pred = (probs >= 0.6).astype(int)
    kw = dict(average="samples", zero_division=0)
    assert r["jaccard_samples"] == pytest.approx(skm.jaccard_score(y, pred, **kw), abs=1e-12)
    assert r["f1"] == pytest.approx(skm.f1_score(y, pred, **kw), abs=1e-12)
    assert r["precision"] == pytest.approx(skm.precision_score(y, pred, **kw), abs=1e-12)
    assert r["recall"] == pytest.approx(skm.recall_score(y, pred, **kw), abs=1e-12)
    assert r["exact_match"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert r["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred), abs=1e-12)
    for i, name in enumerate(LABELS):
        pl = r["per_label"][name]
        assert pl["f1"] == pytest.approx(skm.f1_score(y[:, i], pred[:, i]), abs=1e-12)
        spec = skm.recall_score(y[:, i], pred[:, i], pos_label=0)
        assert pl["specificity"] == pytest.approx(spec, abs=1e-12)
        assert pl["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, i], probs[:, i]), abs=1e-12)


@pytest.mark.parametrize(
    "bad",
    [
        dict(y_true=ML_TRUE, probs=ML_PROBS[:, :2], labels=LABELS),
        dict(y_true=ML_TRUE, probs=ML_PROBS, labels=LABELS[:2]),
        dict(y_true=ML_TRUE * 2, probs=ML_PROBS, labels=LABELS),
        dict(y_true=ML_TRUE, probs=ML_PROBS, labels=LABELS, threshold=1.0),
    ],
)
def test_multilabel_report_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="Received"):
        multilabel_report(**bad)


# ----------------------------------------------------------------- no warnings


def test_degenerate_input_gives_zeros_and_nones_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Only infected present, all predicted infected.
        r = binary_report([0, 0, 0], [[0.9, 0.1]] * 3, BINARY)
        assert r["accuracy"] == 1.0 and r["f1"] == 1.0
        assert r["specificity"] == 0.0 and r["f1_study"] == 0.0 and r["roc_auc"] is None
        assert r["confusion_matrix_normalized"] == [[1.0, 0.0], [0.0, 0.0]]
        assert r["notes"] == ["no 'normal' images in this split: specificity is undefined (reported as 0.0)"]
        # Only normal present, all predicted infected.
        r = binary_report([1, 1], [[0.6, 0.4]] * 2, BINARY)
        assert r["f1"] == r["precision"] == r["recall"] == r["f1_study"] == 0.0
        assert r["notes"] == ["no 'infected' images in this split: sensitivity is undefined (reported as 0.0)"]
        assert r["confusion_matrix"] == [[0, 0], [2, 0]]
        # Multi-label: nothing predicted; nothing true; a single sample.
        y = np.array([[1, 0, 1], [0, 1, 0]])
        r = multilabel_report(y, np.zeros((2, 3)), LABELS)
        assert r["jaccard_samples"] == r["f1"] == r["precision"] == 0.0
        assert r["per_label"]["covid-19"]["roc_auc"] == 0.5
        r = multilabel_report(np.zeros((2, 3)), np.zeros((2, 3)), LABELS)
        assert r["jaccard_samples"] == 0.0 and r["exact_match"] == 1.0
        assert all(pl["roc_auc"] is None for pl in r["per_label"].values())
        r = multilabel_report([[0, 1, 0]], [[0.1, 0.9, 0.2]], LABELS)
        assert r["jaccard_samples"] == 1.0
        _assert_plain_json(r)


# ----------------------------------------------------------------- study_row


def test_study_row():
    b = {"accuracy": 0.94, "f1_study": 0.955}
    m = {"jaccard_samples": 0.93, "f1": 0.925}
    assert study_row({"test": b}, "binary") == {"test": pytest.approx((94.0, 0.955))}
    row = study_row({"train": m, "validation": m}, "multilabel")
    assert list(row) == ["train", "validation"]
    assert row["validation"] == pytest.approx((93.0, 92.5))
    with pytest.raises(ValueError, match="binary"):
        study_row({}, "three-label")


# ----------------------------------------------------------------- Keras metrics


def _accumulate(metric, y, y_pred, splits, sample_weight=None):
    metric.reset_state()
    for idx in np.array_split(np.arange(len(y)), splits):
        sw = None if sample_weight is None else sample_weight[idx]
        metric.update_state(y[idx], y_pred[idx], sample_weight=sw)
    return float(metric.result())


def test_sample_metrics_by_hand():
    # Same four samples as test_multilabel_report_by_hand: J = 0.375, F1 = 5/12.
    y = ML_TRUE.astype(np.float32)
    assert _accumulate(SampleJaccard(from_logits=False), y, ML_PROBS, 2) == pytest.approx(0.375)
    assert _accumulate(SampleF1(from_logits=False), y, ML_PROBS, 2) == pytest.approx(5 / 12)
    logits = _logit(ML_PROBS)
    assert _accumulate(SampleJaccard(), y, logits, 3) == pytest.approx(0.375)
    assert _accumulate(SampleF1(), y, logits, 3) == pytest.approx(5 / 12)


@pytest.mark.parametrize("weighted", [False, True])
def test_sample_metrics_match_sklearn_over_batches(weighted):
    rng = np.random.default_rng(2)
    n = 97
    y = (rng.random((n, 3)) < 0.4).astype(np.float32)
    logits = rng.normal(0, 2, (n, 3)).astype(np.float32)
    y[:12] = 0
    logits[:6] = -5.0  # empty/empty rows
    logits[20:25] = -5.0  # nothing predicted, something true
    sw = rng.random(n).astype(np.float32) if weighted else None
    for threshold in (0.5, 0.3):
        pred = (keras.ops.convert_to_numpy(keras.ops.sigmoid(logits)) >= threshold).astype(int)
        kw = dict(average="samples", zero_division=0, sample_weight=sw)
        want_j = skm.jaccard_score(y.astype(int), pred, **kw)
        want_f = skm.f1_score(y.astype(int), pred, **kw)
        got_j = _accumulate(SampleJaccard(threshold), y, logits, 5, sw)
        got_f = _accumulate(SampleF1(threshold), y, logits, 5, sw)
        assert got_j == pytest.approx(want_j, abs=1e-6)
        assert got_f == pytest.approx(want_f, abs=1e-6)


@pytest.mark.parametrize("positive_index", [0, 1])
def test_binary_f1_matches_sklearn_over_batches(positive_index):
    rng = np.random.default_rng(3)
    n = 83
    y = rng.integers(0, 2, n)
    logits = rng.normal(0, 1, (n, 2)).astype(np.float32)
    pred = logits.argmax(1)
    sw = rng.random(n).astype(np.float32)
    m = BinaryF1(positive_index)
    want = skm.f1_score(y, pred, pos_label=positive_index, zero_division=0)
    assert _accumulate(m, y, logits, 4) == pytest.approx(want, abs=1e-6)
    assert _accumulate(m, y.reshape(-1, 1), logits, 4) == pytest.approx(want, abs=1e-6)
    one_hot = np.eye(2, dtype=np.float32)[y]
    assert _accumulate(m, one_hot, logits, 4) == pytest.approx(want, abs=1e-6)
    want_w = skm.f1_score(y, pred, pos_label=positive_index, sample_weight=sw, zero_division=0)
    assert _accumulate(m, y, logits, 4, sw) == pytest.approx(want_w, abs=1e-6)


def test_binary_f1_by_hand_and_empty():
    # Example from test_binary_report_by_hand: infected F1 2/3, normal F1 1/2.
    y, probs = _binary_example()
    y = np.array(y)
    assert _accumulate(BinaryF1(0), y, probs, 2) == pytest.approx(2 / 3)
    assert _accumulate(BinaryF1(1), y, probs, 2) == pytest.approx(0.5)
    # No positives anywhere: sklearn's zero_division=0 gives 0, not NaN.
    assert _accumulate(BinaryF1(1), np.zeros(4, int), np.tile([[2.0, 0.0]], (4, 1)), 2) == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: SampleJaccard(0.4, from_logits=False),
        lambda: SampleF1(0.7, name="f1_s"),
        lambda: BinaryF1(1, name="f1_study"),
    ],
)
def test_keras_metrics_config_round_trip(make):
    metric = make()
    config = metric.get_config()
    clone = type(metric).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert type(restored) is type(metric) and restored.get_config() == config


def test_keras_metrics_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        SampleJaccard(threshold=1.5)
    with pytest.raises(ValueError, match="positive_index"):
        BinaryF1(positive_index=-1)


# Keras' own model.save trips a NumPy 2 deprecation inside Keras; not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_compiled_metrics_agree_with_reports(tmp_path):
    """In model.compile the metrics give the report's numbers, also after save/load."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(45, 4)).astype(np.float32)

    y_ml = (rng.random((45, 3)) < 0.4).astype(np.float32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[SampleJaccard(), SampleF1()],
    )
    got = model.evaluate(x, y_ml, batch_size=8, verbose=0, return_dict=True)
    probs = keras.ops.convert_to_numpy(keras.ops.sigmoid(model.predict(x, verbose=0)))
    want = multilabel_report(y_ml, probs, LABELS)
    assert got["jaccard"] == pytest.approx(want["jaccard_samples"], abs=1e-6)
    assert got["f1"] == pytest.approx(want["f1"], abs=1e-6)
    path = tmp_path / "ml.keras"
    model.save(path)
    with warnings.catch_warnings():
        # The never-built optimizer has no variables to restore; irrelevant here.
        warnings.filterwarnings("ignore", message="Skipping variable loading")
        reloaded = keras.saving.load_model(path)
    again = reloaded.evaluate(x, y_ml, batch_size=8, verbose=0, return_dict=True)
    assert again["jaccard"] == pytest.approx(got["jaccard"], abs=1e-6)

    y_bin = rng.integers(0, 2, 45)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BinaryF1(0), BinaryF1(1, name="f1_study")],
    )
    got = model.evaluate(x, y_bin, batch_size=8, verbose=0, return_dict=True)
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(model.predict(x, verbose=0)))
    want = binary_report(y_bin, probs, BINARY)
    assert got["f1"] == pytest.approx(want["f1"], abs=1e-6)
    assert got["f1_study"] == pytest.approx(want["f1_study"], abs=1e-6)
