"""Operating points (issue 23.2): chosen on fixed arrays, checked against scikit-learn's
roc_curve, at the edges; and the one decision rule (issue 23.1) in NumPy and TensorFlow."""

import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as skm

from tfcovid import config
from tfcovid.config import operating_point as syntax
from tfcovid.config.checks import ConfigError
from tfcovid.models.outputs import decide, decisions
from tfcovid.results import operating_point, scores
from tfcovid.results.operating_point import OperatingPointError, choose

RNG = np.random.default_rng(7)
# 20 positives scored higher on average than 30 negatives, with overlap; class 0 is the disease.
Y = np.array([0] * 20 + [1] * 30)
P_POS = np.concatenate([RNG.uniform(0.3, 0.95, 20), RNG.uniform(0.05, 0.7, 30)])
PROBS = np.stack([P_POS, 1 - P_POS], axis=1)
OUTPUTS = ("infected", "normal")


def _binary(spec, y=Y, probs=PROBS):
    return choose(y, probs, "binary", spec, OUTPUTS, "infected")


def _sens_spec(is_pos, score, t):
    pred = score >= t
    return pred[is_pos].mean(), (~pred[~is_pos]).mean()


def _roc():
    fpr, tpr, thr = skm.roc_curve(Y == 0, P_POS, drop_intermediate=False)
    return fpr, tpr, thr


def test_youden_is_sklearns_best_point():
    fpr, tpr, thr = _roc()
    point = _binary("youden")
    best = int(np.argmax(tpr - fpr))
    assert (tpr - fpr)[best] > 0 and point["thresholds"] == [thr[best]]
    assert point["chosen_on"] == "validation" and point["method"] == "youden"
    fig = point["figures"]["infected"]
    assert (fig["sensitivity"], fig["specificity"]) == pytest.approx((tpr[best], 1 - fpr[best]))
    assert fig["positives"] == 20 and fig["negatives"] == 30


@pytest.mark.parametrize("target", [0.0, 0.5, 0.95, 1.0])
def test_sensitivity_target_is_the_highest_threshold_that_reaches_it(target):
    _, _, thr = _roc()
    t = _binary(f"sensitivity:{target}")["thresholds"][0]
    sens, _ = _sens_spec(Y == 0, P_POS, t)
    assert sens >= target
    higher = thr[(thr > t) & np.isfinite(thr)]  # every higher candidate misses the target
    assert all(_sens_spec(Y == 0, P_POS, h)[0] < target for h in higher)
    if target == 1.0:
        assert t == P_POS[:20].min()  # the lowest-scored positive
    if target == 0.0:
        assert t == P_POS.max()  # the highest finite threshold: one image positive


@pytest.mark.parametrize("target", [0.0, 0.9, 1.0])
def test_specificity_target_is_the_lowest_threshold_that_keeps_it(target):
    fpr, _, thr = _roc()
    t = _binary(f"specificity:{target}")["thresholds"][0]
    _, spec = _sens_spec(Y == 0, P_POS, t)
    assert spec >= target
    lower = thr[thr < t]
    assert all(_sens_spec(Y == 0, P_POS, low)[1] < target for low in lower)
    if target == 1.0:
        assert t == thr[np.flatnonzero(fpr == 0)[-1]]
    if target == 0.0:
        assert t == P_POS.min()  # everything positive


def test_specificity_above_every_score_when_only_that_keeps_it():
    y = np.array([0, 1, 1])
    p = np.array([0.4, 0.6, 0.5])  # the top score is a negative
    t = choose(y, np.stack([p, 1 - p], 1), "binary", "specificity:1", OUTPUTS, "infected")["thresholds"][0]
    assert t == np.nextafter(0.6, 1) and _sens_spec(y == 0, p, t) == (0.0, 1.0)


def test_ties_in_scores_decide_together():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.8, 0.6, 0.6, 0.6, 0.3, 0.3])  # tied scores across the classes
    probs = np.stack([p, 1 - p], 1)
    fpr, tpr, thr = skm.roc_curve(y == 0, p, drop_intermediate=False)
    assert sorted(thr[1:]) == [0.3, 0.6, 0.8]  # one candidate per distinct score
    for spec, want in (("sensitivity:0.6", 0.6), ("youden", thr[1 + np.argmax((tpr - fpr)[1:])])):
        t = choose(y, probs, "binary", spec, OUTPUTS, "infected")["thresholds"][0]
        assert t == want
        assert len(set(decide(probs, "binary", [t], 0)[p == 0.6, 0])) == 1


@pytest.mark.parametrize("present", [0, 1])
def test_a_validation_split_without_positives_or_negatives_is_named(present):
    y = np.full(6, present)
    with pytest.raises(OperatingPointError) as err:
        choose(y, PROBS[:6], "binary", "sensitivity:0.95", OUTPUTS, "infected")
    missing = "positive" if present == 1 else "negative"
    assert f"the validation split: it has no {missing} images of 'infected'" in str(err.value)
    # A fixed number needs neither.
    assert choose(y, PROBS[:6], "binary", "0.3", OUTPUTS, "infected")["thresholds"] == [0.3]


def test_three_labels_choose_per_label():
    labels = ["covid-19", "normal", "pneumonia"]
    y = (RNG.uniform(size=(40, 3)) < 0.4).astype(int)
    y[:2] = [[1, 0, 1], [0, 1, 0]]  # both classes in every label
    probs = np.clip(0.5 * y + RNG.uniform(0, 0.6, (40, 3)), 0, 0.99)
    point = choose(y, probs, "multilabel", "sensitivity:0.9", labels)
    for i, name in enumerate(labels):
        assert point["figures"][name]["threshold"] == point["thresholds"][i]
        _, tpr, thr = skm.roc_curve(y[:, i], probs[:, i], drop_intermediate=False)
        assert point["thresholds"][i] == thr[np.flatnonzero(tpr >= 0.9)[0]]
    y[:, 2] = 0
    with pytest.raises(OperatingPointError, match="no positive images of 'pneumonia'"):
        choose(y, probs, "multilabel", "youden", labels)


@pytest.mark.parametrize("spec", ["", "0", "1", "1.5", "nan", "youden:1", "sensitivity", "sensitivity:1.01",
                                  "specificity:-0.1", "recall:0.9"])
def test_bad_specs_are_refused_with_the_forms(spec):
    with pytest.raises(ValueError, match="sensitivity:S"):
        syntax.parse(spec)
    with pytest.raises(ConfigError, match="train.operating_point"):
        config.from_dict({"train": {"operating_point": spec}})


def test_spec_forms():
    assert syntax.parse("threshold", 0.3) == ("fixed", 0.3)
    assert syntax.parse("0.25") == ("fixed", 0.25) and syntax.parse(" YOUDEN ") == ("youden", None)
    assert syntax.parse("sensitivity:1") == ("sensitivity", 1.0)
    assert config.from_dict({}).train.operating_point == "threshold"  # the study's configs: 0.5


def test_the_rule_in_numpy_and_tensorflow_agree():
    probs = RNG.uniform(size=(64, 3))
    binary = probs[:, :2] / probs[:, :2].sum(1, keepdims=True)
    for task, p, t, k in (("binary", binary, [0.37], 0), ("binary", binary, [0.61], 1),
                          ("multilabel", probs, [0.2, 0.5, 0.8], 0)):
        want = decide(p, task, t, k)
        got = decisions(tf.constant(p, tf.float32), task, t, k).numpy()
        np.testing.assert_array_equal(got, want)
    # Binary at 0.5 with the disease at index 0 (the study's "infected") is the argmax.
    np.testing.assert_array_equal(decide(binary, "binary", [0.5], 0).argmax(1), binary.argmax(1))
    # At 0.37 it is not: the report follows the threshold, not the argmax.
    report = scores.binary_report(Y, PROBS, OUTPUTS, "infected", 0.37)
    pred = np.where(P_POS >= 0.37, 0, 1)
    assert report["confusion_matrix"] == skm.confusion_matrix(Y, pred, labels=[0, 1]).tolist()
    assert report["threshold"] == 0.37 and (pred != PROBS.argmax(1)).any()


def test_describe_names_the_method_and_the_figures():
    text = operating_point.describe(_binary("sensitivity:0.95"))
    assert text.startswith("Operating point: sensitivity:0.95, chosen on validation")
    assert "infected: threshold " in text and "validation: sensitivity " in text
