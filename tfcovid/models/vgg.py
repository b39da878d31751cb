"""VGG16 from keras.applications, built on the caller's (preprocessed) tensor."""

from __future__ import annotations

import keras


def vgg16_features(x, weights: str | None = None):
    """Return VGG16's last pooled feature map for tensor ``x`` (layers shared with the caller's graph)."""
    base = keras.applications.VGG16(include_top=False, weights=weights, input_tensor=x)
    return base.output


def resnet50_features(x, weights: str | None = None):
    """Return keras.applications ResNet50's last feature map for tensor ``x``."""
    base = keras.applications.ResNet50(include_top=False, weights=weights, input_tensor=x)
    return base.output
