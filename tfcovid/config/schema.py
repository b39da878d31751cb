"""Experiment configuration: YAML + command-line overrides -> frozen, validated dataclasses.

A config file has up to four sections (``data``, ``augment``, ``model``, ``train``) plus the
top-level keys ``name`` and ``out``. Command-line flags override single keys by dotted name
(``train.lr``). Every key is checked: an unknown key or a bad value raises
:class:`ConfigError` naming the key, the value received and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from tfcovid.utils.text import plural

TASKS = ("binary", "multilabel")


# The study's VGG16 and ResNet18, ResNet50, and three later families (docs/beyond.md).
BACKBONES = ("vgg16", "resnet18", "resnet50", "densenet121", "efficientnetv2_b0", "convnext_tiny")


LOSSES = ("ce", "bce", "focal")


OPTIMIZERS = ("sgd", "adam")


PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


STRATEGIES = ("auto", "one", "mirrored", "multiworker")


PREPROCESSING = ("auto", "caffe", "torch", "none")


JIT_COMPILE = ("auto", "true", "false")


CACHES = ("auto", "memory", "disk", "none")


# How a label file's train/validation/test are formed (data.split; docs/own-data.md): patient
# keeps the splits the file gives and makes the missing ones by patient; given only keeps them.
SPLIT_MODES = ("patient", "given")


# Keys that say how the same pixels reach the model, not which: fit --resume may --set them (a
# run resumed on a host with less memory or a smaller GPU); the tests hold each to the same pixels.
RESUME_SETTABLE = ("data.cache", "data.cache_budget_mb", "data.device_cache_mb", "data.resample_processes")
MAX_DEVICE_CACHE_MB = 1 << 20  # data.device_cache_mb: 1 TiB, above any single accelerator's memory
MAX_FOLDS = 20  # data.folds: more folds than this leave validation splits too small to mean much


SCHEDULES = ("constant", "cosine", "step")  # train.schedule (docs/beyond.md#recipes)


# train.early_stopping: the validation metrics fit logs, by task ("none": no early stopping).
EARLY_STOPPING = {"binary": ("val_loss", "val_accuracy", "val_f1"),
                  "multilabel": ("val_loss", "val_jaccard", "val_f1")}


# How 16-bit PNG and TIFF samples become 8 bits (tfcovid.data.highbit, docs/dicom.md): "used"
# scales by the bits the image uses (sBIT or BitsPerSample < 16, else its largest value's). Recorded so a run says which rule.
HIGH_BIT = ("used",)


# data.sampling: the train split's order per epoch (data/sampling.py, docs/imbalance.md).
SAMPLINGS = ("natural", "balanced")


# train.class_weight's names; a mapping {class or label: weight} is the third form.
CLASS_WEIGHTS = ("none", "balanced")


# Where the train augmentation's resampling runs (data.augment_on): auto is the device where a
# GPU or TPU trains, the CPU (OpenCV) otherwise.
AUGMENT_ON = ("auto", "cpu", "device")


CALIBRATIONS = ("none", "temperature")  # train.calibrate (results/calibration.py)


# The smallest input side each backbone takes, found by building the models at decreasing sizes.
# VGG16: five 2x2 max-pools and a Flatten head, so 32 px leaves a 1x1 map and 31 px a zero-size
# one (a structural limit). The ResNets pad before every strided conv and pool globally, so they
# build down to 1 px; below one stride-32 cell their last blocks see mostly padding. 16 (ResNet18)
# and 32 (ResNet50, keras.applications' documented minimum) are the floors tfcovid.models
# enforces; a test keeps the two tables equal. DenseNet121 (2x2 average pools) and ConvNeXt-Tiny
# ("valid" 4x4 then three 2x2 strided convs) are structurally 32 px; EfficientNetV2 pads ("same")
# and would build smaller, but keras.applications refuses below 32 px for all three.
MIN_IMAGE_SIZE = {"vgg16": 32, "resnet18": 16, "resnet50": 32, "densenet121": 32, "efficientnetv2_b0": 32,
                  "convnext_tiny": 32}


# Convolutions in each backbone, in the order ``--freeze firstN`` counts them (shortcut, grouped
# and depthwise convolutions included: EfficientNetV2-B0 has 75 Conv2D + 16 DepthwiseConv2D,
# ConvNeXt-Tiny's 18 depthwise convs are grouped Conv2D); a test keeps the table equal to the models.
CONV_LAYERS = {"vgg16": 13, "resnet18": 20, "resnet50": 53, "densenet121": 120, "efficientnetv2_b0": 91,
               "convnext_tiny": 22}


# Stages of each backbone for ``--freeze stagesN`` (tfcovid.models' Backbone.stages; the stem
# goes with the first); a test keeps the table equal to the registry.
STAGES = {"vgg16": 5, "resnet18": 4, "resnet50": 4, "densenet121": 4, "efficientnetv2_b0": 6, "convnext_tiny": 4}


MAX_SEED = 2**31 - 1  # TensorFlow and NumPy seeds are 32-bit


# The study's Part 2 label scheme: COVID-19 is a pneumonia, so its folder sets both labels.
STUDY_LABELS = ("covid-19", "normal", "pneumonia")


STUDY_LABEL_MAP = {
    "covid-19": ("covid-19", "pneumonia"),
    "normal": ("normal",),
    "pneumonia": ("pneumonia",),
}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how labels are read from folder names."""

    dir: str = "demo"  # an ImageFolder tree, a `tfcovid prepare` output, or "demo"
    task: str = "binary"
    image_size: int = 224
    positive: str = "infected"  # the disease class of the binary task (its F1 is reported)
    labels: tuple[str, ...] = STUDY_LABELS  # multilabel output order
    label_map: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(STUDY_LABEL_MAP))
    demo_per_class: int = 200  # size of the generated demo set (train images per class)
    cache: str = "auto"  # decoded-image cache: auto | memory | disk | none
    cache_budget_mb: int = 2048
    # Train images are decoded (and cached) halved while their shorter side stays at least
    # decode_scale * image_size; 0 keeps full resolution. See tfcovid/pipeline.py.
    decode_scale: float = 2.0
    # Train images' OpenCV decode and resample (and their cache) in this many worker processes
    # (Linux); 0: threads of the training process. Processes scale where the threads' hand-overs
    # of Python's lock limit (many cores); see tfcovid/workers.py. auto: one per core but one on
    # hosts with 8 or more cores, threads below.
    resample_processes: str = "auto"
    # Files that cannot be used (broken, not an image, unreadable, outside a class folder):
    # false stops fit before the first step with the list; true leaves them out and lists them
    # in the run's skipped.txt.
    skip_bad: bool = False
    # Images with more pixels than this are refused (decompression-bomb guard; 8000x8000 = 64e6).
    max_pixels: int = 150_000_000
    # A `tfcovid prepare` output: check every shard's sha256 against its manifest before training
    # (~0.7 GB/s locally, docs/performance.md); false checks only their sizes.
    verify_records: bool = True
    # Train/validation/test from a label file (docs/own-data.md): patient | given.
    split: str = "patient"
    # The validation and test shares of the patients when data.split makes them (each 0.05-0.4).
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    # Cross-validation: K folds of the non-test patients (0: off; 2..MAX_FOLDS) and the fold
    # that is validation in this run (0..K-1).
    folds: int = 0
    fold: int = 0
    # Images with the same decoded pixels in two splits: false stops fit with the pairs listed;
    # true lets it train and lists them (the leakage report).
    allow_duplicates: bool = False
    # 16-bit PNGs and TIFFs to 8 bits (one of HIGH_BIT; docs/dicom.md): recorded in the run's config.yaml;
    # predict, evaluate and explain apply the same rule.
    high_bit: str = "used"
    # natural: each train image once per epoch; balanced: the epoch's slots drawn equally from
    # each class (binary) or class folder (three-label), seeded per (seed, epoch).
    sampling: str = "natural"
    # Where the train augmentation resamples: cpu (OpenCV, in tf.data), device (the planned affine
    # maps applied inside the compiled train step; docs/performance.md), or auto (device on a GPU/TPU).
    augment_on: str = "auto"
    # On the device path: the decoded train images (uint8, padded to one shape) stay in the
    # accelerator's memory when they take at most this many MB; above it, or at 0, they are
    # streamed in uint8 batches (docs/performance.md).
    device_cache_mb: int = 8192


@dataclass(frozen=True)
class AugmentConfig:
    """The study's train augmentation: RandomRotation -> RandomResizedCrop -> HorizontalFlip."""

    enabled: bool = True
    rotation: float = 30.0  # degrees, uniform in [-rotation, +rotation]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, its starting weights, the freeze policy and the head."""

    backbone: str = "vgg16"
    freeze: str = "none"  # all | none | firstN | stagesN
    weights: str = "imagenet"  # imagenet | none | path to a weights file
    preprocessing: str = "auto"  # follows the weights unless set
    head_units: int = 110


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, loss and the training loop's settings."""

    loss: str = "ce"
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    epochs: int = 12
    batch_size: int = 60  # global batch (all replicas together), as in the study
    focal_alpha: float | None = 0.25
    focal_gamma: float | None = 2.0
    # The study summed the focal loss over the batch (its lrs 1e-4 / 5e-5 assume that); "mean"
    # divides by the batch size, making the step size independent of it. BCE is always a mean.
    focal_reduction: str = "sum"
    threshold: float = 0.5
    # How the decision threshold(s) are set at the end of fit (config/operating_point.py):
    # "threshold" keeps train.threshold, the study's 0.5; youden, sensitivity:S, specificity:S
    # choose on the validation split (docs/operating-points.md).
    operating_point: str = "threshold"
    precision: str = "auto"
    strategy: str = "auto"
    jit_compile: str = "auto"  # auto | true | false
    steps_per_execution: int = 1
    seed: int = 0
    # Same seed, same machine -> same weights: TensorFlow's deterministic ops (slower). The
    # input pipeline is ordered either way, its shuffle and augmentation keyed on (seed, epoch,
    # image), so a resumed or repeated run sees the same batches in the same order.
    deterministic: bool = False
    # The learning rate per optimizer step: constant | cosine (to 0 at the last step) | step
    # (x step_gamma every step_epochs epochs), after warmup_epochs of linear warm-up from 0.
    schedule: str = "constant"
    warmup_epochs: int = 0
    step_epochs: int = 10
    step_gamma: float = 0.1
    # Stop when this validation metric (EARLY_STOPPING; "none": never) has not improved for
    # `patience` epochs; best.keras then follows it, and restore_best evaluates that epoch's model.
    early_stopping: str = "none"
    patience: int = 5
    restore_best: bool = True
    # Exponential moving average of the weights (Keras's optimizer use_ema): 0 off, e.g. 0.999;
    # the averaged weights are the ones validated, checkpointed, evaluated and exported.
    ema: float = 0.0
    # Bootstrap resamples of the 95 % intervals in metrics.json and evaluate (seeded with seed;
    # results/uncertainty.py); 0: no intervals. 100 to 100,000 otherwise.
    bootstrap_resamples: int = 1000
    # none | balanced (from the train split) | {class or label: weight}: the binary task's
    # per-class weights, the three-label task's per-label positive weights (docs/imbalance.md).
    class_weight: str | Mapping[str, float] = "none"
    # Temperature scaling of the logits, fitted on the validation split at the end of fit,
    # before the operating point is chosen: none (the study's) | temperature.
    calibrate: str = "none"


@dataclass(frozen=True)
class Experiment:
    """One training run, fully resolved; saved as the run directory's config.yaml."""

    name: str = ""
    out: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        """Plain YAML-ready dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        """Write the config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


NULLABLE = ("focal_alpha", "focal_gamma")  # null turns that focal term off


SECTIONS = {"data": DataConfig, "augment": AugmentConfig, "model": ModelConfig, "train": TrainConfig}


TOP_LEVEL = ("name", "out")


# The offline demo (`tfcovid fit` with no data): from-scratch training differs from the study's
# recipe where it must. Plain VGG16 from random weights barely moves under SGD 1e-3, so the demo
# uses Adam 5e-5 (with torchvision's He initialisation), a small image size and a milder crop so the synthetic lesions stay in view.
DEMO_PRESET = {
    "data": {"dir": "demo", "image_size": 48, "demo_per_class": 200},
    "augment": {"rotation": 10.0, "crop_scale": [0.5, 1.0]},
    "model": {"weights": "none"},
    "train": {"optimizer": "adam", "lr": 5e-5, "epochs": 10, "batch_size": 32},
}


# The three-label demo trains ResNet18: its BatchNorm lets it learn from scratch in a few epochs,
# at about a fifth of VGG16's cost. Measured on 2 shared CPU cores with focal loss: VGG16 (Adam
# 1e-4) sat at Jaccard 0 for 6 epochs and needed ~10 CPU-minutes for 12; ResNet18 (Adam 5e-4)
# ended at validation Jaccard 0.96 after 8 epochs, 4.6 min wall including data generation.
DEMO_MULTILABEL = {
    "data": {"demo_per_class": 160},
    "model": {"backbone": "resnet18"},
    "train": {"epochs": 8, "lr": 5e-4},
}


def describe_demo_preset(exp: Experiment) -> str:
    """The line `tfcovid fit` prints when the demo preset applies: what differs from the study."""
    t, a = exp.train, exp.augment
    part = "part1" if exp.data.task == "binary" else "part2"
    return (f"Demo preset (not the study's recipe): {exp.model.backbone} at {exp.data.image_size} px, "
            f"--weights {exp.model.weights}, {t.optimizer} lr {t.lr:g}, {plural(t.epochs, 'epoch')}, batch "
            f"{t.batch_size}, crop scale {a.crop_scale[0]:g}-{a.crop_scale[1]:g}, rotation "
            f"{a.rotation:g} deg. For the study: --config configs/{part}/<row>.yaml --data DIR.")


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
