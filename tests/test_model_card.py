"""MODEL_CARD.md (issue 23.7): rendered from a run's config.yaml and metrics.json with the real
counts and figures; `tfcovid report` writes it again; an export carries it. The card after a real
fit: tests/test_train.py; in an export of a real fit: tests/test_api.py."""

import json

import numpy as np
from click.testing import CliRunner
from fake_run import make_run

from tfcovid import config
from tfcovid.cli import main
from tfcovid.inference import calibrate
from tfcovid.results import model_card, operating_point, scores
from tfcovid.training import train


def _run(root, task="binary", name="run", calibration=None, **flags):
    """A finished run directory whose metrics.json holds scikit-learn reports of fixed arrays."""
    run = root / name
    run.mkdir(parents=True)
    config.resolve(None, {"data.task": task, "train.seed": 3, **flags}).save(run / "config.yaml")
    rng = np.random.default_rng(0)
    if task == "binary":
        outputs, splits = ["infected", "normal"], {}
        for split, (n_inf, n_norm) in {"train": (30, 50), "validation": (12, 9), "test": (7, 11)}.items():
            y = np.array([0] * n_inf + [1] * n_norm)
            p = np.clip(np.where(y == 0, 0.7, 0.35) + rng.normal(0, 0.2, y.size), 0.01, 0.99)
            splits[split] = scores.binary_report(y, np.stack([p, 1 - p], 1), outputs, "infected", seed=3)
        point = operating_point.choose(y, np.stack([p, 1 - p], 1), "binary", "youden", outputs, "infected")
    else:
        outputs = ["covid-19", "normal", "pneumonia"]
        y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]] * 4)
        p = np.clip(y * 0.5 + rng.random(y.shape) * 0.5, 0, 1)
        splits = {"train": scores.multilabel_report(y, p, outputs, seed=3),
                  "validation": scores.multilabel_report(y[:12], p[:12], outputs, seed=3)}
        point = operating_point.fixed([0.5] * 3, "threshold")
    summary = {"task": task, "outputs": outputs, "class_names": outputs, "epochs": 2, "train_seconds": 75.0,
               "images": {s: r["n"] for s, r in splits.items()} | ({"test": 5} if task != "binary" else {}),
               "trainable_params": 1234, "total_params": 5678, "preprocessing": "torch",
               "precision": "float32", "replicas": 1, "splits": splits, "operating_point": point}
    if calibration:
        summary["calibration"] = calibration
    (run / "metrics.json").write_text(json.dumps(summary))
    return run


def test_binary_card_holds_the_runs_counts_figures_and_intervals(tmp_path):
    run = _run(tmp_path, **{"model.backbone": "resnet18", "model.freeze": "all", "train.lr": 0.003})
    card = model_card.write(run).read_text()
    summary = json.loads((run / "metrics.json").read_text())
    assert card.startswith(f"# Model card: {run.name}\n") and card.count(train.NOT_CLINICAL) == 2
    for split, (n, inf, norm) in {"train": (80, 30, 50), "validation": (21, 12, 9), "test": (18, 7, 11)}.items():
        assert f"| {split} | {n} | {inf} | {norm} |" in card  # images per split and class
        r = summary["splits"][split]
        ci = r["intervals"]
        assert (f"| {split} | {n} | {100 * r['accuracy']:.1f} % ({100 * ci['accuracy']['low']:.1f}–"
                f"{100 * ci['accuracy']['high']:.1f}) | {100 * r['sensitivity']:.1f} % (") in card
        assert f"{r['roc_auc']:.3f} ({ci['roc_auc']['low']:.3f}–{ci['roc_auc']['high']:.3f})" in card
        assert f"| {r['average_precision']:.3f} | {r['brier']:.3f} | {r['ece']:.3f} |" in card
    assert "1000 resamples, seed 3" in card and "10 equal-width bins" in card
    assert "| Backbone | ResNet18 |" in card and "| Frozen | all but head |" in card
    assert "| Learning rate | 0.003 |" in card and "| Seed | 3 |" in card
    assert "| Parameters | 1,234 trainable of 5,678 |" in card
    assert "Chosen on the validation split, never on test" in card and "youden" in card
    assert operating_point.describe(summary["operating_point"]) in card
    assert "Not calibrated" in card and "the split folders found on disk" in card


def test_the_card_names_the_recipes_beyond_the_study(tmp_path):
    """Schedule, warm-up, EMA and early stopping (with metrics.json's outcome) are in the Recipe
    table when set (they were missing), and absent for the study's constant rate."""
    plain = model_card.write(_run(tmp_path, name="plain")).read_text()
    assert "schedule" not in plain and "EMA" not in plain and "Early stopping" not in plain
    run = _run(tmp_path, name="beyond", **{"train.schedule": "cosine", "train.warmup_epochs": 1,
                                           "train.ema": 0.99, "train.early_stopping": "val_f1",
                                           "train.patience": 1})
    summary = json.loads((run / "metrics.json").read_text())
    summary["early_stopping"] = {"metric": "val_f1", "patience": 1, "reason": "ran every epoch",
                                 "restored_best": True}
    (run / "metrics.json").write_text(json.dumps(summary))
    card = model_card.write(run).read_text()
    assert "| Learning-rate schedule | cosine to 0, after 1 warm-up epoch(s) |" in card
    assert "| Weight EMA | momentum 0.99 (the averaged weights are the model) |" in card
    assert ("| Early stopping | on val_f1 (patience 1); ran every epoch; the best epoch's weights "
            "restored |") in card
    step = model_card.write(_run(tmp_path, name="step", **{
        "train.schedule": "step", "train.step_gamma": 0.5, "train.step_epochs": 3})).read_text()
    assert "| Learning-rate schedule | step: ×0.5 every 3 epochs |" in step


def test_the_card_says_how_the_splits_were_made(tmp_path):
    """Folders: the tree's own splits; a label file: kept or made by patient, with the seed and
    shares, and the fold under cross-validation (issue 24.5's settings)."""
    folders = model_card.write(_run(tmp_path, name="tree")).read_text()
    assert "the split folders found on disk" in folders and "by patient" not in folders
    made = model_card.write(_run(tmp_path, name="csv", **{
        "data.dir": str(tmp_path / "labels.csv"), "data.validation_fraction": 0.2,
        "data.folds": 3, "data.fold": 1})).read_text()
    assert ("made by patient (`data.split: patient`, scikit-learn's StratifiedGroupKFold, seed 3, "
            "validation 0.2, test 0.15 of the patients), fold 1 of 3 as validation; no patient in two "
            "splits") in made and "split folders" not in made
    given = model_card.write(_run(tmp_path, name="given", **{
        "data.dir": str(tmp_path / "COVIDX" / "train.txt"), "data.split": "given"})).read_text()
    assert "as the label file gives them (`data.split: given`)" in given and "by patient" not in given


def test_three_label_card_counts_each_label_and_names_unlabeled_splits(tmp_path):
    run = _run(tmp_path, "multilabel")
    card = model_card.write(run).read_text()
    summary = json.loads((run / "metrics.json").read_text())
    assert "| split | images | with covid-19 | with normal | with pneumonia |" in card
    assert "| train | 24 | 8 | 8 | 12 |" in card and "| validation | 12 | 4 | 4 | 6 |" in card
    assert "| test | 5 | unlabeled | unlabeled | unlabeled |" in card
    m = summary["splits"]["validation"]["per_label"]["pneumonia"]
    assert f"| validation | pneumonia | 6 | {100 * m['sensitivity']:.1f} % (" in card
    assert "Fixed (`threshold`), not chosen from data." in card


def test_calibration_is_shown_when_metrics_json_has_it(tmp_path):
    cal = {"method": "temperature", "temperature": 1.7321, "fitted_on": "validation", "nll_before": 0.61,
           "nll_after": 0.48, "ece_before": 0.12, "ece_after": 0.04}
    card = model_card.write(_run(tmp_path, calibration=cal)).read_text()
    section = card.split("## Calibration", 1)[1].split("##", 1)[0]
    assert "| temperature | 1.7321 |" in section and "fitted on the validation split." in section
    assert "| ece after | 0.0400 |" in section and "Not calibrated" not in section


def test_three_label_calibration_has_a_column_per_label(tmp_path):
    """results.calibration records one temperature (and NLL, ECE) per label for the three-label
    task: a column each, in the outputs' order."""
    cal = {"method": "temperature", "temperature": [0.5, 1.25, 2.0], "fitted_on": "validation",
           "nll_before": [0.3, 0.2, 0.1], "nll_after": [0.25, 0.15, 0.05],
           "ece_before": [0.1, 0.2, 0.3], "ece_after": [0.01, 0.02, 0.03], "ece_bins": 10}
    card = model_card.write(_run(tmp_path, task="multilabel", calibration=cal)).read_text()
    section = card.split("## Calibration", 1)[1].split("##", 1)[0]
    assert "(one temperature per label)" in section
    assert "|  | covid-19 | normal | pneumonia |" in section
    assert "| temperature | 0.5000 | 1.2500 | 2.0000 |" in section
    assert "| ece after | 0.0100 | 0.0200 | 0.0300 |" in section and "[" not in section


def test_names_cannot_break_the_markdown(tmp_path):
    run = _run(tmp_path, **{"data.dir": "/data/a|b\n# heading `x`"})
    card = model_card.write(run).read_text()
    assert "- Images: `/data/a|b # heading 'x'`" in card and "\n# heading" not in card
    assert model_card._row(["x|y", "two\nlines"]) == "| x\\|y | two lines |"
    summary = json.loads((run / "metrics.json").read_text())  # class folders named to break it
    summary["outputs"] = ["in|fected\n## x", "normal" + "`" * 3]
    card = model_card.render(config.load_yaml(run / "config.yaml"), summary, "r\nun")
    assert "| split | images | in\\|fected ## x | normal" + "'" * 3 + " |" in card and "\n## x" not in card
    assert card.startswith("# Model card: r un\n") and card.count("`" * 3) == 2  # the operating point's block


def test_report_writes_the_cards_again(tmp_path):
    run = _run(tmp_path / "runs")
    (tmp_path / "runs" / "unfinished").mkdir()
    config.resolve(None, {}).save(tmp_path / "runs" / "unfinished" / "config.yaml")
    done = CliRunner().invoke(main, ["report", str(tmp_path / "runs")])
    assert done.exit_code == 0, done.output
    assert "Wrote MODEL_CARD.md in 1 run directory." in done.output
    assert not (tmp_path / "runs" / "unfinished" / "MODEL_CARD.md").exists()
    assert "Not calibrated" in (run / "MODEL_CARD.md").read_text()
    summary = json.loads((run / "metrics.json").read_text())  # e.g. calibrated since
    summary["calibration"] = {"method": "temperature", "temperature": 2.5}
    (run / "metrics.json").write_text(json.dumps(summary))
    assert CliRunner().invoke(main, ["report", str(run)]).exit_code == 0
    assert "| temperature | 2.5000 |" in (run / "MODEL_CARD.md").read_text()


def test_an_export_carries_the_card_and_says_which_checkpoint(tmp_path):
    run = _run(tmp_path)
    card = model_card.write(run).read_text()
    assert model_card.for_export(run, run / "checkpoints" / "last.keras") == card
    best = model_card.for_export(run, run / "checkpoints" / "best.keras")
    assert best.startswith(card) and "this export is of `checkpoints/best.keras`" in best
    assert model_card.for_export(None, tmp_path / "bare.keras") is None
    (run / "metrics.json").unlink()  # an unfinished run: no card
    assert model_card.for_export(run, run / "checkpoints" / "last.keras") is None


def test_calibrate_writes_the_card_with_the_new_point(binary_tree, tmp_path):
    run = make_run(tmp_path, binary_tree, "binary", bias=[0.2, -0.2])
    (run / "metrics.json").write_text(json.dumps({"task": "binary", "outputs": ["infected", "normal"],
                                                  "epochs": 1, "train_seconds": 1.0, "splits": {"validation": {}}}))
    calibrate.calibrate(run, "0.3", log=lambda s: None)
    summary, card = json.loads((run / "metrics.json").read_text()), (run / "MODEL_CARD.md").read_text()
    r = summary["splits"]["validation"]
    assert r["threshold"] == 0.3 and "Fixed (`0.3`), not chosen from data." in card
    assert f"| validation | 4 | {100 * r['accuracy']:.1f} % (" in card and "| validation | 4 | 2 | 2 |" in card
