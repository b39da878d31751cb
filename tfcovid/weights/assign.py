"""Arrays onto Keras layers: the shape checks and the error every weights reader shares.
"""
from __future__ import annotations

import numpy as np

from tfcovid.models.heads import HEAD_PREFIX


class WeightsError(RuntimeError):
    """Weights could not be found or loaded; the message says which file and what to do."""


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
