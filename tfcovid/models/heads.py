"""The study's classification heads, exactly: 110 hidden units, then one logit per output."""

from __future__ import annotations

import keras

HEAD_PREFIX = "head_"


def head(features, num_outputs: int, pooling: str, units: int = 110):
    """Attach the study's head to backbone features and return float32 logits.

    Args:
        features: the backbone's last feature map (N, H, W, C).
        num_outputs: 2 for the binary task (softmax over 2 logits), the label count otherwise.
        pooling: "flatten" (VGG16: flatten -> Dense) or "avg" (ResNet: global average pool).
        units: hidden units; the study uses 110.
    """
    if pooling == "flatten":
        x = keras.layers.Flatten(name=HEAD_PREFIX + "flatten")(features)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name=HEAD_PREFIX + "avgpool")(features)
    else:
        raise ValueError(f"Unknown pooling type {pooling!r}. Valid types: flatten, avg.")
    x = keras.layers.Dense(units, activation="relu", name=HEAD_PREFIX + "fc1")(x)
    # Logits stay float32 under mixed precision so the loss and metrics are computed stably.
    return keras.layers.Dense(num_outputs, dtype="float32", name=HEAD_PREFIX + "logits")(x)
