"""Splits by patient, leakage checks and cross-validation (issue 24.5, 24.6)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tfcovid import cli, config
from tfcovid.data import demo, demo_labels, leakage, splits
from tfcovid.data.label_files import UNASSIGNED
from tfcovid.data.types import DataError, Manifest, Split
from tfcovid.training import cv


def _collection(n_patients=240, seed=0, named=None):
    """A Manifest of made-up files: patients with 1-5 images each, 30 % of them 'covid'."""
    rng = np.random.default_rng(seed)
    paths, classes, patients = [], [], {}
    for p in range(n_patients):
        label = "covid" if rng.random() < 0.3 else "normal"
        for i in range(int(rng.integers(1, 6))):
            path = f"/data/p{p}_{i}.png"
            paths.append(path)
            classes.append(label)
            patients[path] = f"P{p}"
    names = ("covid", "normal")
    def split(name, rows):
        return Split(name, "/data", tuple(paths[i] for i in rows),
                     np.array([names.index(classes[i]) for i in rows]), tuple(classes[i] for i in rows))
    given = named or {UNASSIGNED: range(len(paths))}
    return Manifest("/data/labels.csv", "binary", names, names,
                    {k: split(k, list(v(len(paths)) if callable(v) else v)) for k, v in given.items()},
                    patients=patients)


def _data(**keys):
    return config.resolve(None, {f"data.{k}": v for k, v in keys.items()}).data


def _patients(manifest, name):
    return {manifest.patients[p] for p in manifest.splits[name].paths}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_no_patient_in_two_splits_and_classes_stratified(seed):
    manifest = _collection(seed=seed)
    made = splits.assign(manifest, _data(), seed)
    assert list(made.splits) == ["train", "validation", "test"]
    sets = [_patients(made, n) for n in made.splits]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert sum(len(s) for s in made.splits.values()) == len(manifest.splits[UNASSIGNED])  # nothing lost
    share = np.mean(np.array(manifest.splits[UNASSIGNED].folders) == "covid")
    for name in made.splits:
        assert abs(np.mean(np.array(made.splits[name].folders) == "covid") - share) < 0.1, name
    # 0.15 of the patients -> one of round(1 / 0.15) = 7 folds: 14 %
    n = len(manifest.patients.values() and set(manifest.patients.values()))
    for name in ("validation", "test"):
        assert abs(len(_patients(made, name)) / n - 1 / 7) < 0.04


def test_same_seed_same_splits_other_seed_other_splits():
    manifest = _collection()
    first, again, other = (splits.assign(manifest, _data(), s) for s in (3, 3, 4))
    assert first.splits["test"].paths == again.splits["test"].paths
    assert first.splits["test"].paths != other.splits["test"].paths


def test_fractions_set_the_share_of_patients():
    made = splits.assign(_collection(), _data(validation_fraction=0.25, test_fraction=0.05), 0)
    n = 240
    assert abs(len(_patients(made, "validation")) / n - 0.25 * 0.95) < 0.05  # a quarter of the rest
    assert abs(len(_patients(made, "test")) / n - 0.05) < 0.02


def test_given_test_split_stays_and_validation_comes_from_train():
    """COVIDx: train.txt and test.txt, no validation: validation is made from train by patient."""
    manifest = _collection(named={"train": lambda n: range(n - 50), "test": lambda n: range(n - 50, n)})
    made = splits.assign(manifest, _data(), 0)
    assert made.splits["test"].paths == manifest.splits["test"].paths
    assert set(made.splits["train"].paths) | set(made.splits["validation"].paths) == set(manifest.splits["train"].paths)


def test_folds_cover_every_patient_once_and_keep_test():
    manifest = _collection()
    runs = [splits.assign(manifest, _data(folds=4, fold=i), 0) for i in range(4)]
    tests = {r.splits["test"].paths for r in runs}
    assert len(tests) == 1
    held = [_patients(r, "validation") for r in runs]
    everyone = set(manifest.patients.values()) - _patients(runs[0], "test")
    assert set().union(*held) == everyone and sum(len(h) for h in held) == len(everyone)


def test_given_mode_refuses_rows_without_a_split_and_folds_need_a_label_file(tmp_path):
    with pytest.raises(DataError, match=r"240 image\(s\)|image\(s\) have no split.*data.split=patient"):
        splits.assign(_collection(), _data(split="given"), 0)
    tree = Manifest(str(tmp_path), "binary", ("a", "b"), ("a", "b"), {})
    with pytest.raises(DataError, match="Cross-validation .* needs a label file"):
        splits.assign(tree, _data(folds=3), 0)


def test_too_few_patients_for_the_folds_says_so():
    with pytest.raises(DataError, match="needs at least 7 patients; the data has 3"):
        splits.assign(_collection(n_patients=3), _data(), 0)


def test_splits_csv_repeats_the_splits_and_notices_changed_data(tmp_path):
    manifest = _collection()
    made = splits.assign(manifest, _data(), 5)
    saved = splits.write(made, tmp_path)
    again = splits.assign(manifest, _data(), 0, saved)  # another seed: the file wins
    assert {n: s.paths for n, s in again.splits.items()} == {n: s.paths for n, s in made.splits.items()}
    smaller = _collection(named={UNASSIGNED: lambda n: range(n - 1)})
    with pytest.raises(DataError, match="list different images .*1 only in splits.csv"):
        splits.assign(smaller, _data(), 0, saved)


def test_patient_in_two_splits_names_patient_and_files():
    patients = {"/d/a.png": "P1", "/d/b.png": "P2", "/d/c.png": "P1", "/d/d.png": "P3"}
    manifest = Manifest("/d/labels.csv", "binary", ("x",), ("x",),
                        {"train": Split("train", "/d", ("/d/a.png", "/d/b.png"), None),
                         "test": Split("test", "/d", ("/d/c.png", "/d/d.png"), None)}, patients=patients)
    with pytest.raises(DataError, match=r"1 patient\(s\) have images in two splits.*\n"
                                        r"  patient P1: train: a.png; test: c.png\n"):
        leakage.patients_in_two_splits(manifest)
    patients["/d/c.png"] = "P4"
    leakage.patients_in_two_splits(manifest)  # no patient shared: nothing to say


def _png(path, array, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return str(path)


def test_same_pixels_in_two_splits_are_an_error_unless_allowed(tmp_path):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (12, 9), dtype=np.uint8) for _ in range(2))
    # The same pixels written differently (compression, a text chunk): other bytes, one image.
    train = [_png(tmp_path / "t/a.png", a), _png(tmp_path / "t/b.png", b)]
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "copy")
    val = [_png(tmp_path / "v/a_copy.png", a, compress_level=0, pnginfo=info),
           _png(tmp_path / "v/c.png", 255 - b)]
    assert (tmp_path / "t/a.png").read_bytes() != (tmp_path / "v/a_copy.png").read_bytes()
    manifest = Manifest(str(tmp_path), "binary", ("x",), ("x",),
                        {"train": Split("train", "t", tuple(train), None),
                         "validation": Split("validation", "v", tuple(val), None)})
    with pytest.raises(DataError, match=r"1 image\(s\) .*\n  t/a.png \(train\) = v/a_copy.png \(validation\)\n"
                                        r".*--allow-duplicates"):
        leakage.check(manifest, allow=False, log=lambda s: None)
    lines = []
    assert leakage.check(manifest, allow=True, log=lines.append) == [("train", train[0], "validation", val[0])]
    assert "kept: data.allow_duplicates" in lines[0]
    distinct = Manifest(str(tmp_path), "binary", ("x",), ("x",),
                        {"train": Split("train", "t", tuple(train), None),
                         "validation": Split("validation", "v", (val[1],), None)})
    assert leakage.check(distinct, allow=False, log=lines.append) == []


def test_cv_summary_is_mean_and_sample_std():
    metrics = [{"splits": {"validation": {"n": 10, "accuracy": a, "roc_auc": r, "class_names": ["x"]}}}
               for a, r in ((0.8, 0.9), (0.6, 0.7))]
    summary = cv.summarise(metrics)
    assert summary["validation"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["validation"]["accuracy"]["std"] == pytest.approx(0.1414213, rel=1e-5)  # ddof=1
    assert set(summary["validation"]) == {"accuracy", "roc_auc"} and "test" not in summary
    assert cv.describe(summary)[1] == "  validation: accuracy 0.700 ± 0.141, roc_auc 0.800 ± 0.141"


def test_cv_leaves_a_folds_undefined_figure_out_of_its_mean():
    """A test split without negatives stores specificity 0.0 with a note (results.scores): that
    fold is left out of the specificity's mean instead of pulling it to 0."""
    note = "no 'normal' images in this split: specificity is undefined (reported as 0.0)"
    metrics = [{"splits": {"test": {"accuracy": a, "specificity": s, "sensitivity": 0.5, "recall": 0.5,
                                    "notes": notes}}}
               for a, s, notes in ((0.8, 0.0, [note]), (0.6, 0.9, []), (0.7, 0.7, []))]
    test = cv.summarise(metrics)["test"]
    assert test["specificity"]["values"] == [0.9, 0.7] and test["specificity"]["folds_used"] == 2
    assert test["specificity"]["mean"] == pytest.approx(0.8) and "folds_used" not in test["accuracy"]
    assert test["sensitivity"]["values"] == [0.5, 0.5, 0.5]  # defined in every fold
    one = cv.summarise(metrics[:2])["test"]["specificity"]  # one fold left: no spread
    assert one == {"mean": 0.9, "std": None, "values": [0.9], "folds_used": 1}
    assert "specificity 0.900 (1 of the folds: undefined in the others)" in cv.describe(cv.summarise(metrics[:2]))[1]


def test_cv_of_a_folder_tree_stops_before_making_its_folder(tmp_path):
    """cv needs patient ids: a folder tree (or the demo) is refused in one line, and no empty
    ``-cvK`` folder is left under --out (it was, after the first fold's run failed)."""
    tree = tmp_path / "tree"
    (tree / "train" / "a").mkdir(parents=True)
    result = CliRunner().invoke(cli.main, ["cv", "--folds", "2", "--data", str(tree),
                                           "--out", str(tmp_path / "runs")])
    assert result.exit_code == 1
    assert f"not --data {tree}. Pass --data FILE.csv" in result.output
    assert "Traceback" not in result.output and "Fold 1" not in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cv_runs_every_fold_by_patient_and_summarises(tmp_path):
    """A real 2-fold cross-validation at 16 px, 1 epoch: each fold's run keeps its splits.csv,
    [3/6] prints the counts per class, and evaluate repeats the run's split exactly."""
    root = demo.make_demo_data(tmp_path / "demo", "binary", per_class=8, image_size=(40, 72))
    labels = demo_labels.write_label_file(root)
    result = CliRunner().invoke(cli.main, [
        "cv", "--folds", "2", "--data", str(labels), "--backbone", "resnet18", "--weights", "none",
        "--image-size", "16", "--epochs", "1", "--batch-size", "2", "--freeze", "all", "--set", "data.test_fraction=0.34",
        "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "runs").iterdir()
    summary = json.loads((folder / "cv.json").read_text())
    assert summary["folds"] == 2 and len(summary["validation"]["accuracy"]["values"]) == 2
    assert "per split and class: train: infected" in result.output
    runs = [p for p in sorted(folder.iterdir()) if p.is_dir()]
    held = [{r.split(",")[2] for r in (run / "splits.csv").read_text().splitlines()[1:]
             if r.split(",")[1] == "validation"} for run in runs]
    assert held[0] and not held[0] & held[1]  # the folds' validation patients differ
    from tfcovid.inference import evaluate
    result = evaluate.evaluate(runs[1], split="validation", make_plots=False, log=lambda s: None)
    trained = json.loads((runs[1] / "metrics.json").read_text())["splits"]["validation"]
    assert result["report"]["accuracy"] == pytest.approx(trained["accuracy"])
    assert result["report"]["n"] == trained["n"]


def test_fit_stops_on_a_copied_image_before_training_and_names_the_pair(tmp_path):
    """Phase 3 of fit (issue 24.6): a train image copied into validation stops the run, listed."""
    from tfcovid.training import train
    rng = np.random.default_rng(1)
    rows = ["path,label,patient_id,split"]
    for i in range(8):
        split = "train" if i < 6 else "validation"
        _png(tmp_path / f"img/{i}.png", rng.integers(0, 256, (20, 20), dtype=np.uint8))
        rows.append(f"img/{i}.png,{'ab'[i % 2]},p{i},{split}")
    (tmp_path / "img/copy.png").write_bytes((tmp_path / "img/0.png").read_bytes())
    rows.append("img/copy.png,a,p9,validation")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    exp = config.resolve(None, {"data.dir": str(tmp_path / "labels.csv"), "model.backbone": "resnet18",
                                "model.weights": "none", "data.image_size": 16, "train.batch_size": 2,
                                "train.epochs": 1, "out": str(tmp_path / "runs"), "data.positive": "a"})
    with pytest.raises(DataError, match=r"img/0.png \(train\) = img/copy.png \(validation\)"):
        train.fit(exp, log=lambda s: None)
    assert list((tmp_path / "runs").iterdir()) == []  # the run directory went with the run
