"""Where and how the model runs: device description, precision policy, tf.distribute strategy."""

from __future__ import annotations

import contextlib
import json
import os

import keras
import tensorflow as tf


def gpu_compute_capability() -> tuple[int, int] | None:
    """Compute capability of the first visible GPU, or None without one."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("compute_capability")


def describe_device() -> str:
    """E.g. 'GPU NVIDIA H100 (cc 9.0) x1' or 'CPU (2 cores)'."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        cc = details.get("compute_capability")
        return f"GPU {details.get('device_name', 'unknown')} (cc {cc[0]}.{cc[1]}) x{len(gpus)}" if cc else f"GPU x{len(gpus)}"
    return f"CPU ({os.cpu_count()} cores)"


def resolve_precision(name: str) -> str:
    """Map --precision auto to a Keras dtype policy name.

    bfloat16 on GPUs of compute capability >= 8 (Ampere and newer), float16 with loss scaling
    on 7.x (Volta/Turing tensor cores), float32 elsewhere (CPUs gain nothing from float16).
    """
    if name != "auto":
        return name
    cc = gpu_compute_capability()
    if cc is None:
        return "float32"
    if cc[0] >= 8:
        return "mixed_bfloat16"
    if cc[0] == 7:
        return "mixed_float16"
    return "float32"


@contextlib.contextmanager
def dtype_policy(name: str):
    """Set Keras's global dtype policy for the block and restore the previous one after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def tf_config_cluster() -> dict | None:
    """The cluster named by TF_CONFIG, if it names more than one task."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        cluster = json.loads(raw).get("cluster", {})
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from None
    return cluster if sum(len(v) for v in cluster.values()) > 1 else None


def make_strategy(name: str):
    """Return (strategy, description) for --strategy auto|one|mirrored|multiworker."""
    if name == "auto":
        if tf_config_cluster():
            name = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "one":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif name == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise ValueError(f"Unknown strategy {name!r}. Valid strategies: auto, one, mirrored, multiworker.")
    return strategy, f"{name} ({strategy.num_replicas_in_sync} replica(s))"


def describe_compute(model: keras.Model) -> str:
    """One line: the compiled model's compute/variable/logit dtypes, loss scaling, XLA, steps.

    Read back from the model rather than from the config, so the log shows what took effect.
    """
    policy = model.dtype_policy
    logits = model.outputs[0].dtype if model.outputs else "?"
    scaled = isinstance(getattr(model, "optimizer", None), keras.optimizers.LossScaleOptimizer)
    return (f"compute {policy.compute_dtype}, variables {policy.variable_dtype}, logits {logits}"
            f"{', dynamic loss scaling' if scaled else ''}; XLA {'on' if model.jit_compile else 'off'}; "
            f"steps_per_execution {model.steps_per_execution}")
