"""What makes an experiment valid: every choice, range and name is checked before a run starts,
and a bad value is a :class:`~tfcovid.config.schema.ConfigError` naming the key and what to use.
"""
from __future__ import annotations

import re

from tfcovid.config import operating_point
from tfcovid.config.schema import (
    BACKBONES,
    CACHES,
    CALIBRATIONS,
    CONV_LAYERS,
    JIT_COMPILE,
    LOSSES,
    MAX_SEED,
    MIN_IMAGE_SIZE,
    OPTIMIZERS,
    PRECISIONS,
    PREPROCESSING,
    STRATEGIES,
    TASKS,
    ConfigError,
    DataConfig,
    Experiment,
    ModelConfig,
)
from tfcovid.utils.text import shown


def _check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"Bad value for '{key}': {shown(value)}. Valid values: {', '.join(valid)}.")


def validate(exp: Experiment) -> None:
    """Check values that depend on each other; raise ConfigError naming the key."""
    _check_choices(exp)
    _check_data(exp.data)
    _check_freeze(exp.model)
    _check_names(exp)
    _check_ranges(exp)
    _check_task(exp)
    _check_calibration(exp)


def _check_choices(exp: Experiment) -> None:
    """Every setting that is one of a fixed list of names."""
    d, m, t = exp.data, exp.model, exp.train
    _check_choice("data.task", d.task, TASKS)
    _check_choice("model.backbone", m.backbone, BACKBONES)
    _check_choice("model.preprocessing", m.preprocessing, PREPROCESSING)
    _check_choice("train.loss", t.loss, LOSSES)
    _check_choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _check_choice("train.precision", t.precision, PRECISIONS)
    _check_choice("train.strategy", t.strategy, STRATEGIES)
    _check_choice("train.jit_compile", t.jit_compile.lower(), JIT_COMPILE)
    _check_choice("train.focal_reduction", t.focal_reduction, ("sum", "mean"))
    _check_choice("data.cache", d.cache, CACHES)


def _check_data(d: DataConfig) -> None:
    """How the images are cached, resampled and decoded."""
    if d.cache_budget_mb < 0:
        raise ConfigError(f"Bad value for 'data.cache_budget_mb': {d.cache_budget_mb}. Use 0 or more MB.")
    try:
        resample_processes(d.resample_processes)
    except ValueError:
        raise ConfigError(f"Bad value for 'data.resample_processes': {shown(d.resample_processes)}. Use auto "
                          "(worker processes on hosts with 8 or more cores, threads below), 0 (threads) "
                          "or a number of worker processes.") from None
    if d.decode_scale != 0 and d.decode_scale < 1:
        raise ConfigError(f"Bad value for 'data.decode_scale': {d.decode_scale}. Use 0 (full resolution) "
                          "or at least 1 (shorter side >= decode_scale x image_size).")


def _check_freeze(m: ModelConfig) -> None:
    """The freeze policy, against the backbone's number of conv layers."""
    if not re.fullmatch(r"all|none|first[1-9][0-9]{0,5}", m.freeze):  # int() of 5000 digits raises
        raise ConfigError(
            f"Bad value for 'model.freeze': {shown(m.freeze)}. Valid values: all, none, firstN "
            "(N >= 1 Conv2D layers in forward order, e.g. first7)."
        )
    n = CONV_LAYERS[m.backbone]
    if m.freeze.startswith("first") and int(m.freeze[len("first"):]) > n:
        raise ConfigError(f"Bad value for 'model.freeze': {shown(m.freeze)}. {m.backbone} has {n} conv layers: "
                          f"use first1 ... first{n}, all (the head only) or none.")


def _check_ranges(exp: Experiment) -> None:
    """Numbers with a lower bound or a range: sizes, counts, seed, learning rate, augmentation."""
    d, a, m, t = exp.data, exp.augment, exp.model, exp.train
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
    try:
        operating_point.parse(t.operating_point, t.threshold)
    except ValueError as err:
        raise ConfigError(f"Bad value for 'train.operating_point': {err}") from None
    if not 0 <= a.rotation <= 180:
        raise ConfigError(f"Bad value for 'augment.rotation': {a.rotation}. Use 0..180 degrees.")
    if a.crop_scale[1] > 1:
        raise ConfigError(f"Bad value for 'augment.crop_scale': {list(a.crop_scale)}. The high end is at most 1.")


def _check_task(exp: Experiment) -> None:
    """The loss and its settings against the task; the task's class and label names."""
    d, t = exp.data, exp.train
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
        raise ConfigError(f"Bad value for 'data.positive': {shown(d.positive)}. The binary task needs the "
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
                    f"Bad value for 'data.label_map': folder {shown(folder)} maps to {shown(unknown)}, which "
                    f"are not in data.labels ({', '.join(d.labels)}). Add them to data.labels."
                )


def _check_names(exp: Experiment) -> None:
    """Names that become paths: the run folder's suffix, the output folder, data and weights."""
    name = exp.name
    # Exactly what the message says: str.isalnum is letters and digits of any script, never a
    # control character, DEL, U+202E (right-to-left override) or a byte that is not UTF-8.
    if name.startswith(".") or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"Bad value for 'name': {shown(name)}. It becomes part of the run folder's name: "
                          "use letters, digits, '-', '_' or '.' (any script; no '/', '\\', spaces, "
                          "control or formatting characters, and no leading '.').")
    if len(name.encode()) > 128:
        raise ConfigError(f"Bad value for 'name': {shown(name[:40])}... ({len(name.encode())} bytes). "
                          "Use at most 128 bytes; folder names are limited to 255.")
    for key, value, what in (("out", exp.out, "a folder for the run directories, e.g. runs"),
                             ("data.dir", exp.data.dir, "an ImageFolder tree, a prepared folder or demo"),
                             ("model.weights", exp.model.weights, "imagenet, none or a weights file")):
        if not value.strip():
            raise ConfigError(f"Bad value for '{key}': {shown(value)}. Expected {what}.")


def resample_processes(setting: int | str) -> int | None:
    """``data.resample_processes`` read: None for ``auto``, else the number of worker processes
    (0: threads). Anything else is a ValueError naming it."""
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        return None
    whole = isinstance(setting, int) or (isinstance(setting, str) and setting.strip().isdigit())
    if isinstance(setting, bool) or not whole or int(setting) < 0:
        raise ValueError(f"data.resample_processes must be auto, 0 (threads) or a number of worker "
                         f"processes. Received: {shown(setting)}")
    return int(setting)


def _check_calibration(exp: Experiment) -> None:
    """train.calibrate: how the probabilities are calibrated on validation (issue 23.5)."""
    _check_choice("train.calibrate", exp.train.calibrate, CALIBRATIONS)
