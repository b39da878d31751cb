"""torchvision state dicts -> tfcovid's Keras layers (VGG16, ResNet18, the study's 110-unit head).

The conversion is exact and loud. Layout rules, and why each is needed:

- Conv2d weight (O, I, kH, kW) -> Conv2D kernel (kH, kW, I, O): Keras is channels-last.
- Linear weight (out, in) -> Dense kernel (in, out).
- BatchNorm2d weight, bias, running_mean, running_var -> gamma, beta, moving_mean,
  moving_variance (tfcovid's ResNet18 already uses PyTorch's epsilon 1e-5);
  ``num_batches_tracked`` is a step counter and is ignored.
- VGG16's first Linear after the flatten: torchvision flattens a (C, 7, 7) map, Keras a
  (7, 7, C) map, so that weight's input columns are permuted. torchvision's
  ``AdaptiveAvgPool2d((7, 7))`` before the classifier is the identity only when the feature map
  is already 7x7, i.e. for 224-255 px inputs; the study's head is loaded only then.

A missing key, an unexpected key or a shape mismatch raises :class:`WeightsError` naming the
key and both shapes. The study's head is ``classifier = Sequential(Linear(25088, 110), ReLU,
Linear(110, n))`` for VGG16 and ``fc = Sequential(Linear(512, 110), ReLU, Linear(110, n))`` for
ResNet18 (keys ``classifier.0.*``/``classifier.2.*``, ``fc.0.*``/``fc.2.*``; any two Linear
layers under that module in order are accepted, so a Flatten or Dropout in between is fine).
A 1000-output ImageNet classifier is recognised and dropped.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tfcovid.weights.assign import WeightsError, format_shape
from tfcovid.weights.imagenet import ImagenetFile

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


HEAD_ROOT = {"vgg16": "classifier", "resnet18": "fc"}


HEAD_LAYERS = ("head_fc1", "head_logits")


# torchvision's vgg16.features indices of the 13 convolutions, in forward order.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


# Keras variable name -> torchvision parameter name.
_BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
              "moving_variance": "running_var"}


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net")


PIP_TORCH = "pip install 'tfcovid[torch]'"


def install_torch_hint(path) -> str:
    """What to do when a PyTorch file must be read but torch is not installed."""
    return (f"Reading {path} needs PyTorch, which is not installed. Install it with {PIP_TORCH} "
            "(for a small CPU-only wheel: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu), or convert the file to .safetensors where "
            "PyTorch is installed and pass that instead: python -c \"import torch, "
            "safetensors.torch as s; s.save_file(torch.load('IN.pth', weights_only=True), "
            "'OUT.safetensors')\"")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a torchvision-layout state dict as float arrays: .safetensors, or .pth with torch.

    Checkpoint dicts that wrap the state dict (``{"state_dict": ...}``, ``{"model_state_dict":
    ...}``) are unwrapped, and DataParallel's ``module.`` prefix is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types and TypeError for bf16
            raise WeightsError(f"Could not read {path} as a safetensors file: {err}") from None
    elif path.suffix in TORCH_SUFFIXES:
        state = _torch_load(path)
    else:
        raise WeightsError(f"{path} is not a PyTorch state dict: expected .safetensors or one of "
                           f"{', '.join(TORCH_SUFFIXES)}.")
    state = _unwrap(state, path)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: np.asarray(v) for k, v in state.items()}


def _torch_load(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise WeightsError(install_torch_hint(path)) from None
    try:
        # weights_only=True, passed explicitly: torch then unpickles tensors and plain containers
        # only, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says (it overrides only the default).
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False or allowlisting; only the name is news.
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f" ({named.group(1)})" if named else ""
        raise WeightsError(
            f"Refused to load {path}: it holds pickled Python objects other than tensors"
            f"{detail}, and tfcovid never runs code from weight files (torch.load with "
            "weights_only=True). Re-save only the weights where the file was made: "
            "torch.save(model.state_dict(), 'state.pth'), or convert it to .safetensors."
        ) from None
    except Exception as err:  # RuntimeError for bad zips, EOFError for truncated files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"Could not read {path} with torch.load(weights_only=True): {first}. The file is "
            "damaged (e.g. cut short by a download) or not a torch.save file: copy it again."
        ) from None

    def to_numpy(value):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            # NumPy has no bfloat16; half and bfloat16 checkpoints are widened to float32.
            return value.float().numpy() if value.is_floating_point() else value.numpy()
        if isinstance(value, dict):
            return {k: to_numpy(v) for k, v in value.items()}
        return value

    return to_numpy(obj)


def _unwrap(obj, path: Path) -> dict:
    if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key], path)
    kind = type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
    raise WeightsError(f"{path} holds a {kind}{keys}, not a state dict of tensors. Expected "
                       f"torchvision parameter names (e.g. conv1.weight) or a checkpoint dict "
                       f"with one of {', '.join(_WRAPPER_KEYS)}.")


@dataclass
class Converted:
    """A state dict converted to Keras arrays, per layer name, in each layer's weights order."""

    arrays: dict[str, list[np.ndarray]]
    head: str  # "study" (loaded), "imagenet" (dropped), "absent" or "mismatch" (fresh head)
    notes: list[str] = field(default_factory=list)


def _torch_module(backbone: str, layer) -> str:
    """The torchvision module name of a Keras backbone layer."""
    name = layer.name
    if backbone == "vgg16":
        match = re.fullmatch(r"block(\d)_conv(\d)", name)
        convs = [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]
        if match:
            block, conv = int(match[1]), int(match[2])
            position = sum(n for _, n in convs[: block - 1]) + conv - 1
            return f"features.{VGG16_CONV_INDICES[position]}"
    elif backbone == "resnet18":
        # Keras names are torchvision's with "." -> "_": layer2_0_downsample_0 -> layer2.0.downsample.0
        match = re.fullmatch(r"(layer\d)_(\d)_(conv\d|bn\d|downsample_\d)", name)
        if match:
            return f"{match[1]}.{match[2]}.{match[3].replace('_', '.')}"
        if name in ("conv1", "bn1"):
            return name
    raise WeightsError(f"No torchvision counterpart for layer {name!r} of {backbone}; "
                       f"PyTorch import supports {', '.join(HEAD_ROOT)} models built by tfcovid.")


def backbone_layout(model, backbone: str) -> dict[str, list[tuple[str, tuple, str]]]:
    """Keras layer -> [(torch key, torch shape, kind)] for every backbone weight of ``model``."""
    if backbone not in HEAD_ROOT:
        raise WeightsError(f"PyTorch checkpoints can be imported for {', '.join(HEAD_ROOT)}, "
                           f"not {backbone!r}.")
    layout = {}
    for layer in model.layers:
        if not layer.weights or layer.name in HEAD_LAYERS:
            continue
        module = _torch_module(backbone, layer)
        entries = []
        for var in layer.weights:
            shape = tuple(var.shape)
            if var.name == "kernel":  # (kH, kW, I, O) -> (O, I, kH, kW)
                entries.append((f"{module}.weight", (shape[3], shape[2], shape[0], shape[1]), "conv"))
            elif var.name == "bias":
                entries.append((f"{module}.bias", shape, "vector"))
            elif var.name in _BN_PARAMS:
                entries.append((f"{module}.{_BN_PARAMS[var.name]}", shape, "vector"))
            else:
                raise WeightsError(f"Unexpected variable {var.path} in layer {layer.name}.")
        layout[layer.name] = entries
    return layout


def _detect(keys) -> str:
    """What a torchvision state dict looks like, for the hint in error messages."""
    keys = set(keys)
    if "features.1.running_mean" in keys:
        return "VGG with BatchNorm (vgg16_bn), which tfcovid does not build"
    if "features.34.weight" in keys:
        return "VGG19, which tfcovid does not build"
    if any(k.startswith("features.") for k in keys):
        return "vgg16"
    if "layer1.0.conv3.weight" in keys:
        return "ResNet with bottleneck blocks (ResNet50 or larger), which tfcovid imports only as Keras weights"
    if "layer1.2.conv1.weight" in keys:
        return "ResNet34, which tfcovid does not build"
    if "layer1.0.conv1.weight" in keys:
        return "resnet18"
    return "unknown"


def _head_linears(state: dict, root: str, source: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The Linear layers under ``root`` in index order, as (module, weight, bias)."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        match = re.fullmatch(rf"({re.escape(root)}(?:\.(\d+))?)\.(weight|bias)", key)
        if not match:
            raise WeightsError(f"{source}: unexpected head key {key} with shape {format_shape(value.shape)}; "
                               f"expected {root}.weight/bias or {root}.<i>.weight/bias (Linear layers).")
        modules.setdefault(match[1], {})[match[3]] = value
    linears = []
    for module in sorted(modules, key=lambda m: int(m.rsplit(".", 1)[1]) if "." in m else -1):
        params = modules[module]
        w, b = params.get("weight"), params.get("bias")
        if w is None or b is None or w.ndim != 2 or b.shape != (w.shape[0],):
            got = ", ".join(f"{module}.{k} {format_shape(v.shape)}" for k, v in params.items())
            raise WeightsError(f"{source}: head module {module} is not a Linear layer with bias: "
                               f"found {got}.")
        linears.append((module, w, b))
    return linears


def convert(state: dict[str, np.ndarray], model, backbone: str, *, require_head: bool,
            source: str = "checkpoint") -> Converted:
    """Check ``state`` against ``model`` key by key and convert it to Keras arrays.

    Args:
        state: torchvision-layout state dict (NumPy arrays).
        model: the tfcovid model it is loaded into (its shapes are the reference).
        backbone: "vgg16" or "resnet18".
        require_head: True for a fine-tuned study checkpoint (import-torch): the head must be
            the study's and match exactly. False for starting weights (fit --weights FILE): a
            matching study head is loaded, anything else leaves the head freshly initialised.
        source: the file name, for messages.

    Raises:
        WeightsError: naming every missing/unexpected key and each shape mismatch.
    """
    layout = backbone_layout(model, backbone)
    root = HEAD_ROOT[backbone]
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    head_state = {k: v for k, v in state.items() if k == root or k.startswith(root + ".")}
    body = {k: v for k, v in state.items() if k not in head_state}

    expected = {key: (shape, kind) for entries in layout.values() for key, shape, kind in entries}
    missing = [k for k in expected if k not in body]
    unexpected = [k for k in body if k not in expected]
    mismatched = [k for k in expected if k in body and tuple(body[k].shape) != expected[k][0]]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match tfcovid's {backbone} (torchvision layout):"]
        lines += [f"  missing key {k}, expected shape {format_shape(expected[k][0])}" for k in missing[:10]]
        lines += [f"  unexpected key {k} with shape {format_shape(body[k].shape)}" for k in unexpected[:10]]
        lines += [f"  shape mismatch for {k}: checkpoint {format_shape(body[k].shape)}, model "
                  f"{format_shape(expected[k][0])}" for k in mismatched[:10]]
        hidden = max(0, len(missing) - 10) + max(0, len(unexpected) - 10) + max(0, len(mismatched) - 10)
        if hidden:
            lines.append(f"  ... and {hidden} more")
        found = _detect(state)
        if found in HEAD_ROOT and found != backbone:
            lines.append(f"The checkpoint looks like a {found} model: use --backbone {found}.")
        elif found not in HEAD_ROOT and found != "unknown":
            lines.append(f"The checkpoint looks like a {found}.")
        raise WeightsError("\n".join(lines))

    arrays = {name: [_to_keras(body[key], kind) for key, _, kind in entries]
              for name, entries in layout.items()}
    converted = Converted(arrays, "absent")
    _convert_head(head_state, model, backbone, root, require_head, source, converted)
    return converted


def _convert_head(head_state, model, backbone, root, require_head, source, converted) -> None:
    fc1, logits = (model.get_layer(name) for name in HEAD_LAYERS)
    want_fc1 = tuple(fc1.kernel.shape)  # (in, units) in Keras
    want_logits = tuple(logits.kernel.shape)  # (units, n)
    # VGG16's feature map before the flatten, (N, H, W, 512): its side must be 7 (see above).
    features = model.get_layer("head_flatten").input.shape if backbone == "vgg16" else None
    linears = _head_linears(head_state, root, source) if head_state else []
    imagenet = bool(linears) and linears[-1][1].shape[0] == 1000

    if not linears or imagenet:
        what = "the ImageNet classifier (1000 classes)" if imagenet else "no classifier"
        if require_head:
            raise WeightsError(
                f"{source} has {what}, not the study's fine-tuned head ({root}: Linear -> ReLU -> "
                f"Linear, {want_logits[0]} hidden units). To fine-tune from its backbone use "
                "`tfcovid fit --weights FILE` instead of import-torch.")
        converted.head = "imagenet" if imagenet else "absent"
        if imagenet:
            dropped = ", ".join(f"{m} {format_shape(w.shape)}" for m, w, _ in linears)
            converted.notes.append(f"dropped the ImageNet classifier ({dropped}); fresh study head")
        return

    problems = []
    if len(linears) != 2:
        found = ", ".join(f"{m}.weight {format_shape(w.shape)}" for m, w, _ in linears)
        problems.append(f"the study's head has 2 Linear layers under {root}; found {len(linears)}: {found}")
    else:
        (m1, w1, b1), (m2, w2, b2) = linears
        units, n = want_logits
        in_torch = 512 * 7 * 7 if backbone == "vgg16" else want_fc1[0]
        if backbone == "vgg16" and tuple(features[1:3]) != (7, 7):
            problems.append(
                f"VGG16's head expects a 7x7x512 feature map (224-255 px inputs, as torchvision's "
                f"AdaptiveAvgPool2d((7, 7)) leaves it unchanged only then); this model's is "
                f"{features[1]}x{features[2]}x512: use --image-size 224")
        for key, got, want in ((f"{m1}.weight", w1.shape, (units, in_torch)),
                               (f"{m1}.bias", b1.shape, (units,)),
                               (f"{m2}.weight", w2.shape, (n, units)),
                               (f"{m2}.bias", b2.shape, (n,))):
            if tuple(got) != want:
                problems.append(f"shape mismatch for {key}: checkpoint {format_shape(got)}, model {format_shape(want)}")
    if problems:
        if require_head:
            outputs = any(f"{m2}.weight" in p or f"{m2}.bias" in p for p in problems)
            raise WeightsError(f"{source}: the head does not match the model:\n  " + "\n  ".join(problems)
                               + ("\n(--task binary needs 2 outputs, multilabel one per label.)" if outputs else ""))
        converted.head = "mismatch"
        converted.notes.append("the checkpoint's head was not loaded (" + "; ".join(problems)
                               + "); fresh study head")
        return
    kind = "linear_chw" if backbone == "vgg16" else "linear"
    converted.arrays[HEAD_LAYERS[0]] = [_to_keras(w1, kind), b1]
    converted.arrays[HEAD_LAYERS[1]] = [_to_keras(w2, "linear"), b2]
    converted.head = "study"


def _to_keras(value: np.ndarray, kind: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float32)
    if kind == "conv":
        return value.transpose(2, 3, 1, 0)
    if kind == "linear":
        return value.T
    if kind == "linear_chw":
        # Input columns are ordered (C, H, W) by torch.flatten; Keras's Flatten gives (H, W, C).
        units, size = value.shape
        channels = 512
        side = int(round((size // channels) ** 0.5))
        return (value.reshape(units, channels, side, side).transpose(2, 3, 1, 0)
                .reshape(side * side * channels, units))
    return value


def _require_torch_for(spec: ImagenetFile | None) -> None:
    # Fail before a 45 MB download that could not be read anyway.
    try:
        import torch  # noqa: F401
    except ImportError:

        raise WeightsError(
            f"The ImageNet weights for ResNet18 are torchvision's {spec.fname} ({spec.url}). "
            + install_torch_hint(spec.fname) + " Then pass --weights OUT.safetensors.") from None
