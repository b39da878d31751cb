"""Freeze policies: ``all`` (head only), ``none``, ``firstN`` (up to the N-th convolution) and
``stagesN`` (the first N stages of the backbone, as the registry names them).

"First N" counts convolutions (Conv2D, grouped ones such as ConvNeXt's depthwise convs included,
and DepthwiseConv2D, EfficientNet's) in the model's forward (topological) order and freezes every
weighted layer up to the N-th, plus the normalisation directly after it; for VGG16, first7 is
block1_conv1 ... block3_conv3, for ResNets each conv with its BatchNorm (the rule of the study's
models, where every weighted layer is a conv or the BatchNorm right after one). Layers between
convs (DenseNet's pre-activation BatchNorms, ConvNeXt's pointwise Dense layers) go with the conv
before them. In Keras 3 a non-trainable BatchNormalization runs in inference mode (moving
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


# What ``firstN`` counts; Keras 3's DepthwiseConv2D is not a Conv2D subclass.
CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


NORMALIZATIONS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)


def _first_n(backbone: list, n: int, policy: str, model_name: str) -> list:
    """The layers ``firstN`` freezes: every weighted layer up to the N-th convolution, and the
    normalisation fed directly by a frozen convolution."""
    convs = [layer for layer in backbone if isinstance(layer, CONVOLUTIONS)]
    if n > len(convs):
        raise ValueError(
            f"Freeze policy {policy!r} asks for {n} conv layers but {model_name} has "
            f"{len(convs)}. Use first1 ... first{len(convs)}, all or none."
        )
    last = backbone.index(convs[n - 1])
    frozen_convs = {id(c) for c in convs[:n]}
    return [layer for i, layer in enumerate(backbone) if i <= last or (
        isinstance(layer, NORMALIZATIONS) and id(_producer(layer.input)) in frozen_convs)]


def _first_stages(backbone: list, n: int, policy: str, model_name: str, stages) -> list:
    """The layers ``stagesN`` freezes: those named with a prefix of one of the first N stages."""
    if not stages or n > len(stages):
        raise ValueError(
            f"Freeze policy {policy!r} asks for {n} stages but {model_name} has {len(stages)}. "
            + (f"Use stages1 ... stages{len(stages)}, all or none." if stages else "Use firstN, all or none."))
    prefixes = tuple(p for stage in stages[:n] for p in stage)
    return [layer for layer in backbone if layer.name.startswith(prefixes)]


def apply_freeze(model: keras.Model, policy: str, is_head=lambda layer: False, stages=()) -> FreezeSummary:
    """Set ``trainable`` on every layer of ``model`` per ``policy`` and return what was done.

    Args:
        model: a model from ``build_model``.
        policy: "all" (freeze the whole backbone, train the head), "none", "firstN" or "stagesN".
        is_head: predicate for head layers, which always stay trainable.
        stages: the backbone's stages for "stagesN" (``Backbone.stages``: name prefixes per stage).
    """
    layers = [layer for layer in _all_layers(model) if layer.weights]
    backbone = [layer for layer in layers if not is_head(layer)]
    match = re.fullmatch(r"(first|stages)([1-9][0-9]*)", policy)
    if policy == "all":
        frozen = backbone
    elif policy == "none":
        frozen = []
    elif match and match.group(1) == "first":
        frozen = _first_n(backbone, int(match.group(2)), policy, model.name)
    elif match:
        frozen = _first_stages(backbone, int(match.group(2)), policy, model.name, stages)
    else:
        raise ValueError(f"Unknown freeze policy {policy!r}. Valid policies: all, none, firstN (e.g. first7), "
                         "stagesN (e.g. stages2).")
    frozen_ids = {id(layer) for layer in frozen}
    for layer in layers:
        layer.trainable = id(layer) not in frozen_ids
    return FreezeSummary(
        policy=policy,
        frozen_layers=tuple(layer.name for layer in frozen),
        trainable_params=count_parameters(model, trainable_only=True),
        total_params=count_parameters(model),
    )
