"""The Python API (``tfcovid/api.py``): docs/python-api.md's example, run as written, gives one
tiny fit that the edge-case tests share; ``import tfcovid`` stays free of TensorFlow, and
``keras.saving.load_model`` finds tfcovid's classes whichever of keras and tfcovid comes first
(fresh interpreters, since this one has both already)."""
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

import tfcovid
from tfcovid import config
from tfcovid.utils import post_import

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def doc_example() -> str:
    """The python block under the doc's "tested by" marker."""
    match = re.search(r"<!-- tested by tests/test_api\.py -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{DOC} lost its tested example block"
    return match.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The doc's example run in a fresh folder: (folder, its variables, what it printed)."""
    folder = tmp_path_factory.mktemp("api-example")
    namespace, printed, cwd = {}, io.StringIO(), os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(doc_example(), str(DOC), "exec"), namespace)
    finally:
        os.chdir(cwd)
    return folder, namespace, printed.getvalue()


@pytest.fixture(scope="module")
def run_dir(example):
    return example[1]["result"].run_dir


def test_the_docs_example_trains_predicts_evaluates_and_exports(example):
    folder, ns, printed = example
    result, exp = ns["result"], ns["exp"]
    assert isinstance(result, tfcovid.FitResult) and result.run_dir.is_absolute()
    assert result.run_dir.parent == folder / "runs" and (result.run_dir / "checkpoints" / "last.keras").is_file()
    assert result.history["epoch"] == [0] and len(result.history["loss"]) == exp.train.epochs == 1
    assert {"loss", "val_loss", "accuracy", "f1", "val_f1"} <= set(result.history)
    assert set(result.metrics["splits"]) == {"train", "validation", "test"}
    assert result.metrics["outputs"] == ["infected", "normal"] and result.model.output_shape == (None, 2)
    assert result.model is result.trained.model and not result.model.compiled
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.metrics = {}
    # freeze first4: VGG16's first four convolutions stay frozen in the checkpoint, the head trains
    trainable = {layer.name: layer.trainable for layer in result.model.layers}
    assert [trainable[n] for n in ("block1_conv1", "block2_conv2", "block3_conv1", "head_logits")] == [
        False, False, True, True]

    preds = ns["preds"]  # 2 test images per class
    assert preds.probs.shape == (4, 2) and preds.failed == [] and preds.names == sorted(preds.names)
    np.testing.assert_allclose(preds.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert set(preds.predicted) <= {"infected", "normal"}

    scores = ns["scores"]
    assert {"report", "diseases", "files", "model", "split", "task", "outputs"} <= set(scores)
    assert scores["split"] == "test" and scores["report"]["n"] == 4 and list(scores["diseases"]) == ["infected"]
    assert all(Path(f).is_file() for f in scores["files"]) and Path(scores["files"][0]).name == "test.json"

    saved = folder / ns["folder"]
    assert (saved / "saved_model.pb").is_file()
    assert (saved / "assets" / "labels.txt").read_text().split() == ["infected", "normal"]
    assert (saved / "MODEL_CARD.md").read_text() == (result.run_dir / "MODEL_CARD.md").read_text()  # issue 23.7
    assert "tfcovid_vgg16_binary [0]" in printed and "(4, 2)" in printed


# --- load_config ---------------------------------------------------------------------------


def test_load_config_takes_sections_and_dotted_keys_alike(tmp_path):
    sections = tfcovid.load_config(train={"epochs": 2, "focal_alpha": None}, data={"image_size": 40})
    dotted = tfcovid.load_config(**{"train.epochs": 2, "train.focal_alpha": None, "data.image_size": 40})
    assert sections == dotted and sections.train.focal_alpha is None and sections.data.image_size == 40
    assert sections.model.weights == "none" and sections.train.optimizer == "adam"  # the demo preset
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  backbone: resnet18\ntrain:\n  lr: 0.01\n  epochs: 5\n")
    exp = tfcovid.load_config(path, out="elsewhere", **{"train.epochs": 3})
    assert (exp.model.backbone, exp.train.lr, exp.train.epochs, exp.out) == ("resnet18", 0.01, 3, "elsewhere")
    assert exp.model.weights == "imagenet"  # a file: no demo preset


def test_load_config_errors_name_the_key_or_file(tmp_path):
    with pytest.raises(config.ConfigError, match=r"unknown key 'train.epoch'\. Did you mean 'epochs'\?"):
        tfcovid.load_config(train={"epoch": 1})
    with pytest.raises(config.ConfigError, match="section 'data' must be a mapping, got 'demo'"):
        tfcovid.load_config(data="demo")
    with pytest.raises(config.ConfigError, match=re.escape(f"Config file not found: {tmp_path / 'no.yaml'}")):
        tfcovid.load_config(tmp_path / "no.yaml")
    with pytest.raises(config.ConfigError, match="Bad value for 'train.epochs'"):
        tfcovid.load_config(**{"train.epochs": "ten"})


def test_fit_applies_overrides_to_an_experiment_and_reads_the_run(run_dir, monkeypatch):
    from tfcovid.training import train

    seen = []
    monkeypatch.setattr(train, "fit", lambda exp, log: seen.append(exp) or run_dir)
    exp = tfcovid.load_config(data={"image_size": 32})
    result = tfcovid.fit(exp, log=None, train={"epochs": 3}, **{"model.freeze": "all"})
    assert (seen[0].train.epochs, seen[0].model.freeze, seen[0].data.image_size) == (3, "all", 32)
    assert result.run_dir == run_dir and result.history["epoch"] == [0] and result.trained.task == "binary"
    monkeypatch.setattr(train, "fit", lambda exp, log: None)  # a non-chief multi-worker process
    assert tfcovid.fit(exp, log=None) is None
    with pytest.raises(config.ConfigError, match="unknown key 'train.epoch'"):
        tfcovid.fit(exp, **{"train.epoch": 3})


# --- build_classifier ------------------------------------------------------------------------


def test_build_classifier_keeps_the_head_trainable_under_every_freeze():
    model = tfcovid.build_classifier("resnet18", freeze="all", image_size=32)
    assert model.name == "tfcovid_resnet18_binary" and model.output_shape == (None, 2)
    assert [layer.name for layer in model.layers if layer.trainable_weights] == ["head_fc1", "head_logits"]
    assert not model.compiled
    model = tfcovid.build_classifier("vgg16", task="multilabel", freeze="first7", image_size=32,
                                     labels=["a", "b", "c", "d"])
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [c.trainable for c in convs] == [False] * 7 + [True] * 6
    assert model.output_shape == (None, 4)
    assert [layer.trainable for layer in model.layers if layer.name.startswith("head_")] == [True] * 3


def test_build_classifier_errors_list_the_valid_choices():
    with pytest.raises(ValueError, match=r"Unknown backbone 'vgg19'\. Valid backbones: convnext_tiny, densenet121, "
                       r"efficientnetv2_b0, resnet18, resnet50, vgg16\."):
        tfcovid.build_classifier("vgg19")
    with pytest.raises(ValueError, match=r"Unknown task 'multiclass'\. Valid tasks: binary, multilabel\."):
        tfcovid.build_classifier(task="multiclass")
    with pytest.raises(ValueError, match=r"binary task has 2 outputs; got labels \['a', 'b', 'c'\]"):
        tfcovid.build_classifier(labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="Unknown freeze policy 'some'"):
        tfcovid.build_classifier("resnet18", freeze="some", image_size=16)
    with pytest.raises(ValueError, match="Image size 8 is too small for vgg16: use at least 32 px"):
        tfcovid.build_classifier(image_size=8)


# --- load, predict, evaluate, export --------------------------------------------------------


def test_load_gives_the_model_and_what_it_predicts(run_dir):
    trained = tfcovid.load(run_dir, checkpoint="best")
    assert trained.path == run_dir / "checkpoints" / "best.keras" and trained.run_dir == run_dir
    assert (trained.task, trained.outputs, trained.positive, trained.image_size) == (
        "binary", ("infected", "normal"), "infected", 32)
    model = tfcovid.load_model(run_dir / "checkpoints" / "last.keras")
    assert model.compiled and model.count_params() == trained.model.count_params()


def test_bad_paths_are_named(tmp_path, run_dir):
    from tfcovid.weights.metadata import ModelInfoError

    missing = tmp_path / "no-such-run"
    for call in (tfcovid.load, lambda p: tfcovid.predict(p, run_dir), lambda p: tfcovid.evaluate(p, log=None),
                 lambda p: tfcovid.export(p, tmp_path / "out", log=None)):
        with pytest.raises(ModelInfoError, match=re.escape(f"Model not found: {missing}")):
            call(missing)
    with pytest.raises(ModelInfoError, match=re.escape(f"{tmp_path} is not a finished run directory")):
        tfcovid.load(tmp_path)
    with pytest.raises(ModelInfoError, match=r"Unknown checkpoint 'first'\. Valid: last, best\."):
        tfcovid.load(run_dir, checkpoint="first")
    with pytest.raises(ValueError, match=re.escape(f"Could not load the Keras model {missing}.keras")):
        tfcovid.load_model(f"{missing}.keras")


def test_predict_takes_a_run_a_loaded_model_or_a_file_and_refuses_a_bare_model(example, run_dir, tmp_path):
    folder, ns, _ = example
    test_dir = folder / "xrays" / "test"
    one = sorted((test_dir / "normal").iterdir())[0]
    by_dir = tfcovid.predict(str(run_dir), [one])
    by_trained = tfcovid.predict(tfcovid.load(run_dir), one)
    assert by_dir.probs.shape == by_trained.probs.shape == (1, 2)
    np.testing.assert_allclose(by_dir.probs, ns["preds"].probs[ns["preds"].paths.index(str(one))][None], atol=1e-6)
    with pytest.raises(ValueError, match="Cannot use a Functional here: .* does not say what it predicts"):
        tfcovid.predict(ns["result"].model, one)
    with pytest.raises(ValueError, match=re.escape(f"found in {tmp_path}")):
        tfcovid.predict(run_dir, tmp_path)
    # max_pixels as --max-pixels: the image's header is over it, so it is refused undecoded.
    pixels = Image.open(one).width * Image.open(one).height
    refused = tfcovid.predict(run_dir, one, max_pixels=pixels - 1)
    assert refused.probs.shape[0] == 0 and [name for name, _ in refused.failed] == [str(one)]
    assert f"larger than the limit of {pixels - 1:,} pixels (--max-pixels)" in refused.failed[0][1]
    assert tfcovid.predict(run_dir, one, max_pixels=pixels).probs.shape == (1, 2)


def test_evaluate_and_export_take_a_loaded_model_and_name_bad_choices(run_dir, tmp_path):
    from tfcovid.inference.evaluate import EvaluateError
    from tfcovid.inference.export import ExportError

    trained = tfcovid.load(run_dir)
    result = tfcovid.evaluate(trained, split="validation", out=tmp_path / "eval", log=None)
    assert result["report"]["n"] == 4 and (tmp_path / "eval" / "validation.json").is_file()
    with pytest.raises(Exception, match=r"larger than the limit of 100 pixels \(--max-pixels\)"):
        tfcovid.evaluate(run_dir, split="validation", out=tmp_path / "small", log=None, max_pixels=100)
    with pytest.raises(EvaluateError, match=r"Unknown split 'dev'\. Valid splits: train, validation, test\."):
        tfcovid.evaluate(run_dir, split="dev", log=None)
    with pytest.raises(ExportError, match=r"Unknown export format 'pb'\. Valid formats: saved_model, tflite, onnx\."):
        tfcovid.export(run_dir, tmp_path / "x", format="pb")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "full"))):
        tfcovid.export(run_dir, tmp_path / "full", log=None)



@pytest.mark.parametrize("bad", [0, -1, 1.5, 1e8, True, "abc", "100"])
def test_predict_and_evaluate_refuse_a_max_pixels_that_is_not_a_whole_number_from_1(bad, tmp_path):
    # Before: 0, -1 and True refused every image as "larger than the limit of -1 pixels", 1.5
    # became 1 and "abc" failed in int(); now one ValueError, before any model is loaded.
    message = re.escape(f"Bad max_pixels {bad!r}: use a whole number of pixels >= 1")
    with pytest.raises(ValueError, match=message):
        tfcovid.predict(tmp_path / "no-run", tmp_path, max_pixels=bad)
    with pytest.raises(ValueError, match=message):
        tfcovid.evaluate(tmp_path / "no-run", max_pixels=bad, log=None)


@pytest.mark.parametrize("good", [1, np.int64(150_000_000), None])
def test_a_whole_max_pixels_from_1_goes_on_to_the_run(good, tmp_path):
    # The edge 1 and a NumPy integer pass the check: the next error is the missing run's.
    for call in (lambda: tfcovid.predict(tmp_path / "no-run", tmp_path, max_pixels=good),
                 lambda: tfcovid.evaluate(tmp_path / "no-run", max_pixels=good, log=None)):
        with pytest.raises(Exception, match="no-run") as caught:
            call()
        assert "Bad max_pixels" not in str(caught.value)

# --- import tfcovid: cheap, and keras.saving.load_model works after it --------------------------

LIGHT = """
import importlib, json, sys
import tfcovid
tfcovid.load_config(train={"epochs": 1})
importlib.reload(tfcovid)
print(json.dumps({"heavy": sorted(m for m in ("tensorflow", "keras") if m in sys.modules),
                  "hooks": sum(type(f).__name__ == "PostImportHook" for f in sys.meta_path)}))
"""

LOAD = """
import json, sys
import numpy as np
{imports}
registered = "tfcovid.models.preprocess" in sys.modules
import keras
model = keras.saving.load_model({path!r})
scores = model.evaluate(np.zeros((2, 32, 32, 3)), np.array([0, 1]), verbose=0, return_dict=True)
print(json.dumps({{"registered_before_import_keras": registered, "name": model.name,
                  "preprocess": type(model.get_layer("preprocess")).__module__, "scores": sorted(scores),
                  "hooks": sum(type(f).__name__ == "PostImportHook" for f in sys.meta_path),
                  "keras_loader": type(keras.__loader__).__name__}}))
"""

ORDERS = {"tfcovid, keras": "import tfcovid, keras", "keras, tfcovid": "import keras, tfcovid",
          "tfcovid, tensorflow": "import tfcovid, tensorflow"}


@pytest.fixture(scope="module")
def fresh_pythons(run_dir):
    """Every script below, started at once in its own interpreter: {name: (returncode, stdout, stderr)}."""
    path = str(run_dir / "checkpoints" / "last.keras")
    scripts = {"light": LIGHT, **{k: LOAD.format(imports=v, path=path) for k, v in ORDERS.items()}}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = {k: subprocess.Popen([sys.executable, "-c", s], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for k, s in scripts.items()}
    return {k: (p.wait(timeout=300), *p.communicate()) for k, p in procs.items()}


def _result(fresh_pythons, name):
    code, out, err = fresh_pythons[name]
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_import_tfcovid_loads_neither_tensorflow_nor_keras(fresh_pythons):
    assert _result(fresh_pythons, "light") == {"heavy": [], "hooks": 1}  # one hook, even after a reload


@pytest.mark.parametrize("order", list(ORDERS))
def test_keras_load_model_finds_tfcovid_classes_in_either_import_order(fresh_pythons, order):
    result = _result(fresh_pythons, order)
    assert result["name"] == "tfcovid_vgg16_binary" and result["preprocess"] == "tfcovid.models.preprocess"
    assert result["scores"] == ["accuracy", "f1", "loss"]  # tfcovid's F1 metric, compiled back
    # ("tfcovid, tensorflow": tensorflow imports keras itself, and the hook fired then)
    assert result["registered_before_import_keras"]
    assert result["hooks"] == 0 and result["keras_loader"] == "SourceFileLoader"
    assert "could not register" not in fresh_pythons[order][2]


def test_the_post_import_hook_fires_once_after_the_module_and_never_breaks_its_import(tmp_path, monkeypatch):
    (tmp_path / "api_hook_target.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    hook = post_import.PostImportHook("api_hook_target", lambda: calls.append(sys.modules["api_hook_target"].VALUE))
    sys.meta_path.insert(0, hook)
    try:
        assert importlib.util.find_spec("api_hook_target") is not None and calls == []  # found, not run
        import api_hook_target

        assert calls == [42] and hook not in sys.meta_path
        assert type(api_hook_target.__loader__).__name__ == "SourceFileLoader"
        assert api_hook_target.__spec__.loader is api_hook_target.__loader__
        del sys.modules["api_hook_target"]
        import api_hook_target  # noqa: F811  (a second import: the hook is gone)

        assert calls == [42]

        del sys.modules["api_hook_target"]
        failing = post_import.PostImportHook("api_hook_target", lambda: 1 / 0)
        sys.meta_path.insert(0, failing)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import api_hook_target  # noqa: F811

        assert api_hook_target.VALUE == 42 and failing not in sys.meta_path
        assert [str(w.message) for w in caught] == ["After importing api_hook_target: ZeroDivisionError: "
                                                    "division by zero"]
    finally:
        for finder in [f for f in sys.meta_path if isinstance(f, post_import.PostImportHook)]:
            if finder.name == "api_hook_target":
                sys.meta_path.remove(finder)
        sys.modules.pop("api_hook_target", None)
