"""The command line through click's test runner."""

import json
import subprocess
import sys

import click
import pytest
import yaml
from click.testing import CliRunner

from tfcovid import config
from tfcovid.cli import main
from tfcovid.config import schema
from tfcovid.models import tta


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
    # --set may change how the same pixels are fed (caches, device memory), nothing else.
    fed = CliRunner().invoke(main, ["fit", "--resume", str(runs[0]), "--set", "data.device_cache_mb=0",
                                    "--set", "data.cache=none", "--set", "data.resample_processes=0"])
    assert fed.exit_code == 1 and "has finished (it has metrics.json)" in fed.output
    other = CliRunner().invoke(main, ["fit", "--resume", str(runs[0]), "--set", "data.cache_budget_mb=64",
                                      "--set", "train.lr=0.5", "--set", "data.augment_on=cpu"])
    assert other.exit_code == 2 and "; --set data.augment_on, --set train.lr would change the run halfway" in other.output
    assert "--set may change data.cache, data.cache_budget_mb, data.device_cache_mb" in other.output
    bad = CliRunner().invoke(main, ["fit", "--resume", str(runs[0]), "--set", "data.device_cache_mb=-1"])
    assert bad.exit_code == 1 and "Bad value for 'data.device_cache_mb': -1" in bad.output


@pytest.mark.parametrize("args, message", [
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


def _options():
    """Every option of every command (and of the group), --help and --version included."""
    commands = [("tfcovid", main), *sorted(main.commands.items())]
    return [(name, param) for name, command in commands
            for param in command.get_params(click.Context(command)) if isinstance(param, click.Option)]


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {param.opts[0]}" for name, param in _options() if not (param.help or "").strip()]
    assert len(_options()) > 90 and missing == []


# Each fixed choice is the config's own tuple: one list, so the command line and a YAML file agree.
CHOICES = {
    ("bench", "--backbone"): schema.BACKBONES, ("bench", "--precision"): schema.PRECISIONS,
    ("bench", "--jit-compile"): schema.JIT_COMPILE, ("bench", "--cache"): schema.CACHES,
    ("demo-data", "--task"): schema.TASKS, ("evaluate", "--task"): schema.TASKS,
    ("calibrate", "--task"): schema.TASKS, ("calibrate", "--calibrate"): schema.CALIBRATIONS,
    ("fit", "--calibrate"): schema.CALIBRATIONS,
    ("explain", "--task"): schema.TASKS, ("export", "--task"): schema.TASKS,
    ("fit", "--backbone"): schema.BACKBONES, ("fit", "--loss"): schema.LOSSES,
    ("fit", "--optimizer"): schema.OPTIMIZERS, ("fit", "--precision"): schema.PRECISIONS,
    ("fit", "--preprocessing"): schema.PREPROCESSING, ("fit", "--strategy"): schema.STRATEGIES,
    ("fit", "--task"): schema.TASKS, ("import-torch", "--task"): schema.TASKS,
    ("predict", "--task"): schema.TASKS,
    ("fit", "--class-weight"): schema.CLASS_WEIGHTS, ("fit", "--sampling"): schema.SAMPLINGS,
    ("bench", "--augment-on"): schema.AUGMENT_ON,
    ("evaluate", "--tta"): tta.TTA, ("predict", "--tta"): tta.TTA,  # not config keys: the models' TTA
}
CHOICES.update({("cv", option): choices for (name, option), choices in list(CHOICES.items()) if name == "fit"})


def test_fixed_choices_are_the_configs_tuples():
    choices = {(name, param.opts[0]): tuple(param.type.choices) for name, param in _options()
               if isinstance(param.type, click.Choice)}
    for key, expected in CHOICES.items():
        assert choices[key] == expected, key
    # The rest are not config keys: checkpoints, splits, export, CSV and shard formats, the torch subset.
    assert sorted(set(choices) - set(CHOICES)) == [
        ("calibrate", "--checkpoint"), ("evaluate", "--checkpoint"), ("evaluate", "--split"), ("explain", "--checkpoint"),
        ("export", "--checkpoint"), ("export", "--format"), ("import-torch", "--backbone"),
        ("predict", "--checkpoint"), ("predict", "--csv-format"), ("prepare", "--format")]


def test_fit_help_shows_the_demo_preset_and_defaults():
    result = CliRunner().invoke(main, ["fit", "--help"])
    text = " ".join(result.output.split())  # click wraps lines
    assert result.exit_code == 0 and "the demo preset applies" in text
    assert ("It sets data.image_size 48, data.demo_per_class 200, augment.rotation 10, augment.crop_scale "
            "[0.5, 1.0], model.weights none, train.optimizer adam, train.lr 5e-05, train.epochs 10, "
            "train.batch_size 32; with --task multilabel also data.demo_per_class 160, model.backbone "
            "resnet18, train.epochs 8, train.lr 0.0005.") in text
    assert "Learning rate. Default: from --config, else 0.001; demo preset 5e-05 (0.0005 multilabel)." in text
    assert "--epochs INTEGER RANGE Passes over the train split. Default: from --config, else 12" in text
    assert "[x>=1]" in text and "--seed INTEGER RANGE" in text and "[0<=x<=2147483647]" in text


def test_help_is_fast_it_loads_no_tensorflow():
    code = ("import sys; from click.testing import CliRunner; from tfcovid.cli import main; "
            "assert CliRunner().invoke(main, ['fit', '--help']).exit_code == 0; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    module = subprocess.run([sys.executable, "-m", "tfcovid.cli", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert module.returncode == 0 and "Not for clinical use" in module.stdout


def test_a_bad_choice_is_refused_by_the_command_line_and_by_a_config_file(tmp_path):
    flag = CliRunner().invoke(main, ["fit", "--backbone", "vgg19"])
    assert flag.exit_code == 2 and "'vgg19' is not one of 'vgg16', 'resnet18', 'resnet50'" in flag.output
    (tmp_path / "bad.yaml").write_text("model:\n  backbone: vgg19\n")
    file = CliRunner().invoke(main, ["fit", "--config", str(tmp_path / "bad.yaml")])
    assert file.exit_code == 1 and "Valid values: vgg16, resnet18, resnet50" in file.output
    assert "Traceback" not in file.output
    low = CliRunner().invoke(main, ["fit", "--epochs", "0"])
    assert low.exit_code == 2 and "0 is not in the range x>=1" in low.output


def test_configs_lists_the_installed_study_configs():
    result = CliRunner().invoke(main, ["configs"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[2:-1]}
    study = sorted(name for name in rows if name.startswith(("part1/", "part2/")))
    assert len(study) == 10 and "part1/vgg16_first7.yaml" in study and "part2/resnet18_focal.yaml" in study
    for name in study:
        model = yaml.safe_load((config.configs_folder() / name).read_text())["model"]
        assert rows[name][:2] == [model["backbone"], model["freeze"]], name
    assert rows["part2/resnet18_focal.yaml"] == ["resnet18", "none", "focal", "22"]


def test_configs_names_a_broken_config_and_still_lists_the_others(monkeypatch):
    """An installed config that does not resolve (e.g. a backbone this install lacks) is named
    after the table, exit 1; it used to stop the listing with no row shown."""
    real = config.resolve

    def resolve(name, *args):
        if name == "part1/vgg16_head.yaml":
            raise config.ConfigError("Bad value for 'model.backbone': 'x'.")
        return real(name, *args)
    monkeypatch.setattr(config, "resolve", resolve)
    result = CliRunner().invoke(main, ["configs"])
    assert result.exit_code == 1
    assert "part1/vgg16_first7.yaml" in result.output and "part2/resnet18_focal.yaml" in result.output
    assert result.output.rstrip().endswith("  part1/vgg16_head.yaml: Bad value for 'model.backbone': 'x'.")
    assert "config(s) cannot be loaded" in result.output


def _resolved_by_fit(args, monkeypatch):
    """The Experiment that fit would train, without training it."""
    from tfcovid.training import train

    seen = []
    monkeypatch.setattr(train, "fit", lambda exp, **kwargs: seen.append(exp) or "RUN")
    result = CliRunner().invoke(main, ["fit", *args])
    return result, (seen[0] if seen else None)


def test_fit_config_by_name_from_any_folder_and_a_file_here_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    installed = config.configs_folder() / "part1" / "vgg16_first7.yaml"
    assert config.find_config("part1/vgg16_first7.yaml") == installed
    assert config.find_config("part1/vgg16_first7") == installed
    assert config.find_config("configs/part1/vgg16_first7.yaml") == installed
    result, exp = _resolved_by_fit(["--config", "part1/vgg16_first7.yaml"], monkeypatch)
    assert result.exit_code == 0, result.output
    assert (exp.name, exp.model.freeze, exp.train.epochs) == ("part1-vgg16_first7", "first7", 12)

    (tmp_path / "part1").mkdir()
    (tmp_path / "part1" / "vgg16_first7.yaml").write_text("name: mine\ntrain:\n  epochs: 3\n")
    result, exp = _resolved_by_fit(["--config", "part1/vgg16_first7.yaml"], monkeypatch)
    assert result.exit_code == 0 and (exp.name, exp.train.epochs) == ("mine", 3)


def test_an_unknown_config_name_lists_the_installed_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["fit", "--config", "part1/vgg16_first8"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Config file not found: part1/vgg16_first8. It is neither a file here nor an installed" in result.output
    assert "part1/vgg16_first4.yaml, part1/vgg16_first7.yaml" in result.output
