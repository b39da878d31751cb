"""``tfcovid bench model`` and ``fit``: training steps on random tensors, and fed by the pipeline."""
from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from tfcovid import config
from tfcovid.bench.files import as_split
from tfcovid.bench.flops import model_flops
from tfcovid.bench.pipeline import processes_fields
from tfcovid.bench.timing import machine, median_rate, timed_pass
from tfcovid.data import augment, batches, datasets, resident, working
from tfcovid.data import cache as data_cache
from tfcovid.models import apply_freeze, build_model, get_backbone, is_head_layer
from tfcovid.training import compile, device_augment, devices


def experiment(backbone="vgg16", image_size=224, batch_size=60, precision="auto",
               jit_compile="auto", steps_per_execution=1, freeze="none") -> config.Experiment:
    """The Experiment the benchmark trains: the study's SGD, binary task, random weights."""
    return config.from_dict({
        "data": {"dir": "bench", "image_size": image_size},
        "model": {"backbone": backbone, "freeze": freeze, "weights": "none"},
        "train": {"batch_size": batch_size, "precision": precision, "jit_compile": jit_compile,
                  "steps_per_execution": steps_per_execution},
    })


def build(exp: config.Experiment):
    """Model compiled exactly as ``tfcovid fit`` compiles it; returns (model, precision)."""

    precision = devices.resolve_precision(exp.train.precision)
    with devices.dtype_policy(precision):
        try:
            model = build_model(exp.model.backbone, 2, exp.data.image_size, "torch")
        except ValueError as err:  # e.g. an image size too small for the backbone
            raise config.ConfigError(str(err)) from None
        apply_freeze(model, exp.model.freeze, is_head_layer, get_backbone(exp.model.backbone).stages)
        compile.compile_model(model, exp, positive_index=0)
    return model, precision


class _EpochClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):  # logs are fetched here, so the step has finished
        self.seconds.append(time.perf_counter() - self._start)


def time_training(model, ds, steps: int, repeats: int) -> list[float]:
    """Seconds per ``steps`` training steps, ``repeats`` times, after one warm-up epoch."""
    clock = _EpochClock()
    model.fit(ds, epochs=repeats + 1, steps_per_epoch=steps, verbose=0, callbacks=[clock], shuffle=False)
    return clock.seconds[1:]


def time_alternating(model, alone, fed, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per ``steps`` steps on ``alone`` and on ``fed``, in alternating epochs.

    One fit() call over a dataset that switches source every ``steps`` batches: one iterator
    for the whole run (no per-epoch start-up in the timings), and both sources see the same
    machine conditions, which drift when other jobs share it. The first two epochs warm up.
    """
    choice = tf.data.Dataset.range(2).flat_map(
        lambda i: tf.data.Dataset.from_tensors(i).repeat(steps)).repeat()
    mixed = tf.data.Dataset.choose_from_datasets([alone, fed], choice)
    clock = _EpochClock()
    model.fit(mixed, epochs=2 * (repeats + 1), steps_per_epoch=steps, verbose=0, callbacks=[clock],
              shuffle=False)
    timed = clock.seconds[2:]
    return timed[0::2], timed[1::2]


def random_batches(image_size: int, batch_size: int, seed: int = 0) -> tf.data.Dataset:
    """One random uint8 batch with labels, repeated forever: the model with no input pipeline."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    y = rng.integers(0, 2, batch_size).astype(np.int64)
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def _model_fields(exp, model, precision, rate) -> dict:
    flops = model_flops(model)
    return {
        "backbone": exp.model.backbone, "freeze": exp.model.freeze,
        "image_size": exp.data.image_size, "batch_size": exp.train.batch_size,
        "precision": precision, "loss_scaling": isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
        "jit_compile": bool(model.jit_compile), "steps_per_execution": exp.train.steps_per_execution,
        "forward_gflops_per_image": round(flops["forward_flops"] / 1e9, 3),
        "train_gflops_per_image": round(flops["train_flops"] / 1e9, 3),
        "tflops": round(rate * flops["train_flops"] / 1e12, 4),
    }


def bench_model(exp: config.Experiment, steps: int = 10, repeats: int = 3, log=print) -> dict:
    """Training throughput of the model alone, on random tensors."""
    model, precision = build(exp)
    log(f"  {exp.model.backbone} at {exp.data.image_size} px, batch {exp.train.batch_size}, "
        f"{precision}, XLA {'on' if model.jit_compile else 'off'}: {repeats} x {steps} steps after a warm-up")
    seconds = time_training(model, random_batches(exp.data.image_size, exp.train.batch_size), steps, repeats)
    rate = median_rate(steps * exp.train.batch_size, seconds)
    return {"kind": "model", **machine(), "repeats": repeats, "steps": steps,
            "images_per_s": round(rate, 2), **_model_fields(exp, model, precision, rate)}


def bench_fit(paths: list[str], exp: config.Experiment, steps: int = 10, repeats: int = 3,
              cache: str = "auto", budget_mb: float = 2048, decode_scale: float = 2.0,
              log=print, processes: int | str = "auto", augment_on: str = "auto",
              device_cache_mb: int = config.DataConfig.device_cache_mb) -> dict:
    """Training fed by the real train pipeline (cache filled first) against the model alone.

    ``augment_on`` (data.augment_on): on the device path the model trains through
    ``device_augment.DeviceTrainer`` and the two are timed one after the other (their batches
    differ in kind, so they cannot alternate in one dataset); the model alone is the classifier.
    There the images are resident on the device when they fit ``device_cache_mb``
    (data.device_cache_mb), decoded once first instead of the cache fill."""
    model, precision = build(exp)
    size, batch = exp.data.image_size, exp.train.batch_size
    split = as_split(paths)
    where, line = device_augment.choose(augment_on, True, True, 1, augment.resampler() == "opencv")
    policy = data_cache.Cache(cache, budget_mb, processes=0 if where == "device" else processes)
    started, held = time.perf_counter(), None
    if where == "device":
        held, said = resident.held_if_fits(split, size, decode_scale, device_cache_mb)
        line = f"{line}; {said}"
    pipe = datasets.dataset(split, size, batch, training=True, aug=exp.augment, cache=policy,
                            decode_scale=decode_scale, drop_remainder=True,
                            augment_on="resident" if held else where, sizes=held.hw if held else None)
    fill_s = time.perf_counter() - started if held else timed_pass(pipe)
    log(f"  {'decoded for the device' if held else 'cache filled'} in {fill_s:.1f} s ({policy.usage()}); {line}")
    if where == "device":
        levels = batches.max_shrink(working.working_sizes(split, size, decode_scale), size)
        with devices.dtype_policy(precision):
            trainer = device_augment.DeviceTrainer(model, size, levels, held)
            compile.compile_model(trainer, exp, 0, optimizer=model.optimizer)
        log(f"  model alone, then fed by the pipeline: {repeats} x {steps} steps each after a warm-up")
        alone = time_training(trainer, random_batches(size, batch), steps, repeats)
        fed = time_training(trainer, pipe.repeat(), steps, repeats)
    else:
        log(f"  model alone and fed by the pipeline, alternating: {repeats} x {steps} steps each after a warm-up")
        alone, fed = time_alternating(model, random_batches(size, batch), pipe.repeat(), steps, repeats)
    alone_rate, fed_rate = median_rate(steps * batch, alone), median_rate(steps * batch, fed)
    return {"kind": "fit", **machine(), "images": len(paths), "repeats": repeats, "steps": steps,
            "images_per_s": round(fed_rate, 2), "model_only_images_per_s": round(alone_rate, 2),
            "ratio_to_model_only": round(fed_rate / alone_rate, 3),
            "cache": {"mode": cache, "bytes": policy.nbytes(), "budget_mb": budget_mb},
            "augment_on": line,
            **processes_fields(policy), **_model_fields(exp, model, precision, fed_rate)}
