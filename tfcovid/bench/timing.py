"""How the benchmarks time: medians of timed passes, CPU seconds, and the machine they ran on."""
from __future__ import annotations

import os
import statistics
import time

import keras
import tensorflow as tf

from tfcovid.data import augment
from tfcovid.data import cache as data_cache
from tfcovid.data.opencv.process_pool import WorkerStore
from tfcovid.training import devices


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
    import jax  # optional: only under KERAS_BACKEND=jax

    return {"keras_backend": backend, "jax": jax.__version__}


def median_rate(images: int, seconds: list[float]) -> float:
    return images / statistics.median(seconds)


def cpu_seconds(policy: data_cache.Cache | None = None) -> float:
    """CPU time used so far by this process (all its threads) and ``policy``'s resample worker
    processes."""
    stores = policy.stores if policy is not None else []
    return time.process_time() + sum(s.cpu_seconds() for s in stores if isinstance(s, WorkerStore))


def timed_pass(ds, startup: list | None = None, cpu: list | None = None, policy=None) -> float:
    """Seconds to read one full pass, from a ready iterator; its CPU seconds go into ``cpu``
    (this process and ``policy``'s worker processes).

    Creating the iterator instantiates and optimises the pipeline's functions (0.1-1 s, once
    per pass, whatever the number of images); it is timed apart, into ``startup``, so the
    figure is the pipeline's throughput and does not depend on how short the benchmark is.
    """
    start = time.perf_counter()
    iterator = iter(ds)
    ready, cpu_start = time.perf_counter(), cpu_seconds(policy)
    if startup is not None:
        startup.append(ready - start)
    for _ in iterator:
        pass
    seconds = time.perf_counter() - ready
    if cpu is not None:
        cpu.append(cpu_seconds(policy) - cpu_start)
    return seconds
