"""FLOPs per image from a model's Conv2D and Dense layers, for achieved TFLOP/s."""
from __future__ import annotations

import keras
import numpy as np


def _macs(layer) -> int:
    """Multiply-accumulates per image of one Conv2D/DepthwiseConv2D/Dense layer, else 0."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        h, w, c = layer.output.shape[1:4]
        kh, kw = layer.kernel_size
        return int(h * w * c * kh * kw)
    if isinstance(layer, keras.layers.Conv2D):
        h, w, c_out = layer.output.shape[1:4]
        kh, kw = layer.kernel_size
        c_in = layer.input.shape[-1] // layer.groups
        return int(h * w * c_out * kh * kw * c_in)
    if isinstance(layer, keras.layers.Dense):
        positions = int(np.prod(layer.input.shape[1:-1])) if len(layer.input.shape) > 2 else 1
        return int(positions * layer.input.shape[-1] * layer.units)
    return 0


def model_flops(model: keras.Model) -> dict:
    """FLOPs per image from the Conv2D and Dense layers' shapes (2 FLOPs per multiply-add).

    Training counts the forward pass, the gradient with respect to the weights of trainable
    layers, and the gradient with respect to the input of layers that have a trainable layer
    before them (frozen early layers need no backward pass at all). BatchNorm, activations and
    pooling are left out (a few percent).

    Returns:
        {"forward_macs", "forward_flops", "train_flops"} per image.
    """
    macs = trainable_before = 0
    train = 0
    for layer in _layers(model):
        m = _macs(layer)
        if not m:
            trainable_before |= bool(layer.trainable_weights)
            continue
        macs += m
        train += 2 * m  # forward
        if layer.trainable_weights:
            train += 2 * m  # weight gradient
        if trainable_before:
            train += 2 * m  # input gradient, needed by the trainable layers below
        trainable_before |= bool(layer.trainable_weights)
    return {"forward_macs": macs, "forward_flops": 2 * macs, "train_flops": train}


def _layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer
