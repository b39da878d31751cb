"""fit(): a real 2-epoch run on tiny demo data writes the whole run directory."""

import json
import math

import pytest

from tfcovid import config
from tfcovid.data import folders
from tfcovid.models import outputs
from tfcovid.training import callbacks, train


def _tiny(tree, out, **extra):
    flags = {"data.dir": str(tree), "data.image_size": 32, "model.backbone": "vgg16",
             "model.freeze": "first7", "model.weights": "none", "train.epochs": 2,
             "train.batch_size": 4, "train.optimizer": "adam", "train.lr": 1e-4, "out": str(out)}
    flags.update(extra)
    return config.resolve(None, flags)


@pytest.mark.slow
def test_fit_writes_every_file_of_the_run_directory(binary_tree, tmp_path):
    lines = []
    run = train.fit(_tiny(binary_tree, tmp_path / "runs"), log=lines.append)
    assert run.parent == tmp_path / "runs" and run.name.endswith("-vgg16-first7-ce")
    for name in ("config.yaml", "history.csv", "metrics.json", "checkpoints/best.keras",
                 "checkpoints/last.keras", "MODEL_CARD.md"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard" / "train").iterdir())
    assert any((run / "tensorboard" / "validation").iterdir())
    assert config.from_dict(config.load_yaml(run / "config.yaml")).train.epochs == 2
    history = (run / "history.csv").read_text().strip().splitlines()
    assert history[0].split(",")[:3] == ["epoch", "accuracy", "f1"] and len(history) == 3
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["epochs"] == 2 and summary["train_seconds"] > 0
    assert summary["augmentation"] == {"on": "cpu", "images": None}  # data.augment_on auto on a CPU
    # At 32 px VGG16 flattens 1x1x512 into the head: 14,771,340 in all, first7 leaves 13,035,852.
    assert (summary["trainable_params"], summary["total_params"]) == (13_035_852, 14_771_340)
    assert set(summary["splits"]) == {"train", "validation", "test"}
    test = summary["splits"]["test"]
    assert test["n"] == 4 and 0 <= test["accuracy"] <= 1
    assert sum(map(sum, test["confusion_matrix"])) == 4
    # the model card holds metrics.json's counts and figures (issue 23.7)
    card, ci = (run / "MODEL_CARD.md").read_text(), test["intervals"]["accuracy"]
    assert "| test | 4 | 2 | 2 |" in card and "| train | 8 | 4 | 4 |" in card
    assert (f"| test | 4 | {100 * test['accuracy']:.1f} % ({100 * ci['low']:.1f}–{100 * ci['high']:.1f}) |"
            in card) and "| Frozen | first 7 conv |" in card and "| Epochs | 2 |" in card
    assert any("Freeze 'first7'" in line and "trainable parameters" in line for line in lines)
    assert any(line.startswith("| VGG16 | first 7 conv | 2 |") for line in "\n".join(lines).splitlines())


def test_run_directories_never_collide(tmp_path):
    exp = _tiny("demo", tmp_path)
    runs = {train.new_run_dir(exp) for _ in range(3)}
    assert len(runs) == 3 and all(r.is_dir() for r in runs)


def test_nan_guard_stops_with_a_clear_message(binary_tree, tmp_path, monkeypatch):
    guard = callbacks.NaNGuard()

    class Model:
        stop_training = False

    guard.set_model(Model())
    guard.on_train_batch_end(0, {"loss": 0.5})
    assert guard.bad is None and not guard.model.stop_training
    guard.on_train_batch_end(3, {"loss": math.nan})
    assert guard.bad == (3, pytest.approx(math.nan, nan_ok=True)) and guard.model.stop_training


@pytest.mark.slow
def test_diverging_run_raises_training_error(binary_tree, tmp_path):
    exp = _tiny(binary_tree, tmp_path, **{"train.optimizer": "sgd", "train.lr": 1e12,
                                          "model.freeze": "none", "train.epochs": 1})
    with pytest.raises(train.TrainingError, match="loss became .* Try a lower --lr"):
        train.fit(exp, log=lambda s: None)
    # What was written before the failure is kept.
    assert len(list((tmp_path).glob("*/config.yaml"))) == 1


def test_probabilities():
    import numpy as np
    p = outputs.probabilities(np.array([[0.0, 0.0], [2.0, 0.0]]), "binary")
    np.testing.assert_allclose(p, [[0.5, 0.5], [np.e ** 2 / (np.e ** 2 + 1), 1 / (np.e ** 2 + 1)]])
    np.testing.assert_allclose(outputs.probabilities(np.array([[0.0, 100.0]]), "multilabel"), [[0.5, 1.0]])


def test_up_front_checks_stop_fit_before_training_and_leave_no_run(binary_tree, tmp_path):
    from tfcovid.training.preflight import PreflightError

    with pytest.raises(PreflightError, match=r"--batch-size 64 is larger than the train split \(8 images\)"):
        train.fit(_tiny(binary_tree, tmp_path / "runs", **{"train.batch_size": 64}), log=lambda s: None)
    assert not (tmp_path / "runs").exists()  # checked before a run directory (or --out) is made
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(PreflightError, match="a-file"):
        train.fit(_tiny(binary_tree, tmp_path / "a-file" / "runs"), log=lambda s: None)


def test_probabilities_of_large_logits_warn_nothing():
    import warnings

    import numpy as np
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in exp" would raise
        p = outputs.probabilities(np.array([[-1000.0, 0.0, 800.0]]), "multilabel")
    np.testing.assert_allclose(p, [[0.0, 0.5, 1.0]])


def test_disease_class_of_a_binary_tree():
    assert folders.disease_class("infected", ("infected", "normal")) == ("infected", None)
    assert folders.disease_class("NORMAL", ("NORMAL", "PNEUMONIA")) == ("NORMAL", None)  # as set
    chosen, note = folders.disease_class("infected", ("NORMAL", "PNEUMONIA"))  # Kaggle's layout
    assert chosen == "PNEUMONIA"
    assert note.startswith("disease class 'PNEUMONIA': data.positive 'infected' is not a class folder")
    with pytest.raises(config.ConfigError) as err:
        folders.disease_class("infected", ("cats", "dogs"))
    assert "data.positive 'infected' is not one of the class folders ['cats', 'dogs']" in str(err.value)
    assert "--set data.positive=cats" in str(err.value)


@pytest.mark.slow
def test_fit_on_normal_and_pneumonia_folders_reports_pneumonia(binary_tree, tmp_path):
    import shutil

    tree = tmp_path / "kaggle"
    for split in ("train", "validation"):
        shutil.copytree(binary_tree / split / "infected", tree / split / "PNEUMONIA")
        shutil.copytree(binary_tree / split / "normal", tree / split / "NORMAL")
    (tree / "test").mkdir()  # unlabeled: images without class folders
    for image in (binary_tree / "test" / "infected").iterdir():
        shutil.copy(image, tree / "test" / image.name)
    lines = []
    run = train.fit(_tiny(tree, tmp_path / "runs", **{"train.epochs": 1, "model.backbone": "resnet18",
                                                      "model.freeze": "none"}), log=lines.append)
    assert any("note: disease class 'PNEUMONIA'" in line for line in lines)
    assert (f"[6/6] Evaluating train, validation (test has no class folders, so no labels: not "
            f"evaluated; `tfcovid predict {run} {tree / 'test'}` predicts it)") in lines
    assert config.from_dict(config.load_yaml(run / "config.yaml")).data.positive == "PNEUMONIA"
    summary = json.loads((run / "metrics.json").read_text())
    assert set(summary["splits"]) == {"train", "validation"}
    validation = summary["splits"]["validation"]
    assert validation["positive_class"] == "PNEUMONIA" and validation["notes"] == []
    from tfcovid.weights import metadata
    assert metadata.load(run).positive == "PNEUMONIA"
