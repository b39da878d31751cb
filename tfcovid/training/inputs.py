"""Phase 3 of ``fit``: the data scanned and every file checked, then the train and validation
datasets over one decoded-image cache."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable

import tensorflow as tf
import yaml

from tfcovid.config import Experiment
from tfcovid.data import (
    augment,
    batches,
    checks,
    class_weights,
    datasets,
    demo,
    label_files,
    leakage,
    records,
    splits,
    types,
    working,
)
from tfcovid.data import folders as data_folders
from tfcovid.data import resident as resident_images
from tfcovid.data.cache import Cache
from tfcovid.data.folders import disease_class
from tfcovid.data.opencv.process_pool import WorkerStore, usable_cores
from tfcovid.data.opencv.process_pool import available as can_use_workers
from tfcovid.training import device_augment, distribute, preflight
from tfcovid.utils import atomic


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The checked data and the datasets fit trains on."""
    manifest: types.Manifest
    counts: dict[str, int]  # images per split
    positive_index: int  # the disease class's index (binary task; 0 otherwise)
    epoch: tf.Variable  # the epoch about to run: the train pipeline keys its randomness on it
    train: tf.data.Dataset
    validation: tf.data.Dataset
    class_weight: tuple[float, ...] | None = None  # train.class_weight per output (None: none)
    augment_on: str = "cpu"  # "device": train batches are for device_augment.DeviceTrainer
    augment_line: str = ""  # where the augmentation runs, as logged and put in metrics.json
    shrink_levels: int = 1  # the device resampler's largest pre-shrink factor
    resident: resident_images.Resident | None = None  # the train images the device holds, if it does


def load_manifest(exp: Experiment, log=print, run_dir=None) -> types.Manifest:
    """Scan the experiment's data (generating the demo set once, when asked for); a label file's
    splits made by patient (or read from ``run_dir``'s splits.csv, when resumed), and checked
    for patients in two splits."""
    d = exp.data
    root = d.dir
    if root == "demo":
        root = demo.ensure_demo_data(d.task, per_class=d.demo_per_class, log=log)
    # Unusable files come back in manifest.bad; fit() checks every file (checks.verify).
    if label_files.is_label_file(root):
        manifest = label_files.read(root, d.task, d.labels, d.label_map)
    else:
        manifest = data_folders.scan(root, d.task, d.labels, d.label_map, strict=False)
    manifest = splits.assign(manifest, d, exp.train.seed, Path(run_dir) / splits.FILE if run_dir else None)
    leakage.patients_in_two_splits(manifest)
    return manifest


def split_sizes(manifest: types.Manifest) -> dict[str, int]:
    """Images per split, in the order train, validation, test."""
    order = list(data_folders.SPLIT_ALIASES)
    names = sorted(manifest.splits, key=lambda n: order.index(n) if n in order else len(order))
    return {name: len(manifest.splits[name]) for name in names}


def describe_sizes(counts: dict[str, int]) -> str:
    """"train 400, validation 100, test 100"."""
    return ", ".join(f"{name} {n:,}" for name, n in counts.items())


def write_config(run: Path, exp: Experiment) -> None:
    """The resolved experiment as the run's config.yaml (atomically)."""
    atomic.atomic_write_text(run / "config.yaml", yaml.safe_dump(exp.to_dict(), sort_keys=False))


def input_pipeline(exp: Experiment, run: Path, workers: int, log: Callable[[str], None],
                   manifest: types.Manifest, replicas: int = 1) -> tuple[Experiment, Inputs]:
    """Phase 3: every file checked, the disease class settled, the train and validation datasets.

    Args:
        exp: the experiment.
        run: the run directory (its config.yaml is rewritten when the disease class changes; a
            disk cache goes in its cache/).
        workers: training processes of a multi-worker run (1 otherwise).
        log: where progress lines go.
        manifest: the data as ``load_manifest`` scanned it (fit scans it, and checks that a
            batch fits the train split, before the weights: they may be a download).

    Returns:
        The experiment with the disease class the data has, and the inputs.
    """
    exp, manifest, counts = _checked_data(exp, run, workers, log, manifest)
    positive_index = (manifest.class_names.index(exp.data.positive)
                      if exp.data.positive in manifest.class_names else 0)
    # One memory budget for both splits' decoded-image caches; a disk cache goes in the run
    # (a killed process's disk cache is stale: it is removed).
    shutil.rmtree(run / "cache", ignore_errors=True)
    # auto: worker processes from 8 cores, the host's cores shared by its training processes.
    train = manifest.splits["train"]
    augment_on, line = device_augment.choose(exp.data.augment_on, exp.augment.enabled,
                                             not getattr(train, "shards", None), replicas * workers,
                                             augment.resampler() == "opencv")
    # On the device path the host only decodes: no resample worker processes.
    cache = Cache(exp.data.cache, exp.data.cache_budget_mb, directory=str(run / "cache"),
                  processes=0 if augment_on == "device" else exp.data.resample_processes,
                  share=distribute.tasks_on_this_host(distribute.tf_config_cluster()))
    # The epoch about to run, set before each epoch: the train pipeline keys its shuffle and
    # augmentation on it, so a resumed run continues with the batches it would have seen.
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="tfcovid_epoch")
    held, line = _resident(exp, train, augment_on, line, log)
    train_ds = datasets.dataset(train, exp.data.image_size, exp.train.batch_size,
                                training=True, aug=exp.augment, seed=exp.train.seed, cache=cache,
                                decode_scale=exp.data.decode_scale, epoch=epoch, readers=workers,
                                balanced=exp.data.task if exp.data.sampling == "balanced" else None,
                                augment_on="resident" if held else augment_on,
                                sizes=held.hw if held else None)
    val_ds = datasets.dataset(manifest.splits["validation"], exp.data.image_size, exp.train.batch_size,
                              cache=cache)
    log(f"      {cache.describe()}")
    weights = resolve_class_weights(exp, manifest)
    log(f"      sampling {exp.data.sampling}; {class_weights.describe(weights, exp.train.class_weight, exp.data.task, manifest.output_names)}")
    if augment_on == "device":
        log(f"      {line}")
    elif exp.augment.enabled:
        log(f"      {line}; resampled with {augment.describe_resampler()}{_where_resampled(exp, cache)}")
    levels = batches.max_shrink(working.working_sizes(train, exp.data.image_size, exp.data.decode_scale),
                                 exp.data.image_size) if augment_on == "device" else 1
    return exp, Inputs(manifest, counts, positive_index, epoch, train_ds, val_ds, class_weight=weights,
                       augment_on=augment_on, augment_line=line, shrink_levels=levels, resident=held)


def _resident(exp: Experiment, train, augment_on: str, line: str, log):
    """On the device path, the train images decoded once for the device to hold when they fit
    data.device_cache_mb (else None: streamed), and the augmentation line saying which."""
    if augment_on != "device":
        return None, line
    started = time.perf_counter()
    held, said = resident_images.held_if_fits(train, exp.data.image_size, exp.data.decode_scale,
                                              exp.data.device_cache_mb)
    if held is not None:
        log(f"      decoded {len(train):,} train images once for the device in {time.perf_counter() - started:.1f} s")
    return held, f"{line}; {said}"


def resolve_class_weights(exp: Experiment, manifest: types.Manifest) -> tuple[float, ...] | None:
    """train.class_weight as one weight per output, from the train split (data.class_weights)."""
    return class_weights.resolve(exp.train.class_weight, exp.data.task, manifest.splits["train"],
                                 manifest.output_names)


def _checked_data(exp: Experiment, run: Path, workers: int, log,
                  scanned: types.Manifest) -> tuple[Experiment, types.Manifest, dict]:
    """The manifest with every file checked and its notes logged; the binary task's disease class
    as the data names it."""
    splits.write(scanned, run)  # before files are left out: resume and evaluate read it back
    manifest = checks.verify(scanned, exp.data, run, lambda line: log(f"      {line}"))
    leakage.check(manifest, exp.data.allow_duplicates, lambda line: log(f"      {line}"))
    if exp.data.verify_records:  # a damaged shard named now, not at the end of epoch 1 or in [6/6]
        records.check_digests(manifest, lambda line: log(f"      {line}"))
    upsampled = records.upsampling_note(manifest, exp.data.image_size)
    for problem in manifest.problems + tuple(records.check_workers(manifest, workers)) + ((upsampled,) if upsampled else ()):
        log(f"      note: {problem}")
    counts = split_sizes(manifest)
    log(f"[3/6] Data: {manifest.root} ({exp.data.task}; outputs {', '.join(manifest.output_names)}; "
        f"images: {describe_sizes(counts)})")
    log(f"      per split and class: {splits.describe_counts(manifest)}")
    preflight.check_batch_size(counts, exp.train.batch_size)  # again: --skip-bad may leave fewer
    if exp.data.task == "binary":
        positive, why = disease_class(exp.data.positive, manifest.class_names)
        if positive != exp.data.positive:  # recorded, so resume, evaluate and the model agree
            exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, positive=positive))
            write_config(run, exp)
        if why:
            log(f"      note: {why}")
    return exp, manifest, counts


def _where_resampled(exp, cache) -> str:
    """", in N worker processes" when data.resample_processes took effect; why not, when not
    (``auto`` on fewer than 8 cores means threads: nothing to say)."""
    n, setting = cache.processes, str(exp.data.resample_processes).strip().lower()
    if not n:
        return ""
    share = f" shared by {cache.share} training processes" if cache.share > 1 else ""
    how = f" (data.resample_processes auto: {usable_cores()} cores{share})" if setting == "auto" else ""
    if any(isinstance(s, WorkerStore) for s in cache.stores):
        return f", in {n} worker processes{how}"
    if cache.worker_error:
        return f" (the {n} worker processes of data.resample_processes {setting} could not start: " \
               f"{cache.worker_error}; threads instead)"
    why = ("needs the decoded-image cache (data.cache)" if exp.data.cache == "none"
           else "needs Linux and OpenCV" if not can_use_workers()
           else "needs OpenCV's resampler")
    return f" (data.resample_processes {setting} not used: it {why}; threads instead)"
