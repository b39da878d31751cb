"""Model registry: one name -> one builder. ``build_model`` assembles preprocess + backbone + head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras

from tfcovid.models.applications import (
    CONVNEXT_NORM,
    convnext_tiny_features,
    densenet121_features,
    efficientnetv2_b0_features,
)
from tfcovid.models.heads import HEAD_PREFIX, head
from tfcovid.models.preprocess import Preprocess
from tfcovid.models.resnet import resnet18_features
from tfcovid.models.vgg import resnet50_features, vgg16_features


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone and what its weights and head need."""

    name: str
    features: Callable  # (tensor, keras_weights) -> feature map
    pooling: str  # the study's head: "flatten" for VGG, "avg" for ResNets
    imagenet_preprocessing: str  # preprocessing mode matching its ImageNet weights
    keras_imagenet: bool  # True when keras.applications ships the ImageNet weights
    min_size: int
    gradcam_layer: str  # last conv block output, Grad-CAM's default target
    # --freeze stagesN: the name prefixes of each stage's weighted layers, in forward order; the
    # stem goes with the first stage and the layers after the last block with the last, so
    # stages<all> freezes what "all" does (a test checks that they split the backbone exactly).
    stages: tuple[tuple[str, ...], ...] = ()
    # A keras.applications .h5 (--weights FILE.h5) is loaded by keras.applications itself, which
    # matches layers by order: these files' layer names differ from Keras 3's (DenseNet's
    # "conv1/conv", ConvNeXt's unnamed final LayerNormalization).
    h5_by_order: bool = False


def _blocks(*prefixes: str) -> tuple[tuple[str, ...], ...]:
    return tuple((p,) for p in prefixes)


_CONVNEXT_STAGES = (("convnext_tiny_stem", "convnext_tiny_stage_0_"),) + tuple(
    (f"convnext_tiny_downsampling_layernorm_{i}", f"convnext_tiny_downsampling_conv_{i}",
     f"convnext_tiny_stage_{i + 1}_") for i in range(3))


BACKBONES = {
    b.name: b
    for b in (
        Backbone("vgg16", vgg16_features, "flatten", "caffe", True, 32, "block5_conv3",
                 _blocks("block1_", "block2_", "block3_", "block4_", "block5_")),
        Backbone("resnet18", lambda x, w=None: resnet18_features(x), "avg", "torch", False, 16,
                 "layer4_1_out", (("conv1", "bn1", "layer1_"),) + _blocks("layer2_", "layer3_", "layer4_")),
        Backbone("resnet50", resnet50_features, "avg", "caffe", True, 32, "conv5_block3_out",
                 (("conv1_", "conv2_"),) + _blocks("conv3_", "conv4_", "conv5_")),
        # Stages: the four dense blocks, each with the transition after it (pool2 ... pool4).
        Backbone("densenet121", densenet121_features, "avg", "torch", True, 32, "relu",
                 (("conv1_", "conv2_", "pool2_"), ("conv3_", "pool3_"), ("conv4_", "pool4_"),
                  ("conv5_", "bn")), h5_by_order=True),
        # Stages: the six block groups (block1a ... block6h); top_conv goes with the last.
        Backbone("efficientnetv2_b0", efficientnetv2_b0_features, "avg", "torch", True, 32,
                 "top_activation", (("stem_", "block1"),) + _blocks("block2", "block3", "block4",
                                                                    "block5") + (("block6", "top_"),),
                 h5_by_order=True),
        # Stages: the four stages, each with the downsampling block before it.
        Backbone("convnext_tiny", convnext_tiny_features, "avg", "torch", True, 32,
                 CONVNEXT_NORM, _CONVNEXT_STAGES[:3] + ((*_CONVNEXT_STAGES[3], CONVNEXT_NORM),),
                 h5_by_order=True),
    )
}


def get_backbone(name: str) -> Backbone:
    """Look up a backbone; an unknown name lists the valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}. Valid backbones: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name]


def build_model(
    backbone: str,
    num_outputs: int,
    image_size: int,
    preprocessing: str = "torch",
    keras_weights: str | None = None,
    head_units: int = 110,
    name: str | None = None,
) -> keras.Model:
    """Build the classifier: raw [0, 255] RGB pixels in, float32 logits out.

    Args:
        backbone: a name from BACKBONES.
        num_outputs: 2 for the binary task, the number of labels for the multilabel task.
        image_size: square input side in pixels.
        preprocessing: "caffe", "torch" or "none" (see Preprocess).
        keras_weights: passed to keras.applications ("imagenet" or a notop .h5 path) for the
            backbones it ships; None for random initialisation.
        head_units: hidden units of the study's head.
        name: model name; defaults to ``tfcovid_<backbone>``.
    """
    spec = get_backbone(backbone)
    if image_size < spec.min_size:
        raise ValueError(
            f"Image size {image_size} is too small for {backbone}: use at least {spec.min_size} px."
        )
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = Preprocess(preprocessing, name="preprocess")(inputs)
    features = spec.features(x, keras_weights)
    logits = head(features, num_outputs, spec.pooling, head_units)
    return keras.Model(inputs, logits, name=name or f"tfcovid_{backbone}")


def init_like_torchvision(model: keras.Model, seed: int | None = None) -> int:
    """Re-initialise backbone convolutions as torchvision does: He normal (fan_out), zero bias.

    For training from scratch. keras.applications' conv layers default to Glorot uniform, with
    which the plain 13-conv VGG16 shrinks its signal by about 2^-6 and can sit at chance for
    many epochs; torchvision's (and so the study's PyTorch code's) initialisation keeps the
    activations' scale through the ReLUs. Returns the number of layers re-initialised.
    """
    init = keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal", seed=seed)
    convs = [layer for layer in model.layers
             if isinstance(layer, keras.layers.Conv2D) and not is_head_layer(layer)]
    for layer in convs:
        layer.kernel.assign(init(layer.kernel.shape, dtype=layer.kernel.dtype))
        if layer.bias is not None:
            layer.bias.assign(keras.ops.zeros(layer.bias.shape, dtype=layer.bias.dtype))
    return len(convs)


def is_head_layer(layer) -> bool:
    """True for the study's head layers (trainable under every freeze policy)."""
    return layer.name.startswith(HEAD_PREFIX)
