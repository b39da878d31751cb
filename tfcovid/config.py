"""Experiment configuration: YAML + command-line overrides -> frozen, validated dataclasses.

A config file has up to four sections (``data``, ``augment``, ``model``, ``train``) plus the
top-level keys ``name`` and ``out``. Command-line flags override single keys by dotted name
(``train.lr``). Every key is checked: an unknown key or a bad value raises
:class:`ConfigError` naming the key, the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

TASKS = ("binary", "multilabel")
BACKBONES = ("vgg16", "resnet18", "resnet50")
LOSSES = ("ce", "bce", "focal")
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "one", "mirrored", "multiworker")
PREPROCESSING = ("auto", "caffe", "torch", "none")
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
    precision: str = "auto"
    strategy: str = "auto"
    jit_compile: str = "auto"  # auto | true | false
    steps_per_execution: int = 1
    seed: int = 0
    # Same seed, same machine -> same weights: TensorFlow's deterministic ops and an ordered
    # input pipeline (slower). Shuffling and augmentation are keyed on (seed, epoch, image)
    # either way, so a resumed run sees the batches an uninterrupted one would have.
    deterministic: bool = False


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
            f"--weights {exp.model.weights}, {t.optimizer} lr {t.lr:g}, {t.epochs} epochs, batch "
            f"{t.batch_size}, crop scale {a.crop_scale[0]:g}-{a.crop_scale[1]:g}, rotation "
            f"{a.rotation:g} deg. For the study: --config configs/{part}/<row>.yaml --data DIR.")


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def merge(base: dict, update: Mapping, where: str = "config") -> dict:
    """Deep-merge ``update`` into a copy of ``base``, rejecting unknown sections and keys."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in update.items():
        if key in TOP_LEVEL:
            out[key] = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: section '{key}' must be a mapping, got {value!r}.")
            names = [f.name for f in dataclasses.fields(SECTIONS[key])]
            for sub, subvalue in value.items():
                if sub not in names:
                    raise ConfigError(
                        f"{where}: unknown key '{key}.{sub}'.{_suggest(sub, names)} "
                        f"Valid keys in '{key}': {', '.join(names)}."
                    )
                out.setdefault(key, {})[sub] = subvalue
        else:
            valid = list(TOP_LEVEL) + list(SECTIONS)
            raise ConfigError(
                f"{where}: unknown key '{key}'.{_suggest(key, valid)} Valid top-level keys: "
                f"{', '.join(valid)}."
            )
    return out


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    without a word: `lr: 0.01` then `lr: 0.02` trained at 0.02)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} is given twice (also on line {seen[key] + 1}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    """Read a config file; a missing file or invalid YAML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # safe: SafeLoader's tags only
    except _DuplicateKey as err:
        mark = err.problem_mark
        raise ConfigError(f"{path} (line {mark.line + 1}, column {mark.column + 1}): {err.problem}.") from None
    except yaml.constructor.ConstructorError as err:  # e.g. !!python/object/apply:os.system
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: {err.problem}. tfcovid reads plain YAML "
                          "only (yaml.safe_load) and never runs code from config files; remove "
                          "the tag.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}.")
    return dict(data)


def overrides_from_flags(flags: Mapping[str, Any]) -> dict:
    """Turn {"train.lr": 0.01, "data.dir": None, ...} into nested overrides, skipping None."""
    out: dict = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        if "." in dotted:
            section, key = dotted.split(".", 1)
            out.setdefault(section, {})[key] = value
        else:
            out[dotted] = value
    return out


def parse_assignments(items: Sequence[str]) -> dict:
    """Turn ``--set`` items such as ``train.lr=0.01`` into nested overrides.

    Values are read as YAML, so ``null``, ``true``, ``[0.5, 1.0]`` and numbers work; keys are
    checked later by :func:`merge` (an unknown key is an error naming the valid ones).
    """
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"Bad --set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01 or data.demo_per_class=8.")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        section, dot, sub = key.partition(".")
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else {}
        if sub in fields and isinstance(fields[sub].default, str) and not isinstance(value, str):
            value = text.strip()  # a string key keeps its text: jit_compile=false, name=123
        if dot:
            out.setdefault(section, {})[sub] = value
        else:
            out[section] = value
    return out


def local_demo_folder() -> Path | None:
    """``./demo`` as an absolute path where it is a folder, else None: ``data.dir: demo`` is
    still the built-in set (whatever folder a run starts in; ``reproduce_tables.sh --smoke``
    relies on it), and ``fit`` says how to train on the folder instead."""
    folder = Path("demo")
    return folder.resolve() if folder.is_dir() else None


def resolve(config_file: str | Path | None = None, flags: Mapping[str, Any] | None = None,
            assignments: Mapping | None = None) -> Experiment:
    """Build the final Experiment: defaults <- [demo preset] <- config file <- --set <- flags.

    The demo preset applies when no config file is given and the data is the demo set, so
    `tfcovid fit --backbone vgg16 --freeze first7` runs offline in minutes. ``assignments``
    (from :func:`parse_assignments`) may set a key to None, which flags cannot.
    """
    overrides = overrides_from_flags(flags or {})
    layers: list[tuple[str, Mapping]] = []
    if config_file is not None:
        layers.append((str(config_file), load_yaml(config_file)))
    if assignments:
        layers.append(("--set", assignments))
    layers.append(("command-line flags", overrides))

    tree: dict = {}
    for where, layer in layers:
        tree = merge(tree, layer, where)
    if config_file is None and str(tree.get("data", {}).get("dir", "demo")) == "demo":
        preset = merge({}, DEMO_PRESET, "demo preset")
        if tree.get("data", {}).get("task") == "multilabel":
            preset = merge(preset, DEMO_MULTILABEL, "demo preset")
        tree = merge(preset, tree, "command-line flags")
    if tree.get("data", {}).get("task") == "multilabel" and "loss" not in tree.get("train", {}):
        tree = merge(tree, {"train": {"loss": "bce"}})  # "ce" is the binary task's loss
    return from_dict(tree)


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field's type and allowed choices; return it normalised."""
    key = f"{section}.{f.name}" if section else f.name
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"Bad value for '{key}': {value!r}. {msg}")

    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise bad("Expected true or false.")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        number = _number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise bad("Expected an integer.")
        return int(number)
    if isinstance(default, float):
        if value is None and f.name in NULLABLE:
            return None
        number = _number(value)
        if number is None:
            raise bad("Expected a number" + (" or null." if f.name in NULLABLE else "."))
        if not math.isfinite(number):
            raise bad("Expected a finite number (not NaN or infinity).")
        return number
    if isinstance(default, tuple) and default and isinstance(default[0], float):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise bad("Expected two numbers, e.g. [0.08, 1.0].")
        lo, hi = _number(value[0]), _number(value[1])
        if lo is None or hi is None:
            raise bad("Expected two numbers, e.g. [0.08, 1.0].")
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise bad("Expected finite numbers with 0 < low <= high.")
        return (lo, hi)
    if isinstance(default, tuple):
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise bad("Expected a non-empty list of non-empty names, e.g. [covid-19, normal, pneumonia].")
        if len(set(value)) != len(value):
            raise bad("Names must be unique.")
        return tuple(value)
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping) or not value:
            raise bad("Expected a mapping of folder name -> list of labels.")
        out = {}
        for folder, labels in value.items():
            if isinstance(labels, str):
                labels = [labels]
            if not isinstance(labels, (list, tuple)) or not all(isinstance(v, str) for v in labels):
                raise bad(f"Folder '{folder}' must map to a list of label names.")
            out[str(folder)] = tuple(labels)
        return out
    if isinstance(default, str):
        if isinstance(value, bool) and f.name == "jit_compile":  # YAML reads `true` as a bool
            return str(value).lower()
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("Expected a string.")
        return str(value)
    return value


def _number(value: Any) -> float | None:
    """``value`` as a float, or None when it is not a number (bools, lists, None, 'ten').

    Numeric strings are accepted because PyYAML reads ``1e-3`` (no dot) as a string.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def _check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"Bad value for '{key}': {value!r}. Valid values: {', '.join(valid)}.")


def from_dict(tree: Mapping) -> Experiment:
    """Validate a nested dict (as read from YAML) into an Experiment."""
    tree = merge({}, tree)  # rejects unknown keys
    sections = {}
    for name, cls in SECTIONS.items():
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in tree.get(name, {}):
                values[f.name] = _coerce(name, f, tree[name][f.name])
        sections[name] = cls(**values)
    top = {}
    for f in dataclasses.fields(Experiment):
        if f.name in TOP_LEVEL and f.name in tree:
            top[f.name] = _coerce("", f, tree[f.name])
    exp = Experiment(**top, **sections)
    validate(exp)
    return exp


def validate(exp: Experiment) -> None:
    """Check values that depend on each other; raise ConfigError naming the key."""
    d, a, m, t = exp.data, exp.augment, exp.model, exp.train
    _check_choice("data.task", d.task, TASKS)
    _check_choice("model.backbone", m.backbone, BACKBONES)
    _check_choice("model.preprocessing", m.preprocessing, PREPROCESSING)
    _check_choice("train.loss", t.loss, LOSSES)
    _check_choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _check_choice("train.precision", t.precision, PRECISIONS)
    _check_choice("train.strategy", t.strategy, STRATEGIES)
    _check_choice("train.jit_compile", t.jit_compile.lower(), ("auto", "true", "false"))
    _check_choice("train.focal_reduction", t.focal_reduction, ("sum", "mean"))
    _check_choice("data.cache", d.cache, ("auto", "memory", "disk", "none"))
    if d.cache_budget_mb < 0:
        raise ConfigError(f"Bad value for 'data.cache_budget_mb': {d.cache_budget_mb}. Use 0 or more MB.")
    from tfcovid.workers import processes_for  # OpenCV's import, only when validating

    try:
        processes_for(d.resample_processes)
    except ValueError:
        raise ConfigError(f"Bad value for 'data.resample_processes': {d.resample_processes!r}. Use auto "
                          "(worker processes on hosts with 8 or more cores, threads below), 0 (threads) "
                          "or a number of worker processes.") from None
    if d.decode_scale != 0 and d.decode_scale < 1:
        raise ConfigError(f"Bad value for 'data.decode_scale': {d.decode_scale}. Use 0 (full resolution) "
                          "or at least 1 (shorter side >= decode_scale x image_size).")
    if not re.fullmatch(r"all|none|first[1-9][0-9]*", m.freeze):
        raise ConfigError(
            f"Bad value for 'model.freeze': {m.freeze!r}. Valid values: all, none, firstN "
            "(N >= 1 Conv2D layers in forward order, e.g. first7)."
        )
    n = CONV_LAYERS[m.backbone]
    if m.freeze.startswith("first") and int(m.freeze[len("first"):]) > n:
        raise ConfigError(f"Bad value for 'model.freeze': {m.freeze!r}. {m.backbone} has {n} conv layers: "
                          f"use first1 ... first{n}, all (the head only) or none.")
    _check_names(exp)
    if d.image_size < MIN_IMAGE_SIZE[m.backbone]:
        raise ConfigError(f"Bad value for 'data.image_size': {d.image_size}. {m.backbone} needs at "
                          f"least {MIN_IMAGE_SIZE[m.backbone]} px.")
    if not 0 <= t.seed <= MAX_SEED:
        raise ConfigError(f"Bad value for 'train.seed': {t.seed}. Use 0 <= seed < 2**31 ({MAX_SEED + 1}).")
    for key, value, low in (
        ("train.epochs", t.epochs, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.steps_per_execution", t.steps_per_execution, 1),
        ("model.head_units", m.head_units, 1),
        ("data.demo_per_class", d.demo_per_class, 1),
        ("data.max_pixels", d.max_pixels, 1),
    ):
        if value < low:
            raise ConfigError(f"Bad value for '{key}': {value}. It must be at least {low}.")
    if not t.lr > 0:
        raise ConfigError(f"Bad value for 'train.lr': {t.lr}. It must be positive.")
    if not 0 <= t.momentum < 1:
        raise ConfigError(f"Bad value for 'train.momentum': {t.momentum}. Use 0 <= momentum < 1.")
    if not 0 < t.threshold < 1:
        raise ConfigError(f"Bad value for 'train.threshold': {t.threshold}. Use 0 < threshold < 1.")
    if not 0 <= a.rotation <= 180:
        raise ConfigError(f"Bad value for 'augment.rotation': {a.rotation}. Use 0..180 degrees.")
    if a.crop_scale[1] > 1:
        raise ConfigError(f"Bad value for 'augment.crop_scale': {list(a.crop_scale)}. The high end is at most 1.")
    if t.focal_alpha is not None and not 0 <= t.focal_alpha <= 1:
        raise ConfigError(f"Bad value for 'train.focal_alpha': {t.focal_alpha}. Use 0..1 or null.")
    if t.focal_gamma is not None and t.focal_gamma < 0:
        raise ConfigError(f"Bad value for 'train.focal_gamma': {t.focal_gamma}. Use >= 0 or null.")
    if d.task == "binary" and t.loss != "ce":
        raise ConfigError(
            f"Bad value for 'train.loss': {t.loss!r} with data.task 'binary'. The binary task "
            "trains 2 logits with cross-entropy: use --loss ce (or --task multilabel for bce/focal)."
        )
    if d.task == "binary" and not d.positive.strip():
        raise ConfigError(f"Bad value for 'data.positive': {d.positive!r}. The binary task needs the "
                          "disease class's folder name, e.g. infected.")
    if d.task == "multilabel":
        if t.loss == "ce":
            raise ConfigError(
                "Bad value for 'train.loss': 'ce' with data.task 'multilabel'. The three-label task "
                "uses sigmoid outputs: use --loss bce or --loss focal."
            )
        for folder, labels in d.label_map.items():
            unknown = [lab for lab in labels if lab not in d.labels]
            if unknown:
                raise ConfigError(
                    f"Bad value for 'data.label_map': folder '{folder}' maps to {unknown}, which "
                    f"are not in data.labels ({', '.join(d.labels)}). Add them to data.labels."
                )


def _check_names(exp: Experiment) -> None:
    """Names that become paths: the run folder's suffix, the output folder, data and weights."""
    name = exp.name
    if "/" in name or "\\" in name or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise ConfigError(f"Bad value for 'name': {name!r}. It becomes part of the run folder's name: "
                          "use letters, digits, '-' or '_' (no '/', '\\', control characters or "
                          "leading '.').")
    if len(name.encode()) > 128:
        raise ConfigError(f"Bad value for 'name': {name[:40]!r}... ({len(name.encode())} bytes). "
                          "Use at most 128 bytes; folder names are limited to 255.")
    for key, value, what in (("out", exp.out, "a folder for the run directories, e.g. runs"),
                             ("data.dir", exp.data.dir, "an ImageFolder tree, a prepared folder or demo"),
                             ("model.weights", exp.model.weights, "imagenet, none or a weights file")):
        if not value.strip():
            raise ConfigError(f"Bad value for '{key}': {value!r}. Expected {what}.")
