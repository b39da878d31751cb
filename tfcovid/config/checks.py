"""What makes an experiment valid: every choice, range and name is checked before a run starts,
and a bad value is a :class:`~tfcovid.config.schema.ConfigError` naming the key and what to use.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from tfcovid.config import operating_point
from tfcovid.config.schema import (
    AUGMENT_ON,
    BACKBONES,
    CACHES,
    CALIBRATIONS,
    CLASS_WEIGHTS,
    CONV_LAYERS,
    EARLY_STOPPING,
    HIGH_BIT,
    JIT_COMPILE,
    LOSSES,
    MAX_DEVICE_CACHE_MB,
    MAX_FOLDS,
    MAX_SEED,
    MIN_IMAGE_SIZE,
    OPTIMIZERS,
    PRECISIONS,
    PREPROCESSING,
    SAMPLINGS,
    SCHEDULES,
    SPLIT_MODES,
    STAGES,
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
    _check_splits(exp.data)
    _check_recipe(exp)
    _check_bootstrap(exp.train.bootstrap_resamples)
    _check_imbalance(exp)
    _check_calibration(exp)


BOOTSTRAP_RESAMPLES = (100, 100_000)  # fewer make a poor 2.5th percentile; more take seconds per split


def _check_bootstrap(resamples: int) -> None:
    """train.bootstrap_resamples: 0 (no intervals) or a count within BOOTSTRAP_RESAMPLES."""
    low, high = BOOTSTRAP_RESAMPLES
    if resamples != 0 and not low <= resamples <= high:
        raise ConfigError(f"Bad value for 'train.bootstrap_resamples': {resamples}. Use 0 (no confidence "
                          f"intervals) or {low} to {high:,} resamples (default 1000).")


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
    _check_choice("data.high_bit", d.high_bit, HIGH_BIT)
    _check_choice("data.augment_on", d.augment_on, AUGMENT_ON)


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
    if not 0 <= d.device_cache_mb <= MAX_DEVICE_CACHE_MB:
        raise ConfigError(f"Bad value for 'data.device_cache_mb': {d.device_cache_mb}. Use 0 (stream "
                          f"every batch to the device) to {MAX_DEVICE_CACHE_MB:,} MB.")
    if d.decode_scale != 0 and d.decode_scale < 1:
        raise ConfigError(f"Bad value for 'data.decode_scale': {d.decode_scale}. Use 0 (full resolution) "
                          "or at least 1 (shorter side >= decode_scale x image_size).")


def _check_splits(d: DataConfig) -> None:
    """How a label file's splits are made: mode, fractions, folds (docs/own-data.md)."""
    _check_choice("data.split", d.split, SPLIT_MODES)
    low, high = 0.05, 0.4
    for key, value in (("data.validation_fraction", d.validation_fraction), ("data.test_fraction", d.test_fraction)):
        if not low <= value <= high:
            raise ConfigError(f"Bad value for '{key}': {value}. Use {low} to {high} (a share of the patients).")
    if d.folds != 0 and not 2 <= d.folds <= MAX_FOLDS:
        raise ConfigError(f"Bad value for 'data.folds': {d.folds}. Use 0 (no cross-validation) or "
                          f"2..{MAX_FOLDS} folds.")
    if not 0 <= d.fold < max(d.folds, 1):
        where = f"0..{d.folds - 1}" if d.folds else "0 (data.folds is 0: no cross-validation)"
        raise ConfigError(f"Bad value for 'data.fold': {d.fold}. Use {where}.")


def _check_freeze(m: ModelConfig) -> None:
    """The freeze policy, against the backbone's number of conv layers or stages."""
    if not re.fullmatch(r"all|none|(first|stages)[1-9][0-9]{0,5}", m.freeze):  # int() of 5000 digits raises
        raise ConfigError(
            f"Bad value for 'model.freeze': {shown(m.freeze)}. Valid values: all, none, firstN "
            "(up to the N-th convolution in forward order, e.g. first7), stagesN (the first N "
            "stages, e.g. stages2)."
        )
    n = CONV_LAYERS[m.backbone]
    if m.freeze.startswith("first") and int(m.freeze[len("first"):]) > n:
        raise ConfigError(f"Bad value for 'model.freeze': {shown(m.freeze)}. {m.backbone} has {n} conv layers: "
                          f"use first1 ... first{n}, all (the head only) or none.")
    stages = STAGES[m.backbone]
    if m.freeze.startswith("stages") and int(m.freeze[len("stages"):]) > stages:
        raise ConfigError(f"Bad value for 'model.freeze': {shown(m.freeze)}. {m.backbone} has {stages} stages: "
                          f"use stages1 ... stages{stages}, all (the head only) or none.")


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


def _check_recipe(exp: Experiment) -> None:
    """The schedule, early stopping and weight averaging (issue 25; docs/beyond.md#recipes)."""
    t = exp.train
    _check_choice("train.schedule", t.schedule, SCHEDULES)
    _check_choice("train.early_stopping", t.early_stopping, ("none", *EARLY_STOPPING[exp.data.task]))
    if not 0 <= t.warmup_epochs < t.epochs:
        raise ConfigError(f"Bad value for 'train.warmup_epochs': {t.warmup_epochs}. Use 0 <= warmup_epochs "
                          f"< train.epochs ({t.epochs}): the schedule needs at least one epoch after it.")
    if t.step_epochs < 1:
        raise ConfigError(f"Bad value for 'train.step_epochs': {t.step_epochs}. It must be at least 1.")
    if not 0 < t.step_gamma <= 1:
        raise ConfigError(f"Bad value for 'train.step_gamma': {t.step_gamma}. Use 0 < step_gamma <= 1 "
                          "(the factor the rate is multiplied by every step_epochs epochs).")
    if t.patience < 1:
        raise ConfigError(f"Bad value for 'train.patience': {t.patience}. It must be at least 1 (epochs "
                          "without improvement before early stopping).")
    if not (t.ema == 0 or 0 < t.ema < 1):
        raise ConfigError(f"Bad value for 'train.ema': {t.ema}. Use 0 (no weight averaging) or a momentum "
                          "0 < ema < 1, e.g. 0.999.")


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


# The largest class weight a config may give: a weight beyond it is more likely a typo (9000 for
# 9) than a plan, and it scales the loss (and so the step size) by as much.
MAX_CLASS_WEIGHT = 1000.0


def class_weight_value(value: Any, key: str = "train.class_weight") -> str | dict[str, float]:
    """``train.class_weight`` read: ``none``, ``balanced`` or {class or label name: weight} with
    0 < weight <= MAX_CLASS_WEIGHT (names not listed keep weight 1). Anything else is a
    ConfigError naming it."""
    if value is None:
        return "none"
    if isinstance(value, str) and value.strip().lower() in CLASS_WEIGHTS:
        return value.strip().lower()
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"Bad value for '{key}': {shown(value)}. Use none, balanced or a mapping "
                          "{class or label: weight}, e.g. --set 'train.class_weight={covid-19: 9}'.")
    out = {}
    for name, weight in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"Bad value for '{key}': the name {shown(name)} is not a class or label name.")
        ok = isinstance(weight, numbers.Real) and not isinstance(weight, bool) and math.isfinite(weight)
        if not ok or not 0 < weight <= MAX_CLASS_WEIGHT:
            raise ConfigError(f"Bad value for '{key}': {shown(name)}: {shown(weight)}. A weight is a number "
                              f"with 0 < weight <= {MAX_CLASS_WEIGHT:g} (1 leaves the class as it is).")
        out[name] = float(weight)
    return out


def _check_imbalance(exp: Experiment) -> None:
    """data.sampling and train.class_weight (docs/imbalance.md); the three-label task's names are
    known now, the binary task's class folders when the data is scanned."""
    _check_choice("data.sampling", exp.data.sampling, SAMPLINGS)
    weights = class_weight_value(exp.train.class_weight)
    if isinstance(weights, dict) and exp.data.task == "multilabel":
        unknown = [name for name in weights if name not in exp.data.labels]
        if unknown:
            raise ConfigError(f"Bad value for 'train.class_weight': {shown(unknown)} not in data.labels "
                              f"({', '.join(exp.data.labels)}). Weigh those labels by name.")


def _check_calibration(exp: Experiment) -> None:
    """train.calibrate: how the probabilities are calibrated on validation (issue 23.5)."""
    _check_choice("train.calibrate", exp.train.calibrate, CALIBRATIONS)
