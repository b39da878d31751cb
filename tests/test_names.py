"""Names from outside tfcovid (issue 22.7, 22.8; issue 27.5, 27.7): file names that are not
UTF-8 are refused by every command with the name shown escaped; names are printed escaped;
CSV cells that a spreadsheet would run are neutralised; the study's CSV byte for byte; a
closed pipe ends quietly with status 141."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from tfcovid import config
from tfcovid.cli import CLOSED_PIPE_STATUS, main
from tfcovid.data import checks
from tfcovid.data import folders as data_folders
from tfcovid.data.types import DataError
from tfcovid.inference import evaluate, explain, predict
from tfcovid.models import build_model
from tfcovid.training import train
from tfcovid.utils.text import csv_text, escape, not_utf8, shown
from tfcovid.weights import metadata

LABELS = ("covid-19", "normal", "pneumonia")
NOT_UTF8 = b"bad\xff\xfe.png"  # latin-1 bytes: not valid UTF-8
HOSTILE = ["new\nline.png", "cr\rhere.png", "rtl\u202egnp.exe.png", "del\x7f.png",
           "=HYPERLINK(1).png", "+sum.png", "-x.png", "@cmd.png"]


def _write(folder: Path, name, data: bytes) -> None:
    """A file named by str or by raw bytes (os.fsencode: the bytes a Linux file name holds)."""
    path = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else os.fsencode(name))
    with open(path, "wb") as fh:
        fh.write(data)


def _png(tree) -> bytes:
    return min((tree / "validation" / "normal").iterdir()).read_bytes()


# --------------------------------------------------------------------------------- the helpers


@pytest.mark.parametrize("text, expected", [
    ("plain-name_1.png", "plain-name_1.png"),
    ("répétition 東京.png", "répétition 東京.png"),  # printable text in any script stays
    ("a\tb\nc\rd\\e", "a\\tb\\nc\\rd\\\\e"),
    ("bad\udcff\udcfe.png", "bad\\xff\\xfe.png"),  # bytes that were not UTF-8 (surrogateescape)
    ("rtl\u202egnp.exe", "rtl\\u202egnp.exe"), ("del\x7f", "del\\u007f"), ("esc\x1b[31m", "esc\\u001b[31m"),
    ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"), ("zw\u200bj", "zw\\u200bj"), ("\U000e0001", "\\U000e0001"),
])
def test_escape_puts_any_name_on_one_unambiguous_printable_line(text, expected):
    assert escape(text) == expected
    assert escape(text).isprintable() and escape(text).encode("utf-8")


def test_shown_is_bounded_and_csv_text_neutralises_formulas():
    assert shown("train") == "'train'" and shown([1, 2]) == "[1, 2]"
    assert len(shown("x" * 10**6)) <= 80 and len(shown(list(range(10**6)))) <= 80
    assert shown("a\u202e\x7f") == "'a\\u202e\\x7f'"
    for cell in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert csv_text(cell) == "'" + cell
    for cell in ("x=1", "covid-19", "a.png", "", "'quoted"):
        assert csv_text(cell) == cell
    assert not_utf8("ok/é.png") is None and "not valid UTF-8" in not_utf8("bad\udcff.png")


# ------------------------------------------------------------------- the file check (fit, prepare, evaluate)


def _tree_with_hostile_names(tmp_path, tree):
    root = tmp_path / "data"
    shutil.copytree(tree, root)
    folder = root / "train" / "normal"
    _write(folder, NOT_UTF8, _png(tree))
    _write(folder, "new\nline.png", _png(tree))
    return root, folder


def test_scan_refuses_a_name_that_is_not_utf8_and_shows_it_escaped(tmp_path, binary_tree):
    root, folder = _tree_with_hostile_names(tmp_path, binary_tree)
    with pytest.raises(DataError) as raised:
        data_folders.scan(root)
    message = str(raised.value)
    assert message.startswith(f"1 file under {root} cannot be used:\n  train/normal/bad\\xff\\xfe.png: "
                              "its name is not valid UTF-8")
    message.encode("utf-8")  # printable anywhere: no lone surrogate left in it
    m = data_folders.scan(root, strict=False)
    assert [os.fsencode(b.path) for b in m.bad] == [os.path.join(os.fsencode(folder), NOT_UTF8)]
    # The newline name is usable (TensorFlow reads it), and printed escaped when listed.
    assert str(folder / "new\nline.png") in m.splits["train"].paths
    listed = checks.describe([*m.bad, SimpleNamespace(path=str(folder / "new\nline.png"), reason="x")], root)
    assert listed.splitlines() == [f"  train/normal/bad\\xff\\xfe.png: {m.bad[0].reason}",
                                   "  train/normal/new\\nline.png: x"]


def test_fit_with_skip_bad_leaves_the_name_out_and_trains(tmp_path, multilabel_tree):
    """Before: `Error converting unicode string` mid-fit, and the run directory removed."""
    root, folder = _tree_with_hostile_names(tmp_path, multilabel_tree)
    exp = config.resolve(None, {
        "data.dir": str(root), "data.task": "multilabel", "data.image_size": 32,
        "data.skip_bad": True, "model.backbone": "resnet18", "model.weights": "none", "model.freeze": "all",
        # _png copies an image of another split: the leakage check would stop fit (and says so)
        "data.allow_duplicates": True,
        "train.loss": "bce", "train.epochs": 1, "train.batch_size": 6, "out": str(tmp_path / "runs")})
    lines = []
    run = train.fit(exp, log=lines.append)
    assert (run / "checkpoints" / "last.keras").is_file()
    assert any("train/normal/new\\nline.png (train) = " in line for line in lines)  # listed, escaped
    skipped = (run / "skipped.txt").read_text(encoding="utf-8").splitlines()
    assert skipped[1].startswith(f"{checks.escape_field(str(folder))}/bad\\xff\\xfe.png\tits name is "
                                 "not valid UTF-8") and len(skipped) == 2


# ----------------------------------------------------------------------------- predict, evaluate CSVs


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An untrained three-label model file with the study's labels recorded."""
    path = tmp_path_factory.mktemp("model") / "three.keras"
    build_model("resnet18", 3, 16, "torch", name="tfcovid_resnet18_multilabel").save(path)
    metadata.embed(path, {"task": "multilabel", "outputs": list(LABELS), "threshold": 0.5})
    return path


def test_predict_escapes_names_refuses_non_utf8_and_neutralises_csv_cells(tmp_path, model_file,
                                                                         multilabel_tree):
    """Before: a newline broke the table, and the CSV was never written (UnicodeEncodeError)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in [*HOSTILE, NOT_UTF8, "plain.png"]:
        _write(folder, name, _png(multilabel_tree))
    out = tmp_path / "p.csv"
    done = subprocess.run([sys.executable, "-m", "tfcovid.cli", "predict", str(model_file), str(folder),
                           "--csv", str(out)], capture_output=True, timeout=300, check=False)
    stdout, stderr = done.stdout.decode("utf-8"), done.stderr.decode("utf-8")
    assert done.returncode == 1, stderr[-2000:]
    assert stderr.splitlines()[-2:] == [
        "Could not read 1 of 10 image(s):",
        ("  bad\\xff\\xfe.png: its name is not valid UTF-8 (the bytes that are not are shown as "
         "\\xNN); rename it, e.g. convmv -f latin1 -t utf8 --notest NAME")]
    table = stdout.splitlines()
    assert len(table) == 2 + 9 + 1  # header, rule, one line per image, "Wrote 9 rows"
    shown_names = sorted(line.split("  ")[0] for line in table[2:-1])
    assert shown_names == sorted(escape(n) for n in [*HOSTILE, "plain.png"])
    assert all(line.isprintable() for line in table)
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["filename", *LABELS]
    assert sorted(r[0] for r in rows[1:]) == sorted(
        ["new\nline.png", "cr\rhere.png", "rtl\u202egnp.exe.png", "del\x7f.png", "'=HYPERLINK(1).png",
         "'+sum.png", "'-x.png", "'@cmd.png", "plain.png"])


def test_evaluate_predictions_csv_neutralises_names(tmp_path):
    split = SimpleNamespace(paths=["=cmd|'/c calc'!A1.png", "ok.png"], folders=["@bad", "normal"])
    path = tmp_path / "test_predictions.csv"
    trained = SimpleNamespace(task="binary", outputs=("-a", "b"), thresholds=(0.5,), positive_index=0)
    evaluate._write_predictions(path, split, np.array([[0.25, 0.75], [0.5, 0.5]]), trained)
    with open(path, newline="") as fh:  # the predicted class is a name too
        assert list(csv.reader(fh)) == [["path", "true_folder", "'-a", "b", "predicted"],
                                        ["'=cmd|'/c calc'!A1.png", "'@bad", "0.250000", "0.750000", "b"],
                                        ["ok.png", "normal", "0.500000", "0.500000", "'-a"]]


# ----------------------------------------------------------------------------- the study's CSV


def test_study_csv_is_the_studys_file_byte_for_byte(tmp_path):
    result = predict.Predictions("multilabel", LABELS, 0.5, names=["a.png", "b 2.jpg", "c,d.png"],
                                 probs=np.array([[.9, .1, .8], [.1, .7, .2], [.6, .6, .6]]),
                                 predicted=[(1, 0, 1), (0, 1, 0), (1, 1, 1)])
    path = predict.write_csv(result, tmp_path / "study.csv", "study")
    assert path.read_bytes() == (b"filename,covid,normal,pneumonia\n"
                                 b"a.png,1,0,1\nb 2.jpg,0,1,0\n\"c,d.png\",1,1,1\n")
    labels = predict.write_csv(result, tmp_path / "labels.csv").read_bytes()  # the default
    assert labels.startswith(b"filename,covid-19,normal,pneumonia\r\na.png,1,0,1\r\n")
    assert predict.CSV_FORMATS == tuple(next(p for p in main.commands["predict"].params
                                             if p.name == "csv_format").type.choices)
    binary = predict.Predictions("binary", ("infected", "normal"), 0.5)
    for task, outputs in (("binary", ("infected", "normal")), ("multilabel", ("covid", "normal", "pneumonia")),
                          ("multilabel", ("normal", "covid-19", "pneumonia"))):
        assert "needs a three-label model with the labels covid-19, normal, pneumonia" in \
            predict.csv_format_problem(task, outputs, "study")
    with pytest.raises(ValueError, match="--csv-format study"):
        predict.write_csv(binary, tmp_path / "b.csv", "study")


def test_predict_csv_format_study_on_the_command_line(tmp_path, model_file, multilabel_tree):
    folder = tmp_path / "Test"
    folder.mkdir()
    for i, path in enumerate(sorted((multilabel_tree / "test").rglob("*.png"))[:3]):
        shutil.copy(path, folder / f"x{i}.png")
    study, labels = tmp_path / "study.csv", tmp_path / "labels.csv"
    for out, extra in ((study, ["--csv-format", "study"]), (labels, [])):
        result = CliRunner().invoke(main, ["predict", str(model_file), str(folder), "--csv", str(out),
                                           "--no-table", *extra])
        assert result.exit_code == 0, result.output
    rows = labels.read_text().splitlines()
    assert study.read_bytes() == ("\n".join(["filename,covid,normal,pneumonia", *rows[1:]]) + "\n").encode()
    assert [r.split(",")[0] for r in rows[1:]] == ["x0.png", "x1.png", "x2.png"]


# ----------------------------------------------------------------------------- a closed pipe


@pytest.mark.parametrize("args", [["configs"], ["--help"], ["predict", "--help"]])
def test_a_closed_pipe_ends_quietly_with_status_141(args):
    """`tfcovid ... | head` exited 1 (the status of a failed image) before; a Unix tool killed
    by SIGPIPE gives 128 + 13."""
    assert CLOSED_PIPE_STATUS == 141
    p = subprocess.Popen([sys.executable, "-m", "tfcovid.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first line
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == b""


def test_a_closed_pipe_still_gets_predicts_csv(tmp_path, model_file, multilabel_tree):
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder, "a.png", _png(multilabel_tree))
    out = tmp_path / "p.csv"
    done = subprocess.run(f"set -o pipefail; {sys.executable} -m tfcovid.cli predict {model_file} "
                          f"{folder} --csv {out} | true", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 141 and done.stderr == ""
    assert out.read_text().splitlines()[1].startswith("a.png,")


def test_explain_lists_a_name_that_is_not_utf8_escaped_and_goes_on(tmp_path, model_file, multilabel_tree):
    _write(tmp_path, NOT_UTF8, _png(multilabel_tree))
    results = explain.explain(model_file, [tmp_path], tmp_path / "out")
    assert len(results) == 0 and len(results.failed) == 1  # listed, as predict lists it
    name, reason = results.failed[0]
    assert escape(name) == "bad\\xff\\xfe.png" and reason.startswith("its name is not valid UTF-8")
