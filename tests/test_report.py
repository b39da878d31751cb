"""tfcovid report: the study's Part 1 / Part 2 tables from run directories."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tfcovid import config
from tfcovid.results import scores, tables
from tfcovid.cli import main


def _write_run(root, name, task, backbone, freeze="none", loss=None, epochs=3, seconds=4500.0,
               correct=None):
    """A finished run directory whose metrics come from scikit-learn on hand-made predictions."""
    run = root / name
    run.mkdir(parents=True)
    flags = {"data.task": task, "model.backbone": backbone, "model.freeze": freeze,
             "train.epochs": epochs}
    if loss:
        flags["train.loss"] = loss
    exp = config.resolve(None, flags)
    exp.save(run / "config.yaml")
    splits = {}
    if task == "binary":
        # 8 images per split: 4 infected (0), 4 normal (1); `correct` of them predicted right.
        y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
        for split, k in correct.items():
            pred = y.copy()
            pred[:8 - k] = 1  # the first misses are infected images called normal
            probs = np.eye(2)[pred]
            splits[split] = scores.binary_report(y, probs, ["infected", "normal"], "infected")
    else:
        y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0]])
        for split, pred in correct.items():
            splits[split] = scores.multilabel_report(y, np.array(pred, dtype=float),
                                                      ["covid-19", "normal", "pneumonia"])
    summary = {"task": task, "epochs": epochs, "train_seconds": seconds, "splits": splits}
    if task == "multilabel":
        summary["outputs"] = ["covid-19", "normal", "pneumonia"]
    (run / "metrics.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "r1-vgg16-none", "binary", "vgg16", "none", epochs=11, seconds=6000,
               correct={"train": 8, "validation": 7, "test": 6})
    _write_run(root, "r2-vgg16-all", "binary", "vgg16", "all", epochs=15, seconds=50,
               correct={"train": 8, "validation": 8, "test": 8})
    _write_run(root, "r3-resnet18-all", "binary", "resnet18", "all", epochs=15, seconds=3600,
               correct={"train": 6, "validation": 6, "test": 6})
    _write_run(root, "r4-vgg16-first7", "binary", "vgg16", "first7", epochs=12, seconds=3600,
               correct={"train": 8, "validation": 8, "test": 8})
    perfect = [[1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0]]
    half = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]  # jaccard 1/2, 1, 1, 1/2 -> 0.75
    _write_run(root, "r5-resnet18-focal", "multilabel", "resnet18", loss="focal", epochs=22,
               seconds=10800, correct={"train": perfect, "validation": half})
    _write_run(root, "r6-vgg16-bce", "multilabel", "vgg16", loss="bce", epochs=15, seconds=4200,
               correct={"train": half, "validation": perfect})
    unfinished = root / "r7-unfinished"
    unfinished.mkdir()
    config.resolve(None, {}).save(unfinished / "config.yaml")
    return root


def _table(text, heading):
    section = text.split(heading, 1)[1]
    return [line for line in section.splitlines() if line.startswith("| ")]


def test_both_tables_in_the_studys_order_and_format(runs):
    text, skipped = tables.build_report([runs])
    assert skipped == [(str(runs / "r7-unfinished"),
                        "no metrics.json: the run has not finished (or failed)")]
    part1 = _table(text, "## Part 1")
    assert part1[0] == ("| Backbone | Frozen | Epochs | Time | Train acc/F1 | Val acc/F1 | "
                        "Test acc/F1 | Run |")
    # Study order: head only, first 7, ..., none; VGG16 before ResNet18.
    assert part1[1] == "| VGG16 | all conv (head only) | 15 | 50 s | 100/1.000 | 100/1.000 | 100/1.000 | `r2-vgg16-all` |"
    assert part1[2].startswith("| VGG16 | first 7 conv | 12 | 1 h 00 |")
    # 7 of 8 right: accuracy 88 %; infected F1 = 2*3/(2*3+1) = 0.857.
    assert part1[3] == "| VGG16 | none | 11 | 1 h 40 | 100/1.000 | 88/0.857 | 75/0.667 | `r1-vgg16-none` |"
    assert part1[4].startswith("| ResNet18 | all but head | 15 | 1 h 00 | 75/0.667 |")
    # The study's own F1 (class 'normal'): 7 of 8 right -> normal F1 = 2*4/(2*4+1) = 0.889.
    study = _table(text.split("like-for-like", 1)[1], "\n")
    assert study[0].startswith("| Backbone | Frozen | Train F1 (study's)")
    assert "| VGG16 | none | 1.000 | 0.889 | 0.800 | `r1-vgg16-none` |" in study
    part2 = _table(text, "## Part 2")
    assert part2[0] == "| Backbone | Loss | Epochs | Time | Train acc/F1 | Val acc/F1 | Run |"
    # half: jaccard 0.75; sample F1 = mean(2/3, 1, 1, 2/3) = 83.3 %.
    assert part2[1] == "| VGG16 | BCE with logits | 15 | 1 h 10 | 75/83 | 100/100 | `r6-vgg16-bce` |"
    assert part2[2] == "| ResNet18 | focal | 22 | 3 h 00 | 100/100 | 75/83 | `r5-resnet18-focal` |"
    assert "Test acc" not in text.split("## Part 2", 1)[1].splitlines()[2]


def test_part_2_heading_names_the_runs_labels(runs):
    text, _ = tables.build_report([runs])
    assert "## Part 2: three labels (covid-19, normal, pneumonia)\n" in text
    four = json.loads((runs / "r5-resnet18-focal" / "metrics.json").read_text())
    for name in ("r5-resnet18-focal", "r6-vgg16-bce"):  # both runs with a fourth label
        path = runs / name / "metrics.json"
        path.write_text(json.dumps(dict(four, outputs=["covid-19", "normal", "pneumonia", "tuberculosis"])))
    text, _ = tables.build_report([runs])
    assert "## Part 2: four labels (covid-19, normal, pneumonia, tuberculosis)\n" in text
    (runs / "r6-vgg16-bce" / "metrics.json").write_text(json.dumps(four))  # back to three
    text, _ = tables.build_report([runs])
    assert "## Part 2: multi-label runs (their labels differ)\n" in text


def test_cli_prints_and_writes_markdown(runs, tmp_path):
    out = tmp_path / "docs" / "tables.md"
    result = CliRunner().invoke(main, ["report", str(runs / "r6-vgg16-bce"), str(runs / "r1-vgg16-none"),
                                       "--markdown", str(out)])
    assert result.exit_code == 0, result.output
    written = out.read_text()
    assert written.startswith("# Results\n") and "## Part 1" in written and "## Part 2" in written
    assert "| VGG16 | none | 11 | 1 h 40 |" in result.output
    assert "| VGG16 | BCE with logits | 15 | 1 h 10 |" in written


def test_only_one_part_and_errors(runs, tmp_path):
    text, _ = tables.build_report([runs / "r5-resnet18-focal"])
    assert "## Part 2" in text and "## Part 1" not in text
    with pytest.raises(tables.ReportError, match="No finished runs"):
        tables.build_report([runs / "r7-unfinished", tmp_path / "nope"])
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no such folder" in result.output
    assert "Traceback" not in result.output
    (runs / "r6-vgg16-bce" / "metrics.json").write_text("{not json")
    _, skipped = tables.build_report([runs])
    assert any("r6-vgg16-bce" in p and "unreadable" in r for p, r in skipped)


@pytest.mark.parametrize("seconds, text", [(42, "42 s"), (59.4, "59 s"), (150, "2 min"),
                                           (3599, "1 h 00"), (5100, "1 h 25"), (9000, "2 h 30")])
def test_durations_as_the_study_writes_them(seconds, text):
    assert tables.format_duration(seconds) == text


def test_freeze_labels():
    assert tables.freeze_label("all", "vgg16") == "all conv (head only)"
    assert tables.freeze_label("all", "resnet18") == "all but head"
    assert tables.freeze_label("first4") == "first 4 conv"
    assert tables.freeze_label("none") == "none"


def test_the_test_split_is_called_unlabeled_only_when_it_is(runs):
    unlabeled = ("The test split is unlabeled, as in the study: use "
                 "`tfcovid predict RUN_DIR DATA/Test --csv FILE`.")
    text, _ = tables.build_report([runs])
    assert unlabeled in text and "The test split is labeled" not in text
    # Demo data has a labeled test split: fit writes its metrics to metrics.json.
    perfect = [[1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0]]
    _write_run(runs, "r8-resnet18-bce", "multilabel", "resnet18", loss="bce", epochs=8, seconds=190,
               correct={"train": perfect, "validation": perfect, "test": perfect})
    text, _ = tables.build_report([runs / "r8-resnet18-bce"])
    assert ("The test split is labeled (the study's was not, so its table has no test column): the "
            "test numbers are in the run's metrics.json, and `tfcovid evaluate RUN_DIR` prints them."
            in text)
    assert "unlabeled" not in text
    text, _ = tables.build_report([runs])  # one of three Part 2 runs has test labels
    part2 = text.split("## Part 2", 1)[1]
    assert "The test split is labeled for `r8-resnet18-bce` (the study's" in part2
    assert "The other runs' test split is unlabeled: use `tfcovid predict" in part2
    assert unlabeled not in part2


@pytest.mark.parametrize("early, cell", [
    (None, "10"),  # no early stopping configured
    ({"stopped_early": False, "stopped_epoch": None}, "10"),  # on, but every epoch ran
    ({"stopped_early": True, "stopped_epoch": 4}, "4 of 10"),
    ({"stopped_early": True, "stopped_epoch": 1}, "1 of 10"),
])
def test_the_epochs_column_says_when_early_stopping_ended_the_run(tmp_path, early, cell):
    """metrics.json's epochs are the configured ones; a run early stopping ended shows the
    epoch it stopped after, in the study's table and in the model card."""
    from tfcovid.results import model_card

    run = _write_run(tmp_path, "r-vgg16-all", "binary", "vgg16", "all", epochs=10,
                     correct={"train": 8, "validation": 8, "test": 8})
    summary = json.loads((run / "metrics.json").read_text())
    if early is not None:
        summary["early_stopping"] = early
    (run / "metrics.json").write_text(json.dumps(summary))
    assert tables.epochs_cell(summary) == cell
    row = _table(tables.build_report([tmp_path])[0], "## Part 1")[1]
    assert row.startswith(f"| VGG16 | all conv (head only) | {cell} | ")
    model_card.write(run)
    assert f"| Epochs | {cell} |" in (run / "MODEL_CARD.md").read_text()
