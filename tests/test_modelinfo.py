"""What a trained model predicts: --task/--labels never rename what a model records."""

import shutil
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from fake_run import make_run
from tfcovid.data import folders, types
from tfcovid.inference import evaluate
from tfcovid.weights import metadata
from tfcovid.cli import main


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory, binary_tree):
    return make_run(tmp_path_factory.mktemp("runs"), binary_tree, "binary", bias=[0.3, -0.3])


def test_recorded_labels_and_task_are_not_renamed(binary_run):
    trained = metadata.load(binary_run)
    assert trained.outputs == ("infected", "normal") and trained.task == "binary"
    # The same values as recorded: harmless.
    same = metadata.load(binary_run, task="binary", labels=["infected", "normal"])
    assert same.outputs == ("infected", "normal")
    with pytest.raises(metadata.ModelInfoError) as err:
        metadata.load(binary_run, labels=["normal", "infected"])
    message = str(err.value)
    assert "last.keras records its outputs as ['infected', 'normal']" in message
    assert "--labels normal,infected would rename them" in message and "Leave out --labels" in message
    with pytest.raises(metadata.ModelInfoError, match=r"is a binary model \(recorded in .*\), not multilabel"):
        metadata.load(binary_run, task="multilabel")


def test_labels_still_name_a_bare_model(binary_run, tmp_path):
    bare = tmp_path / "bare.keras"
    shutil.copy(binary_run / "checkpoints" / "last.keras", bare)
    with zipfile.ZipFile(bare) as z:
        assert metadata.INFO_MEMBER in z.namelist()
    # A copy without the embedded info and no run directory beside it.
    stripped = tmp_path / "stripped.keras"
    with zipfile.ZipFile(bare) as src, zipfile.ZipFile(stripped, "w") as dst:
        for item in src.infolist():
            if item.filename != metadata.INFO_MEMBER:
                dst.writestr(item, src.read(item.filename))
    with pytest.raises(metadata.ModelInfoError, match="does not say what it predicts"):
        metadata.load(stripped)
    trained = metadata.load(stripped, task="binary", labels=["sick", "well"])
    assert trained.outputs == ("sick", "well") and trained.source == "--labels"


def test_cli_refuses_renaming_for_predict_and_evaluate(binary_run, binary_tree):
    image = next((binary_tree / "test" / "infected").iterdir())
    for args in (["predict", str(binary_run), str(image), "--labels", "normal,infected"],
                 ["evaluate", str(binary_run), "--task", "multilabel"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert "Error:" in result.output and "Traceback" not in result.output
        assert "Leave out --" in result.output


def test_binary_model_on_three_class_folders_names_both(binary_run, multilabel_tree):
    with pytest.raises(evaluate.EvaluateError) as err:
        evaluate.evaluate(binary_run, data=multilabel_tree, split="test", make_plots=False)
    message = str(err.value)
    assert "is a binary model with outputs ['infected', 'normal']" in message
    assert "has 3 class folders: ['covid-19', 'normal', 'pneumonia']" in message
    assert "--task multilabel" not in message  # fit's advice, wrong for a trained binary model


def test_label_map_to_a_label_the_outputs_lack_is_a_data_error():
    vectors = folders.label_vectors(["a", "b"], "multilabel", (), ["x", "y"], {"a": ["x"], "b": ["x", "y"]})
    np.testing.assert_array_equal(vectors, [[1, 0], [1, 1]])
    with pytest.raises(types.DataError) as err:
        folders.label_vectors(["a", "pneumonia"], "multilabel", (), ["infected", "normal"],
                           {"a": ["normal"], "pneumonia": ["pneumonia"]})
    assert "pneumonia -> ['pneumonia']" in str(err.value)
    assert "['infected', 'normal']" in str(err.value)


def test_checkpoint_option_is_refused_for_a_model_file(binary_run, binary_tree):
    model = binary_run / "checkpoints" / "last.keras"
    image = next((binary_tree / "test" / "infected").iterdir())
    for args in (["predict", str(model), str(image), "--checkpoint", "best"],
                 ["evaluate", str(model), "--checkpoint", "last"],
                 ["export", str(model), "--checkpoint", "best"],
                 ["explain", str(model), str(image), "--out", "x", "--checkpoint", "best"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"--checkpoint picks a checkpoint of a run directory, and {model} is a model file" in result.output


def test_labels_must_be_distinct_and_non_empty(binary_run, binary_tree, tmp_path):
    image = next((binary_tree / "test" / "infected").iterdir())
    for bad in ("a,a", "covid,", ",b"):
        for args in (["predict", str(binary_run / "checkpoints" / "last.keras"), str(image), "--labels", bad],
                     ["import-torch", str(image), "--backbone", "resnet18", "--task", "binary",
                      "--out", str(tmp_path / "x.keras"), "--labels", bad]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 2, (args, result.output)
            assert f"Invalid value for '--labels': {bad!r}: give distinct, non-empty names" in result.output
    result = CliRunner().invoke(main, ["import-torch", str(tmp_path / "missing.pth"), "--backbone",
                                       "resnet18", "--task", "binary", "--out", str(tmp_path / "y.keras")])
    assert result.exit_code == 2 and "does not exist" in result.output and "--weights" not in result.output
