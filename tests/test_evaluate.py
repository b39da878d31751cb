"""evaluate: recomputed metrics match an independent computation; JSON, CSV and plots are written."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from fake_run import make_run, reference_probs
from tfcovid import cli
from tfcovid.inference import evaluate
from tfcovid.results import scores
from tfcovid.weights import metadata
from tfcovid.data.types import DataError


@pytest.fixture(scope="module")
def binary_run(binary_tree, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("eval"), binary_tree, "binary", bias=[0.3, -0.3])


@pytest.fixture(scope="module")
def multilabel_run(multilabel_tree, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("eval"), multilabel_tree, "multilabel", "vgg16",
                    bias=[2.0, -1.0, 0.5])


def test_binary_evaluation_matches_sklearn_on_the_same_probabilities(binary_run, binary_tree):
    result = evaluate.evaluate(binary_run, split="validation", log=lambda s: None)
    paths = sorted((binary_tree / "validation").rglob("*.*"))
    labels = np.array([0 if p.parent.name == "infected" else 1 for p in paths])
    probs = reference_probs(binary_run, paths, "binary")
    expected = scores.binary_report(labels, probs, ["infected", "normal"], "infected")
    report = result["report"]
    assert report["n"] == 4 and report["confusion_matrix"] == expected["confusion_matrix"]
    for key in ("accuracy", "f1", "sensitivity", "specificity", "f1_study"):
        assert report[key] == pytest.approx(expected[key]), key
    assert report["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-6)
    assert result["diseases"] == {"infected": {
        "sensitivity": report["sensitivity"], "specificity": report["specificity"], "f1": report["f1"],
        "roc_auc": report["roc_auc"], "average_precision": report["average_precision"],
        "brier": report["brier"], "ece": report["ece"], "support": 2,
        "intervals": {k: report["intervals"][k] for k in ("sensitivity", "specificity", "f1", "roc_auc")}}}
    # the intervals are those of the same probabilities, with the run's seed (0) and resamples (1000)
    assert set(report["intervals"]) == set(expected["intervals"])
    for key, shown in expected["intervals"].items():
        got = report["intervals"][key]
        assert (got["low"], got["high"]) == pytest.approx((shown["low"], shown["high"]), abs=1e-6), key
        assert got["resamples"] == shown["resamples"], key
    assert report["uncertainty"]["bootstrap_resamples"] == 1000 and report["uncertainty"]["seed"] == 0
    line = evaluate.format_result(result).splitlines()[2]
    ci = report["intervals"]["sensitivity"]
    assert line.startswith("infected ") and f"({100 * ci['low']:.1f}–{100 * ci['high']:.1f})" in line

    out = binary_run / "eval"
    saved = json.loads((out / "validation.json").read_text())
    assert saved["report"]["confusion_matrix"] == expected["confusion_matrix"]
    rows = (out / "validation_predictions.csv").read_text().strip().splitlines()
    assert rows[0] == "path,true_folder,infected,normal,predicted" and len(rows) == 5
    first = rows[1].split(",")
    assert float(first[2]) == pytest.approx(probs[0, 0], abs=1e-6)
    assert (out / "validation_confusion.png").stat().st_size > 1000
    assert (out / "validation_roc.png").stat().st_size > 1000


def test_multilabel_reports_every_disease_label_by_name(multilabel_run, multilabel_tree):
    result = evaluate.evaluate(multilabel_run, split="test", log=lambda s: None)
    assert set(result["diseases"]) == {"covid-19", "pneumonia"}  # not "normal"
    paths = sorted((multilabel_tree / "test").rglob("*.*"))
    folder_labels = {"covid-19": [1, 0, 1], "normal": [0, 1, 0], "pneumonia": [0, 0, 1]}
    y = np.array([folder_labels[p.parent.name] for p in paths])
    probs = reference_probs(multilabel_run, paths, "multilabel")
    expected = scores.multilabel_report(y, probs, ["covid-19", "normal", "pneumonia"])
    report = result["report"]
    assert report["jaccard_samples"] == pytest.approx(expected["jaccard_samples"])
    for name in ("covid-19", "pneumonia"):
        got, want = result["diseases"][name], expected["per_label"][name]
        assert got["sensitivity"] == pytest.approx(want["sensitivity"])
        assert got["specificity"] == pytest.approx(want["specificity"])
        assert got["support"] == want["support"]
    assert result["diseases"]["pneumonia"]["support"] == 4  # covid-19 and pneumonia folders
    text = evaluate.format_result(result)
    assert "covid-19" in text and "pneumonia" in text and "sensitivity" in text
    assert "In brackets: 95 % CI, percentile bootstrap, 1000 resamples (seed 0)" in text
    assert result["diseases"]["covid-19"]["intervals"] == report["per_label"]["covid-19"]["intervals"]


def test_a_bare_model_file_needs_data_and_writes_beside_itself(binary_run, binary_tree, tmp_path):
    model = tmp_path / "copy.keras"
    model.write_bytes((binary_run / "checkpoints" / "last.keras").read_bytes())
    with pytest.raises(evaluate.EvaluateError, match="--data"):
        evaluate.evaluate(model, log=lambda s: None)
    result = evaluate.evaluate(model, data=binary_tree, split="test", log=lambda s: None)
    assert (tmp_path / "copy-eval" / "test.json").is_file()
    assert result["report"]["n"] == 4


def test_bad_input_is_named(binary_run, binary_tree, multilabel_tree, tmp_path):
    with pytest.raises(evaluate.EvaluateError, match="Valid splits"):
        evaluate.evaluate(binary_run, split="dev", log=lambda s: None)
    with pytest.raises(evaluate.EvaluateError, match="is a binary model with outputs"):  # 3 class folders
        evaluate.evaluate(binary_run, data=multilabel_tree, log=lambda s: None)
    with pytest.raises(metadata.ModelInfoError, match="not found"):
        evaluate.evaluate(tmp_path / "missing.keras", log=lambda s: None)
    no_test = tmp_path / "no_test"  # a copy without test/: the error says which split to use
    for split in ("train", "validation"):
        shutil.copytree(binary_tree / split, no_test / split)
    with pytest.raises(DataError, match=r"has no test split folder .* Evaluate another split with "
                                        r"--split validation\.$"):
        evaluate.evaluate(binary_run, data=no_test, log=lambda s: None)


def test_cli_evaluate_prints_the_disease_table_and_fails_cleanly(binary_run, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli.main, ["evaluate", str(binary_run), "--split", "test",
                                  "--out", str(tmp_path / "ev")])
    assert ok.exit_code == 0, ok.output
    assert "infected" in ok.output and "specificity" in ok.output
    assert (tmp_path / "ev" / "test.json").is_file()
    bad = runner.invoke(cli.main, ["evaluate", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "Error:" in bad.output and "Traceback" not in bad.output


def test_best_checkpoint_results_sit_beside_the_last_ones(binary_tree, tmp_path):
    run = make_run(tmp_path, binary_tree, "binary", bias=[0.3, -0.3])
    other = make_run(tmp_path / "other", binary_tree, "binary", bias=[-1.0, 1.0], seed=1)
    best = run / "checkpoints" / "best.keras"
    shutil.copy(other / "checkpoints" / "last.keras", best)
    out = run / "eval"
    lines = []

    got = evaluate.evaluate(run, split="validation", checkpoint="best", log=lines.append)
    names = ["validation-best.json", "validation-best_predictions.csv", "validation-best_confusion.png",
             "validation-best_roc.png", "validation-best_pr.png", "validation-best_reliability.png"]
    assert [f.split("/")[-1] for f in got["files"]] == names
    assert got["checkpoint"] == "best" and got["model"] == str(best) and got["replaced"] == []
    last = evaluate.evaluate(run, split="validation", log=lines.append)
    assert [f.split("/")[-1] for f in last["files"]] == [n.replace("-best", "") for n in names]
    assert last["checkpoint"] == "last" and last["replaced"] == []
    assert not any("Replaced" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [n.replace("-best", "") for n in names])

    # Each file holds its own checkpoint's numbers.
    paths = sorted((binary_tree / "validation").rglob("*.*"))
    for stem, model, source in (("validation", run / "checkpoints" / "last.keras", run),
                                ("validation-best", best, other)):
        saved = json.loads((out / f"{stem}.json").read_text())
        assert saved["model"] == str(model) and saved["files"][0] == str(out / f"{stem}.json")
        rows = (out / f"{stem}_predictions.csv").read_text().strip().splitlines()[1:]
        np.testing.assert_allclose([float(r.split(",")[2]) for r in rows],
                                   reference_probs(source, paths, "binary")[:, 0], atol=1e-6)

    # best.keras given as a file is still the run's best checkpoint: it replaces only best's files.
    kept = (out / "validation.json").read_text()
    lines.clear()
    again = evaluate.evaluate(best, split="validation", log=lines.append)
    assert again["checkpoint"] == "best" and again["files"] == got["files"]
    assert again["replaced"] == got["files"]
    assert lines[-1] == (f"Replaced 6 file(s) of an earlier evaluation in {out}: "
                         "validation-best.json, validation-best_predictions.csv, "
                         "validation-best_confusion.png, validation-best_roc.png, "
                         "validation-best_pr.png, validation-best_reliability.png.")
    assert (out / "validation.json").read_text() == kept

    # Any other model file inside the run writes beside itself, never over the run's results.
    mine = run / "mine.keras"
    shutil.copy(best, mine)
    result = evaluate.evaluate(mine, split="validation", log=lambda s: None)
    assert result["checkpoint"] is None and result["files"][0] == str(run / "mine-eval" / "validation.json")
    assert (out / "validation.json").read_text() == kept

    # The command line says what it replaced.
    cli_run = CliRunner().invoke(cli.main, ["evaluate", str(run), "--split", "validation"])
    assert cli_run.exit_code == 0, cli_run.output
    assert (f"Replaced 6 file(s) of an earlier evaluation in {out}: validation.json, "
            "validation_predictions.csv, validation_confusion.png, validation_roc.png, "
            "validation_pr.png, validation_reliability.png.") in cli_run.output


def test_scan_notes_are_shown(binary_run, binary_tree, tmp_path):
    import shutil

    from tfcovid.data import prepare as data_prepare

    tree = tmp_path / "tree"
    shutil.copytree(binary_tree, tree)
    (tree / "test" / "normal" / ".DS_Store").write_bytes(b"\0\0")
    lines = []
    evaluate.evaluate(binary_run, data=tree, split="test", out=tmp_path / "ev", make_plots=False,
                      log=lines.append)
    note = "note: ignored 1 system or hidden file(s) and folder(s)"
    assert any(line.startswith(note) for line in lines), lines
    lines = []
    data_prepare.prepare(tree, tmp_path / "rec", shards=1, max_side=16, log=lines.append)
    assert any(line.startswith(note) for line in lines), lines


def test_the_table_says_positives_and_notes_an_undefined_figure():
    """A test split of infected images only: the specificity's 0.0 is undefined and the table
    says so under it (it printed a bare 0.0 %); the last column counts positives, not images."""
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    report = scores.binary_report(np.zeros(3, int), probs, ["infected", "normal"], resamples=0)
    result = {"report": report, "task": "binary", "split": "test",
              "diseases": evaluate.disease_summary(report, "binary", ["infected"])}
    lines = evaluate.format_result(result).splitlines()
    assert lines[0].startswith("test: 3 images;") and lines[1].endswith(" positives")
    assert lines[2].endswith(" 3") and " 0.0 % " in lines[2]
    assert lines[-1] == "note: no 'normal' images in this split: specificity is undefined (reported as 0.0)"
    both = scores.binary_report(np.array([0, 1, 1]), probs, ["infected", "normal"], resamples=0)
    text = evaluate.format_result({**result, "report": both,
                                   "diseases": evaluate.disease_summary(both, "binary", ["infected"])})
    assert "note:" not in text and text.splitlines()[2].endswith(" 1")
