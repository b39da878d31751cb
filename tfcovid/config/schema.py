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


BACKBONES = ("vgg16", "resnet18", "resnet50")


LOSSES = ("ce", "bce", "focal")


OPTIMIZERS = ("sgd", "adam")


PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


STRATEGIES = ("auto", "one", "mirrored", "multiworker")


PREPROCESSING = ("auto", "caffe", "torch", "none")


JIT_COMPILE = ("auto", "true", "false")


CACHES = ("auto", "memory", "disk", "none")


CALIBRATIONS = ("none", "temperature")  # train.calibrate (results/calibration.py)


# The smallest input side each backbone takes, found by building the models at decreasing sizes.
# VGG16: five 2x2 max-pools and a Flatten head, so 32 px leaves a 1x1 map and 31 px a zero-size
# one (a structural limit). The ResNets pad before every strided conv and pool globally, so they
# build down to 1 px; below one stride-32 cell their last blocks see mostly padding. 16 (ResNet18)
# and 32 (ResNet50, keras.applications' documented minimum) are the floors tfcovid.models
# enforces; a test keeps the two tables equal.
MIN_IMAGE_SIZE = {"vgg16": 32, "resnet18": 16, "resnet50": 32}


# Conv2D layers in each backbone, in the order ``--freeze firstN`` counts them (shortcut
# convolutions included); a test builds the models and keeps the table equal to them.
CONV_LAYERS = {"vgg16": 13, "resnet18": 20, "resnet50": 53}


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
    freeze: str = "none"  # all | none | firstN
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
