"""Temperature scaling (issue 23.5/23.6): the fit against a direct minimisation of the NLL on
fixed logits (both tasks), the ECE against scikit-learn's calibration_curve, the recorded
temperature checked when a model is loaded, and train.calibrate's values."""

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from tfcovid import config
from tfcovid.models.outputs import probabilities
from tfcovid.results import calibration
from tfcovid.weights import metadata


def _overconfident(task: str, n: int = 1000, scale: float = 3.0, seed: int = 0):
    """Logits that are ``scale`` times too large: labels drawn from the probabilities of
    logits / scale, so the best temperature is close to ``scale``."""
    rng = np.random.default_rng(seed)
    if task == "binary":
        true = rng.normal(0, 1.5, (n, 2))
        p = np.exp(true) / np.exp(true).sum(1, keepdims=True)
        y = (rng.random(n) >= p[:, 0]).astype(int)  # class 0 with probability p[:, 0]
    else:
        true = rng.normal(0, 1.5, (n, 3))
        y = (rng.random((n, 3)) < 1 / (1 + np.exp(-true))).astype(int)
    return true * scale, y


def _nll_by_formula(logits, y, task, t):
    """-mean log p(true label) for each temperature in ``t``, written out: softmax / sigmoid
    probabilities, then their logs."""
    z = np.asarray(logits, float)[None] / np.reshape(t, (-1, 1, 1))
    if task == "binary":
        p = np.exp(z - z.max(2, keepdims=True))
        p /= p.sum(2, keepdims=True)
        return -np.mean(np.log(p[:, np.arange(len(y)), y]), axis=1)
    p = 1 / (1 + np.exp(-z))
    return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p), axis=(1, 2))


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_the_temperature_is_the_direct_minimum_of_the_validation_nll(task):
    logits, y = _overconfident(task)
    fitted = calibration.fit_temperature(logits, y, task)
    grid = np.geomspace(2, 4.5, 2001)  # steps of 0.04 %
    columns = [slice(None)] if task == "binary" else [[i] for i in range(3)]
    assert len(fitted) == len(columns)
    for t, cols in zip(fitted, columns):
        z, yy = logits[:, cols], (y if task == "binary" else y[:, cols])
        losses = _nll_by_formula(z, yy, task, grid)
        best = grid[int(np.argmin(losses))]
        assert t == pytest.approx(best, rel=5e-4)
        assert _nll_by_formula(z, yy, task, t)[0] <= losses.min() + 1e-12
        assert 2.5 < t < 3.5  # the logits were made 3 times too large
    record = calibration.record(logits, y, task, ["a", "b"] if task == "binary" else ["a", "b", "c"], "a")
    after, before = np.ravel(record["nll_after"]), np.ravel(record["nll_before"])
    assert (after < before).all() and (np.ravel(record["ece_after"]) < np.ravel(record["ece_before"])).all()
    assert record["method"] == "temperature" and record["fitted_on"] == "validation" and record["images"] == 1000
    assert isinstance(record["temperature"], float if task == "binary" else list)


def test_the_fit_stops_at_its_bounds_and_refuses_what_cannot_be_fitted():
    # Separable logits: the NLL falls as T falls, so the fit ends at the lower bound.
    logits = np.array([[2.0, -2.0], [-1.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    y = np.array([0, 1, 0, 1])
    # (The NLL is flat there, so Brent's method stops short of the bound: the bound is taken.)
    (t,) = calibration.fit_temperature(logits, y, "binary")
    assert t == pytest.approx(0.01, rel=1e-12) and calibration.at_bound(t)
    assert calibration.nll(logits, y, "binary", t)[0] < 1e-12
    # Every prediction wrong: the NLL falls as T rises (towards log 2), to the upper bound.
    (t,) = calibration.fit_temperature(logits, 1 - y, "binary")
    assert t == pytest.approx(100.0, rel=1e-12) and calibration.at_bound(t)
    with pytest.raises(calibration.CalibrationError, match="validation split: it has no images"):
        calibration.fit_temperature(np.zeros((0, 2)), np.zeros(0), "binary")
    with pytest.raises(calibration.CalibrationError, match="non-finite"):
        calibration.fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]), "binary")



def test_a_temperature_at_a_search_bound_is_said_so_and_an_inner_one_is_not():
    # A user saw "temperature 100" for a model no better than chance, with nothing saying that
    # 100 is where the search stops; inner values, even just inside the bounds, get no note.
    note = "T at the search bound (0.01 or 100): the validation split cannot pin it down"
    record = {"method": "temperature", "fitted_on": "validation", "nll_before": 0.9, "nll_after": 0.69,
              "ece_before": 0.4, "ece_after": 0.01}
    for t, said in [(100.0, True), (0.01, True), (99.9, False), (0.0101, False), (1.3, False),
                    ([1.2, 100.0, 0.8], True), ([1.2, 0.9, 0.8], False)]:
        line = calibration.describe({**record, "temperature": t})
        assert (note in line) is said, (t, line)
    # The fit gives the bound only when the NLL keeps falling towards it: an inner minimum stays.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    logits = np.stack([np.zeros(400), (2 * y - 1) * 1.0 + rng.normal(0, 1.5, 400)], axis=1)
    (t,) = calibration.fit_temperature(logits, y, "binary")
    assert not calibration.at_bound(t) and 0.05 < t < 20

def test_ece_matches_calibration_curve_also_on_bin_edges():
    rng = np.random.default_rng(1)
    score = np.concatenate([rng.random(200), [0.0, 0.1, 0.5, 0.9, 1.0, 0.30000001]])
    is_pos = rng.random(len(score)) < score ** 2
    true, pred = calibration_curve(is_pos, score, n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], score), minlength=10)
    counts = counts[counts > 0]  # calibration_curve leaves out empty bins
    assert calibration.ece(is_pos, score) == pytest.approx(np.sum(counts / len(score) * np.abs(true - pred)))
    assert calibration.ece([1, 0], [1.0, 0.0]) == 0.0 and calibration.ece([0, 1], [1.0, 0.0]) == 1.0


def test_probabilities_divide_the_logits_and_no_temperature_changes_nothing():
    z = np.array([[2.0, -1.0], [0.3, 0.2]])
    assert np.array_equal(probabilities(z, "binary", ()), probabilities(z, "binary"))
    got = probabilities(z, "binary", (2.0,))
    e = np.exp(z / 2)
    np.testing.assert_allclose(got, e / e.sum(1, keepdims=True), rtol=1e-12)
    z3 = np.array([[2.0, -1.0, 0.5]])
    np.testing.assert_allclose(probabilities(z3, "multilabel", (2.0, 0.5, 1.0)),
                               1 / (1 + np.exp(-np.array([[1.0, -2.0, 0.5]]))), rtol=1e-12)


def test_train_calibrate_is_none_unless_asked_and_checked_by_name():
    assert config.resolve(None, {}).train.calibrate == "none"
    assert config.resolve(None, {"train.calibrate": "temperature"}).train.calibrate == "temperature"
    with pytest.raises(config.ConfigError, match="'train.calibrate': 'platt'. Valid values: none, temperature"):
        config.resolve(None, {"train.calibrate": "platt"})


def test_a_recorded_temperature_is_loaded_and_a_bad_one_refused(tmp_path):
    data = Path(__file__).parent / "data"
    for task, good, bad in (("binary", 1.7, [[1.0, 2.0], 0, -1.0, float("nan"), True, "2"]),
                            ("multilabel", [0.5, 1.0, 2.0], [[1.0, 2.0], [1.0, 0.0, 1.0], 2.0])):
        path = tmp_path / f"{task}.keras"
        shutil.copy(data / f"pre_layout_{task}.keras", path)
        info = metadata.read_embedded(path) or {}
        metadata.embed(path, {**info, "calibration": {"method": "temperature", "temperature": good}})
        assert metadata.load(path).temperature == tuple(np.ravel(good))
        for value in bad:
            metadata.embed(path, {**info, "calibration": {"method": "temperature", "temperature": value}})
            with pytest.raises(metadata.ModelInfoError, match="bad calibration"):
                metadata.load(path)
        metadata.embed(path, {**info, "calibration": {"method": "none"}})
        assert metadata.load(path).temperature == ()


def test_calibrate_fits_per_label_temperatures_that_predict_and_the_export_apply(multilabel_tree, tmp_path):
    """`calibrate --calibrate temperature` on a three-label model: one T per label, the minimum
    of each label's validation NLL; predict and the SavedModel give sigmoid(logit / T); then
    `--calibrate none` removes it, and calibrate without a flag says what to give."""
    import tensorflow as tf
    from click.testing import CliRunner
    from fake_run import make_run, reference_probs

    from tfcovid.cli import main
    from tfcovid.data import folders
    from tfcovid.inference import export
    from tfcovid.inference import predict as inference_predict

    run = make_run(tmp_path, multilabel_tree, "multilabel", bias=[0.3, -0.2, 0.1])
    done = CliRunner().invoke(main, ["calibrate", str(run), "--calibrate", "temperature", "--operating-point", "0.5"])
    assert done.exit_code == 0, done.output
    assert "Calibration: temperature " in done.output and "fitted on validation" in done.output
    trained = metadata.load(run)
    validation = folders.scan(multilabel_tree, "multilabel", trained.outputs, config.STUDY_LABEL_MAP).splits["validation"]
    raw = reference_probs(run, validation.paths, "multilabel")
    logits = np.log(raw) - np.log1p(-raw)  # the logits back from the sigmoids
    assert len(trained.temperature) == 3
    np.testing.assert_allclose(trained.temperature, calibration.fit_temperature(logits, validation.labels, "multilabel"),
                               rtol=1e-4)
    files = sorted((multilabel_tree / "test").rglob("*.*"))
    z = np.log(reference_probs(run, files, "multilabel")) - np.log1p(-reference_probs(run, files, "multilabel"))
    want = 1 / (1 + np.exp(-z / np.asarray(trained.temperature)))
    got = inference_predict.predict(trained, files)
    np.testing.assert_allclose(np.asarray(got.probs)[[got.paths.index(str(f)) for f in files]], want, atol=2e-5)
    saved = tf.saved_model.load(str(export.export(run, tmp_path / "sm", log=lambda s: None)))
    out = saved.signatures["serving_default"](image_bytes=tf.constant([f.read_bytes() for f in files]))
    np.testing.assert_allclose(out["probabilities"].numpy(), want, atol=2e-5)

    done = CliRunner().invoke(main, ["calibrate", str(run), "--calibrate", "none"])
    assert done.exit_code == 0, done.output
    assert metadata.load(run).temperature == () and "calibration" not in metadata.read_embedded(
        run / "checkpoints" / "last.keras")
    done = CliRunner().invoke(main, ["calibrate", str(run)])
    assert done.exit_code == 2 and "Give --operating-point SPEC, --calibrate temperature|none, or both." in done.output


def test_report_names_a_calibrated_run_even_at_0_5():
    """At 0.5 a temperature never changes a decision (softmax/sigmoid of z / T >= 0.5 iff z >= 0),
    but the probabilities differ: report lists the run with its temperature."""
    from tfcovid.results import operating_point, tables

    record = {"method": "temperature", "temperature": 0.5566, "fitted_on": "validation",
              "nll_before": 0.1606, "nll_after": 0.1284, "ece_before": 0.0719, "ece_after": 0.0367}
    plain = {"operating_point": operating_point.fixed([0.5])}
    lines = tables._operating_points([(Path("plain"), {}, plain), (Path("calib"), {}, {**plain, "calibration": record})])
    assert lines[4:-1] == ["- `calib`: threshold (fixed); Calibration: temperature 0.5566, fitted on validation; "
                           "NLL 0.1606 -> 0.1284, ECE 0.0719 -> 0.0367"]
    assert tables._operating_points([(Path("plain"), {}, plain)]) == []
    z = np.array([[0.3, -0.2], [-1.0, 2.0], [0.0, 0.0]])
    assert (probabilities(z, "binary", (0.3,))[:, 0] >= 0.5).tolist() == (probabilities(z, "binary")[:, 0] >= 0.5).tolist()


def test_calibrate_refuses_a_run_a_fit_is_training_in(binary_tree, tmp_path, monkeypatch):
    """calibrate writes the run's checkpoint and metrics.json: while a fit holds the run's lock
    it stops, naming the run and the process, and changes nothing; once free it calibrates."""
    from click.testing import CliRunner
    from fake_run import make_run

    from tfcovid.cli import main
    from tfcovid.utils import run_lock

    run = make_run(tmp_path, binary_tree, "binary", bias=[0.3, -0.2])
    before = (run / "checkpoints" / "last.keras").read_bytes()
    held = run_lock.RunLock(run).acquire()  # as fit holds it while it trains
    loads = []  # the model is not read before the lock is held: weights read then could be stale
    real_load = metadata.load
    monkeypatch.setattr(metadata, "load", lambda *args, **kw: loads.append(args) or real_load(*args, **kw))
    try:
        done = CliRunner().invoke(main, ["calibrate", str(run), "--calibrate", "temperature"])
    finally:
        held.release()
    assert loads == []
    assert done.exit_code == 1, done.output
    assert f"{run} is in use: process {os.getpid()} is training in it. Wait for it to end" in done.output
    assert "calibrate writes the checkpoint and metrics.json" in done.output and "Traceback" not in done.output
    assert (run / "checkpoints" / "last.keras").read_bytes() == before
    done = CliRunner().invoke(main, ["calibrate", str(run), "--calibrate", "temperature"])
    assert done.exit_code == 0, done.output
    assert "temperature" in metadata.read_embedded(run / "checkpoints" / "last.keras")["calibration"]["method"]
    assert not (run / run_lock.LOCK_NAME).exists()  # released after
