"""One decision rule everywhere (issue 23.1): the same images through fit's evaluation, evaluate,
predict, explain, the SavedModel export and calibrate decide alike at a model's operating point,
also when it is not 0.5 and per label."""

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from fake_run import make_run, reference_probs
from sklearn import metrics as skm

from tfcovid import config
from tfcovid.cli import main
from tfcovid.data import decode
from tfcovid.inference import calibrate, evaluate, explain, export
from tfcovid.inference import predict as inference_predict
from tfcovid.models.outputs import decide, probabilities
from tfcovid.training import train
from tfcovid.weights import metadata

DATA = Path(__file__).parent / "data"

def _every_path(run, tree, tmp_path, seen=None):
    """{path: decision} from evaluate's CSV, predict, explain and the SavedModel, per path;
    ``seen``: a dict that gets each path's probabilities {path: (n, outputs)}, in file order."""
    files = sorted((tree / "test").rglob("*.*"))
    trained = metadata.load(run)
    result = evaluate.evaluate(run, split="test", make_plots=False, log=lambda s: None)
    with open(result["files"][1], newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_evaluate = {row["path"]: row["predicted"] for row in rows}
    got = inference_predict.predict(trained, [tree / "test"])
    if trained.task == "binary":
        by_predict = dict(zip(got.paths, got.predicted))
    else:
        by_predict = {p: "+".join(o for o, v in zip(got.outputs, row) if v) for p, row in zip(got.paths, got.predicted)}
    shown = explain.explain(run, files, tmp_path / "cam", log=lambda s: None)
    by_explain = {}
    for item in shown:
        by_explain.setdefault(item["image"], []).append(item["label"])
    saved = tf.saved_model.load(str(export.export(run, tmp_path / "sm", log=lambda s: None)))
    labels = saved.signatures["serving_default"](image_bytes=tf.constant([f.read_bytes() for f in files]))
    by_saved = {str(f): s.decode().replace(",", "+") for f, s in zip(files, labels["labels"].numpy())}
    if seen is not None:
        order = [str(f) for f in files]
        seen["evaluate"] = np.array([[float(row[o]) for o in trained.outputs]
                                     for row in sorted(rows, key=lambda r: order.index(r["path"]))])
        seen["predict"] = np.asarray(got.probs)[[got.paths.index(p) for p in order]]
        seen["explain"] = {item["image"]: (trained.outputs.index(item["label"]), item["probability"]) for item in shown}
        seen["saved_model"] = labels["probabilities"].numpy()
    return files, result, by_evaluate, by_predict, {k: "+".join(v) for k, v in by_explain.items()}, by_saved


@pytest.fixture(scope="module")
def binary_run(binary_tree, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("decide"), binary_tree, "binary", bias=[0.2, -0.2])


def test_binary_paths_decide_at_a_threshold_that_is_not_the_argmax(binary_run, binary_tree, tmp_path):
    files = sorted((binary_tree / "test").rglob("*.*"))
    p = reference_probs(binary_run, files, "binary")[:, 0]  # the disease class, infected
    # A threshold in the widest gap between the test images' probabilities above 0.5: some
    # images the argmax calls infected are normal at it.
    above = np.sort(p[p >= 0.5])
    gaps = np.diff(above)
    k = int(np.argmax(gaps))
    assert above.size >= 2 and gaps[k] > 1e-3
    t = float((above[k] + above[k + 1]) / 2)
    done = CliRunner().invoke(main, ["calibrate", str(binary_run), "--operating-point", f"{t!r}"])
    assert done.exit_code == 0, done.output
    assert metadata.load(binary_run).thresholds == (t,)
    assert "chosen on" not in done.output and f"infected: threshold {t:.4g}" in done.output

    want = {str(f): "infected" if q >= t else "normal" for f, q in zip(files, p)}
    assert any(w == "normal" and q >= 0.5 for w, q in zip(want.values(), p))  # differs from argmax
    _, result, *paths = _every_path(binary_run, binary_tree, tmp_path)
    for decided in paths:
        assert decided == want
    truth = [0 if f.parent.name == "infected" else 1 for f in files]
    pred = [0 if want[str(f)] == "infected" else 1 for f in files]
    assert result["report"]["confusion_matrix"] == skm.confusion_matrix(truth, pred, labels=[0, 1]).tolist()
    assert result["report"]["threshold"] == t and result["operating_point"]["thresholds"] == [t]


def test_three_label_paths_decide_per_label(multilabel_tree, tmp_path):
    run = make_run(tmp_path, multilabel_tree, "multilabel", bias=[0.3, -0.2, 0.1])
    point = calibrate.calibrate(run, "youden", log=lambda s: None)  # on validation, per label
    trained = metadata.load(run)
    assert trained.thresholds == tuple(point["thresholds"]) and len(set(point["thresholds"])) == 3
    files = sorted((multilabel_tree / "test").rglob("*.*"))
    p = reference_probs(run, files, "multilabel")
    want = {str(f): "+".join(o for o, q, t in zip(trained.outputs, row, trained.thresholds) if q >= t)
            for f, row in zip(files, p)}
    _, result, by_evaluate, by_predict, by_explain, by_saved = _every_path(run, multilabel_tree, tmp_path)
    assert by_evaluate == want and by_predict == want and by_saved == want
    # explain shows the labels set, or the most probable one when none is
    assert by_explain == {k: v or trained.outputs[int(np.argmax(p[files.index(next(f for f in files if str(f) == k))]))]
                          for k, v in want.items()}
    assert result["report"]["threshold"] == pytest.approx(point["thresholds"])


def test_fit_chooses_on_validation_and_every_path_agrees(binary_tree, tmp_path):
    exp = config.resolve(None, {
        "data.dir": str(binary_tree), "data.image_size": 32, "model.backbone": "resnet18",
        "model.weights": "none", "model.freeze": "all", "train.epochs": 1, "train.batch_size": 4,
        "train.operating_point": "sensitivity:1.0", "train.calibrate": "temperature",
        "out": str(tmp_path / "runs")})
    lines = []
    run = train.fit(exp, log=lines.append)
    metrics = json.loads((run / "metrics.json").read_text())
    point = metrics["operating_point"]
    assert point["chosen_on"] == "validation" and point["figures"]["infected"]["sensitivity"] == 1.0
    assert metadata.load(run).thresholds == tuple(point["thresholds"])  # recorded in last.keras
    # one epoch: best.keras holds the same weights, so the same point
    assert metadata.load(run, "best").thresholds == tuple(point["thresholds"]) != (0.5,)
    assert any(line.startswith("Operating point: sensitivity:1.0, chosen on validation") for line in lines)
    # evaluate scores the test split as fit did, at the same point
    again = evaluate.evaluate(run, split="test", make_plots=False, log=lambda s: None)
    assert again["report"] == metrics["splits"]["test"]
    assert metrics["splits"]["validation"]["sensitivity"] == 1.0
    # Calibrated first (train.calibrate), then the point chosen on the calibrated probabilities:
    # sensitivity:1.0 is the lowest calibrated probability of a validation positive.
    calib = metrics["calibration"]
    assert calib["method"] == "temperature" and calib["fitted_on"] == "validation"
    assert set(calib) >= {"temperature", "nll_before", "nll_after", "ece_before", "ece_after"}
    assert calib["nll_after"] <= calib["nll_before"]
    assert metadata.load(run).temperature == (calib["temperature"],) and metadata.load(run).calibration == calib
    val = evaluate.evaluate(run, split="validation", make_plots=False, log=lambda s: None)
    with open(val["files"][1], newline="") as fh:
        rows = list(csv.DictReader(fh))
    lowest = min(float(r["infected"]) for r in rows if r["true_folder"] == "infected")
    assert point["thresholds"][0] == pytest.approx(lowest, abs=1e-6)  # the CSV keeps 6 decimals
    assert val["calibration"] == calib
    for name in ("validation_reliability", "test_reliability", "test_pr", "test_roc"):
        assert (run / "plots" / f"{name}.png").is_file()
    assert any(line.startswith("Calibration: temperature ") for line in lines)


def _flipping_threshold(raw, calibrated):
    """A threshold that the calibrated and the raw probabilities fall on different sides of for
    some image, as far as possible from every probability (so float32 paths decide alike)."""
    values = np.sort(np.concatenate([raw, calibrated]))
    mids = (values[1:] + values[:-1]) / 2
    flips = [(min(np.abs(values - m)), m) for m in mids if ((raw >= m) != (calibrated >= m)).any()]
    margin, t = max(flips)
    assert margin > 1e-3
    return float(t)


def test_a_calibrated_model_gives_the_same_probabilities_and_decisions_everywhere(binary_tree, tmp_path):
    """T = 0.4 recorded in the model: evaluate, predict, explain, the SavedModel and TFLite all
    give softmax(logits / T), and decide on it (issue 23.6)."""
    run = make_run(tmp_path, binary_tree, "binary", bias=[0.2, -0.2])
    path = run / "checkpoints" / "last.keras"
    metadata.embed(path, {**metadata.read_embedded(path),
                          "calibration": {"method": "temperature", "temperature": 0.4}})
    files = sorted((binary_tree / "test").rglob("*.*"))
    raw = reference_probs(run, files, "binary")
    calibrated = probabilities(np.log(raw), "binary", (0.4,))  # log-softmax: the logits up to a shift
    t = _flipping_threshold(raw[:, 0], calibrated[:, 0])
    done = CliRunner().invoke(main, ["calibrate", str(run), "--operating-point", f"{t!r}"])
    assert done.exit_code == 0, done.output
    assert metadata.load(run).temperature == (0.4,) and metadata.load(run).thresholds == (t,)
    want = {str(f): "infected" if q >= t else "normal" for f, q in zip(files, calibrated[:, 0])}
    assert want != {str(f): "infected" if q >= t else "normal" for f, q in zip(files, raw[:, 0])}
    seen = {}
    _, _, *paths = _every_path(run, binary_tree, tmp_path, seen)
    for decided in paths:
        assert decided == want
    for name in ("evaluate", "predict", "saved_model"):
        np.testing.assert_allclose(seen[name], calibrated, atol=2e-5, err_msg=name)
    for image, (k, p) in seen["explain"].items():
        assert p == pytest.approx(calibrated[[str(f) for f in files].index(image), k], abs=2e-5)
    tflite = export.export(run, tmp_path / "tflite", format="tflite", log=lambda s: None)
    info = json.loads((tflite.parent / "tfcovid.json").read_text())
    assert info["temperature"] == [0.4] and info["thresholds"] == [t]
    with warnings.catch_warnings():  # tf.lite.Interpreter warns that LiteRT replaces it
        warnings.simplefilter("ignore")
        runner = tf.lite.Interpreter(model_path=str(tflite)).get_signature_runner()
    x = np.stack([decode.load_image(str(f), 32).numpy() for f in files]).astype("float32")
    np.testing.assert_allclose(runner(pixels=x)["probabilities"], calibrated, atol=1e-4)


def test_a_model_without_an_operating_point_decides_as_before():
    """The pre-layout fixtures (no operating point recorded) decide at train.threshold, 0.5:
    binary as the argmax did, three-label at 0.5 per label."""
    for task, n in (("binary", 1), ("multilabel", 3)):
        trained = metadata.load(DATA / f"pre_layout_{task}.keras")
        assert trained.thresholds == (0.5,) * n and trained.operating_point["method"] == "threshold"
        probs = probabilities(np.load(DATA / f"pre_layout_{task}.npz")["logits"], task)
        decided = decide(probs, task, trained.thresholds, trained.positive_index)
        want = np.eye(2)[probs.argmax(1)] if task == "binary" else probs >= 0.5
        np.testing.assert_array_equal(decided, want)


def test_a_bad_recorded_operating_point_is_refused(binary_run, tmp_path):
    import shutil
    path = tmp_path / "bad.keras"
    shutil.copy(binary_run / "checkpoints" / "last.keras", path)
    info = metadata.read_embedded(path)
    for bad in ([1.5], [0.2, 0.3], ["x"], None):
        metadata.embed(path, {**info, "operating_point": {"thresholds": bad}})
        with pytest.raises(metadata.ModelInfoError, match="bad operating point"):
            metadata.load(path)


def test_a_validation_split_without_negatives_is_refused_by_name(multilabel_tree, tmp_path):
    """Every folder maps to 'pneumonia', so validation has no image without it: calibrate, and
    fit before it trains, name the split and the label; a fixed number needs no such image."""
    every = {"covid-19": ["covid-19", "pneumonia"], "normal": ["normal", "pneumonia"], "pneumonia": ["pneumonia"]}
    run = make_run(tmp_path, multilabel_tree, "multilabel")
    settings = config.load_yaml(run / "config.yaml")
    settings["data"]["label_map"] = every
    config.from_dict(settings).save(run / "config.yaml")
    done = CliRunner().invoke(main, ["calibrate", str(run), "--operating-point", "youden"])
    assert done.exit_code == 1
    assert "on the validation split: it has no negative images of 'pneumonia'" in done.output
    assert CliRunner().invoke(main, ["calibrate", str(run), "--operating-point", "0.4"]).exit_code == 0
    assert metadata.load(run).thresholds == (0.4,) * 3

    exp = config.from_dict({"data": {"dir": str(multilabel_tree), "task": "multilabel", "image_size": 32,
                                     "label_map": every},
                            "model": {"backbone": "resnet18", "weights": "none"},
                            "train": {"loss": "bce", "batch_size": 4, "operating_point": "sensitivity:0.9"},
                            "out": str(tmp_path / "runs")})
    lines = []
    with pytest.raises(train.TrainingError, match="no negative images of 'pneumonia'.*train.operating_point"):
        train.fit(exp, log=lines.append)
    assert not any(line.startswith("[1/6]") for line in lines)  # before a run directory exists
