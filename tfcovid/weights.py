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

import contextlib
import hashlib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from tfcovid.models import build_model, get_backbone, init_like_torchvision
from tfcovid.models.heads import HEAD_PREFIX

KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
DOWNLOAD_TIMEOUT_S = 30  # per socket operation: an unreachable host fails in seconds, not minutes
# Layers of keras.applications' ImageNet tops, dropped when a file with the top is used.
KERAS_IMAGENET_TOP = ("fc1", "fc2", "predictions", "fc1000")


class WeightsError(RuntimeError):
    """Weights could not be found or loaded; the message says which file and what to do."""


@dataclass(frozen=True)
class ImagenetFile:
    """One published ImageNet weights file."""

    fname: str
    url: str
    md5: str | None = None  # full md5, checked by keras.utils.get_file (Keras's own hashes)
    sha256_prefix: str | None = None  # torchvision's check: sha256 starts with the name's hash


# The Keras entries are keras.applications' own notop files and md5s; torchvision names its
# files after the first 8 hex digits of their sha256 and checks just that prefix.
IMAGENET = {
    "vgg16": ImagenetFile("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                          KERAS_BASE + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                          md5="6d6bbae143d832006294945121d1f1fc"),
    "resnet50": ImagenetFile("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             KERAS_BASE + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             md5="4d473c1dd8becc155b73f8504c6f6626"),
    "resnet18": ImagenetFile("resnet18-f37072fd.pth",
                             "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                             sha256_prefix="f37072fd"),
}


def keras_cache_dir() -> Path:
    """Where ImageNet weights are kept: ``$KERAS_HOME/models`` (default ``~/.keras/models``).

    Read at call time (Keras reads KERAS_HOME once, at import) and passed to get_file, so the
    folder named in messages is always the one used.
    """
    base = Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if not os.access(base, os.W_OK):
        base = Path(tempfile.gettempdir()) / ".keras"  # what keras.utils.get_file falls back to
    return base / "models"


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # keras.utils.get_file has no timeout argument; urllib uses the process default.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def fetch_imagenet(backbone: str) -> Path:
    """The ImageNet weights file for ``backbone``, from Keras's cache or downloaded into it.

    Raises:
        WeightsError: no such weights, download failed (offline) or the file's hash is wrong.
    """
    if backbone not in IMAGENET:
        raise WeightsError(f"No ImageNet weights are known for {backbone!r}; known: "
                           f"{', '.join(IMAGENET)}. Use --weights none or --weights FILE.")
    spec = IMAGENET[backbone]
    folder = keras_cache_dir()
    cached = folder / spec.fname
    if cached.exists():
        # Checked here, not by get_file: on a hash mismatch Keras deletes the file (even one a
        # user copied in by hand) while trying to download it again.
        _check_hash(cached, spec)
        return cached
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            path = Path(keras.utils.get_file(spec.fname, spec.url, cache_dir=str(folder.parent),
                                             cache_subdir=folder.name, file_hash=spec.md5))
    except Exception as err:  # get_file raises a bare Exception wrapping URLError/HTTPError
        if cached.exists():  # downloaded, but Keras found the wrong md5 (it removes partial files)
            _check_hash(cached, spec)
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"Could not download the ImageNet weights for {backbone}: {spec.fname} from "
            f"{spec.url} ({reason}).\nOffline? Download that file elsewhere and put it in "
            f"{folder}/ (Keras's cache; set KERAS_HOME to use another folder), or pass "
            "--weights FILE (a .keras, .weights.h5, keras.applications .h5, or torchvision "
            ".safetensors/.pth file), or --weights none to train from scratch."
        ) from None
    if not spec.md5:  # get_file checked the md5; torchvision's sha256 prefix is ours to check
        _check_hash(path, spec)
    return path


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(path: Path, spec: ImagenetFile) -> None:
    """Raise WeightsError, leaving the file where it is, when ``path`` is not ``spec``'s file."""
    try:
        if spec.md5:
            digest = _file_digest(path, "md5")
            good, shown, expected = digest == spec.md5, f"md5 is {digest}", spec.md5
        elif spec.sha256_prefix:
            digest = _file_digest(path, "sha256")
            good = digest.startswith(spec.sha256_prefix)
            shown, expected = f"sha256 is {digest[:16]}...", f"{spec.sha256_prefix}..."
        else:
            return
    except OSError as err:
        raise WeightsError(f"Could not read {path}: {err}. Delete or replace it and run again.") from None
    if not good:
        raise WeightsError(
            f"{path} is damaged or not {spec.fname}: its {shown}, expected {expected}. "
            f"Delete it and run again to re-download from {spec.url}, or replace it with a "
            "good copy of that file.")


def file_kind(path: str | Path) -> str:
    """"torch" (state dict), "keras" (.keras model), "keras_h5" (.weights.h5) or "legacy_h5"."""
    from tfcovid.torch_import import TORCH_SUFFIXES

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
        from tfcovid import keras_files

        return keras_files.preprocessing_of(path) or spec.imagenet_preprocessing
    if kind == "legacy_h5":
        return "caffe" if spec.keras_imagenet else spec.imagenet_preprocessing
    return spec.imagenet_preprocessing


def format_shape(shape) -> str:
    """A shape as messages show it: (3, 3, 64, 64)."""
    return str(tuple(int(d) for d in shape))


def weighted_layers(model) -> dict:
    """{layer name: layer} for the layers of ``model`` that have weights."""
    return {layer.name: layer for layer in model.layers if layer.weights}


def _mismatches(layer, values) -> list[str]:
    if len(values) != len(layer.weights):
        return [f"{layer.name}: the file has {len(values)} arrays "
                f"({', '.join(format_shape(np.shape(v)) for v in values)}), the layer has "
                f"{len(layer.weights)} ({', '.join(v.name + ' ' + format_shape(v.shape) for v in layer.weights)})"]
    return [f"{var.path}: file {format_shape(np.shape(v))}, model {format_shape(var.shape)}"
            for var, v in zip(layer.weights, values) if tuple(np.shape(v)) != tuple(var.shape)]


def assign(model, arrays: dict[str, list], source: str, require_head: bool = False) -> list[str]:
    """Set ``model``'s layers from ``{layer name: [arrays in layer.weights order]}``.

    Every backbone layer must be present with the right shapes and nothing may be left over;
    the head is loaded when it is all there with matching shapes, and is an error otherwise
    only when ``require_head``.

    Returns:
        Notes for the description (e.g. that the head starts fresh).
    """
    layers = weighted_layers(model)
    backbone = [name for name in layers if not name.startswith(HEAD_PREFIX)]
    head = [name for name in layers if name.startswith(HEAD_PREFIX)]
    problems = [f"missing layer {name} (" + ", ".join(f"{v.name} {format_shape(v.shape)}" for v in
                                                      layers[name].weights) + ")"
                for name in backbone if name not in arrays]
    problems += [p for name in backbone if name in arrays for p in _mismatches(layers[name], arrays[name])]
    problems += [f"unexpected layer {name} (" + ", ".join(format_shape(np.shape(v)) for v in arrays[name]) + ")"
                 for name in arrays if name not in layers]
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise WeightsError(f"{source} does not fit {model.name}'s backbone:\n  "
                           + "\n  ".join(problems[:12]) + more
                           + "\nWas it saved from another backbone (--backbone)?")
    head_problems = [f"missing {name}" for name in head if name not in arrays]
    head_problems += [p for name in head if name in arrays for p in _mismatches(layers[name], arrays[name])]
    if head_problems and require_head:
        raise WeightsError(f"{source}: the head does not fit the model: " + "; ".join(head_problems))
    for name in backbone + ([] if head_problems else head):
        layers[name].set_weights([np.asarray(v) for v in arrays[name]])
    if head_problems and any(name in arrays for name in head):
        return [f"head not loaded ({'; '.join(head_problems)}); fresh study head"]
    return ["study head loaded from the file"] if not head_problems else ["fresh study head"]


def load_file(model, path: str | Path, backbone: str) -> str:
    """Load a local weights file into ``model``; return a one-line description of what was loaded."""
    from tfcovid import keras_files

    path = Path(path)
    kind = file_kind(path)
    notes: list[str] = []
    if kind == "torch":
        from tfcovid import torch_import

        converted = torch_import.convert(torch_import.read_state_dict(path), model, backbone,
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
            try:
                model = build_model(backbone, num_outputs, image_size, mode, str(path), head_units, name)
            except (ValueError, OSError) as err:  # a truncated or foreign .h5 in the cache
                raise WeightsError(f"Could not load {path}: {err}. Delete it to re-download.") from None
            return model, mode, f"Keras ImageNet weights ({path.name})"
        model = build_model(backbone, num_outputs, image_size, mode, None, head_units, name)
        return model, mode, "torchvision ImageNet " + load_file(model, path, backbone)
    path = _existing(weights)
    model = build_model(backbone, num_outputs, image_size, mode, None, head_units, name)
    return model, mode, load_file(model, path, backbone)


def _require_torch_for(spec: ImagenetFile | None) -> None:
    # Fail before a 45 MB download that could not be read anyway.
    try:
        import torch  # noqa: F401
    except ImportError:
        from tfcovid.torch_import import install_torch_hint

        raise WeightsError(
            f"The ImageNet weights for ResNet18 are torchvision's {spec.fname} ({spec.url}). "
            + install_torch_hint(spec.fname) + " Then pass --weights OUT.safetensors.") from None


# The study's outputs, in its ImageFolder (sorted folder) order: Part 1 infected = 0, normal = 1.
STUDY_OUTPUTS = {"binary": ("infected", "normal"), "multilabel": ("covid-19", "normal", "pneumonia")}


def import_torch(checkpoint: str | Path, backbone: str, task: str, out: str | Path,
                 image_size: int = 224, outputs: tuple[str, ...] | None = None,
                 head_units: int = 110, log=print) -> Path:
    """Convert the study's fine-tuned PyTorch checkpoint into a tfcovid ``.keras`` model.

    The model takes raw [0, 255] pixels and normalises them with ImageNet mean/std ("torch"
    preprocessing), as the study's transforms did; every weight comes from the checkpoint.

    Args:
        checkpoint: torchvision-layout state dict (.safetensors, or .pth with torch installed).
        backbone: "vgg16" or "resnet18".
        task: "binary" (2 outputs) or "multilabel" (one per label).
        out: the .keras file to write (must not exist).
        image_size: input side; VGG16's head needs 224-255 px (a 7x7 feature map).
        outputs: output names, in the checkpoint's order; defaults to the study's.

    Raises:
        WeightsError: unreadable checkpoint, any missing/unexpected key or shape mismatch.
    """
    from tfcovid import torch_import

    checkpoint, out = _existing(str(checkpoint)), Path(out)
    if out.suffix != ".keras":
        raise WeightsError(f"--out must be a .keras file, got {out}.")
    if out.exists():
        raise WeightsError(f"{out} already exists; choose another --out or delete it first.")
    if task not in STUDY_OUTPUTS:
        raise WeightsError(f"Unknown task {task!r}. Valid tasks: {', '.join(STUDY_OUTPUTS)}.")
    outputs = tuple(outputs or STUDY_OUTPUTS[task])
    if task == "binary" and len(outputs) != 2:
        raise WeightsError(f"The binary task has 2 outputs; got names {list(outputs)}.")
    state = torch_import.read_state_dict(checkpoint)
    model = build_model(backbone, len(outputs), image_size, "torch", None, head_units,
                        name=f"tfcovid_{backbone}_{task}")
    converted = torch_import.convert(state, model, backbone, require_head=True, source=str(checkpoint))
    assign(model, converted.arrays, str(checkpoint), require_head=True)
    log(f"Converted {len(state)} tensors from {checkpoint} into {model.name} "
        f"({image_size}x{image_size} px, 'torch' preprocessing, outputs {', '.join(outputs)})")

    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    _embed_info(out, {"task": task, "outputs": list(outputs), "class_names": list(outputs),
                      "image_size": image_size,
                      "positive": outputs[0] if task == "binary" else None, "backbone": backbone,
                      "threshold": 0.5, "source": f"import-torch {checkpoint.name}"})
    # A reload check, as for every export: the written file must give the same logits.
    probe = np.random.default_rng(0).uniform(0, 255, (1, image_size, image_size, 3)).astype("float32")
    reloaded = keras.models.load_model(out, compile=False, safe_mode=True)
    want = np.asarray(model(probe, training=False))
    got = np.asarray(reloaded(probe, training=False))
    if not np.allclose(want, got, rtol=1e-5, atol=1e-5 * float(np.abs(want).max() + 1e-12)):
        raise WeightsError(f"{out} reloads with different outputs; the file is damaged.")
    return out


def _embed_info(path: Path, info: dict) -> None:
    # predict/evaluate read the task and output names from inside the .keras file.
    try:
        from tfcovid import modelinfo
    except ImportError:  # pragma: no cover - modelinfo ships with tfcovid
        return
    modelinfo.embed(path, {"format": modelinfo.FORMAT_VERSION, **info})


def resolve_experiment_weights(exp):
    """``exp`` with ``model.preprocessing`` resolved from its weights ("auto" -> the mode) and a
    weights file made an absolute path, so the saved config.yaml says exactly what was used.

    ImageNet weights are fetched into the cache here, so an offline run stops before anything
    is written.
    """
    import dataclasses

    m = exp.model
    if m.weights == "imagenet":
        if not get_backbone(m.backbone).keras_imagenet:
            _require_torch_for(IMAGENET.get(m.backbone))
        fetch_imagenet(m.backbone)
    mode = resolve_preprocessing(m.backbone, m.weights, m.preprocessing)
    source = m.weights if m.weights in ("imagenet", "none") else str(_existing(m.weights).resolve())
    return dataclasses.replace(exp, model=dataclasses.replace(m, weights=source, preprocessing=mode))
