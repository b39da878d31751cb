"""ResNet18 in torchvision's layout, so torchvision weights load exactly.

keras.applications has no ResNet18. torchvision pads inside its convolutions; here each padded
convolution is an explicit ZeroPadding2D followed by a "valid" Conv2D, which computes the same
thing for any input size (Keras's "same" padding is asymmetric for stride 2 and would not).
BatchNorm uses PyTorch's epsilon 1e-5 and momentum 0.1 (Keras momentum 0.9). Layer names follow
torchvision's module names with "." replaced by "_" (``layer2.0.downsample.0`` ->
``layer2_0_downsample_0``), which is what the weight converter relies on.
"""

from __future__ import annotations

from keras import layers

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def _conv_bn(x, filters: int, kernel: int, stride: int, pad: int, conv_name: str, bn_name: str):
    if pad:
        x = layers.ZeroPadding2D(pad, name=conv_name + "_pad")(x)
    x = layers.Conv2D(filters, kernel, strides=stride, use_bias=False, name=conv_name)(x)
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=bn_name)(x)


def _basic_block(x, filters: int, stride: int, prefix: str):
    shortcut = x
    out = _conv_bn(x, filters, 3, stride, 1, f"{prefix}_conv1", f"{prefix}_bn1")
    out = layers.ReLU(name=f"{prefix}_relu1")(out)
    out = _conv_bn(out, filters, 3, 1, 1, f"{prefix}_conv2", f"{prefix}_bn2")
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(
            x, filters, 1, stride, 0, f"{prefix}_downsample_0", f"{prefix}_downsample_1"
        )
    out = layers.Add(name=f"{prefix}_add")([out, shortcut])
    return layers.ReLU(name=f"{prefix}_out")(out)


def resnet18_features(x):
    """Return ResNet18's last feature map (N, H/32, W/32, 512) for tensor ``x``."""
    x = _conv_bn(x, 64, 7, 2, 3, "conv1", "bn1")
    x = layers.ReLU(name="relu")(x)
    # torchvision pads the max-pool with -inf; after a ReLU every value is >= 0, so zeros are
    # equivalent.
    x = layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
    for stage, (filters, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for block in range(2):
            x = _basic_block(x, filters, stride if block == 0 else 1, f"layer{stage}_{block}")
    return x
