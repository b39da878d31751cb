"""Freeze policies: ``all`` (head only), ``none``, ``firstN`` (the first N Conv2D layers).

"First N" counts Conv2D layers in the model's forward (topological) order; for VGG16, first7 is
block1_conv1 ... block3_conv3. A BatchNormalization that directly follows a frozen Conv2D is
frozen with it. In Keras 3 a non-trainable BatchNormalization runs in inference mode (moving
statistics, no updates). The study's PyTorch code froze parameters with requires_grad=False
but kept BatchNorm in training mode, so its frozen ResNet18 still updated running statistics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import keras
import numpy as np


@dataclass(frozen=True)
class FreezeSummary:
    """What a freeze policy did, for the start-of-run log and config checks."""

    policy: str
    frozen_layers: tuple[str, ...]
    trainable_params: int
    total_params: int

    def describe(self) -> str:
        """One line: policy, frozen layers and trainable/total parameter counts."""
        if not self.frozen_layers:
            frozen = "nothing frozen"
        elif len(self.frozen_layers) <= 4:
            frozen = "frozen: " + ", ".join(self.frozen_layers)
        else:
            frozen = (f"{len(self.frozen_layers)} layers frozen: {self.frozen_layers[0]} ... "
                      f"{self.frozen_layers[-1]}")
        return (f"Freeze '{self.policy}' ({frozen}); trainable parameters "
                f"{self.trainable_params:,} of {self.total_params:,}")


def _bn_moving_stats(model) -> list:
    return [w for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
            for w in (layer.moving_mean, layer.moving_variance)]


def _all_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def count_parameters(model, trainable_only: bool = False) -> int:
    """Parameter count as PyTorch reports it: BatchNorm moving statistics are buffers, not parameters."""
    if trainable_only:
        return int(sum(np.prod(w.shape) for w in model.trainable_weights))
    stats = {id(w) for w in _bn_moving_stats(model)}
    return int(sum(np.prod(w.shape) for w in model.weights if id(w) not in stats))


def _producer(tensor):
    history = getattr(tensor, "_keras_history", None)
    return history[0] if history else None


def apply_freeze(model: keras.Model, policy: str, is_head=lambda layer: False) -> FreezeSummary:
    """Set ``trainable`` on every layer of ``model`` per ``policy`` and return what was done.

    Args:
        model: a model from ``build_model``.
        policy: "all" (freeze the whole backbone, train the head), "none", or "firstN".
        is_head: predicate for head layers, which always stay trainable.
    """
    layers = [layer for layer in _all_layers(model) if layer.weights]
    backbone = [layer for layer in layers if not is_head(layer)]
    match = re.fullmatch(r"first([1-9][0-9]*)", policy)
    if policy == "all":
        frozen = backbone
    elif policy == "none":
        frozen = []
    elif match:
        n = int(match.group(1))
        convs = [layer for layer in backbone if isinstance(layer, keras.layers.Conv2D)]
        if n > len(convs):
            raise ValueError(
                f"Freeze policy {policy!r} asks for {n} conv layers but {model.name} has "
                f"{len(convs)}. Use first1 ... first{len(convs)}, all or none."
            )
        frozen_convs = set(id(c) for c in convs[:n])
        frozen = [layer for layer in backbone if id(layer) in frozen_convs or (
            isinstance(layer, keras.layers.BatchNormalization)
            and id(_producer(layer.input)) in frozen_convs)]
    else:
        raise ValueError(f"Unknown freeze policy {policy!r}. Valid policies: all, none, firstN (e.g. first7).")
    frozen_ids = {id(layer) for layer in frozen}
    for layer in layers:
        layer.trainable = id(layer) not in frozen_ids
    return FreezeSummary(
        policy=policy,
        frozen_layers=tuple(layer.name for layer in frozen),
        trainable_params=count_parameters(model, trainable_only=True),
        total_params=count_parameters(model),
    )
