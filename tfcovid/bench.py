"""Throughput benchmarks: the input pipeline, the model's training step, and both together.

Every figure is the median of ``repeats`` timed runs after a warm-up run (tracing, XLA
compilation, filling the page cache), in images per second of wall-clock time. Each result
also records the machine (device, CPU count, load average: other jobs on the machine slow
everything down, and the load average says whether they were there).

- ``pipeline``: the train pipeline's first epoch (decoding, filling the cache) and later
  epochs (from the cache), against the ceiling of decoding alone (``tf.io.decode_image`` at
  full size on all cores), measured in alternation so both see the same conditions. Later
  epochs are timed several per pass on small sets, so they show the steady state.
- ``model``: training steps on random tensors (no input pipeline), with FLOPs per image
  counted from the Conv2D/Dense layers' shapes, giving achieved TFLOP/s.
- ``fit``: training steps fed by the real train pipeline from a filled cache, against the
  model alone at the same batch size and precision; the ratio says whether the input
  pipeline holds the model back (1.0: never).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfcovid.data import cache as data_cache
from tfcovid import config
from tfcovid.data import augment, datasets, decode as data_decode, folders, types, checks
from tfcovid.training import devices
from tfcovid.data.opencv.process_pool import WorkerStore, usable_cores
from tfcovid.data import demo
from tfcovid.training import compile
from tfcovid.models import apply_freeze, build_model, is_head_layer

KINDS = ("pipeline", "model", "fit")


def synthetic_xrays(out_dir: str | Path, count: int = 300, side: int = 1024, seed: int = 0) -> list[str]:
    """Write ``count`` grayscale ``side`` x ``side`` chest-X-ray-like JPEGs (~160 KB at 1024 px).

    Four demo renders (``tfcovid.data.demo``), softened and re-noised per file with film-grain-like
    noise and exposure jitter, so files differ and compress like radiographs, not like noise.
    """
    from PIL import Image, ImageFilter


    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = []
    for k in range(4):
        img, _ = demo._render(rng, "binary", ("infected", "normal")[k % 2], side, side)
        soft = Image.fromarray(np.round(img * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1.2))
        bases.append(np.asarray(soft, np.float32))
    grain = rng.normal(0.0, 2.0, (side, side)).astype(np.float32)
    paths = []
    for i in range(count):
        shift = rng.integers(0, side, 2)
        img = bases[i % 4] * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8) + np.roll(grain, shift, (0, 1))
        path = out / f"xray_{i:05d}.jpg"
        Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "L").save(path, quality=92)
        paths.append(str(path))
    return paths


def image_files(root: str | Path) -> list[str]:
    """Images to benchmark on: the train split of an ImageFolder tree, else every image under root."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise types.DataError(f"Benchmark data folder not found: {root}. Pass --data DIR or leave it out to generate images.")
    top = folders.find_splits(root).get("train", root)
    found = sorted(str(Path(d) / f) for d, _, files in os.walk(top) for f in files
                   if Path(f).suffix.lower() in folders.IMAGE_EXTENSIONS and not f.startswith("."))
    if not found:
        raise types.DataError(f"No images ({', '.join(folders.IMAGE_EXTENSIONS)}) under {top}.")
    return found


def as_split(paths: list[str]) -> types.Split:
    """A binary-labelled split over ``paths`` (labels alternate; speed does not depend on them)."""
    labels = np.arange(len(paths), dtype=np.int64) % 2
    return types.Split("train", os.path.commonpath(paths) if paths else "", tuple(paths), labels,
                      tuple("ab"[i] for i in labels))


def require_usable(paths: list[str], root: str | Path, max_pixels: int, log=print) -> None:
    """Check every file the benchmark will read, as ``fit`` does, before anything is timed.

    Each file is read and decoded once (``filecheck.check``), so a damaged one stops the
    benchmark here with every problem listed, instead of a TensorFlow error mid-pass that names
    no file. The check is not part of any timing.

    Raises:
        data.DataError: one or more files cannot be used; the message lists each with its reason.
    """
    root = Path(root).expanduser()
    manifest = types.Manifest(str(root), "binary", ("a", "b"), ("a", "b"), {"train": as_split(paths)})
    bad = checks.check(manifest, max_pixels, lambda line: log(f"  {line}"))
    if bad:
        raise checks.problems_error(bad, root, "Fix or remove these files: the benchmark reads "
                                       "every image it finds there.")


def machine() -> dict:
    """What the numbers were measured on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"device": devices.describe_device(), "cpu_count": os.cpu_count(),
            "load_average_1min": round(load[0], 2), "tensorflow": tf.__version__,
            "keras": keras.__version__, "augment_resampler": augment.resampler(), **_backend()}


def _backend() -> dict:
    """Keras's backend; under JAX (KERAS_BACKEND=jax) the model runs on JAX, tf.data on TensorFlow."""
    backend = keras.backend.backend()
    if backend != "jax":
        return {"keras_backend": backend}
    import jax

    return {"keras_backend": backend, "jax": jax.__version__}


def _median_rate(images: int, seconds: list[float]) -> float:
    return images / statistics.median(seconds)


def _cpu_seconds(policy: data_cache.Cache | None = None) -> float:
    """CPU time used so far by this process (all its threads) and ``policy``'s resample worker
    processes."""
    stores = policy.stores if policy is not None else []
    return time.process_time() + sum(s.cpu_seconds() for s in stores if isinstance(s, WorkerStore))


def _timed_pass(ds, startup: list | None = None, cpu: list | None = None, policy=None) -> float:
    """Seconds to read one full pass, from a ready iterator; its CPU seconds go into ``cpu``
    (this process and ``policy``'s worker processes).

    Creating the iterator instantiates and optimises the pipeline's functions (0.1-1 s, once
    per pass, whatever the number of images); it is timed apart, into ``startup``, so the
    figure is the pipeline's throughput and does not depend on how short the benchmark is.
    """
    start = time.perf_counter()
    iterator = iter(ds)
    ready, cpu_start = time.perf_counter(), _cpu_seconds(policy)
    if startup is not None:
        startup.append(ready - start)
    for _ in iterator:
        pass
    seconds = time.perf_counter() - ready
    if cpu is not None:
        cpu.append(_cpu_seconds(policy) - cpu_start)
    return seconds


def decode_only(paths: list[str]) -> tf.data.Dataset:
    """Read and decode every file at full size on all cores, and nothing else: the ceiling."""
    def decode(path):
        # One pixel is returned so nothing is copied, yet the decode must run in full.
        return data_decode.decode_image(tf.io.read_file(path))[0, 0, 0]
    return (tf.data.Dataset.from_tensor_slices(paths)
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
            .batch(256).prefetch(tf.data.AUTOTUNE))


def bench_pipeline(paths: list[str], image_size: int = 224, batch_size: int = 60,
                   aug: config.AugmentConfig | None = None, cache: str = "auto",
                   budget_mb: float = 2048, decode_scale: float = 2.0, repeats: int = 3,
                   log=print, processes: int | str = "auto") -> dict:
    """Time decode-only, the first epoch (fresh cache each time) and later epochs.

    ``processes``: ``data.resample_processes`` ("auto" or a number; 0: threads)."""
    aug = aug or config.AugmentConfig()
    split = as_split(paths)
    for path in paths:  # page cache: time decoding, not the disk
        Path(path).read_bytes()
    ceiling = decode_only(paths)
    _timed_pass(ceiling)  # warm-up: tracing, thread pools
    decode_s, first_s, startup_s, decode_cpu, first_cpu, later_cpu = [], [], [], [], [], []
    for r in range(repeats):
        decode_s.append(_timed_pass(ceiling, cpu=decode_cpu))
        policy = data_cache.Cache(cache, budget_mb, processes=processes)
        ds = datasets.dataset(split, image_size, batch_size, training=True, aug=aug, seed=r,
                          cache=policy, decode_scale=decode_scale)
        first_s.append(_timed_pass(ds, startup_s, first_cpu, policy))
        log(f"  repeat {r + 1}/{repeats}: decode-only {len(paths) / decode_s[-1]:.0f} img/s, "
            f"first epoch {len(paths) / first_s[-1]:.0f} img/s")
    n = len(paths)
    # Later epochs are timed several to a pass (>= ~3000 images), each still a full reshuffle
    # with fresh views, so a small benchmark set measures the steady state that epochs of
    # thousands of images run at, not each pass's start-up and ramp-up.
    per_pass = max(1, math.ceil(3000 / max(n, 1)))
    later = ds.repeat(per_pass)
    _timed_pass(later)  # warm-up of the cached path
    later_s = [_timed_pass(later, cpu=later_cpu, policy=policy) / per_pass for _ in range(repeats)]
    result = {
        "kind": "pipeline", **machine(), "images": n,
        "mean_file_kb": round(sum(os.path.getsize(p) for p in paths) / n / 1024, 1),
        "image_size": image_size,
        "batch_size": batch_size, "repeats": repeats,
        "images_per_s": round(_median_rate(n, later_s), 1),
        "decode_only_images_per_s": round(_median_rate(n, decode_s), 1),
        "first_epoch_images_per_s": round(_median_rate(n, first_s), 1),
        "later_epochs_images_per_s": round(_median_rate(n, later_s), 1),
        "startup_s": round(statistics.median(startup_s), 2), "later_epochs_per_pass": per_pass,
        "decode_scale": decode_scale, **_processes_fields(policy),
        "cache": {"mode": cache, "bytes": policy.nbytes(), "stored": policy.usage(),
                  "budget_mb": budget_mb},
    }
    result["first_epoch_ratio"] = round(result["first_epoch_images_per_s"] / result["decode_only_images_per_s"], 3)
    # Where a ratio comes from: CPU per image (all threads, and the worker processes; medians)
    # and the cores it kept busy (CPU seconds per second of the pass).
    for key, cpu, wall, images in (("decode_only", decode_cpu, decode_s, n), ("first_epoch", first_cpu, first_s, n),
                                   ("later_epochs", later_cpu, later_s, n * per_pass)):
        per_pass_wall = [w * images / n for w in wall]
        result[f"{key}_cpu_ms_per_image"] = round(statistics.median(cpu) / images * 1e3, 4)
        result[f"{key}_cores_busy"] = round(statistics.median(c / w for c, w in zip(cpu, per_pass_wall)), 2)
    return result


# --------------------------------------------------------------------------- model FLOPs


def _macs(layer) -> int:
    """Multiply-accumulates per image of one Conv2D/DepthwiseConv2D/Dense layer, else 0."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        h, w, c = layer.output.shape[1:4]
        kh, kw = layer.kernel_size
        return int(h * w * c * kh * kw)
    if isinstance(layer, keras.layers.Conv2D):
        h, w, c_out = layer.output.shape[1:4]
        kh, kw = layer.kernel_size
        c_in = layer.input.shape[-1] // layer.groups
        return int(h * w * c_out * kh * kw * c_in)
    if isinstance(layer, keras.layers.Dense):
        positions = int(np.prod(layer.input.shape[1:-1])) if len(layer.input.shape) > 2 else 1
        return int(positions * layer.input.shape[-1] * layer.units)
    return 0


def model_flops(model: keras.Model) -> dict:
    """FLOPs per image from the Conv2D and Dense layers' shapes (2 FLOPs per multiply-add).

    Training counts the forward pass, the gradient with respect to the weights of trainable
    layers, and the gradient with respect to the input of layers that have a trainable layer
    before them (frozen early layers need no backward pass at all). BatchNorm, activations and
    pooling are left out (a few percent).

    Returns:
        {"forward_macs", "forward_flops", "train_flops"} per image.
    """
    macs = trainable_before = 0
    train = 0
    for layer in _layers(model):
        m = _macs(layer)
        if not m:
            trainable_before |= bool(layer.trainable_weights)
            continue
        macs += m
        train += 2 * m  # forward
        if layer.trainable_weights:
            train += 2 * m  # weight gradient
        if trainable_before:
            train += 2 * m  # input gradient, needed by the trainable layers below
        trainable_before |= bool(layer.trainable_weights)
    return {"forward_macs": macs, "forward_flops": 2 * macs, "train_flops": train}


def _layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


# --------------------------------------------------------------------------- model and fit


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
        apply_freeze(model, exp.model.freeze, is_head_layer)
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
    rate = _median_rate(steps * exp.train.batch_size, seconds)
    return {"kind": "model", **machine(), "repeats": repeats, "steps": steps,
            "images_per_s": round(rate, 2), **_model_fields(exp, model, precision, rate)}


def bench_fit(paths: list[str], exp: config.Experiment, steps: int = 10, repeats: int = 3,
              cache: str = "auto", budget_mb: float = 2048, decode_scale: float = 2.0,
              log=print, processes: int | str = "auto") -> dict:
    """Training fed by the real train pipeline (cache filled first) against the model alone."""
    model, precision = build(exp)
    size, batch = exp.data.image_size, exp.train.batch_size
    policy = data_cache.Cache(cache, budget_mb, processes=processes)
    pipe = datasets.dataset(as_split(paths), size, batch, training=True, aug=exp.augment,
                        cache=policy, decode_scale=decode_scale, drop_remainder=True)
    fill_s = _timed_pass(pipe)
    log(f"  cache filled in {fill_s:.1f} s ({policy.usage()})")
    log(f"  model alone and fed by the pipeline, alternating: {repeats} x {steps} steps each after a warm-up")
    alone, fed = time_alternating(model, random_batches(size, batch), pipe.repeat(), steps, repeats)
    alone_rate, fed_rate = _median_rate(steps * batch, alone), _median_rate(steps * batch, fed)
    return {"kind": "fit", **machine(), "images": len(paths), "repeats": repeats, "steps": steps,
            "images_per_s": round(fed_rate, 2), "model_only_images_per_s": round(alone_rate, 2),
            "ratio_to_model_only": round(fed_rate / alone_rate, 3),
            "cache": {"mode": cache, "bytes": policy.nbytes(), "budget_mb": budget_mb},
            **_processes_fields(policy), **_model_fields(exp, model, precision, fed_rate)}


def _processes_fields(policy: data_cache.Cache) -> dict:
    """The worker processes that ran the rows (0: threads) and the setting that chose them."""
    ran = any(isinstance(s, WorkerStore) for s in policy.stores)
    fields = {"resample_processes": policy.processes if ran else 0,
              "resample_processes_setting": str(policy.processes_setting), "usable_cores": usable_cores()}
    return {**fields, "resample_processes_error": policy.worker_error} if policy.worker_error else fields


def run(kind: str, data_dir: str | None = None, images: int = 300, log=print, **options) -> dict:
    """Run one benchmark (``tfcovid bench KIND``); images are generated when data_dir is None.

    ``options``: image_size, batch_size, backbone, precision, jit_compile, steps_per_execution,
    freeze, steps, repeats, cache, budget_mb, decode_scale, processes.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown benchmark {kind!r}. Valid benchmarks: {', '.join(KINDS)}.")
    o = {"image_size": 224, "batch_size": 60, "backbone": "vgg16", "precision": "auto",
         "jit_compile": "auto", "steps_per_execution": 1, "freeze": "none", "steps": 10,
         "repeats": 3, "cache": "auto", "budget_mb": 2048, "decode_scale": 2.0, "processes": "auto",
         **options}
    exp = experiment(o["backbone"], o["image_size"], o["batch_size"], o["precision"],
                     o["jit_compile"], o["steps_per_execution"], o["freeze"])
    if kind == "model":
        return bench_model(exp, o["steps"], o["repeats"], log)
    with tempfile.TemporaryDirectory(prefix="tfcovid-bench-") as tmp:
        if data_dir is None:
            log(f"No --data: generating {images} grayscale 1024x1024 JPEGs in {tmp} (deleted afterwards)")
            paths, source = synthetic_xrays(tmp, images), f"generated: {images} grayscale 1024x1024 JPEGs"
        else:
            paths, source = image_files(data_dir), str(data_dir)
            require_usable(paths, data_dir, exp.data.max_pixels, log)  # before any timing
        if kind == "pipeline":
            result = bench_pipeline(paths, o["image_size"], o["batch_size"], exp.augment, o["cache"],
                                    o["budget_mb"], o["decode_scale"], o["repeats"], log, o["processes"])
        else:
            if len(paths) < o["batch_size"]:
                raise types.DataError(f"{len(paths)} images are fewer than one batch of {o['batch_size']}; "
                                     "use more images or a smaller --batch-size.")
            result = bench_fit(paths, exp, o["steps"], o["repeats"], o["cache"], o["budget_mb"],
                               o["decode_scale"], log, o["processes"])
    return {**result, "data": source}


def summary(result: dict) -> str:
    """A few human-readable lines for one benchmark result."""
    r = result
    where = f"{r['device']}, load average {r['load_average_1min']}"
    if r["kind"] == "pipeline":
        return "\n".join([
            f"Train pipeline on {r['images']} images ({r['data']}; mean file {r['mean_file_kb']} KB), "
            f"{r['image_size']} px, batch {r['batch_size']}, {where}; medians of {r['repeats']}:",
            f"  decode only (the ceiling)  {r['decode_only_images_per_s']:8.1f} images/s{_cpu(r, 'decode_only')}",
            f"  first epoch (fills cache)  {r['first_epoch_images_per_s']:8.1f} images/s "
            f"({r['first_epoch_ratio']:.0%} of decode only){_cpu(r, 'first_epoch')}",
            f"  later epochs (from cache)  {r['later_epochs_images_per_s']:8.1f} images/s{_cpu(r, 'later_epochs')}",
            f"  start-up per pass (not in the rates above): {r['startup_s']} s",
            f"  cache: {r['cache']['stored']}",
            f"  augmentation resampled with {augment.describe_resampler(r['augment_resampler'])}"
            f"{_processes(r)}",
        ])
    model = (f"{r['backbone']} (freeze {r['freeze']}) at {r['image_size']} px, batch {r['batch_size']}, "
             f"{r['precision']}{' + loss scaling' if r['loss_scaling'] else ''}, XLA "
             f"{'on' if r['jit_compile'] else 'off'}, steps_per_execution {r['steps_per_execution']}, {where}")
    flops = (f"{r['train_gflops_per_image']} GFLOPs per image per training step "
             f"(forward {r['forward_gflops_per_image']}) -> {r['tflops']} TFLOP/s")
    if r["kind"] == "model":
        return f"Training step, random tensors: {model}\n  {r['images_per_s']} images/s; {flops}"
    return (f"Training fed by the pipeline ({r['data']}{_processes(r)}): {model}\n"
            f"  end to end {r['images_per_s']} images/s; model alone {r['model_only_images_per_s']} "
            f"images/s; ratio {r['ratio_to_model_only']:.2f}\n  {flops}")


def _cpu(result: dict, key: str) -> str:
    if f"{key}_cpu_ms_per_image" not in result:  # a result saved by an earlier version
        return ""
    return (f"; {result[f'{key}_cpu_ms_per_image']:.3f} ms CPU per image, "
            f"{result[f'{key}_cores_busy']:.1f} cores busy")


def _processes(result: dict) -> str:
    n, auto = result.get("resample_processes", 0), result.get("resample_processes_setting") == "auto"
    if "resample_processes_error" in result:
        return f", in threads: the worker processes could not start ({result['resample_processes_error']})"
    return f", in {n} worker processes" + (" (auto)" if auto else "") if n else ""

