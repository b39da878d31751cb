"""Safe loading: no code from a model, weights or config file ever runs (issue 8, section 4).

Each hostile file would create a marker file if its code ran. Every test first proves that
(the positive control), then that tfcovid refuses the file with an error naming it and leaves
the marker absent.
"""

import shutil

import keras
import pytest
import torch
from click.testing import CliRunner
from keras.src.backend.common import global_state

from tfcovid import config
from tfcovid.weights import keras_files, metadata, torch_files, loading
from tfcovid.cli import main
from tfcovid.config import ConfigError
from tfcovid.weights.metadata import ModelInfoError
from tfcovid.weights.assign import WeightsError


def _touching_lambda(marker):
    # Built from source so the marker's path is a constant in the lambda's bytecode, which is
    # what Keras marshals into config.json (a closure would be serialised too; this is plainer).
    return eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")


@pytest.fixture(scope="module")
def lambda_model(tmp_path_factory):
    """(a .keras file whose Lambda layer touches a marker file when it runs, that marker)."""
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "MARKER"
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Lambda(_touching_lambda(marker), name="evil")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x), name="tfcovid_vgg16_binary")
    model.save(folder / "evil.keras")
    marker.unlink()  # building the model called the lambda once
    return folder / "evil.keras", marker


@pytest.fixture
def hostile(lambda_model, tmp_path):
    """A fresh copy of the Lambda model with its marker path absent."""
    path, marker = lambda_model
    marker.unlink(missing_ok=True)
    copy = tmp_path / "evil.keras"
    shutil.copy(path, copy)
    return copy, marker


def test_the_hostile_model_really_runs_code_without_safe_mode(hostile):
    path, marker = hostile
    keras.models.load_model(path, compile=False, safe_mode=False)
    assert marker.exists()  # so the marker's absence below means tfcovid refused it


def test_modelinfo_load_refuses_a_lambda_model(hostile):
    path, marker = hostile
    with pytest.raises(ModelInfoError, match=rf"Refused to load {path}: it holds Python code "
                                             r"\(Lambda layer evil\).*never runs code"):
        metadata.load(path, task="binary", labels=["infected", "normal"])
    assert not marker.exists()


def test_a_run_directory_with_a_lambda_checkpoint_is_refused(hostile, tmp_path):
    path, marker = hostile
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run / "checkpoints" / "last.keras")
    with pytest.raises(ModelInfoError, match=r"last\.keras: it holds Python code"):
        metadata.load(run, task="binary", labels=["a", "b"])
    assert not marker.exists()


def test_weights_file_with_a_lambda_is_refused(hostile):
    path, marker = hostile
    with pytest.raises(WeightsError, match=rf"Refused to load {path}.*Lambda layer evil"):
        loading.initial_model("vgg16", 2, 32, str(path))
    with pytest.raises(WeightsError, match="never runs code from model files"):
        keras_files.model_arrays(path)  # the reader behind --weights, past the preprocessing check
    assert not marker.exists()


def test_refused_even_when_keras_safe_mode_is_off_globally(hostile):
    path, marker = hostile
    before = global_state.get_global_attribute("safe_mode_saving")
    keras.config.enable_unsafe_deserialization()  # e.g. done by another library in the process
    try:
        with pytest.raises(ModelInfoError, match="holds Python code"):
            metadata.load(path, task="binary", labels=["a", "b"])
        with pytest.raises(WeightsError, match="holds Python code"):
            keras_files.load_model(path)
    finally:
        global_state.set_global_attribute("safe_mode_saving", before)
    assert not marker.exists()


def test_a_lambda_of_a_named_function_is_refused_too(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(keras.ops.relu, name="named_fn")(inputs))
    model.save(tmp_path / "named.keras")
    with pytest.raises(WeightsError, match=r"Lambda layer named_fn"):
        keras_files.load_model(tmp_path / "named.keras")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_cli_refuses_a_lambda_model(command, hostile, binary_tree, tmp_path):
    path, marker = hostile
    image = next((binary_tree / "test").rglob("*.png"), None) or next((binary_tree / "test").rglob("*.*"))
    args = [str(path), str(image)] if command == "predict" else [str(path), "--data", str(binary_tree)]
    result = CliRunner().invoke(main, [command, *args, "--task", "binary", "--labels", "infected,normal"]
                                if command == "predict" else [command, *args, "--task", "binary"])
    assert result.exit_code == 1, result.output
    assert f"Refused to load {path}" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_tfcovid_checkpoints_still_load(tmp_path):
    model, _, _ = loading.initial_model("resnet18", 2, 32, "none", name="tfcovid_resnet18_binary")
    model.save(tmp_path / "ok.keras")
    trained = metadata.load(tmp_path / "ok.keras", task="binary", labels=["infected", "normal"])
    assert trained.model.count_params() == model.count_params() and trained.image_size == 32


def test_tfcovid_load_model_refuses_a_lambda_model(hostile):
    import tfcovid

    path, marker = hostile
    with pytest.raises(ValueError, match=rf"Refused to load {path}: it holds Python code"):
        tfcovid.load_model(path)
    assert not marker.exists()


def test_a_runs_checkpoint_loads_in_a_fresh_python_with_tfcovid_load_model(tmp_path):
    """The documented way to use a checkpoint in your own code: plain ``keras.models.load_model``
    in a fresh interpreter cannot find tfcovid's classes (the control), ``tfcovid.load_model``
    gives the model compiled as training compiled it, and uncompiled on request."""
    import json
    import subprocess
    import sys

    from tfcovid.training.compile import compile_model

    exp = config.resolve(None, {"data.task": "multilabel", "train.loss": "focal", "model.backbone": "resnet18",
                                "data.image_size": 32, "model.weights": "none"})
    model, _, _ = loading.initial_model("resnet18", 3, 32, "none", name="tfcovid_resnet18_multilabel")
    compile_model(model, exp, positive_index=0)
    model.save(tmp_path / "last.keras")
    script = f"""
import json, keras, numpy as np
path = {str(tmp_path / "last.keras")!r}
try:
    keras.models.load_model(path)
    plain = "loaded"
except Exception as err:
    plain = type(err).__name__
import tfcovid
model = tfcovid.load_model(path)
x = np.zeros((2, 32, 32, 3), "float32")
results = model.evaluate(x, np.array([[1, 0, 1], [0, 1, 0]], "float32"), verbose=0, return_dict=True)
bare = tfcovid.load_model(path, compile=False)
print(json.dumps({{"plain": plain, "loss": type(model.loss).__name__, "metrics": sorted(results),
                  "params": model.count_params(), "bare_compiled": bare.compiled}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["plain"] != "loaded"
    assert result["loss"] == "SigmoidFocalCrossEntropy"
    assert {"loss", "jaccard", "f1"} <= set(result["metrics"]), result["metrics"]
    assert result["params"] == model.count_params() and result["bare_compiled"] is False


# --- PyTorch pickles ---

class _TouchOnUnpickle:
    """Unpickling this calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pth_with_a_pickled_payload_is_refused(tmp_path):
    marker = tmp_path / "PTH_MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(2), "payload": _TouchOnUnpickle(marker)}, path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # positive control: unpickling runs the payload
    assert marker.exists()
    marker.unlink()
    with pytest.raises(WeightsError, match=rf"Refused to load {path}: it holds pickled Python "
                                           r"objects other than tensors \(io\.open\).*never runs code"):
        torch_files.read_state_dict(path)
    with pytest.raises(WeightsError, match=r"Refused to load .*evil\.pth"):
        loading.initial_model("resnet18", 2, 32, str(path))
    assert not marker.exists()


def test_pth_refused_even_with_torch_force_no_weights_only(tmp_path, monkeypatch):
    marker = tmp_path / "PTH_MARKER"
    torch.save({"payload": _TouchOnUnpickle(marker)}, tmp_path / "evil.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(WeightsError, match="pickled Python objects"):
        torch_files.read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


# --- YAML ---

def test_yaml_python_tags_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.yaml"
    path.write_text('train:\n  lr: !!python/object/apply:os.system ["touch MARKER"]\n')
    with pytest.raises(ConfigError, match=rf"{path}.*python/object/apply.*plain YAML"):
        config.resolve(path, {})
    assert not (tmp_path / "MARKER").exists()
    # --set values are read with safe_load too; a tag it refuses is kept as plain text.
    tagged = 'name=!!python/object/apply:os.system ["touch MARKER"]'
    assert config.parse_assignments([tagged]) == {"name": tagged.split("=", 1)[1]}
    assert not (tmp_path / "MARKER").exists()
