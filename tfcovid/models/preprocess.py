"""The model's first layer: raw [0, 255] RGB pixels -> what the backbone's weights expect."""

from __future__ import annotations

import keras
from keras import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
MODES = ("caffe", "torch", "none")


@keras.saving.register_keras_serializable(package="tfcovid")
class Preprocess(keras.layers.Layer):
    """Normalise raw pixels inside the model, so every saved or exported model carries it.

    Args:
        mode: "caffe" (RGB->BGR, subtract the ImageNet mean; Keras VGG16/ResNet50 weights),
            "torch" (scale to [0, 1], ImageNet mean/std; torchvision weights) or "none".
    """

    def __init__(self, mode: str = "torch", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"Unknown preprocessing mode {mode!r}. Valid modes: {', '.join(MODES)}.")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor([255.0 * m for m in IMAGENET_MEAN], self.compute_dtype)
            std = ops.convert_to_tensor([255.0 * s for s in IMAGENET_STD], self.compute_dtype)
            return (x - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
