"""DenseNet121, EfficientNetV2-B0 and ConvNeXt-Tiny from keras.applications, built on the caller's
(preprocessed) tensor.

tfcovid's ``Preprocess`` layer is the one normalisation of every model (``model.preprocessing``),
so the backbones' own (``include_preprocessing``: EfficientNetV2's Rescaling + Normalization,
ConvNeXt's PreStem) are left out; for their ImageNet weights both are "torch" (ImageNet mean/std on
[0, 255] pixels), as is DenseNet's ``preprocess_input``. A test checks each against Keras's own.
"""

from __future__ import annotations

import keras


def densenet121_features(x, weights: str | None = None):
    """Return DenseNet121's last feature map (after its final BatchNorm + ReLU) for tensor ``x``."""
    base = keras.applications.DenseNet121(include_top=False, weights=weights, input_tensor=x)
    return base.output


def efficientnetv2_b0_features(x, weights: str | None = None):
    """Return EfficientNetV2-B0's last feature map (``top_activation``, 1280 channels)."""
    base = keras.applications.EfficientNetV2B0(include_top=False, weights=weights, input_tensor=x,
                                               include_preprocessing=False)
    return base.output


CONVNEXT_NORM = "convnext_tiny_layernorm"


def convnext_tiny_features(x, weights: str | None = None):
    """Return ConvNeXt-Tiny's last feature map after its final LayerNormalization.

    keras.applications leaves that LayerNormalization unnamed, so its name would change with every
    model built in a process (``layer_normalization_3``) and files could not be matched by name: an
    identical layer named ``convnext_tiny_layernorm`` replaces it, holding the same weights.
    """
    base = keras.applications.ConvNeXtTiny(include_top=False, weights=weights, input_tensor=x,
                                           include_preprocessing=False)
    keras_norm = base.layers[-1]
    norm = keras.layers.LayerNormalization(epsilon=keras_norm.epsilon, name=CONVNEXT_NORM)
    features = norm(keras_norm.input)
    norm.set_weights(keras_norm.get_weights())
    return features
