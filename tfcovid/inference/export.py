"""Export a trained model for serving: SavedModel (TF Serving), TFLite (phones), ONNX.

SavedModel (Keras 3 ``keras.export.ExportArchive``) with two signatures, both returning
``probabilities`` (float32, N x outputs), ``labels`` (string, N: the predicted class, or the
predicted labels joined by "," for the three-label task) and ``predicted`` (int32 0/1, N x
outputs):

* ``serving_default``: ``image_bytes``, a tf.string batch of encoded JPEG/PNG/BMP/GIF files
  (what TensorFlow Serving's REST API passes for ``{"b64": ...}``);
* ``serving_pixels``: ``pixels``, a uint8 batch (N, H, W, C) of any size, C = 1, 3 or 4.

Both decode/resize exactly as ``tfcovid evaluate`` does (antialiased resize to S x S, rounded
to uint8) and the model's own first layer normalises, so nothing outside the SavedModel needs
to know the preprocessing. The label names are an asset (``assets/labels.txt``) read by a
lookup table inside the graph. Every export is reloaded and compared with the in-memory model
before it is reported as written; a run's ``MODEL_CARD.md`` is copied into every export folder.

TFLite and ONNX take float32 raw pixels (N, S, S, 3) in [0, 255], already resized to S x S,
and return ``probabilities``; ``labels.txt`` is written beside them. They give ``predict``'s
probabilities for pixels prepared exactly as it prepares them: decoded to 8-bit RGB, resized
with antialiasing and rounded to whole values::

    x = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    x = tf.image.resize(x, (S, S), antialias=True)   # bilinear, antialiased
    x = np.clip(np.round(x.numpy()), 0, 255)          # whole values, as uint8 pixels hold them

The SavedModel's encoded-bytes signature decodes JPEG/PNG/BMP/GIF in the graph; DICOM needs
pydicom and TIFF Pillow, so those go in as pixels: ``tfcovid.data.dicom.to_uint8`` or
``tfcovid.data.tiff.to_uint8`` (docs/dicom.md).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfcovid.data import augment
from tfcovid.data import decode as data_decode
from tfcovid.models.outputs import decide, decisions, probabilities
from tfcovid.results import model_card
from tfcovid.weights import metadata

FORMATS = ("saved_model", "tflite", "onnx")


SAVED_MODEL_TOLERANCE = 1e-5


TFLITE_TOLERANCE = 1e-4


ONNX_TOLERANCE = 1e-4


ONNX_PACKAGES = ("tf2onnx", "onnx", "onnxruntime")


class ExportError(RuntimeError):
    """The export could not be written or did not reproduce the model; the message says why."""


def _output_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder (export writes a folder of files); "
                              "choose a new output folder.")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new output folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a parent folder should be, no permission, ...
        raise ExportError(f"Cannot create the output folder {out}: {err.strerror or err}. "
                          "Choose another output folder.") from None
    return out


def _resize_round(images, size: int):
    """uint8/float (N, H, W, C) -> float32 (N, S, S, 3): the evaluation transform, batched."""
    x = tf.cast(images, tf.float32)
    channels = tf.shape(x)[-1]
    # Grayscale is repeated, alpha dropped, as data.decode_image + data.to_rgb_uint8 do.
    x = tf.cond(channels >= 3, lambda: x[..., :3], lambda: tf.tile(x[..., :1], [1, 1, 1, 3]))
    x = augment.resize_eval(x, size)
    return tf.clip_by_value(tf.round(x), 0.0, 255.0)


def _decode_one(encoded, size: int):
    image = data_decode.to_rgb_uint8(augment.resize_eval(data_decode.decode_image(encoded, dicom_files=False), size), size)
    return tf.cast(image, tf.float32)


def _serving_fns(model: keras.Model, task: str, outputs, thresholds, positive_index: int, table,
                 temperature=()):
    """The two signature functions (plain Python: ExportArchive wraps them in tf.function).
    Their probabilities include the model's temperature and their decisions are
    ``models.outputs.decisions`` at the model's operating point."""
    size, n = int(model.input_shape[1]), len(outputs)

    def heads(x):
        logits = tf.cast(model(x, training=False), tf.float32)
        if len(temperature):  # calibrated: the logits divided by T, as models.outputs.probabilities
            logits = logits / tf.constant(temperature, tf.float32)
        names = table.lookup(tf.range(n, dtype=tf.int64))
        probs = tf.nn.softmax(logits, axis=-1) if task == "binary" else tf.sigmoid(logits)
        chosen = tf.cast(decisions(probs, task, thresholds, positive_index), tf.int32)
        picked = tf.ragged.boolean_mask(tf.broadcast_to(names, tf.shape(probs)), chosen > 0)
        return {"probabilities": probs,
                "labels": tf.strings.reduce_join(picked, axis=-1, separator=","),
                "predicted": chosen}

    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda b: _decode_one(b, size), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        return heads(images)

    def serve_pixels(pixels):
        return heads(_resize_round(pixels, size))

    return serve_bytes, serve_pixels


def _label_table(labels_txt: Path):
    init = tf.lookup.TextFileInitializer(
        str(labels_txt), tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
        tf.string, tf.lookup.TextFileIndex.WHOLE_LINE)
    return tf.lookup.StaticHashTable(init, default_value="")


def _check_names(outputs) -> None:
    bad = [o for o in outputs if "\n" in o or "," in o or not o]
    if bad:
        raise ExportError(f"Label names {bad} cannot be exported: no empty names, commas or newlines.")


def sample_images(size: int, seed: int = 0) -> list[np.ndarray]:
    """Small synthetic test images of awkward shapes: RGB, grayscale, wide, tall."""
    rng = np.random.default_rng(seed)
    shapes = [(size + 13, size + 5, 3), (size, size, 1), (size // 2 + 3, 2 * size, 3), (2 * size + 1, size, 3)]
    out = []
    for h, w, c in shapes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 100 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None]
        out.append(np.clip(base + rng.normal(0, 25, (h, w, c)), 0, 255).astype(np.uint8))
    return out


def reference_probabilities(trained, images) -> np.ndarray:
    """What tfcovid itself predicts for these uint8 images (evaluation transform)."""

    size = trained.image_size
    batch = np.stack([
        data_decode.to_rgb_uint8(augment.resize_eval(tf.convert_to_tensor(im), size), size).numpy()
        for im in images])
    return probabilities(trained.model.predict(batch.astype(np.float32), verbose=0), trained.task,
                         trained.temperature)


def write_saved_model(trained, out: Path) -> Path:
    """Write the SavedModel with both signatures and the labels asset to ``out``."""
    _check_names(trained.outputs)
    with tempfile.TemporaryDirectory() as tmp:
        labels_txt = Path(tmp) / "labels.txt"  # copied into out/assets/ by the save
        labels_txt.write_text("\n".join(trained.outputs) + "\n")
        table = _label_table(labels_txt)
        serve_bytes, serve_pixels = _serving_fns(trained.model, trained.task, trained.outputs,
                                                 trained.thresholds, trained.positive_index, table,
                                                 trained.temperature)
        archive = keras.export.ExportArchive()
        archive.track(trained.model)
        archive.track(table)
        archive.add_endpoint("serving_default", serve_bytes,
                             [tf.TensorSpec([None], tf.string, name="image_bytes")])
        archive.add_endpoint("serving_pixels", serve_pixels,
                             [tf.TensorSpec([None, None, None, None], tf.uint8, name="pixels")])
        archive.write_out(str(out), verbose=False)
    extra = out / "assets.extra"  # TF Serving's place for files the graph does not read
    extra.mkdir(exist_ok=True)
    (extra / "tfcovid.json").write_text(json.dumps({
        **_decision_info(trained),
        "signatures": {"serving_default": "image_bytes: tf.string [N] encoded images",
                       "serving_pixels": "pixels: uint8 [N, H, W, C] (C = 1, 3 or 4)"},
        "outputs_doc": {"probabilities": "float32 [N, outputs]",
                        "labels": "string [N]: predicted class / labels joined by ','",
                        "predicted": "int32 [N, outputs]: 0/1 decisions"},
        "source": str(trained.path)}, indent=2))
    return out


def _decision_info(trained) -> dict:
    """What an export's user needs to decide as tfcovid does (models.outputs.decisions): the
    outputs, the disease class, the operating point's thresholds, and the temperature that the
    export's probabilities already include (1 per output when not calibrated; docs/inference.md)."""
    n = 1 if trained.task == "binary" else len(trained.outputs)
    return {"task": trained.task, "outputs": list(trained.outputs), "image_size": trained.image_size,
            "threshold": trained.threshold, "positive": trained.positive,
            "thresholds": list(trained.thresholds), "operating_point": trained.operating_point,
            "temperature": list(trained.temperature or (1.0,) * n), "temperature_applied": True,
            "calibration": trained.calibration}


def verify_saved_model(trained, out: Path, images=None) -> float:
    """Reload ``out`` and compare both signatures with the in-memory model.

    Returns:
        The largest absolute probability difference.

    Raises:
        ExportError: a difference of SAVED_MODEL_TOLERANCE or more, or wrong label names.
    """
    images = sample_images(trained.image_size) if images is None else images
    expected = reference_probabilities(trained, images)
    loaded = tf.saved_model.load(str(out))
    encoded = [tf.io.encode_png(im).numpy() for im in images]
    got = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
    diffs = [np.abs(got["probabilities"].numpy() - expected).max()]
    # One pixel batch needs one size: the first image's, repeated, suffices for the check.
    same = np.stack([images[0]] * 2)
    got_px = loaded.signatures["serving_pixels"](pixels=tf.constant(same))
    diffs.append(np.abs(got_px["probabilities"].numpy() - expected[[0, 0]]).max())
    worst = float(max(diffs))
    if not worst < SAVED_MODEL_TOLERANCE:
        raise ExportError(f"The SavedModel in {out} differs from the model by {worst:.2e} "
                          f"(tolerance {SAVED_MODEL_TOLERANCE:g}); do not use it.")
    names = [s.decode() for s in got["labels"].numpy()]
    decided = decide(expected, trained.task, trained.thresholds, trained.positive_index)
    want = [",".join(o for o, d in zip(trained.outputs, row) if d) for row in decided]
    # A probability within the tolerance of its threshold may fall either side in float32.
    scores = expected[:, [trained.positive_index]] if trained.task == "binary" else expected
    sure = (np.abs(scores - np.asarray(trained.thresholds)) >= SAVED_MODEL_TOLERANCE).all(axis=1)
    if [n for n, s in zip(names, sure) if s] != [w for w, s in zip(want, sure) if s]:
        raise ExportError(f"The SavedModel in {out} returns labels {names}, not the expected ones.")
    return worst


def _probability_model(model: keras.Model, task: str, temperature=()) -> keras.Model:
    """raw pixels -> {"probabilities": softmax/sigmoid of the logits / temperature}, for TFLite
    and ONNX: a calibrated model's export gives the probabilities its thresholds were chosen on."""
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    act = "softmax" if task == "binary" else "sigmoid"
    logits = model(inputs)
    if len(temperature):
        logits = keras.ops.divide(keras.ops.cast(logits, "float32"), np.asarray(temperature, np.float32))
    probs = keras.layers.Activation(act, dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, {"probabilities": probs}, name=f"{model.name}_probabilities")


def write_tflite(trained, path: Path) -> Path:
    """Write a .tflite file (float32 pixels in, probabilities out) via Keras's LiteRT export."""
    _probability_model(trained.model, trained.task, trained.temperature).export(
        str(path), format="litert", verbose=False)
    return path


def verify_tflite(trained, path: Path, images=None) -> float:
    """Run the .tflite file in tf.lite.Interpreter and compare with the model."""
    images = sample_images(trained.image_size) if images is None else images
    expected = reference_probabilities(trained, images)
    size = trained.image_size
    batch = np.stack([data_decode.to_rgb_uint8(augment.resize_eval(tf.convert_to_tensor(im), size), size)
                      .numpy() for im in images]).astype(np.float32)
    with warnings.catch_warnings():  # tf.lite.Interpreter warns that LiteRT replaces it
        warnings.simplefilter("ignore")
        runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner()
    got = runner(pixels=batch)["probabilities"]
    worst = float(np.abs(got - expected).max())
    if not worst < TFLITE_TOLERANCE:
        raise ExportError(f"{path} differs from the model by {worst:.2e} (tolerance {TFLITE_TOLERANCE:g}).")
    return worst


def onnx_missing() -> list[str]:
    """The ONNX packages that are not installed."""
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


def require_onnx() -> None:
    """Raise ExportError saying how to install the ONNX packages when any is missing."""
    missing = onnx_missing()
    if missing:
        raise ExportError(
            f"ONNX export needs the optional packages {', '.join(ONNX_PACKAGES)} "
            f"(missing: {', '.join(missing)}). Install them with: pip install 'tfcovid[onnx]' "
            "(or pip install tf2onnx onnx onnxruntime), or use --format saved_model / tflite.")


def onnx_unsupported(model: keras.Model) -> list[str]:
    """What in ``model`` tf2onnx (1.17) cannot convert: Keras's grouped convolutions, which its
    TensorFlow backend runs as an XLA-compiled function on CPU, and GELU (its Erfc op).
    ConvNeXt has both; the other registered backbones have neither."""
    found = set()
    for layer in _layers(model):
        if isinstance(layer, keras.layers.Conv2D) and layer.groups > 1:
            found.add("grouped convolutions (Conv2D with groups > 1)")
        if getattr(layer, "activation", None) is keras.activations.gelu:
            found.add("GELU (Erfc)")
    return sorted(found)


def _layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):  # nested: ConvNeXt's Sequential stem and downsampling
            yield from _layers(layer)
        else:
            yield layer


def write_onnx(trained, path: Path) -> Path:
    """Write an ONNX file (input "pixels", output "probabilities") via Keras's tf2onnx export."""
    require_onnx()
    unsupported = onnx_unsupported(trained.model)
    if unsupported:
        raise ExportError(f"ONNX export of {trained.path} is not possible: tf2onnx cannot convert its "
                          f"{' and '.join(unsupported)} (ConvNeXt has both). Use --format saved_model "
                          "or tflite, which export it exactly.")
    if trained.model.dtype_policy.name != "float32":
        raise ExportError(f"ONNX export needs a float32 model; {trained.path} uses "
                          f"{trained.model.dtype_policy.name}. Use --format saved_model.")
    spec = keras.InputSpec(shape=(None, *trained.model.input_shape[1:]), dtype="float32", name="pixels")
    with warnings.catch_warnings():  # tf2onnx's numpy-2 shims warn on import
        warnings.simplefilter("ignore")
        _probability_model(trained.model, trained.task, trained.temperature).export(
            str(path), format="onnx", input_signature=[spec], verbose=False)
    return path


def verify_onnx(trained, path: Path, images=None) -> float:
    """Run the ONNX file in onnxruntime and compare with the model."""
    import onnxruntime

    images = sample_images(trained.image_size) if images is None else images
    expected = reference_probabilities(trained, images)
    size = trained.image_size
    batch = np.stack([data_decode.to_rgb_uint8(augment.resize_eval(tf.convert_to_tensor(im), size), size)
                      .numpy() for im in images]).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"pixels": batch})[0]
    worst = float(np.abs(got - expected).max())
    if not worst < ONNX_TOLERANCE:
        raise ExportError(f"{path} differs from the model by {worst:.2e} (tolerance {ONNX_TOLERANCE:g}).")
    return worst


def export(run_or_model, out=None, format: str = "saved_model", checkpoint: str = "last",
           task: str | None = None, labels=None, log=print) -> Path:
    """Export a trained model and check the export against it.

    Args:
        run_or_model: a run directory or a ``.keras`` file.
        out: output folder (must be new or empty); default ``RUN/saved_model`` (or
            ``RUN/tflite``, ``RUN/onnx``) for a run, ``<model>-<format>/`` beside a bare model.
        format: "saved_model", "tflite" or "onnx".
        checkpoint: "last" or "best" for a run directory.
        task, labels: for a bare model that does not carry them (see weights.metadata.load).
        log: where progress lines go.

    Returns:
        The SavedModel folder, or the .tflite / .onnx file.

    Raises:
        ExportError, FileExistsError, metadata.ModelInfoError.
    """
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}. Valid formats: {', '.join(FORMATS)}.")
    if format == "onnx":
        require_onnx()  # before loading anything: say how to install it
    trained = metadata.load(run_or_model, checkpoint, task, labels)
    if out is None:
        base = trained.run_dir if trained.run_dir is not None else trained.path.parent
        stem = "" if trained.run_dir is not None else f"{trained.path.stem}-"
        out = base / f"{stem}{'saved_model' if format == 'saved_model' else format}"
    out = _output_dir(Path(out))
    try:
        if format == "saved_model":
            write_saved_model(trained, out)
            diff, target = verify_saved_model(trained, out), out
        else:
            target = out / f"model.{format}"
            (out / "labels.txt").write_text("\n".join(trained.outputs) + "\n")
            (out / "tfcovid.json").write_text(json.dumps(_decision_info(trained), indent=2))
            if format == "tflite":
                write_tflite(trained, target)
                diff = verify_tflite(trained, target)
            else:
                write_onnx(trained, target)
                diff = verify_onnx(trained, target)
        card = model_card.for_export(trained.run_dir, trained.path)
        if card is not None:  # the run's model card travels with the model (issue 23.7)
            (out / model_card.FILENAME).write_text(card)
    except Exception:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written or wrong export
        raise
    log(f"Exported {trained.path} ({trained.task}: {', '.join(trained.outputs)}) to {target}; "
        f"reloaded and checked: max probability difference {diff:.1e}.")
    return target
