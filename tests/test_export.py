"""export: a SavedModel that a process without tfcovid loads and gets the same probabilities from.

Also TFLite in tf.lite.Interpreter, ONNX in onnxruntime (when the extra is installed), and
saved_model_cli's view of the signatures.
"""

import json
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fake_run import make_run, reference_probs
from tfcovid import cli
from tfcovid.inference import export

# Runs in a fresh interpreter: TensorFlow only, never tfcovid.
CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    saved_model, files = sys.argv[1], sys.argv[2:]
    loaded = tf.saved_model.load(saved_model)
    encoded = [open(f, "rb").read() for f in files]
    by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
    # The pixel signature gets the first file decoded by PIL, at its own size, batched twice.
    first = np.asarray(Image.open(files[0]).convert("RGB"))
    by_pixels = loaded.signatures["serving_pixels"](pixels=tf.constant(np.stack([first, first])))
    labels_asset = open(saved_model + "/assets/labels.txt").read().split()
    print(json.dumps({
        "bytes_probs": by_bytes["probabilities"].numpy().tolist(),
        "bytes_labels": [s.decode() for s in by_bytes["labels"].numpy()],
        "bytes_predicted": by_bytes["predicted"].numpy().tolist(),
        "pixel_probs": by_pixels["probabilities"].numpy().tolist(),
        "asset": labels_asset,
        "imported_tfcovid": "tfcovid" in sys.modules,
    }))
""")


@pytest.fixture(scope="module")
def binary_run(binary_tree, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export"), binary_tree, "binary", bias=[0.2, -0.2])


def _client(saved_model, files):
    env_cmd = [sys.executable, "-c", CLIENT, str(saved_model), *map(str, files)]
    done = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300,
                          env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _test_files(binary_tree):
    """Every test image (PNG, JPEG, BMP; gray, RGB, RGBA, 16-bit), a plain 8-bit PNG first.

    The client feeds the first one to the pixel signature as decoded by PIL, which agrees with
    TensorFlow's decoder exactly for 8-bit PNG (JPEG decoders may round differently).
    """
    from PIL import Image

    files = sorted((binary_tree / "test").rglob("*.*"))
    plain = next(f for f in files if f.suffix == ".png" and Image.open(f).mode in ("L", "RGB"))
    return [plain] + [f for f in files if f != plain]


@pytest.mark.slow
def test_saved_model_in_a_clean_process_matches_the_model(binary_run, binary_tree, tmp_path):
    out = export.export(binary_run, tmp_path / "sm", log=lambda s: None)
    files = _test_files(binary_tree)
    got = _client(out, files)
    assert got["imported_tfcovid"] is False
    expected = reference_probs(binary_run, files, "binary")
    assert np.abs(np.array(got["bytes_probs"]) - expected).max() < 1e-5
    assert got["bytes_labels"] == [["infected", "normal"][k] for k in expected.argmax(1)]
    assert got["bytes_predicted"] == np.eye(2, dtype=int)[expected.argmax(1)].tolist()
    assert got["asset"] == ["infected", "normal"]
    # PIL's pixels of the first file through the pixel signature equal tfcovid's own pipeline.
    assert np.abs(np.array(got["pixel_probs"]) - expected[[0, 0]]).max() < 1e-5
    meta = json.loads((out / "assets.extra" / "tfcovid.json").read_text())
    assert meta["outputs"] == ["infected", "normal"] and meta["image_size"] == 32

    if shutil.which("saved_model_cli"):
        show = subprocess.run(["saved_model_cli", "show", "--dir", str(out), "--all"],
                              capture_output=True, text=True, timeout=300)
        assert show.returncode == 0, show.stderr[-2000:]
        for text in ("signature_def['serving_default']", "inputs['image_bytes']", "DT_STRING",
                     "signature_def['serving_pixels']", "inputs['pixels']", "DT_UINT8",
                     "outputs['probabilities']", "outputs['labels']"):
            assert text in show.stdout, text


def test_multilabel_saved_model_joins_the_predicted_labels(multilabel_tree, tmp_path):
    # Biases +4 / -4 / +4 put covid-19 and pneumonia far above the 0.5 threshold, normal far below.
    run = make_run(tmp_path, multilabel_tree, "multilabel", bias=[4.0, -4.0, 4.0])
    out = export.export(run, None, log=lambda s: None)
    assert out == run / "saved_model"
    import tensorflow as tf

    loaded = tf.saved_model.load(str(out))
    images = export.sample_images(32)
    got = loaded.signatures["serving_pixels"](pixels=tf.constant(np.stack([images[2]] * 3)))
    assert [s.decode() for s in got["labels"].numpy()] == ["covid-19,pneumonia"] * 3
    assert got["predicted"].numpy().tolist() == [[1, 0, 1]] * 3
    gray = loaded.signatures["serving_pixels"](pixels=tf.constant(images[1][None]))  # 1 channel
    assert gray["probabilities"].shape == (1, 3)


def test_tflite_runs_in_the_interpreter_within_1e4(binary_run, binary_tree, tmp_path):
    import tensorflow as tf

    path = export.export(binary_run, tmp_path / "tfl", format="tflite", log=lambda s: None)
    assert path.name == "model.tflite" and (path.parent / "labels.txt").read_text().split() == [
        "infected", "normal"]
    files = sorted((binary_tree / "test").rglob("*.*"))
    from tfcovid.data import decode as data_decode

    x = np.stack([data_decode.load_image(str(f), 32).numpy() for f in files]).astype("float32")
    runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner()
    got = runner(pixels=x)["probabilities"]
    assert np.abs(got - reference_probs(binary_run, files, "binary")).max() < 1e-4


def test_onnx_export_or_a_clear_message(binary_run, binary_tree, tmp_path, monkeypatch):
    if export.onnx_missing():
        with pytest.raises(export.ExportError, match=r"pip install 'tfcovid\[onnx\]'"):
            export.export(binary_run, tmp_path / "onnx", format="onnx", log=lambda s: None)
        assert not (tmp_path / "onnx").exists()
        return
    import onnxruntime

    from tfcovid.data import decode as data_decode

    path = export.export(binary_run, tmp_path / "onnx", format="onnx", log=lambda s: None)
    files = sorted((binary_tree / "test").rglob("*.*"))
    x = np.stack([data_decode.load_image(str(f), 32).numpy() for f in files]).astype("float32")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"pixels": x})[0]
    assert np.abs(got - reference_probs(binary_run, files, "binary")).max() < 1e-4
    # And the message a user without the extra gets:
    monkeypatch.setattr(export, "onnx_missing", lambda: ["tf2onnx"])
    with pytest.raises(export.ExportError, match="missing: tf2onnx"):
        export.export(binary_run, tmp_path / "onnx2", format="onnx", log=lambda s: None)


def test_existing_output_and_unknown_format_are_clear_errors(binary_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export.export(binary_run, tmp_path / "full", log=lambda s: None)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(export.ExportError, match="Valid formats"):
        export.export(binary_run, tmp_path / "o", format="pb", log=lambda s: None)
    runner = CliRunner()
    bad = runner.invoke(cli.main, ["export", str(binary_run), str(tmp_path / "full")])
    assert bad.exit_code == 1 and "not empty" in bad.output and "Traceback" not in bad.output


def test_a_mismatching_export_is_refused_and_removed(binary_run, tmp_path, monkeypatch):
    real = export.reference_probabilities
    monkeypatch.setattr(export, "reference_probabilities", lambda t, im: real(t, im) + 1e-3)
    with pytest.raises(export.ExportError, match="differs from the model"):
        export.export(binary_run, tmp_path / "sm", log=lambda s: None)
    assert not (tmp_path / "sm").exists()


def test_a_file_as_output_is_called_a_file(binary_run, tmp_path):
    (tmp_path / "emptyfile").touch()
    with pytest.raises(FileExistsError, match=r"emptyfile is a file, not a folder \(export writes "
                                              r"a folder of files\); choose a new output folder\."):
        export.export(binary_run, tmp_path / "emptyfile", log=lambda s: None)
    bad = CliRunner().invoke(cli.main, ["export", str(binary_run), str(tmp_path / "emptyfile")])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert f"Error: {tmp_path / 'emptyfile'} is a file, not a folder" in bad.output
    assert "not empty" not in bad.output
    # A file where a parent folder would have to be: named, not a NotADirectoryError traceback.
    bad = CliRunner().invoke(cli.main, ["export", str(binary_run), str(tmp_path / "emptyfile" / "sub")])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert (f"Error: Cannot create the output folder {tmp_path / 'emptyfile' / 'sub'}: Not a directory. "
            "Choose another output folder.") in bad.output
    assert (tmp_path / "emptyfile").read_bytes() == b""


def _readme_block(marker):
    """The ```python block of docs/inference.md (the pixel recipe) that contains ``marker``."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_the_readme_pixel_recipe_reproduces_predict(binary_run, binary_tree, tmp_path):
    from tfcovid.data import decode as data_decode
    from tfcovid.inference import calibrate, predict
    from tfcovid.weights import metadata

    # Every test image: PNG, JPEG, BMP; grey, RGB, RGBA, 16-bit.
    files = sorted((binary_tree / "test").rglob("*.*"))
    run = tmp_path / "run"
    shutil.copytree(binary_run, run)
    # An operating point above the first image's disease probability: the argmax says
    # infected or normal, the recipe must say what predict says at it.
    first = predict.predict(metadata.load(run), files[:1]).probs[0, 0]
    assert first >= 0.5  # the argmax says infected
    calibrate.calibrate(run, repr(float(min(first + 1e-3, 0.99))), log=lambda s: None)
    path = export.export(run, tmp_path / "tfl", format="tflite", log=lambda s: None)
    code = _readme_block("antialias=True").replace("model.tflite", str(path))
    code = code.replace("xray.png", str(files[0])).replace('"tfcovid.json"', repr(str(path.parent / "tfcovid.json")))
    ns = {}
    with warnings.catch_warnings():  # tf.lite.Interpreter warns that LiteRT replaces it
        warnings.simplefilter("ignore")
        exec(code, ns)  # noqa: S102 - the docs' own example, run as a user would
    expected = predict.predict(metadata.load(run), files)
    assert expected.paths == [str(f.resolve()) for f in files]
    got = np.concatenate([ns["runner"](pixels=ns["pixels"](str(f))[None])["probabilities"]
                          for f in files])
    assert np.abs(got - expected.probs).max() < 1e-5
    np.testing.assert_allclose(ns["probs"], expected.probs[:1], atol=1e-5)
    assert ns["decided"] == expected.predicted[:1] == ["normal"]  # at the recorded threshold
    # The recipe's pixels are tfcovid's own, value for value.
    for f in files:
        np.testing.assert_array_equal(ns["pixels"](str(f)), data_decode.load_image(str(f), 32).numpy())
