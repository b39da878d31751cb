"""Where the model runs and in what precision: the device line, ``--precision auto`` (bfloat16 on
GPUs of compute capability >= 8, float16 on 7.x, float32 on CPU) and deterministic ops.
"""
from __future__ import annotations

import contextlib
import os

import keras
import tensorflow as tf

from tfcovid.config import ConfigError
from tfcovid.utils import tf_import


def _jax_gpus() -> list:
    """JAX's GPUs when Keras runs on the JAX backend (KERAS_BACKEND=jax), else []."""
    if keras.backend.backend() != "jax":
        return []
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:  # JAX found no GPU backend
        return []


def _tf_gpus() -> list:
    """TensorFlow's GPUs when Keras runs on TensorFlow, else [] (they do not run the model)."""
    return tf.config.list_physical_devices("GPU") if keras.backend.backend() == "tensorflow" else []


def _cc_tuple(value) -> tuple[int, int] | None:
    """(major, minor) from a compute capability as TensorFlow, (9, 0), or JAX, '9.0', gives it."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return int(value[0]), int(value[1])
    major, _, minor = str(value).partition(".")
    return int(major), int(minor or 0)


def _gpu() -> tuple[str, tuple[int, int] | None, int, bool] | None:
    """(name, compute capability, count, on JAX) of the GPUs the model runs on, or None.

    Those of the backend Keras runs on: TensorFlow's, or JAX's under KERAS_BACKEND=jax
    (tf.data still runs on TensorFlow then, which may be a CPU-only build).
    """
    jax_gpus = _jax_gpus()
    if jax_gpus:
        first = jax_gpus[0]
        return first.device_kind, _cc_tuple(getattr(first, "compute_capability", None)), len(jax_gpus), True
    gpus = _tf_gpus()
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    cc = _cc_tuple(details.get("compute_capability"))
    return details.get("device_name", "unknown"), cc, len(gpus), False


def gpu_compute_capability() -> tuple[int, int] | None:
    """Compute capability of the first GPU the model runs on, or None without one."""
    gpu = _gpu()
    return gpu[1] if gpu else None


def describe_device() -> str:
    """E.g. 'GPU NVIDIA H100 (cc 9.0) x1', 'CPU (2 cores)', 'CPU (2 cores; no CUDA GPU: cuInit
    failed, UNKNOWN ERROR (303))' (see ``tfcovid.utils.tf_import``), or on JAX's GPU
    'GPU NVIDIA H100 80GB HBM3 (cc 9.0) x1, JAX backend'."""
    gpu = _gpu()
    if gpu is None:
        backend = keras.backend.backend()
        on = "" if backend == "tensorflow" else f", {backend.upper()} backend"
        problem = tf_import.cuda_problem()  # TensorFlow's cuInit failure, its ERROR line held back
        why = f"; no CUDA GPU: cuInit failed, {problem.rsplit(': ', 1)[-1]}" if problem else ""
        return f"CPU ({os.cpu_count()} cores{why}){on}"
    name, cc, count, on_jax = gpu
    if on_jax:
        return f"GPU {name}" + (f" (cc {cc[0]}.{cc[1]})" if cc else "") + f" x{count}, JAX backend"
    return f"GPU {name} (cc {cc[0]}.{cc[1]}) x{count}" if cc else f"GPU x{count}"


def accelerator() -> str | None:
    """"GPU:0" or "TPU:0" where the model trains on one (the backend Keras runs on), else None."""
    if keras.backend.backend() == "jax":
        import jax  # optional: only under KERAS_BACKEND=jax

        first = jax.devices()[0]
        return None if first.platform == "cpu" else f"{first.platform.upper()}:0"
    for kind in ("GPU", "TPU"):
        if keras.backend.backend() == "tensorflow" and tf.config.list_logical_devices(kind):
            return f"{kind}:0"
    return None


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


class op_determinism:
    """Deterministic ops for the duration of one fit (``--deterministic``).

    TensorFlow's op determinism is process-wide; it is turned off again afterwards where
    TensorFlow allows (its switch-off is not public API), so fits in the same process do not
    inherit it. Under the JAX backend XLA decides, and on a GPU only the XLA flag
    ``--xla_gpu_deterministic_ops=true``, set before JAX starts, makes it deterministic:
    without it the fit stops before it begins (see ``check_determinism``).
    """

    def __init__(self, on: bool):
        from tensorflow.python.framework import config as tf_config

        self._is_on = getattr(tf_config, "is_op_determinism_enabled", lambda: False)
        self._disable = getattr(tf_config, "disable_op_determinism", None)
        self.on = on and not self._is_on()

    def __enter__(self):
        if self.on:
            tf.config.experimental.enable_op_determinism()

    def __exit__(self, *exc):
        if self.on and self._disable is not None:
            self._disable()
        return False


JAX_DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def check_determinism(deterministic: bool) -> None:
    """Refuse ``--deterministic`` where it would not hold: on JAX's GPU without XLA's flag."""
    if deterministic and _jax_gpus() and JAX_DETERMINISTIC_FLAG not in os.environ.get("XLA_FLAGS", ""):
        raise ConfigError(
            "--deterministic on the JAX backend needs XLA's deterministic GPU ops, which must be "
            f"set before JAX starts: XLA_FLAGS={JAX_DETERMINISTIC_FLAG} tfcovid fit ... "
            "(or train on the default TensorFlow backend).")


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
