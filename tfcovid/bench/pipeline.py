"""``tfcovid bench pipeline``: the train pipeline's first and later epochs against decoding alone."""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import tensorflow as tf

from tfcovid import config
from tfcovid.bench.files import as_split
from tfcovid.bench.timing import machine, median_rate, timed_pass
from tfcovid.data import cache as data_cache
from tfcovid.data import datasets
from tfcovid.data import decode as data_decode
from tfcovid.data.opencv.process_pool import WorkerStore, usable_cores


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
    timed_pass(ceiling)  # warm-up: tracing, thread pools
    decode_s, first_s, startup_s, decode_cpu, first_cpu, later_cpu = [], [], [], [], [], []
    for r in range(repeats):
        decode_s.append(timed_pass(ceiling, cpu=decode_cpu))
        policy = data_cache.Cache(cache, budget_mb, processes=processes)
        ds = datasets.dataset(split, image_size, batch_size, training=True, aug=aug, seed=r,
                          cache=policy, decode_scale=decode_scale)
        first_s.append(timed_pass(ds, startup_s, first_cpu, policy))
        log(f"  repeat {r + 1}/{repeats}: decode-only {len(paths) / decode_s[-1]:.0f} img/s, "
            f"first epoch {len(paths) / first_s[-1]:.0f} img/s")
    n = len(paths)
    # Later epochs are timed several to a pass (>= ~3000 images), each still a full reshuffle
    # with fresh views, so a small benchmark set measures the steady state that epochs of
    # thousands of images run at, not each pass's start-up and ramp-up.
    per_pass = max(1, math.ceil(3000 / max(n, 1)))
    later = ds.repeat(per_pass)
    timed_pass(later)  # warm-up of the cached path
    later_s = [timed_pass(later, cpu=later_cpu, policy=policy) / per_pass for _ in range(repeats)]
    result = {
        "kind": "pipeline", **machine(), "images": n,
        "mean_file_kb": round(sum(os.path.getsize(p) for p in paths) / n / 1024, 1),
        "image_size": image_size,
        "batch_size": batch_size, "repeats": repeats,
        "images_per_s": round(median_rate(n, later_s), 1),
        "decode_only_images_per_s": round(median_rate(n, decode_s), 1),
        "first_epoch_images_per_s": round(median_rate(n, first_s), 1),
        "later_epochs_images_per_s": round(median_rate(n, later_s), 1),
        "startup_s": round(statistics.median(startup_s), 2), "later_epochs_per_pass": per_pass,
        "decode_scale": decode_scale, **processes_fields(policy),
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


def processes_fields(policy: data_cache.Cache) -> dict:
    """The worker processes that ran the rows (0: threads) and the setting that chose them."""
    ran = any(isinstance(s, WorkerStore) for s in policy.stores)
    fields = {"resample_processes": policy.processes if ran else 0,
              "resample_processes_setting": str(policy.processes_setting), "usable_cores": usable_cores()}
    return {**fields, "resample_processes_error": policy.worker_error} if policy.worker_error else fields
