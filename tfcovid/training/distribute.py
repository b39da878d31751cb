"""tf.distribute: TF_CONFIG clusters, the strategy for `--strategy`, and what multi-worker training needs."""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import types
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfcovid.config import STRATEGIES, ConfigError

_TASK_TYPES = ("chief", "worker")


_STRATEGIES: dict = {}  # (name, devices) -> the process's strategy instance


def tf_config_cluster() -> dict | None:
    """The cluster named by TF_CONFIG when it has more than one task, else None.

    TF_CONFIG is TensorFlow's own contract for multi-worker training (Vertex AI and the
    Kubeflow TFJob operator set it); it is checked here so a mistake is a clear error
    rather than a hang while the workers wait for each other.

    Raises:
        ConfigError: TF_CONFIG is not JSON, names task types MultiWorkerMirroredStrategy
            does not use, or this task is not in the cluster.
    """
    raw = os.environ.get("TF_CONFIG")
    if raw is not None and not raw.strip():
        # Set but empty (an unset variable exported as ""): as unset. TensorFlow's own
        # resolvers json.loads it and raise a JSONDecodeError from inside the strategy.
        del os.environ["TF_CONFIG"]
        return None
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {err}. See docs/distributed.md (several machines: TF_CONFIG).") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"TF_CONFIG must be a JSON object with 'cluster' and 'task', got {raw!r}. "
                          "See docs/distributed.md (several machines: TF_CONFIG).")
    cluster = spec.get("cluster") or {}
    if not isinstance(cluster, dict):
        raise ConfigError(f"TF_CONFIG's 'cluster' must map task types to address lists, got {cluster!r}.")
    if sum(len(v) for v in cluster.values()) <= 1:
        return None
    unknown = sorted(set(cluster) - set(_TASK_TYPES))
    if unknown:
        raise ConfigError(
            f"TF_CONFIG names task type(s) {unknown}; tfcovid trains with "
            f"MultiWorkerMirroredStrategy, which uses only {' and '.join(_TASK_TYPES)} tasks "
            "(no parameter servers)."
        )
    task = spec.get("task") or {}
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ConfigError(
            f"TF_CONFIG's task {task!r} is not in its cluster {cluster!r}. Each process needs the "
            "same cluster and its own task, e.g. {\"type\": \"worker\", \"index\": 1}."
        )
    return cluster


def tasks_on_this_host(cluster: dict | None) -> int:
    """How many of TF_CONFIG's tasks run on this machine (1 without a cluster): they share its
    cores, e.g. for ``data.resample_processes: auto``. A task is local when its address names
    localhost, a loopback address or this host's name."""
    if not cluster:
        return 1
    local = {"localhost", "127.0.0.1", "::1", "[::1]", socket.gethostname(), socket.getfqdn()}
    hosts = [str(address).rsplit(":", 1)[0] for addresses in cluster.values() for address in addresses]
    return max(sum(host in local for host in hosts), 1)


def split_cpu(replicas: int) -> None:
    """Split the CPU into ``replicas`` logical devices, so MirroredStrategy runs without GPUs.

    For trying distribution (and testing it) on a laptop; it must run before TensorFlow
    initialises its devices, i.e. before any tensor is created.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])


def pick_strategy(name: str, cluster: dict | None, gpus: int) -> str:
    """Resolve --strategy auto: multiworker when TF_CONFIG names a cluster, mirrored on >1 GPU."""
    if name not in STRATEGIES:
        raise ConfigError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(STRATEGIES)}.")
    if name != "auto":
        return name
    if cluster:
        return "multiworker"
    return "mirrored" if gpus > 1 else "one"


def worker_info(strategy) -> tuple[int, int]:
    """(this worker's index, number of workers); the chief is index 0 (single host: (0, 1))."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 0, 1
    cluster = resolver.cluster_spec().as_dict()
    chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
    if chiefs + workers <= 1 or resolver.task_type is None:
        return 0, 1
    if resolver.task_type == "chief":
        return 0, chiefs + workers
    return chiefs + int(resolver.task_id), chiefs + workers


def is_chief(strategy) -> bool:
    """True where the run directory is written: the only worker, or worker 0 / the chief."""
    return worker_info(strategy)[0] == 0


@contextlib.contextmanager
def _signals_stop_at_once(cluster: dict | None):
    """While MultiWorkerMirroredStrategy waits in C++ for every worker of the cluster, Python's
    handlers cannot run (they wait for the call to return), so Ctrl-C was ignored until all
    workers came: forever, if one never does. Here it ends the process at once (the default
    action; nothing has been written yet), and a line says what the process waits for. SIGTERM
    stays ignored there: TensorFlow's preemption notifier installs its own handler during that
    wait (a scheduler's SIGKILL after its grace period still ends it)."""
    if cluster and sum(len(v) for v in cluster.values()) > 1 and \
            threading.current_thread() is threading.main_thread():
        peers = ", ".join(str(a) for addresses in cluster.values() for a in addresses)
        print(f"Waiting for the {sum(len(v) for v in cluster.values())} tasks of TF_CONFIG's "
              f"cluster ({peers}) to start; Ctrl-C stops.", flush=True)
        previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    else:
        yield


def make_strategy(name: str):
    """Return (strategy, description) for --strategy auto|one|mirrored|multiworker.

    ``mirrored`` replicates over every visible GPU (or, without GPUs, over the logical CPUs
    made by :func:`split_cpu`). ``multiworker`` must be created before TensorFlow runs any
    op, which is why ``fit`` makes the strategy first.
    """
    cluster = tf_config_cluster()
    # Physical devices only: listing logical ones would start TensorFlow's runtime, after
    # which MultiWorkerMirroredStrategy can no longer configure its collectives.
    name = pick_strategy(name, cluster, len(tf.config.list_physical_devices("GPU")))
    if name == "one":
        strategy = tf.distribute.get_strategy()
    else:
        devices = None
        if name == "mirrored" and not tf.config.list_physical_devices("GPU"):
            cpus = tf.config.list_logical_devices("CPU")
            devices = tuple(d.name for d in cpus) if len(cpus) > 1 else None
        # One instance per process: two strategies over the same devices number their
        # collective ops alike, and the second one's all-reduces then collide with the first's.
        key = (name, devices)
        if key not in _STRATEGIES:
            if name == "mirrored":
                _STRATEGIES[key] = tf.distribute.MirroredStrategy(devices)
            else:
                with _signals_stop_at_once(cluster):
                    _STRATEGIES[key] = tf.distribute.MultiWorkerMirroredStrategy()
        strategy = _STRATEGIES[key]
    replicas = strategy.num_replicas_in_sync
    index, workers = worker_info(strategy)
    desc = f"{name} ({replicas} replica{'s' if replicas != 1 else ''}"
    if workers > 1:
        desc += f" on {workers} workers; this is worker {index}{', the chief' if index == 0 else ''}"
    elif name == "multiworker" and cluster is None:
        desc += "; TF_CONFIG names no cluster of two or more tasks, so this process trains alone"
    elif name == "mirrored" and replicas == 1:
        desc += "; one device: no GPU is visible"
    return strategy, desc + ")"


def per_replica_batches(global_batch: int, replicas: int) -> str:
    """How tf.distribute splits a global batch, e.g. '60 = 2 x 30' or '60 = 4 x 15'."""
    if replicas == 1:
        return str(global_batch)
    low, extra = divmod(global_batch, replicas)
    if not extra:
        return f"{global_batch} = {replicas} x {low}"
    return f"{global_batch} = {extra} x {low + 1} + {replicas - extra} x {low}"


def synchronize_batchnorm(model: keras.Model) -> int:
    """Make every BatchNormalization layer use global-batch statistics; return how many.

    Keras 3 keeps each replica's moving mean/variance separately (they drift apart, and a
    checkpoint keeps only replica 0's). Synchronised BatchNorm all-reduces the batch moments,
    so every replica and worker holds identical statistics, computed over the global batch
    as on the study's single GPU. Read at trace time, so setting it before fit() suffices.
    """
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.synchronized = True
    return len(layers)


def fit_xla_to_strategy(model: keras.Model, strategy) -> str | None:
    """Turn XLA off when one step spans several local devices; return a note when it did.

    Keras 3 compiles the whole ``strategy.run`` step (every replica) as one XLA function, and
    XLA cannot use variables placed on other devices (tensorflow.org/xla/known_issues), so
    MirroredStrategy over 2+ GPUs fails with jit_compile=True.
    """
    try:
        local_devices = len(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one device
        local_devices = 1
    if local_devices > 1 and model.jit_compile:
        model.jit_compile = False
        return "XLA off: one Keras step spans several devices, which XLA cannot compile"
    return None


def weights_fingerprint(model: keras.Model) -> str:
    """Short sha256 of all weights (in order): equal on every worker of a synchronous run."""
    digest = hashlib.sha256()
    for value in model.get_weights():
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def scratch_dir(strategy, resume: str | Path | None = None) -> Path | None:
    """Where a non-chief worker writes what the chief writes to the run directory.

    Returns None on the chief (it writes the real run directory). Other workers get a new
    temporary folder, removed by :func:`release` or at the latest when the process exits.
    Keras's checkpoint callbacks must write on every worker, so they write there. When a
    run is resumed, its backup/ (on storage every worker sees) is copied in, so all workers
    restore the same epoch and weights.
    """
    index, _ = worker_info(strategy)
    if index == 0:
        return None
    path = Path(tempfile.mkdtemp(prefix=f"tfcovid-worker{index}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    if resume is not None:
        backup = Path(resume) / "backup"
        if not backup.is_dir():
            raise ConfigError(
                f"Worker {index} cannot see {backup}: resuming a multi-worker run needs the run "
                "directory on storage every worker mounts (NFS, a shared volume)."
            )
        shutil.copytree(backup, path / "backup")
    return path


def release(path: Path | None) -> None:
    """Remove a worker's scratch folder (no-op for None)."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def keras_multiworker_fixes(model: keras.Model, strategy) -> bool:
    """Work around Keras 3's fit() under MultiWorkerMirroredStrategy; True when applied.

    Keras 3 (up to at least 3.15) fails there in two places (keras-team/keras#20585):
    ``_maybe_symbolic_build`` all-reduces a whole (x, y) batch just to learn its shapes, and
    ``reduce_per_replica`` reduces scalar logs along an axis 0 they do not have. The first is
    replaced, for this model only, by reading the local replica's batch (shapes are all it
    needs); the second reduces scalars with axis=None. predict()'s cross-worker gather is
    Keras's own and keeps the input order. No-op for other strategies or other Keras layouts.
    """
    if worker_info(strategy)[1] <= 1:
        return False
    try:
        from keras.src.backend.tensorflow import trainer as tf_trainer
    except ImportError:  # pragma: no cover - a Keras layout this fix does not know
        return False
    if not hasattr(tf_trainer, "reduce_per_replica") or not hasattr(model, "_maybe_symbolic_build"):
        return False  # pragma: no cover
    if not getattr(tf_trainer.reduce_per_replica, "_tfcovid_fix", False):
        original = tf_trainer.reduce_per_replica

        def reduce_per_replica(values, strategy, reduction):
            if reduction in ("auto", "mean") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
                return tf.nest.map_structure(
                    lambda v: strategy.reduce("MEAN", v, axis=None)
                    if isinstance(v, tf.distribute.DistributedValues) else v, values)
            return original(values, strategy, reduction)

        reduce_per_replica._tfcovid_fix = True
        tf_trainer.reduce_per_replica = reduce_per_replica

    def local_values(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(local_values, next(it))
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(maybe_symbolic_build, model)
    return True


class forget_traced_gradients:
    """Drop the gradient functions TensorFlow registered while tracing one fit, afterwards.

    Keras's optimizer all-reduces gradients through ``ReplicaContext.all_reduce`` even with
    one replica, and in graph mode that registers a ``tf.custom_gradient`` in TensorFlow's
    process-wide gradient registry, which is never emptied. The entry holds the traced train
    step, and with it a handle to every model and optimizer variable: without this, each
    ``fit`` in a long-lived process (a notebook, a sweep) kept its model's weights and
    optimizer state alive (~170 MB per VGG16 fit, measured by tests/test_soak.py). The
    registry is private TensorFlow API; if it moves, this does nothing.
    """

    def __enter__(self):
        from tensorflow.python.framework import ops as tf_ops

        registry = getattr(getattr(tf_ops, "_gradient_registry", None), "_registry", None)
        self._registry = registry if isinstance(registry, dict) else None
        self._before = set(self._registry) if self._registry is not None else set()
        return self

    def __exit__(self, *exc):
        if self._registry is not None:
            for key in set(self._registry) - self._before:
                if key.startswith("CustomGradient-"):
                    del self._registry[key]
        return False
