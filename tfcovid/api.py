"""The Python API, for notebooks and other tools: load a config, fit, build a classifier, load a
trained model, predict, evaluate, export (``docs/python-api.md``). ``tfcovid/__init__.py``
re-exports it: ``import tfcovid; tfcovid.fit(...)``.

Importing this module is cheap: each function imports the TensorFlow/Keras modules it needs
when it runs, as ``cli`` does. It also makes ``keras.saving.load_model`` find tfcovid's
serializable classes once tfcovid is imported, whichever of keras and tfcovid comes first
(:func:`tfcovid.training.keras_classes.register_on_import`).

May import: every tfcovid package (this is the top layer, beside ``cli``).
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tfcovid import config
from tfcovid.training import keras_classes
from tfcovid.utils import tf_import

if TYPE_CHECKING:  # annotations only: importing these at run time would load Keras
    import keras

    from tfcovid.inference.predict import Predictions
    from tfcovid.weights.metadata import Trained


def load_config(path: str | Path | None = None, **overrides: Any) -> config.Experiment:
    """Read an experiment: defaults <- [demo preset] <- the YAML file <- ``overrides``.

    Overrides are sections as keywords (``train={"epochs": 1}``), dotted keys as in
    ``tfcovid fit --set`` (``**{"train.epochs": 1}``), or the top-level ``name`` and ``out``.
    A value may be None (``train={"focal_alpha": None}``). Without a file, and with the data
    left at "demo", the offline demo preset applies, as in ``tfcovid fit``.

    Args:
        path: a YAML config file (e.g. ``configs/part1/vgg16_first7.yaml``), or None.
        **overrides: values that replace the file's.

    Returns:
        The validated, frozen :class:`tfcovid.config.Experiment`.

    Raises:
        tfcovid.config.ConfigError: a missing file, an unknown key (with the valid ones) or a
            bad value, named.

    Example:
        >>> exp = tfcovid.load_config(train={"epochs": 1}, **{"data.image_size": 32})
        >>> exp.train.epochs, exp.data.image_size, exp.model.weights
        (1, 32, 'none')
    """
    return config.resolve(path, assignments=_nested(overrides))


def _nested(overrides: dict[str, Any]) -> dict:
    """``{"train.lr": 0.01, "data": {"dir": "x"}}`` -> one nested tree; unknown keys are errors."""
    tree: dict = {}
    for key, value in overrides.items():
        section, dot, sub = key.partition(".")
        tree = config.merge(tree, {section: {sub: value}} if dot else {key: value}, "load_config")
    return tree


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` trained: the run directory and what it holds.

    Attributes:
        run_dir: the run directory, absolute (``config.yaml``, ``checkpoints/``, ``plots/``, ...).
        model: the trained keras.Model (``checkpoints/last.keras``), uncompiled: for inference;
            ``tfcovid.load_model(path)`` gives it compiled as in training.
        history: ``history.csv`` as {column: one value per epoch}, e.g. ``history["val_loss"]``.
        metrics: ``metrics.json``: per-split scores under ``metrics["splits"]``.
        trained: the model with what it predicts (task, outputs, threshold), as :func:`load` gives.
    """

    run_dir: Path
    model: keras.Model
    history: dict[str, list[float]] = field(repr=False)
    metrics: dict = field(repr=False)
    trained: Trained = field(repr=False, compare=False)


def fit(config_or_path: config.Experiment | str | Path | None = None, *, log: Callable[[str], Any] | None = print,
        **overrides: Any) -> FitResult | None:
    """Train one experiment, as ``tfcovid fit`` does, and read back its run directory.

    Args:
        config_or_path: an Experiment (from :func:`load_config`), a YAML file, or None for the
            defaults (the offline demo preset).
        log: where progress lines go (``print``); None for silence.
        **overrides: as in :func:`load_config`, applied over the config.

    Returns:
        A :class:`FitResult`; None on the non-chief workers of a ``multiworker`` run (only the
        chief writes the run directory).

    Raises:
        tfcovid.config.ConfigError, tfcovid.data.types.DataError, tfcovid.training.train.TrainingError,
        tfcovid.weights.assign.WeightsError: with what to do.

    Example:
        >>> result = tfcovid.fit(train={"epochs": 1, "batch_size": 8}, data={"image_size": 32, "demo_per_class": 8})
        >>> len(result.history["loss"]), sorted(result.metrics["splits"])
        (1, ['test', 'train', 'validation'])
    """
    if isinstance(config_or_path, config.Experiment):
        exp = config_or_path
        if overrides:
            exp = config.from_dict(config.merge(exp.to_dict(), _nested(overrides), "fit"))
    else:
        exp = load_config(config_or_path, **overrides)
    _import_tensorflow()
    from tfcovid.training import train  # heavy: TensorFlow

    run = train.fit(exp, log=log or (lambda line: None))
    return None if run is None else _read_run(Path(run).resolve())


def _read_run(run: Path) -> FitResult:
    """A finished run directory as a FitResult (its last checkpoint loaded)."""
    from tfcovid.results import plots  # heavy: matplotlib and TensorFlow

    history = plots.read_history(run / "history.csv")
    if "epoch" in history:
        history["epoch"] = [int(e) for e in history["epoch"]]
    trained = load(run)
    return FitResult(run_dir=run, model=trained.model, history=history,
                     metrics=json.loads((run / "metrics.json").read_text()), trained=trained)


def build_classifier(backbone: str = "vgg16", task: str = "binary", freeze: str = "none",
                     weights: str = "none", image_size: int = 224, labels: Sequence[str] | None = None,
                     preprocessing: str = "auto", head_units: int = 110) -> keras.Model:
    """Build the study's classifier (raw [0, 255] RGB pixels in, float32 logits out), uncompiled.

    Args:
        backbone: "vgg16", "resnet18", "resnet50", "densenet121", "efficientnetv2_b0" or
            "convnext_tiny".
        task: "binary" (2 outputs) or "multilabel" (one output per label).
        freeze: "none", "all" (backbone frozen), "firstN" (up to the N-th conv layer, e.g.
            "first7") or "stagesN" (the first N stages); the head always stays trainable.
        weights: "none" (random, torchvision's initialisation), "imagenet" (downloaded once)
            or a weights file (.keras, .weights.h5, .h5, .safetensors, .pth).
        image_size: square input side in pixels.
        labels: the multilabel task's output names (default covid-19, normal, pneumonia).
        preprocessing: "auto" (follows the weights), "caffe", "torch" or "none".
        head_units: hidden units of the study's head.

    Returns:
        The keras.Model, named ``tfcovid_<backbone>_<task>``, with the freeze policy applied.

    Raises:
        ValueError: an unknown backbone or freeze policy (the valid ones listed), a task other
            than binary/multilabel, or an image size below the backbone's minimum.
        tfcovid.weights.assign.WeightsError: the weights cannot be had or do not fit.

    Example:
        >>> model = tfcovid.build_classifier("resnet18", freeze="all", image_size=32)
        >>> model.output_shape, [layer.name for layer in model.layers if layer.trainable_weights]
        ((None, 2), ['head_fc1', 'head_logits'])
    """
    if task not in config.TASKS:
        raise ValueError(f"Unknown task {task!r}. Valid tasks: {', '.join(config.TASKS)}.")
    if task == "binary" and labels is not None and len(labels) != 2:
        raise ValueError(f"The binary task has 2 outputs; got labels {list(labels)}.")
    outputs = 2 if task == "binary" else len(labels if labels is not None else config.STUDY_LABELS)
    _import_tensorflow()
    from tfcovid.models import apply_freeze, get_backbone, is_head_layer  # heavy: Keras
    from tfcovid.weights import loading  # heavy: Keras

    model, _, _ = loading.initial_model(backbone, outputs, image_size, weights, preprocessing,
                                        head_units, name=f"tfcovid_{backbone}_{task}")
    apply_freeze(model, freeze, is_head_layer, get_backbone(backbone).stages)
    return model


def load(run_dir_or_keras_file: str | Path, checkpoint: str = "last", task: str | None = None,
         labels: Sequence[str] | None = None) -> Trained:
    """Load a trained model with what it predicts (task, output names, image size, threshold).

    Args:
        run_dir_or_keras_file: a run directory or a ``.keras`` file.
        checkpoint: for a run directory, "last" (what metrics.json describes) or "best".
        task, labels: only for a .keras file that does not record them.

    Returns:
        A :class:`tfcovid.weights.metadata.Trained`: ``.model`` (uncompiled keras.Model),
        ``.task``, ``.outputs``, ``.positive``, ``.image_size``, ``.threshold``, ``.run_dir``.

    Raises:
        tfcovid.weights.metadata.ModelInfoError: the path is missing or not a finished run or a
            .keras file (named), or the file holds Python code (refused, never run).

    Example:
        >>> trained = tfcovid.load("runs/20250101-120000-vgg16-none-ce")
        >>> trained.task, trained.outputs
        ('binary', ('infected', 'normal'))
    """
    _import_tensorflow()
    from tfcovid.weights import metadata  # heavy: Keras

    return metadata.load(run_dir_or_keras_file, checkpoint, task, labels)


def load_model(path: str | Path, compile: bool = True) -> keras.Model:
    """Load a tfcovid ``.keras`` model (a run's checkpoint, an ``import-torch`` output) as a
    bare keras.Model.

    Keras's safe mode: no code from the file runs (a ``Lambda`` layer is refused). After
    ``import tfcovid``, ``keras.saving.load_model`` loads these files too; this one adds
    messages that name the file.

    Args:
        path: the .keras file.
        compile: restore the optimizer, loss and metrics (``model.evaluate`` reports accuracy
            and F1 as training did); False gives the bare model.

    Raises:
        ValueError: a missing or damaged file, or one with a Lambda layer, named.

    Example:
        >>> model = tfcovid.load_model("runs/RUN/checkpoints/best.keras", compile=False)
    """
    _import_tensorflow()
    from tfcovid.weights import keras_files  # heavy: Keras

    keras_classes.register()
    return keras_files.load_model(path, ValueError, compile=compile)


def predict(model_or_run, images: str | Path | Sequence[str | Path], threshold: float | None = None,
            checkpoint: str = "last", batch_size: int = 32, tta: str = "none",
            max_pixels: int | None = None) -> Predictions:
    """Predict image files and folders (walked recursively), as ``tfcovid predict`` does.

    Args:
        model_or_run: a :class:`FitResult`, a loaded model from :func:`load`, a run directory
            or a .keras file.
        images: one file or folder, or a list of them.
        threshold: decision threshold; None uses the model's operating point (its recorded
            thresholds; ``train.threshold`` unless chosen, see docs/operating-points.md).
        checkpoint: "last" or "best", for a run directory.
        batch_size: images per forward pass.
        tta: "flip" averages each image's probabilities with its mirror image's (docs/beyond.md).
        max_pixels: larger images are refused from their headers, before decoding, and listed
            in ``.failed``; None: the run's ``data.max_pixels`` (``--max-pixels``).

    Returns:
        :class:`tfcovid.inference.predict.Predictions`: ``.names`` and ``.probs`` (one row per
        readable image, sorted by name: N x outputs, columns ``.outputs``), ``.predicted``
        (binary: a class name; three labels: 0/1 per label) and ``.failed`` ((name, reason)
        for files that could not be read).

    Raises:
        ValueError: no images found under ``images`` (named), a bare keras.Model given, or
            ``max_pixels`` not a whole number >= 1.

    Example:
        >>> preds = tfcovid.predict("runs/RUN", "xrays/")
        >>> preds.probs.shape, preds.predicted[0]
        ((12, 2), 'infected')
    """
    _check_max_pixels(max_pixels)
    _import_tensorflow()
    from tfcovid.data.folders import IMAGE_EXTENSIONS  # heavy: TensorFlow
    from tfcovid.inference import predict as inference_predict  # heavy: TensorFlow

    inputs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    result = inference_predict.predict(_trained(model_or_run, checkpoint), inputs, threshold, batch_size,
                                       max_pixels=max_pixels, tta=tta)
    if not result.names and not result.failed:
        kinds = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        raise ValueError(f"No images ({kinds}) found in {', '.join(map(str, inputs))}.")
    return result


def evaluate(run, data: str | Path | None = None, split: str = "test", checkpoint: str = "last",
             out: str | Path | None = None, batch_size: int = 32, log: Callable[[str], Any] | None = print,
             tta: str = "none", max_pixels: int | None = None) -> dict:
    """Recompute a trained model's metrics on one labeled split, as ``tfcovid evaluate`` does.

    Writes ``<split>.json``, ``<split>_predictions.csv`` and the split's plots to ``out``
    (default ``RUN/eval/``).

    Args:
        run: a :class:`FitResult`, a loaded model from :func:`load`, a run directory or a
            .keras file.
        data: an ImageFolder tree (or "demo"); default the run's own data.
        split: "train", "validation" or "test".
        checkpoint: "last" or "best", for a run directory.
        out: output folder.
        batch_size: images per prediction batch.
        log: where progress lines go; None for silence.
        tta: "flip" averages each image's probabilities with its mirror image's; the files are
            then ``<split>-tta*`` (docs/beyond.md).
        max_pixels: a larger image stops it before decoding, named (``--max-pixels``); None:
            the run's ``data.max_pixels``.

    Returns:
        The dict written to ``<split>.json``: ``report`` (accuracy, F1, ...), ``diseases``
        (sensitivity, specificity, ROC AUC per disease class), ``files``, ``model``, ...

    Raises:
        tfcovid.inference.evaluate.EvaluateError, tfcovid.data.types.DataError,
        tfcovid.weights.metadata.ModelInfoError: with what to do. ValueError: ``max_pixels``
        not a whole number >= 1.

    Example:
        >>> report = tfcovid.evaluate("runs/RUN", split="validation")
        >>> report["report"]["accuracy"], report["diseases"]["infected"]["sensitivity"]
        (0.9, 0.85)
    """
    _check_max_pixels(max_pixels)
    _import_tensorflow()
    from tfcovid.inference import evaluate as inference_evaluate  # heavy: TensorFlow

    target, checkpoint, task, labels = _target(run, checkpoint)
    return inference_evaluate.evaluate(target, data, split, out, checkpoint, batch_size, task, labels,
                                       log=log or (lambda line: None), max_pixels=max_pixels, tta=tta)


def export(run, out: str | Path | None = None, format: str = "saved_model", checkpoint: str = "last",
           log: Callable[[str], Any] | None = print) -> Path:
    """Export a trained model for serving and check the export against it, as ``tfcovid export``.

    Args:
        run: a :class:`FitResult`, a loaded model from :func:`load`, a run directory or a
            .keras file.
        out: a new or empty folder; default ``RUN/saved_model`` (``RUN/tflite``, ``RUN/onnx``).
        format: "saved_model" (raw pixels or encoded images in; probabilities and labels out),
            "tflite" or "onnx" (the onnx extra).
        checkpoint: "last" or "best", for a run directory.
        log: where the one-line summary goes; None for silence.

    Returns:
        The SavedModel folder, or the .tflite / .onnx file.

    Raises:
        tfcovid.inference.export.ExportError, FileExistsError (``out`` is not empty),
        tfcovid.weights.metadata.ModelInfoError.

    Example:
        >>> tfcovid.export("runs/RUN", "serving/xray/1")
        PosixPath('serving/xray/1')
    """
    _import_tensorflow()
    from tfcovid.inference import export as inference_export  # heavy: TensorFlow

    target, checkpoint, task, labels = _target(run, checkpoint)
    return inference_export.export(target, out, format, checkpoint, task, labels,
                                   log=log or (lambda line: None))


def _trained(model_or_run, checkpoint: str) -> Trained:
    """A FitResult, a Trained or a path, as a Trained; a bare keras.Model is refused."""
    if isinstance(model_or_run, FitResult):
        return model_or_run.trained
    from tfcovid.weights import metadata  # heavy: Keras

    if isinstance(model_or_run, metadata.Trained):
        return model_or_run
    if isinstance(model_or_run, (str, os.PathLike)):
        return metadata.load(model_or_run, checkpoint)
    raise ValueError(
        f"Cannot use a {type(model_or_run).__name__} here: pass what tfcovid.fit or tfcovid.load "
        "returns, a run directory or a .keras file (a bare keras.Model does not say what it predicts)."
    )


def _check_max_pixels(max_pixels) -> None:
    """As --max-pixels' range: None or a whole number >= 1 (0, -1, 1.5 or True would refuse, or
    silently truncate to, every image's size)."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral)
                                   or max_pixels < 1):
        raise ValueError(f"Bad max_pixels {max_pixels!r}: use a whole number of pixels >= 1 (as "
                         "--max-pixels), or None for the run's data.max_pixels.")


def _target(run, checkpoint: str) -> tuple[Any, str, str | None, tuple[str, ...] | None]:
    """(path, checkpoint, task, labels) for inference.evaluate/export from what :func:`_trained` takes."""
    if isinstance(run, FitResult):
        return run.run_dir, checkpoint, None, None
    if isinstance(run, (str, os.PathLike)):
        return run, checkpoint, None, None
    trained = _trained(run, checkpoint)  # a Trained: its file, and the names it was loaded with
    return trained.path, "last", trained.task, trained.outputs


def _import_tensorflow() -> None:
    # TensorFlow first, through tf_import: it filters TensorFlow's start-up lines and keeps the
    # CUDA note that fit's device line shows.
    tf_import.import_tensorflow()
