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

The pieces: ``files`` (the images), ``timing`` (timed passes, the machine), ``pipeline``,
``flops`` and ``training`` (``model`` and ``fit``); ``run`` and ``summary`` are here.

May import: ``training``, ``data``, ``models``, ``config``, ``utils``; never ``inference`` or ``cli``.
"""

from __future__ import annotations

import tempfile

from tfcovid.bench.files import as_split, image_files, require_usable, synthetic_xrays
from tfcovid.bench.flops import model_flops
from tfcovid.bench.pipeline import bench_pipeline, decode_only
from tfcovid.bench.timing import machine
from tfcovid.bench.training import (
    bench_fit,
    bench_model,
    build,
    experiment,
    random_batches,
    time_alternating,
    time_training,
)
from tfcovid.config.schema import DataConfig
from tfcovid.data import augment, types

__all__ = [
    "KINDS", "as_split", "bench_fit", "bench_model", "bench_pipeline", "build", "decode_only",
    "experiment", "image_files", "machine", "model_flops", "random_batches", "require_usable",
    "run", "summary", "synthetic_xrays", "time_alternating", "time_training",
]

KINDS = ("pipeline", "model", "fit")


# run calls the benchmarks by this module's names, so a test can replace them here.
def run(kind: str, data_dir: str | None = None, images: int = 300, log=print, **options) -> dict:
    """Run one benchmark (``tfcovid bench KIND``); images are generated when data_dir is None.

    ``options``: image_size, batch_size, backbone, precision, jit_compile, steps_per_execution,
    freeze, steps, repeats, cache, budget_mb, decode_scale, processes, augment_on and device_cache_mb (fit), max_pixels (the
    limit a --data folder's images are checked against; default fit's data.max_pixels).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown benchmark {kind!r}. Valid benchmarks: {', '.join(KINDS)}.")
    o = {"image_size": 224, "batch_size": 60, "backbone": "vgg16", "precision": "auto",
         "jit_compile": "auto", "steps_per_execution": 1, "freeze": "none", "steps": 10,
         "repeats": 3, "cache": "auto", "budget_mb": 2048, "decode_scale": 2.0, "processes": "auto",
         "augment_on": "auto", "device_cache_mb": DataConfig.device_cache_mb, **options}
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
            limit = o.get("max_pixels") or exp.data.max_pixels
            require_usable(paths, data_dir, limit, log)  # before any timing
        if kind == "pipeline":
            result = bench_pipeline(paths, o["image_size"], o["batch_size"], exp.augment, o["cache"],
                                    o["budget_mb"], o["decode_scale"], o["repeats"], log, o["processes"])
        else:
            if len(paths) < o["batch_size"]:
                raise types.DataError(f"{len(paths)} images are fewer than one batch of {o['batch_size']}; "
                                     "use more images or a smaller --batch-size.")
            result = bench_fit(paths, exp, o["steps"], o["repeats"], o["cache"], o["budget_mb"],
                               o["decode_scale"], log, o["processes"], o["augment_on"], o["device_cache_mb"])
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
    return (f"Training fed by the pipeline ({r['data']}{_processes(r)}; {r.get('augment_on', '')}): {model}\n"
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
