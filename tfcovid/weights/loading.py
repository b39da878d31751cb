"""Starting weights (ImageNet, none, or a local file), the preprocessing that goes with them, and
the import of the study's fine-tuned PyTorch checkpoints.

``--weights`` accepts:

- ``imagenet``: Keras's ImageNet weights for VGG16 and ResNet50 ("caffe" preprocessing);
  torchvision's ImageNet ResNet18 (``resnet18-f37072fd.pth``, converted; "torch" preprocessing).
  Files are fetched once into Keras's cache (``$KERAS_HOME/models``, default ``~/.keras/models``)
  and checked against their published hashes. Offline, the error names the file, its URL and the
  folder to put it in. A cached file with the wrong hash is reported (its hash and the expected
  one) and left where it is: tfcovid checks it before Keras would delete it to re-download.
- ``none``: random initialisation.
- a file: a ``.keras`` model from an earlier run, a Keras ``.weights.h5``, a keras.applications
  "notop" (legacy) ``.h5``, or a torchvision-layout state dict (``.safetensors`` or ``.pth``).
  The backbone must match exactly; the study's head is taken from the file only when its shapes
  match, otherwise it starts fresh (and the description says so). ImageNet classifiers
  (1000 classes) are dropped.
"""
from __future__ import annotations

from pathlib import Path

from tfcovid.models import build_model, get_backbone, init_like_torchvision
from tfcovid.weights import keras_files
from tfcovid.weights import torch_files as weights_torch_files
from tfcovid.weights.assign import WeightsError, assign
from tfcovid.weights.imagenet import IMAGENET, fetch_imagenet
from tfcovid.weights.torch_files import TORCH_SUFFIXES, _require_torch_for

# Layers of keras.applications' ImageNet tops, dropped when a file with the top is used.
KERAS_IMAGENET_TOP = ("fc1", "fc2", "predictions", "fc1000")


def file_kind(path: str | Path) -> str:
    """"torch" (state dict), "keras" (.keras model), "keras_h5" (.weights.h5) or "legacy_h5"."""

    path = Path(path)
    if path.suffix == ".safetensors" or path.suffix in TORCH_SUFFIXES:
        return "torch"
    if path.suffix == ".keras":
        return "keras"
    if path.suffix == ".h5":
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if "layer_names" in f.attrs or "layer_names0" in f.attrs or "model_weights" in f:
                    return "legacy_h5"
                if "layers" in f:
                    return "keras_h5"
        except OSError as err:
            raise WeightsError(f"Could not read {path} as an HDF5 file: {err}") from None
        raise WeightsError(f"{path} is an HDF5 file but neither Keras weights format.")
    raise WeightsError(f"Unsupported weights file {path}. Use a .keras, .weights.h5 or "
                       "keras.applications .h5 file, or a torchvision .safetensors/.pth state dict.")


def _existing(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}. Use --weights imagenet, none, or an "
                           "existing file.")
    return path


def resolve_preprocessing(backbone: str, weights: str, preprocessing: str = "auto") -> str:
    """The normalisation the weights expect, unless ``preprocessing`` sets it.

    Keras ImageNet and keras.applications .h5 -> "caffe"; torchvision weights -> "torch"; a
    .keras model -> whatever it used; a .weights.h5 (which does not record it) -> the backbone's
    ImageNet preprocessing. Training from scratch ("none") uses ImageNet mean/std ("torch"):
    standardised inputs are what random initialisation assumes.
    """
    if preprocessing != "auto":
        return preprocessing
    spec = get_backbone(backbone)
    if weights == "imagenet":
        return spec.imagenet_preprocessing
    if weights == "none":
        return "torch"
    path = _existing(weights)
    kind = file_kind(path)
    if kind == "torch":
        return "torch"
    if kind == "keras":

        return keras_files.preprocessing_of(path) or spec.imagenet_preprocessing
    return spec.imagenet_preprocessing  # .weights.h5 and keras.applications .h5


def load_file(model, path: str | Path, backbone: str) -> str:
    """Load a local weights file into ``model``; return a one-line description of what was loaded."""

    path = Path(path)
    kind = file_kind(path)
    notes: list[str] = []
    if kind == "torch":

        converted = weights_torch_files.convert(weights_torch_files.read_state_dict(path), model, backbone,
                                         require_head=False, source=str(path))
        notes = converted.notes
        arrays, what = converted.arrays, "torchvision state dict"
    elif kind == "keras":
        arrays, what = keras_files.model_arrays(path), "Keras model"
    elif kind == "keras_h5":
        arrays, what = keras_files.weights_h5_arrays(path, model), "Keras weights"
    else:
        arrays, what = keras_files.legacy_h5_arrays(path), "Keras .h5 weights"
    top = [name for name in arrays if name in KERAS_IMAGENET_TOP]
    if top:
        notes.append(f"dropped the ImageNet top ({', '.join(top)})")
        arrays = {k: v for k, v in arrays.items() if k not in top}
    for note in assign(model, arrays, str(path)):
        if note not in notes and not any("fresh study head" in n for n in notes):
            notes.append(note)
    return f"{what} from {path}" + (f" ({'; '.join(notes)})" if notes else "")


def initial_model(backbone: str, num_outputs: int, image_size: int, weights: str = "none",
                  preprocessing: str = "auto", head_units: int = 110, name: str | None = None):
    """Build the model with its starting weights.

    Returns:
        (model, preprocessing mode, one-line description of where the weights came from).

    Raises:
        WeightsError: the weights cannot be had or do not fit; the message says what to do.
    """
    mode = resolve_preprocessing(backbone, weights, preprocessing)
    spec = get_backbone(backbone)
    if weights == "none":
        model = build_model(backbone, num_outputs, image_size, mode, None, head_units, name)
        init_like_torchvision(model)
        return model, mode, "random initialisation as torchvision's (He normal; training from scratch)"
    if weights == "imagenet":
        if not spec.keras_imagenet:
            _require_torch_for(IMAGENET.get(backbone))
        path = fetch_imagenet(backbone)
        if spec.keras_imagenet:
            model = _keras_loaded(backbone, num_outputs, image_size, mode, path, head_units, name,
                                  "Delete it to re-download.")
            return model, mode, f"Keras ImageNet weights ({path.name})"
        model = build_model(backbone, num_outputs, image_size, mode, None, head_units, name)
        return model, mode, "torchvision ImageNet " + load_file(model, path, backbone)
    path = _existing(weights)
    if spec.h5_by_order and file_kind(path) == "legacy_h5":
        model = _keras_loaded(backbone, num_outputs, image_size, mode, path, head_units, name,
                              f"Use keras.applications' {backbone} notop .h5 or a tfcovid .keras file.")
        return model, mode, f"Keras .h5 weights from {path} (loaded by keras.applications; fresh study head)"
    model = build_model(backbone, num_outputs, image_size, mode, None, head_units, name)
    return model, mode, load_file(model, path, backbone)


def _keras_loaded(backbone, num_outputs, image_size, mode, path, head_units, name, advice):
    """The model with ``path`` loaded into its backbone by keras.applications."""
    try:
        return build_model(backbone, num_outputs, image_size, mode, str(path), head_units, name)
    except (ValueError, OSError) as err:  # a truncated or foreign .h5
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"Could not load {path} into {backbone}: {reason}. {advice}") from None


# The study's outputs, in its ImageFolder (sorted folder) order: Part 1 infected = 0, normal = 1.
STUDY_OUTPUTS = {"binary": ("infected", "normal"), "multilabel": ("covid-19", "normal", "pneumonia")}


def resolve_experiment_weights(exp, fetch: bool = True):
    """``exp`` with ``model.preprocessing`` resolved from its weights ("auto" -> the mode) and a
    weights file made an absolute path, so the saved config.yaml says exactly what was used.

    ImageNet weights are fetched into the cache here (unless not ``fetch``: ``fit`` fetches
    them after its cheap checks of the data), so an offline run stops before anything is written.
    """
    import dataclasses

    m = exp.model
    if m.weights == "imagenet":
        if not get_backbone(m.backbone).keras_imagenet:
            _require_torch_for(IMAGENET.get(m.backbone))
        if fetch:
            fetch_imagenet(m.backbone)
    mode = resolve_preprocessing(m.backbone, m.weights, m.preprocessing)
    source = m.weights if m.weights in ("imagenet", "none") else str(_existing(m.weights).resolve())
    return dataclasses.replace(exp, model=dataclasses.replace(m, weights=source, preprocessing=mode))
