"""Reading Keras files: .keras models (safely), Keras 3 .weights.h5, legacy .h5.

Each weights reader returns ``{layer name: [arrays in layer.weights order]}`` for
:func:`tfcovid.weights.assign`, which checks every layer and shape.

tfcovid never runs code from a model file. A ``.keras`` file's ``config.json`` can carry Python
in a ``Lambda`` layer (marshalled bytecode, or a reference to a function); Keras's safe mode
refuses the bytecode, but a process-wide ``keras.config.enable_unsafe_deserialization()`` turns
that off for every later load. So :func:`load_model` reads the config itself first and refuses
any Lambda layer, then loads with ``safe_mode=True``.
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import keras
import numpy as np

from tfcovid.weights.assign import WeightsError, format_shape, weighted_layers

# Config entries that carry Python code: a Lambda layer, and the marshalled bytecode of a lambda.
CODE_CLASSES = ("Lambda", "__lambda__")


def _nodes(node):
    """Every dict in a parsed config.json, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


def _config_of(node: dict) -> dict:
    # A hostile or damaged file may put anything here; never let it raise AttributeError.
    config = node.get("config")
    return config if isinstance(config, dict) else {}


def read_config(path: str | Path, error: type[Exception] = WeightsError) -> dict:
    """The parsed ``config.json`` of a .keras file, refused when it carries Python code.

    Raises:
        error: the file is not a readable .keras archive, or it holds a Lambda layer.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read("config.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"Could not load the Keras model {path}: it is not a readable .keras "
                    f"archive ({err}).") from None
    found = [node for node in _nodes(config) if node.get("class_name") in CODE_CLASSES]
    lambdas = sorted({str(_config_of(node).get("name", "?")) for node in found
                      if node["class_name"] == "Lambda"})
    if found:
        what = f"Lambda layer {', '.join(lambdas)}" if lambdas else "a marshalled Python lambda"
        raise error(unsafe_message(path, what))
    return config


def unsafe_message(path: str | Path, what: str) -> str:
    """Why a model file with code in it is refused, and what to do instead."""
    return (f"Refused to load {path}: it holds Python code ({what}), and tfcovid never runs code "
            "from model files (Keras safe mode). Use a model written by `tfcovid fit` or "
            "`tfcovid import-torch`, or rebuild this one without Lambda layers.")


def load_model(path: str | Path, error: type[Exception] = WeightsError, compile: bool = False) -> keras.Model:
    """Load a .keras model without running code from it (uncompiled unless ``compile``).

    Raises:
        error: the file is unreadable, not a Keras model, or holds Python code.
    """
    read_config(path, error)  # refuses Lambda layers even if safe mode was turned off globally
    try:
        return keras.models.load_model(path, compile=compile, safe_mode=True)
    except Exception as err:  # Keras raises several types for damaged or foreign files
        if "safe_mode" in str(err):  # any other construct Keras's safe mode refuses
            raise error(unsafe_message(path, str(err).split(".")[0])) from None
        raise error(f"Could not load the Keras model {path}: {err}") from None


def preprocessing_of(path: Path) -> str | None:
    """The Preprocess layer's mode recorded in a .keras file's config, if any."""
    modes = [_config_of(node).get("mode") for node in _nodes(read_config(path))
             if node.get("class_name") == "Preprocess"]
    return modes[0] if modes else None


def _snake(name: str) -> str:
    # keras.src.utils.naming.to_snake_case: how Keras names a layer's group in a .weights.h5.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _layer_keys(layers) -> dict:
    """{group name in a .weights.h5: layer}: the class in snake case, numbered per class."""
    keys, used = {}, {}
    for layer in layers:
        key = _snake(type(layer).__name__)
        used[key] = used.get(key, -1) + 1
        keys[key if used[key] == 0 else f"{key}_{used[key]}"] = layer
    return keys


def _group_arrays(group, layer=None) -> list:
    """One layer's arrays from its .weights.h5 group, in ``layer.weights`` order; a nested model
    (ConvNeXt's stem and downsampling blocks are Sequential) keeps them in its own layers' groups."""
    values = [group["vars"][str(i)][()] for i in range(len(group["vars"]))] if group.get("vars") is not None else []
    if not values and isinstance(layer, keras.Model) and group.get("layers") is not None:
        inner = group["layers"]
        return [a for key, sub in _layer_keys(layer.layers).items() if key in inner
                for a in _group_arrays(inner[key], sub)]
    return values


def weights_h5_arrays(path: Path, model) -> dict[str, list]:
    """Read a Keras 3 ``.weights.h5`` for ``model``.

    Such files name each layer's group by its class and position (``conv2d_3``), not by the
    layer's name, in the order of ``model.layers``; so the file must come from the same backbone.
    """
    import h5py

    keys = _layer_keys(model.layers)
    arrays, problems = {}, []
    with h5py.File(path, "r") as f:
        groups = f["layers"]
        found = {key: _group_arrays(groups[key], keys.get(key)) for key in groups}
        # keras.applications' classifier (VGG16: fc1, fc2, predictions; ResNet50: predictions)
        # is saved as dense, dense_1, ...: with a 1000-class output, all of them are that top,
        # returned under keras.applications' names so the caller drops them and says so.
        dense = sorted((k for k in found if re.fullmatch(r"dense(_[0-9]+)?", k)),
                       key=lambda k: int(k.split("_")[1]) if "_" in k else 0)
        if dense and found[dense[-1]] and found[dense[-1]][-1].shape == (1000,):
            names = [f"fc{i + 1}" for i in range(len(dense) - 1)] + ["predictions"]
            for key, name in zip(dense, names):
                arrays[name] = found.pop(key)
        for key, values in found.items():
            layer = keys.get(key)
            if layer is None or not layer.weights:
                if values:
                    problems.append(f"unexpected {key} ({', '.join(format_shape(v.shape) for v in values)})")
                continue
            arrays[layer.name] = values
    if problems:
        raise WeightsError(f"{path} was not saved from a {model.name} model: "
                           + "; ".join(problems[:8]) + ". A .weights.h5 names layers by position, so it "
                           "must come from the same backbone; use that run's .keras checkpoint, or a "
                           "legacy .h5 (matched by layer name), instead.")
    return arrays


def _legacy_attr(group, name: str) -> list[str]:
    # Keras splits long attribute lists into name0, name1, ... (HDF5's 64 KB attribute limit).
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values += list(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def legacy_h5_arrays(path: Path) -> dict[str, list]:
    """Read a legacy Keras ``.h5`` (keras.applications weights, or ``model.save('x.h5')``) by layer name."""
    import h5py

    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f and "layer_names" not in f.attrs else f
        arrays = {}
        for name in _legacy_attr(root, "layer_names"):
            weight_names = _legacy_attr(root[name], "weight_names")
            if weight_names:
                arrays[name] = [np.asarray(root[name][w]) for w in weight_names]
    return arrays


def model_arrays(path: Path) -> dict[str, list]:
    """Read a ``.keras`` model's weights by layer name (the model is loaded safely)."""
    source = load_model(path)
    return {name: layer.get_weights() for name, layer in weighted_layers(source).items()}
