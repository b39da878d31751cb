"""The command line through click's test runner."""

import json

import pytest
import yaml
from click.testing import CliRunner

from tfcovid.cli import main


def test_help_says_not_for_clinical_use():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "Not for clinical use" in result.output
    for command in ("fit", "demo-data"):
        assert command in result.output


def test_demo_data_command(tmp_path):
    result = CliRunner().invoke(main, ["demo-data", str(tmp_path / "d"), "--per-class", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert meta["seed"] == 3 and meta["task"] == "binary"
    again = CliRunner().invoke(main, ["demo-data", str(tmp_path / "d")])
    assert again.exit_code == 1 and "d" in again.output and "Traceback" not in again.output


@pytest.mark.slow
def test_fit_command_on_tiny_data(binary_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(binary_tree.parent)  # --data as typed, relative to here
    result = CliRunner().invoke(main, [
        "fit", "--data", binary_tree.name, "--backbone", "resnet18", "--freeze", "all",
        "--weights", "none", "--epochs", "1", "--batch-size", "4", "--image-size", "32",
        "--out", str(tmp_path), "--name", "cli"])
    assert result.exit_code == 0, result.output
    runs = list(tmp_path.glob("*-resnet18-all-ce-cli"))
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file()
    assert "| ResNet18 | all but head | 1 |" in result.output  # the study's wording for ResNet18
    # The run keeps where its data is, so resume, evaluate and explain work from anywhere.
    saved = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert saved["data"]["dir"] == str(binary_tree.resolve())

    # --resume takes the run's own config: other options are refused, not silently dropped.
    monkeypatch.chdir(tmp_path)
    changed = CliRunner().invoke(main, ["fit", "--resume", str(runs[0]), "--epochs", "3", "--lr", "0.5"])
    assert changed.exit_code == 2 and "Traceback" not in changed.output
    assert "--epochs, --lr would change the run halfway" in changed.output
    # --data may say where the data is now; this run has finished, so nothing is resumed.
    moved = CliRunner().invoke(main, ["fit", "--resume", str(runs[0]), "--data", str(binary_tree)])
    assert moved.exit_code == 1 and "has finished (it has metrics.json)" in moved.output


@pytest.mark.parametrize("args, message", [
    (["--backbone", "vgg19"], "Valid values: vgg16, resnet18, resnet50"),
    (["--config", "nope.yaml"], "Config file not found: nope.yaml"),
    (["--data", "/no/such/dir", "--weights", "none"], "Data folder not found: /no/such/dir"),
    (["--freeze", "firstx"], "model.freeze"),
    (["--freeze", "first14"], "vgg16 has 13 conv layers: use first1 ... first13"),
])
def test_fit_bad_input_is_a_clear_error(args, message, tmp_path):
    result = CliRunner().invoke(main, ["fit", "--out", str(tmp_path), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_weights_that_do_not_load_leave_no_run_directory(binary_tree, tmp_path):
    """A weights file is read when the model is built, after the run directory was made: when
    it is refused, the half-made run (only config.yaml) is removed, as for other early stops."""
    import keras

    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(
        tmp_path / "vgg.weights.h5")
    result = CliRunner().invoke(main, [
        "fit", "--data", str(binary_tree), "--backbone", "resnet18", "--weights", str(tmp_path / "vgg.weights.h5"),
        "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "Was it saved from another backbone (--backbone)?" in result.output
    assert "Traceback" not in result.output and "stopped before training" in result.output
    assert list((tmp_path / "runs").iterdir()) == []
