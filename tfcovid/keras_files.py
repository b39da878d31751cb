"""Reading Keras weight files by layer: .keras models, Keras 3 .weights.h5, legacy .h5.

Each reader returns ``{layer name: [arrays in layer.weights order]}`` for
:func:`tfcovid.weights.assign`, which checks every layer and shape.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import keras
import numpy as np

from tfcovid.weights import WeightsError, format_shape, weighted_layers


def preprocessing_of(path: Path) -> str | None:
    """The Preprocess layer's mode recorded in a .keras file's config, if any."""
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read("config.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise WeightsError(f"{path} is not a readable .keras model: {err}") from None
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "Preprocess":
                found.append(node.get("config", {}).get("mode"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found[0] if found else None


def _snake(name: str) -> str:
    # keras.src.utils.naming.to_snake_case: how Keras names a layer's group in a .weights.h5.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def weights_h5_arrays(path: Path, model) -> dict[str, list]:
    """Read a Keras 3 ``.weights.h5`` for ``model``.

    Such files name each layer's group by its class and position (``conv2d_3``), not by the
    layer's name, in the order of ``model.layers``; so the file must come from the same backbone.
    """
    import h5py

    keys, used = {}, {}
    for layer in model.layers:
        key = _snake(type(layer).__name__)
        used[key] = used.get(key, -1) + 1
        keys[key if used[key] == 0 else f"{key}_{used[key]}"] = layer
    arrays, problems = {}, []
    with h5py.File(path, "r") as f:
        groups = f["layers"]
        for key in groups:
            vars_ = groups[key].get("vars")
            values = [vars_[str(i)][()] for i in range(len(vars_))] if vars_ is not None else []
            layer = keys.get(key)
            if layer is None or not layer.weights:
                if values:
                    problems.append(f"unexpected {key} ({', '.join(format_shape(v.shape) for v in values)})")
                continue
            arrays[layer.name] = values
    if problems:
        raise WeightsError(f"{path} was not saved from a {model.name} model: "
                           + "; ".join(problems[:8]) + ". Use the run's .keras checkpoint instead.")
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
    try:
        source = keras.models.load_model(path, compile=False)
    except Exception as err:  # Keras raises several types for damaged or foreign files
        raise WeightsError(f"Could not load the Keras model {path}: {err}") from None
    return {name: layer.get_weights() for name, layer in weighted_layers(source).items()}
