"""Figures with their uncertainty (issue 23.4/23.6): average precision, Brier score, ECE and the
bootstrap intervals, against scikit-learn, scipy.stats.bootstrap and formulas on fixed arrays."""

import time

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from tfcovid import config
from tfcovid.results import scores
from tfcovid.results import uncertainty as u


def _case(n=200, seed=7, share=0.4, digits=2):
    """Labels and scores with ties (rounded), positives scoring higher on average."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < share
    s = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), digits)
    return y, s


def test_point_figures_match_sklearn_and_the_ece_formula():
    y, s = _case()
    got = u.point_figures(y, s)
    assert got["average_precision"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert got["brier"] == pytest.approx(skm.brier_score_loss(y, s), abs=1e-12)
    # ECE from calibration_curve's bins (scores rounded to 0.01 lie on bin edges too: the counts
    # come from the same edges, searched the way calibration_curve searches them)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], s), minlength=10)
    weights = counts[counts > 0] / len(s)
    assert got["ece"] == pytest.approx(float((weights * np.abs(prob_true - prob_pred)).sum()), abs=1e-12)
    # by hand: bins 0 {.05}, 1 {.15, .15}, 9 {.95}: (.05 + 2 x .35 + .05) / 4
    assert u.expected_calibration_error(np.array([0, 1, 0, 1], bool), np.array([.05, .15, .15, .95])) == \
        pytest.approx(0.2, abs=1e-12)


def test_ece_bins_put_edge_values_where_calibration_curve_does():
    # 0.1 belongs to bin 0 (0, 0.1] with 0.0, 0.2 to bin 1, 1.0 to bin 9: other edges change the means
    p = np.array([0.0, 0.1, 0.1, 0.15, 0.2, 0.2, 0.9, 1.0, 1.0])
    y = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1], bool)
    count, total, positives = u.calibration_bins(y, p)
    assert count.tolist() == [3, 3, 0, 0, 0, 0, 0, 0, 1, 2]
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    kept = count > 0
    np.testing.assert_allclose(positives[kept] / count[kept], prob_true, atol=1e-12)
    np.testing.assert_allclose(total[kept] / count[kept], prob_pred, atol=1e-12)
    # perfect scores have no calibration error; constant 0.5 on half positives neither
    assert u.expected_calibration_error(y, y.astype(float)) == 0.0
    assert u.expected_calibration_error(np.array([0, 1] * 5, bool), np.full(10, 0.5)) == 0.0


def test_per_resample_figures_are_sklearn_on_the_resampled_images():
    y, s = _case(n=120)
    hit = s >= 0.5
    indices = next(u.resample_indices(len(y), 1000, 3))[:25]
    counts = u.counts_of(indices)
    auc = u.auc_values(counts, y, s)
    values = u.decision_values(counts, y, hit)
    for row, idx in enumerate(indices):
        yy, ss, hh = y[idx], s[idx], hit[idx]
        assert auc[row] == pytest.approx(skm.roc_auc_score(yy, ss), abs=1e-12)
        assert values["sensitivity"][row] == pytest.approx(skm.recall_score(yy, hh), abs=1e-12)
        assert values["specificity"][row] == pytest.approx(skm.recall_score(~yy, ~hh), abs=1e-12)
        assert values["f1"][row] == pytest.approx(skm.f1_score(yy, hh), abs=1e-12)
    # A resample of one class: AUC and the other class's figure undefined, F1 0 (zero_division=0)
    one = np.zeros((1, len(y)))
    one[0, np.flatnonzero(~y)[:3]] = 40  # three negatives, 120 draws
    assert np.isnan(u.auc_values(one, y, s)).all()
    got = u.decision_values(one, y, np.zeros_like(hit))
    assert np.isnan(got["sensitivity"][0]) and got["specificity"][0] == 1.0 and got["f1"][0] == 0.0


def test_per_sample_multilabel_means_are_sklearns_sample_averages():
    y = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], bool)
    p = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 1], [1, 1, 0], [1, 0, 0]], bool)
    got = u.per_sample_multilabel(y, p)
    assert got["accuracy"].mean() == pytest.approx(skm.jaccard_score(y, p, average="samples", zero_division=0))
    assert got["f1"].mean() == pytest.approx(skm.f1_score(y, p, average="samples", zero_division=0))
    assert got["accuracy"][1] == 0.0 and got["f1"][1] == 0.0  # no true and no predicted label


def _rank_auc(y, s):
    """ROC AUC by the rank-sum formula (midranks for ties): roc_auc_score's value, 100x faster."""
    ranks, n_pos = stats.rankdata(s), y.sum()
    return (ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos))


@pytest.mark.parametrize("figure, statistic", [
    ("accuracy", lambda yy, ss: np.mean((ss >= 0.5) == yy.astype(bool))),
    ("sensitivity", lambda yy, ss: np.mean(ss[yy.astype(bool)] >= 0.5)),
    ("roc_auc", lambda yy, ss: _rank_auc(yy.astype(bool), ss)),
])
def test_intervals_agree_with_scipy_bootstrap_percentile(figure, statistic):
    """Same data, same resample count, percentile method; their random streams differ, so the
    ends agree within 0.3 bootstrap standard errors (the Monte Carlo error of a 2.5th percentile
    from 1000 resamples is about 0.085 standard errors each; both: ~0.12)."""
    y, s = _case()
    assert _rank_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    hit = s >= 0.5
    means, columns = u.bootstrap({"d": (y, s, hit)}, {"accuracy": (hit == y).astype(float)}, len(y), 1000, 0)
    ours = means["accuracy"] if figure == "accuracy" else columns["d"][figure]
    ref = stats.bootstrap((y, s), statistic, paired=True, vectorized=False, n_resamples=1000,
                          method="percentile", random_state=1)
    tolerance = 0.3 * ref.standard_error
    assert ours["resamples"] == 1000
    assert abs(ours["low"] - ref.confidence_interval.low) < tolerance
    assert abs(ours["high"] - ref.confidence_interval.high) < tolerance


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    y, s = _case()
    labels = np.where(y, 0, 1)  # class 0 "infected" is the disease class
    probs = np.stack([s, 1 - s], axis=1)
    first = scores.binary_report(labels, probs, ["infected", "normal"], "infected", seed=5)
    again = scores.binary_report(labels, probs, ["infected", "normal"], "infected", seed=5)
    other = scores.binary_report(labels, probs, ["infected", "normal"], "infected", seed=6)
    assert first == again and first["intervals"] != other["intervals"]
    assert first["uncertainty"] == {"bootstrap_resamples": 1000, "seed": 5, "confidence": 0.95,
                                    "interval": "percentile", "ece_bins": 10}
    ci = first["intervals"]
    for key in ("accuracy", "sensitivity", "specificity", "f1", "roc_auc"):
        assert ci[key]["low"] <= first[key] <= ci[key]["high"] and ci[key]["resamples"] == 1000, key
    assert first["average_precision"] == pytest.approx(skm.average_precision_score(y, s))
    assert first["brier"] == pytest.approx(skm.brier_score_loss(y, s))
    none = scores.binary_report(labels, probs, ["infected", "normal"], "infected", resamples=0)
    assert none["intervals"] == {} and none["uncertainty"]["bootstrap_resamples"] == 0


def test_binary_undefined_cases():
    # one class only: AUC, AP and the positives' figures undefined, with no interval
    only_normal = scores.binary_report([1, 1, 1, 1], [[.2, .8], [.6, .4], [.1, .9], [.3, .7]],
                                       ["infected", "normal"], "infected")
    assert only_normal["roc_auc"] is None and only_normal["average_precision"] is None
    ci = only_normal["intervals"]
    assert ci["roc_auc"] is None and ci["sensitivity"] is None
    assert ci["specificity"]["resamples"] == 1000 and ci["accuracy"]["resamples"] == 1000
    assert only_normal["brier"] == pytest.approx(np.mean(np.array([.2, .6, .1, .3]) ** 2))
    # one positive in 30: resamples without it are skipped for sensitivity and AUC, and counted
    labels = np.array([0] + [1] * 29)
    probs = np.stack([np.linspace(0.9, 0.05, 30), 1 - np.linspace(0.9, 0.05, 30)], axis=1)
    rare = scores.binary_report(labels, probs, ["infected", "normal"], "infected", seed=2)
    drawn = np.concatenate(list(u.resample_indices(30, 1000, 2)))
    with_it = int((drawn == 0).any(axis=1).sum())
    assert 500 < with_it < 1000  # (29/30)^30 ~ 36 % of the resamples miss it
    assert rare["intervals"]["roc_auc"]["resamples"] == with_it == rare["intervals"]["sensitivity"]["resamples"]
    assert rare["intervals"]["specificity"]["resamples"] == 1000


def test_multilabel_intervals_and_undefined_labels():
    rng = np.random.default_rng(0)
    y = np.zeros((60, 3), int)
    y[:, 0] = rng.random(60) < 0.5
    y[:, 1] = 1 - y[:, 0]  # "normal": every image not covid-19
    # pneumonia: no positive at all in this split
    probs = np.clip(y * 0.5 + rng.random((60, 3)) * 0.5, 0, 1)
    got = scores.multilabel_report(y, probs, ["covid-19", "normal", "pneumonia"], seed=1)
    y_pred = probs >= 0.5
    for i, name in enumerate(["covid-19", "normal"]):
        m = got["per_label"][name]
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, i], probs[:, i]))
        assert m["average_precision"] == pytest.approx(skm.average_precision_score(y[:, i], probs[:, i]))
        assert m["brier"] == pytest.approx(skm.brier_score_loss(y[:, i], probs[:, i]))
        assert set(m["intervals"]) == {"sensitivity", "specificity", "f1", "roc_auc"}
        assert m["intervals"]["roc_auc"]["low"] <= m["roc_auc"] <= m["intervals"]["roc_auc"]["high"]
    none = got["per_label"]["pneumonia"]
    assert none["roc_auc"] is None and none["average_precision"] is None
    assert none["intervals"]["roc_auc"] is None and none["intervals"]["sensitivity"] is None
    assert none["intervals"]["specificity"]["resamples"] == 1000
    assert got["intervals"]["accuracy"]["low"] <= got["jaccard_samples"] <= got["intervals"]["accuracy"]["high"]
    assert got["jaccard_samples"] == pytest.approx(skm.jaccard_score(y, y_pred, average="samples", zero_division=0))
    assert set(got["intervals"]) == {"accuracy", "f1"}


def test_a_thousand_resamples_of_1500_images_take_well_under_seconds():
    y, s = _case(n=1500, digits=4)
    hit = s >= 0.5
    start = time.perf_counter()
    u.bootstrap({"d": (y, s, hit)}, {"accuracy": (hit == y).astype(float)}, 1500, 1000, 0)
    # ~0.4 s on the shared 2-core machine (docs/performance.md); the bound only catches a
    # quadratic slip (a loop over resamples or pairs takes tens of seconds)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("value, ok", [(0, True), (99, False), (100, True), (100_000, True), (100_001, False)])
def test_bootstrap_resamples_setting_limits(value, ok):
    if ok:
        assert config.resolve(None, {"train.bootstrap_resamples": value}).train.bootstrap_resamples == value
    else:
        with pytest.raises(config.ConfigError, match=r"'train.bootstrap_resamples': .* Use 0 \(no confidence"):
            config.resolve(None, {"train.bootstrap_resamples": value})
