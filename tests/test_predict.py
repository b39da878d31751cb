"""tfcovid predict: the study's CSV for an unlabeled folder, broken files, bare model files."""

import csv
import shutil
import zipfile

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from tfcovid import config
from tfcovid.data import decode
from tfcovid.weights import metadata
from tfcovid.inference import predict
from tfcovid.training import train
from tfcovid.cli import main
from tfcovid.models import build_model

LABELS = ["covid-19", "normal", "pneumonia"]


@pytest.fixture(scope="module")
def run(multilabel_tree, tmp_path_factory):
    """A real one-epoch three-label run at 32 px (the backbone frozen: the head trains)."""
    exp = config.resolve(None, {
        "data.dir": str(multilabel_tree), "data.task": "multilabel", "data.image_size": 32,
        "model.backbone": "resnet18", "model.weights": "none", "model.freeze": "all", "train.loss": "focal",
        "train.epochs": 1, "train.batch_size": 6, "train.optimizer": "adam", "train.lr": 1e-3,
        "out": str(tmp_path_factory.mktemp("runs"))})
    return train.fit(exp, log=lambda line: None)


@pytest.fixture(scope="module")
def test_folder(multilabel_tree, tmp_path_factory):
    """The study's Part 2 Test/ layout: images directly in the folder, no class folders."""
    folder = tmp_path_factory.mktemp("part2") / "Test"
    folder.mkdir()
    for path in sorted((multilabel_tree / "test").rglob("*.*")):
        shutil.copy(path, folder / f"x{path.name}")  # renamed so the name hides the class
    return folder


def _reference_probs(model_file, paths, size=32):
    """Sigmoid of the saved model's logits, on images loaded the way evaluation loads them."""
    model = keras.models.load_model(model_file, compile=False)
    pixels = np.stack([decode.load_image(str(p), size).numpy() for p in paths])
    return 1.0 / (1.0 + np.exp(-model.predict(pixels, verbose=0).astype(np.float64)))


def _read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_unlabeled_test_folder_gives_the_studys_csv(run, test_folder, tmp_path):
    out = tmp_path / "pred" / "test.csv"
    result = CliRunner().invoke(main, ["predict", str(run), str(test_folder), "--csv", str(out)])
    assert result.exit_code == 0, result.output
    header, rows = _read_csv(out)
    assert header == ["filename", *LABELS]
    names = sorted(p.name for p in test_folder.iterdir())
    assert [r[0] for r in rows] == names and len(rows) == 6
    expected = _reference_probs(run / "checkpoints" / "last.keras", [test_folder / n for n in names])
    np.testing.assert_array_equal(np.array([r[1:] for r in rows], dtype=int), expected >= 0.5)
    # The printed table holds the probabilities.
    first = next(line for line in result.output.splitlines() if line.startswith(names[0]))
    np.testing.assert_allclose([float(v) for v in first.split()[1:4]], expected[0], atol=6e-4)


def test_threshold_and_checkpoint_choice(run, test_folder):
    trained = metadata.load(run, "best")
    assert trained.path == run / "checkpoints" / "best.keras" and trained.threshold == 0.5
    names = sorted(p.name for p in test_folder.iterdir())
    probs = _reference_probs(trained.path, [test_folder / n for n in names])
    for threshold in (0.2, 0.5, float(np.median(probs))):
        result = predict.predict(trained, [test_folder], threshold=threshold)
        assert result.names == names
        np.testing.assert_allclose(result.probs, probs, atol=1e-5)
        assert result.predicted == [tuple(int(v) for v in row) for row in probs >= threshold]
    with pytest.raises(ValueError, match="threshold"):
        predict.predict(trained, [test_folder], threshold=1.5)


def test_broken_files_are_listed_and_the_rest_predicted(run, multilabel_tree, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    good = sorted((multilabel_tree / "validation" / "normal").iterdir())[:2]
    shutil.copy(good[0], folder / good[0].name)
    shutil.copy(good[1], folder / "sub" / good[1].name)
    png = next((multilabel_tree / "train").rglob("*.png")).read_bytes()
    (folder / "truncated.png").write_bytes(png[:200])
    (folder / "sub" / "text.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "mixed.csv"
    result = CliRunner().invoke(main, ["predict", str(run), str(folder), str(tmp_path / "gone.png"),
                                       "--csv", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "Could not read 4 of 6 image(s)" in result.stderr
    for name, reason in (("truncated.png", "damaged image data"), ("sub/text.jpg", "not a JPEG/PNG"),
                         ("empty.png", "empty file"), ("gone.png", "no such file or folder")):
        assert any(name in line and reason in line for line in result.stderr.splitlines()), name
    assert "skipped 1 file(s) without an image extension" in result.stderr
    header, rows = _read_csv(out)
    assert [r[0] for r in rows] == sorted([good[0].name, f"sub/{good[1].name}"])


def _bare_binary_model(tmp_path):
    model = build_model("resnet18", 2, 16, "torch", name="tfcovid_resnet18_binary")
    path = tmp_path / "bare.keras"
    model.save(path)
    return path


def test_bare_binary_model_file(multilabel_tree, tmp_path):
    path = _bare_binary_model(tmp_path)
    with pytest.raises(metadata.ModelInfoError, match="--labels"):
        metadata.load(path)
    trained = metadata.load(path, labels=["infected", "normal"])  # the task is in the model's name
    assert (trained.task, trained.positive, trained.image_size) == ("binary", "infected", 16)
    with pytest.raises(metadata.ModelInfoError, match="2 outputs but its labels"):
        metadata.load(path, labels=["a", "b", "c"])
    metadata.embed(path, {"task": "binary", "outputs": ["infected", "normal"],
                           "positive": "infected", "threshold": 0.5})
    trained = metadata.load(path)
    images = sorted((multilabel_tree / "test" / "normal").iterdir())
    result = predict.predict(trained, images, threshold=0.3)
    out = predict.write_csv(result, tmp_path / "binary.csv")
    header, rows = _read_csv(out)
    assert header == ["filename", "infected", "normal", "predicted"]
    probs = np.array([[float(v) for v in r[1:3]] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=2e-6)
    model = keras.models.load_model(path, compile=False)
    logits = model.predict(np.stack([decode.load_image(str(p), 16).numpy() for p in images]), verbose=0)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=2e-6)
    assert [r[3] for r in rows] == ["infected" if p >= 0.3 else "normal" for p in probs[:, 0]]


def test_embedded_info_is_replaced_and_model_still_loads(tmp_path):
    path = _bare_binary_model(tmp_path)
    metadata.embed(path, {"task": "binary", "outputs": ["a", "b"]})
    metadata.embed(path, {"task": "binary", "outputs": ["infected", "normal"], "threshold": 0.7})
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist().count(metadata.INFO_MEMBER) == 1
    trained = metadata.load(path)
    assert trained.outputs == ("infected", "normal") and trained.threshold == 0.7


def test_run_without_embedded_info_uses_its_config(run, tmp_path):
    copy = tmp_path / "old-run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tensorboard", "backup"))
    checkpoint = copy / "checkpoints" / "last.keras"
    stripped = tmp_path / "stripped.keras"
    with zipfile.ZipFile(checkpoint) as src, zipfile.ZipFile(stripped, "w") as dst:
        for item in src.infolist():
            if item.filename != metadata.INFO_MEMBER:
                dst.writestr(item, src.read(item.filename))
    stripped.replace(checkpoint)
    assert metadata.read_embedded(checkpoint) is None
    trained = metadata.load(checkpoint)  # a file inside a run directory finds its config.yaml
    assert trained.run_dir == copy and "config.yaml" in trained.source
    assert trained.task == "multilabel" and trained.outputs == tuple(LABELS)


def test_bad_targets_are_clear_errors(run, tmp_path):
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "model.h5").write_text("x")
    (tmp_path / "broken.keras").write_text("not a zip")
    for target, message in ((tmp_path / "nope", "Model not found"),
                            (tmp_path / "empty-run", "not a finished run directory"),
                            (tmp_path / "model.h5", "not a .keras model file"),
                            (tmp_path / "broken.keras", "Could not load the Keras model")):
        result = CliRunner().invoke(main, ["predict", str(target), str(tmp_path)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    (tmp_path / "no-images").mkdir()
    result = CliRunner().invoke(main, ["predict", str(run), str(tmp_path / "no-images")])
    assert result.exit_code == 1 and "No images" in result.output


def test_several_inputs_name_rows_by_path_and_predict_each_file_once(run, multilabel_tree, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = sorted((multilabel_tree / "train").rglob("*.png"))[:5]
    assert len(images) == 5
    for folder, source in (("A", images[0]), ("B", images[1]), ("odd", images[2]), ("odd2", images[3])):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / ("cmyk.png" if folder.startswith("odd") else "x.png"))
    shutil.copy(images[4], tmp_path / "odd" / "other.png")
    model = run / "checkpoints" / "last.keras"

    # The same file name in two folders: each row names its folder, as the path given plus the
    # path inside it.
    result = CliRunner().invoke(main, ["predict", str(run), "A", "B/", "--csv", "ab.csv"])
    assert result.exit_code == 0, result.output
    header, rows = _read_csv(tmp_path / "ab.csv")
    assert [r[0] for r in rows] == ["A/x.png", "B/x.png"]
    expected = _reference_probs(model, [images[0], images[1]])
    np.testing.assert_array_equal(np.array([r[1:] for r in rows], dtype=int), expected >= 0.5)
    for name, probs in zip(["A/x.png", "B/x.png"], expected):
        line = next(line for line in result.output.splitlines() if line.startswith(name + " "))
        np.testing.assert_allclose([float(v) for v in line.split()[1:4]], probs, atol=6e-4)

    # A file given directly and again inside a given folder: one row, under one name; the
    # other folder's cmyk.png is named by its own folder.
    trained = metadata.load(run)
    got = predict.predict(trained, ["odd/cmyk.png", "odd2", "odd", "./odd"])
    assert got.names == ["odd/cmyk.png", "odd/other.png", "odd2/cmyk.png"]
    assert got.paths == [str((tmp_path / n).resolve()) for n in got.names]
    np.testing.assert_allclose(got.probs, _reference_probs(model, [images[2], images[4], images[3]]),
                               atol=1e-5)
    # One folder alone (however spelled) keeps the names relative to it.
    assert predict.predict(trained, ["odd", "odd/"]).names == ["cmyk.png", "other.png"]
    found, missing, _ = predict.find_images(["A", "gone.png"])  # a missing input gives no rows
    assert [name for name, _ in found] == ["x.png"] and missing == [("gone.png", "no such file or folder")]


def test_linked_folders_followed_and_a_named_pipe_refused_unopened(run, multilabel_tree, tmp_path):
    import os
    import subprocess
    import sys

    folder, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    good = sorted((multilabel_tree / "validation" / "normal").iterdir())[:2]
    shutil.copy(good[0], folder / "a.png")
    shutil.copy(good[1], elsewhere / "b.png")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # read once, not forever
    os.mkfifo(folder / "pipe.png")
    raw, reason = predict.read_file(folder / "pipe.png")  # returns at once: never opened
    assert raw is None and reason.startswith("not a regular file: a named pipe")
    found, missing, skipped = predict.find_images([folder])
    assert sorted(name for name, _ in found) == ["a.png", "linked/b.png", "pipe.png"]
    out = tmp_path / "p.csv"
    done = subprocess.run([sys.executable, "-m", "tfcovid.cli", "predict", str(run), str(folder),
                           "--csv", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "pipe.png: not a regular file: a named pipe" in done.stderr
    _, rows = _read_csv(out)
    assert [r[0] for r in rows] == ["a.png", "linked/b.png"]
