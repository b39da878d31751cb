"""The command line through click's test runner."""

import json

import pytest
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
def test_fit_command_on_tiny_data(binary_tree, tmp_path):
    result = CliRunner().invoke(main, [
        "fit", "--data", str(binary_tree), "--backbone", "resnet18", "--freeze", "all",
        "--weights", "none", "--epochs", "1", "--batch-size", "4", "--image-size", "32",
        "--out", str(tmp_path), "--name", "cli"])
    assert result.exit_code == 0, result.output
    runs = list(tmp_path.glob("*-resnet18-all-ce-cli"))
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file()
    assert "| ResNet18 | all but head | 1 |" in result.output  # the study's wording for ResNet18


@pytest.mark.parametrize("args, message", [
    (["--backbone", "vgg19"], "Valid values: vgg16, resnet18, resnet50"),
    (["--config", "nope.yaml"], "Config file not found: nope.yaml"),
    (["--data", "/no/such/dir", "--weights", "none"], "Data folder not found: /no/such/dir"),
    (["--freeze", "firstx"], "model.freeze"),
])
def test_fit_bad_input_is_a_clear_error(args, message, tmp_path):
    result = CliRunner().invoke(main, ["fit", "--out", str(tmp_path), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
