"""tf.distribute: strategy choice, mirrored replicas on a split CPU, and a real two-worker run.

The two subprocess tests are the expensive ones (a TensorFlow start-up each, ResNet18 at 32 px,
tiny data). The two-worker test uses only loopback addresses and kills its workers on any
failure or after its time limit.
"""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import pytest
import tensorflow as tf
import yaml

from tfcovid.data import prepare as data_prepare
from tfcovid.training import distribute as training_distribute
from tfcovid.config import ConfigError

WORKER_LIMIT_S = 300  # hard bound on the two-worker run (it takes about 1-2 minutes on 2 cores)


class FakeResolver:
    def __init__(self, cluster, task_type, task_id):
        self.task_type, self.task_id, self._cluster = task_type, task_id, cluster

    def cluster_spec(self):
        return tf.train.ClusterSpec(self._cluster)


def _fake_strategies(monkeypatch, task=("worker", 0), cluster=None):
    """Replace the strategy classes so choosing one starts no servers and needs no GPUs."""
    made = []

    class FakeMirrored:
        num_replicas_in_sync = 2

        def __init__(self, devices=None):
            made.append(("mirrored", devices))

    class FakeMultiWorker:
        num_replicas_in_sync = 2

        def __init__(self):
            made.append(("multiworker", None))
            self.cluster_resolver = FakeResolver(cluster, *task)

    monkeypatch.setattr(tf.distribute, "MirroredStrategy", FakeMirrored)
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", FakeMultiWorker)
    monkeypatch.setattr(training_distribute, "_STRATEGIES", {})
    return made


def _tf_config(cluster, kind="worker", index=0):
    return json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})


def test_auto_picks_multiworker_mirrored_or_one():
    assert training_distribute.pick_strategy("auto", {"worker": ["a:1", "b:2"]}, 8) == "multiworker"
    assert training_distribute.pick_strategy("auto", None, 2) == "mirrored"
    assert training_distribute.pick_strategy("auto", None, 1) == "one"
    assert training_distribute.pick_strategy("auto", None, 0) == "one"
    for name in ("one", "mirrored", "multiworker"):
        assert training_distribute.pick_strategy(name, None, 0) == name
    with pytest.raises(ConfigError, match="Valid strategies: auto, one, mirrored, multiworker"):
        training_distribute.pick_strategy("horovod", None, 0)


def test_tf_config_is_checked(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert training_distribute.tf_config_cluster() is None
    two = {"worker": ["localhost:1", "localhost:2"]}
    monkeypatch.setenv("TF_CONFIG", _tf_config(two, index=1))
    assert training_distribute.tf_config_cluster() == two
    monkeypatch.setenv("TF_CONFIG", _tf_config({"worker": ["localhost:1"]}))
    assert training_distribute.tf_config_cluster() is None  # one task: nothing to distribute
    for bad, message in (
        ("{not json", "not valid JSON"),
        (_tf_config({"worker": ["localhost:1"], "ps": ["localhost:2"]}), r"task type\(s\) \['ps'\]"),
        (_tf_config(two, index=2), "is not in its cluster"),
        (_tf_config(two, kind="chief"), "is not in its cluster"),
        ("[1, 2]", r"must be a JSON object with 'cluster' and 'task', got '\[1, 2\]'"),
    ):
        monkeypatch.setenv("TF_CONFIG", bad)
        with pytest.raises(ConfigError, match=message):
            training_distribute.tf_config_cluster()
    for empty in ("", "  "):  # exported but empty: as unset, and removed before TensorFlow reads it
        monkeypatch.setenv("TF_CONFIG", empty)
        assert training_distribute.tf_config_cluster() is None and "TF_CONFIG" not in os.environ


def test_waiting_for_a_cluster_can_be_stopped(tmp_path):
    """A worker whose peers never come waits in C++, where Python's handlers cannot run: Ctrl-C
    was ignored. It now ends the process at once. (SIGTERM stays TensorFlow's: its preemption
    notifier installs a handler of its own during that wait.)"""
    import signal

    ports = _free_loopback_ports(2)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               TF_CONFIG=_tf_config({"worker": [f"localhost:{p}" for p in ports]}, index=0))
    proc = subprocess.Popen([sys.executable, "-c", "from tfcovid.training import distribute; distribute.make_strategy('auto')"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line, deadline = "", time.monotonic() + 120
        while "Waiting for the 2 tasks" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert line.startswith(f"Waiting for the 2 tasks of TF_CONFIG's cluster (localhost:{ports[0]}, "
                               f"localhost:{ports[1]}) to start; Ctrl-C stops."), line
        time.sleep(3)  # inside MultiWorkerMirroredStrategy's wait by now
        assert proc.poll() is None  # still waiting for the worker that never comes
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == -signal.SIGINT
    finally:
        proc.kill()
        proc.wait()


def test_make_strategy_follows_tf_config_and_devices(monkeypatch):
    cluster = {"chief": ["localhost:1"], "worker": ["localhost:2", "localhost:3"]}
    made = _fake_strategies(monkeypatch, task=("worker", 1), cluster=cluster)
    monkeypatch.setenv("TF_CONFIG", _tf_config(cluster, "worker", 1))
    strategy, desc = training_distribute.make_strategy("auto")
    assert made == [("multiworker", None)]
    # With a chief task, the chief is worker 0 and worker i is i + 1.
    assert training_distribute.worker_info(strategy) == (2, 3) and not training_distribute.is_chief(strategy)
    assert desc == "multiworker (2 replicas on 3 workers; this is worker 2)"

    monkeypatch.delenv("TF_CONFIG")
    gpus = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU"),
            tf.config.PhysicalDevice("/physical_device:GPU:1", "GPU")]
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: gpus if kind == "GPU" else real(kind))
    strategy, desc = training_distribute.make_strategy("auto")
    assert made[-1] == ("mirrored", None) and desc == "mirrored (2 replicas)"
    assert training_distribute.worker_info(strategy) == (0, 1) and training_distribute.is_chief(strategy)


def test_a_strategy_that_ends_up_alone_says_why(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    made = _fake_strategies(monkeypatch, cluster={})  # what a resolver without TF_CONFIG holds
    monkeypatch.setattr(tf.distribute.MultiWorkerMirroredStrategy, "num_replicas_in_sync", 1)
    _, desc = training_distribute.make_strategy("multiworker")
    assert made == [("multiworker", None)]
    assert desc == "multiworker (1 replica; TF_CONFIG names no cluster of two or more tasks, so this process trains alone)"
    monkeypatch.setattr(tf.distribute.MirroredStrategy, "num_replicas_in_sync", 1)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: ["/cpu:0"])
    _, desc = training_distribute.make_strategy("mirrored")
    assert desc == "mirrored (1 replica; one device: no GPU is visible)"


def test_worker_index_without_a_chief_task(monkeypatch):
    cluster = {"worker": ["localhost:1", "localhost:2"]}
    _fake_strategies(monkeypatch, task=("worker", 0), cluster=cluster)
    chief = tf.distribute.MultiWorkerMirroredStrategy()
    assert training_distribute.worker_info(chief) == (0, 2) and training_distribute.is_chief(chief)
    assert training_distribute.worker_info(tf.distribute.get_strategy()) == (0, 1)


def test_xla_stays_as_compiled_on_one_device():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(loss="mse", jit_compile=True)
    assert training_distribute.fit_xla_to_strategy(model, tf.distribute.get_strategy()) is None
    assert model.jit_compile is True


def test_global_batch_split_per_replica():
    assert training_distribute.per_replica_batches(60, 1) == "60"
    assert training_distribute.per_replica_batches(60, 2) == "60 = 2 x 30"
    assert training_distribute.per_replica_batches(60, 4) == "60 = 4 x 15"
    assert training_distribute.per_replica_batches(60, 8) == "60 = 4 x 8 + 4 x 7"


def test_scratch_dirs_of_non_chief_workers(monkeypatch, tmp_path):
    assert training_distribute.scratch_dir(tf.distribute.get_strategy()) is None
    _fake_strategies(monkeypatch, task=("worker", 1), cluster={"worker": ["localhost:1", "localhost:2"]})
    worker = tf.distribute.MultiWorkerMirroredStrategy()
    scratch = training_distribute.scratch_dir(worker)
    assert scratch.is_dir() and scratch.name.startswith("tfcovid-worker1-")
    training_distribute.release(scratch)
    assert not scratch.exists()
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="storage every worker mounts"):
        training_distribute.scratch_dir(worker, resume=run)
    (run / "backup").mkdir(parents=True)
    (run / "backup" / "training_metadata.json").write_text('{"epoch": 3}')
    resumed = training_distribute.scratch_dir(worker, resume=run)
    assert (resumed / "backup" / "training_metadata.json").read_text() == '{"epoch": 3}'
    training_distribute.release(resumed)


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from tfcovid.training import distribute
    distribute.split_cpu(2)  # before TensorFlow starts its devices
    import keras, tensorflow as tf
    from tfcovid import config
    from tfcovid.models import build_model
    from tfcovid.training import train

    strategy, desc = distribute.make_strategy("mirrored")
    # Synchronised BatchNorm: after training, both replicas hold identical variables.
    with strategy.scope():
        model = build_model("resnet18", 2, 32, "torch", None, 110)
        model.compile(optimizer=keras.optimizers.SGD(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        synced = distribute.synchronize_batchnorm(model)
        xla = distribute.fit_xla_to_strategy(model, strategy)
    x = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3)).astype("uint8")
    model.fit(x, np.arange(8) % 2, batch_size=4, epochs=1, verbose=0)
    diff = max(float(np.abs(v.value.values[0].numpy() - v.value.values[1].numpy()).max())
               for v in model.variables)
    exp = config.resolve(None, {
        "data.dir": sys.argv[1], "data.image_size": 32, "model.backbone": "resnet18",
        "model.weights": "none", "train.epochs": 1, "train.batch_size": 4,
        "train.optimizer": "adam", "train.strategy": "mirrored", "out": sys.argv[2]})
    lines = []
    run = train.fit(exp, log=lines.append)
    print(json.dumps({"desc": desc, "synced": synced, "xla": xla, "diff": diff,
                      "run": str(run), "lines": lines}))
""")


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(binary_tree, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    done = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(binary_tree), str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=WORKER_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["desc"] == "mirrored (2 replicas)"
    assert out["synced"] == 20 and out["diff"] == 0.0  # ResNet18 has 20 BatchNorm layers
    lines = "\n".join(out["lines"])
    assert "strategy mirrored (2 replicas)" in lines
    assert "batch 4 = 2 x 2" in lines and "20 BatchNorm layers use global-batch statistics" in lines
    summary = json.loads((Path(out["run"]) / "metrics.json").read_text())
    assert (summary["replicas"], summary["workers"]) == (2, 1)
    assert summary["images"] == {"train": 8, "validation": 4, "test": 4}


def _free_loopback_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.slow
def test_two_workers_on_localhost_end_with_identical_weights(binary_tree, tmp_path):
    prepared = tmp_path / "prepared"
    manifest = data_prepare.prepare(binary_tree, prepared, shards=2, max_side=48, log=lambda s: None)
    cfg = tmp_path / "two-workers.yaml"
    cfg.write_text(yaml.safe_dump({
        "out": str(tmp_path / "runs"),
        "data": {"dir": str(prepared), "image_size": 32},
        "model": {"backbone": "resnet18", "freeze": "none", "weights": "none"},
        "train": {"epochs": 2, "batch_size": 4, "optimizer": "adam", "lr": 1e-3,
                  "strategy": "multiworker", "jit_compile": "false"},
    }))
    cluster = {"worker": [f"localhost:{port}" for port in _free_loopback_ports(2)]}
    procs, logs = [], [tmp_path / f"worker{i}.log" for i in range(2)]
    try:
        for index, log in enumerate(logs):
            env = dict(os.environ, TF_CONFIG=_tf_config(cluster, "worker", index), TF_CPP_MIN_LOG_LEVEL="2")
            with open(log, "w") as sink:
                procs.append(subprocess.Popen([sys.executable, "-m", "tfcovid.cli", "fit", "--config", str(cfg)],
                                              env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + WORKER_LIMIT_S
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:  # on failure or timeout: never leave a worker behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert "this is worker 0, the chief" in outputs[0] and "this is worker 1)" in outputs[1]
    assert all("batch 4 = 2 x 2" in o and "20 BatchNorm layers" in o for o in outputs)
    prints = [re.findall(r"weights fingerprint ([0-9a-f]{16})", o) for o in outputs]
    assert len(prints[0]) == 1 and prints[0] == prints[1]

    # Only the chief wrote a run directory, and it is complete; the worker's scratch is gone.
    (run,) = list((tmp_path / "runs").iterdir())
    for name in ("config.yaml", "history.csv", "metrics.json", "checkpoints/best.keras",
                 "checkpoints/last.keras"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3
    scratch = re.search(r"Run directory: (\S+) \(scratch", outputs[1]).group(1)
    assert not Path(scratch).exists()
    summary = json.loads((run / "metrics.json").read_text())
    assert (summary["workers"], summary["replicas"]) == (2, 2)
    assert summary["images"] == {k: v["images"] for k, v in manifest["splits"].items()}
    for name, split in summary["splits"].items():  # predictions gathered from both workers
        assert split["n"] == manifest["splits"][name]["images"]
    # The chief's checkpoint holds exactly the weights both workers ended with.
    import tfcovid.models  # noqa: F401  (registers the custom layers)

    last = keras.models.load_model(run / "checkpoints" / "last.keras", compile=False)
    assert training_distribute.weights_fingerprint(last) == prints[0][0]


def test_tasks_on_this_host_share_its_cores():
    """data.resample_processes: auto divides a host's cores among the cluster's tasks on it."""
    assert training_distribute.tasks_on_this_host(None) == 1
    here = {"worker": ["localhost:2222", "127.0.0.1:2223", f"{socket.gethostname()}:2224"],
            "chief": ["other-machine.example:2222"]}
    assert training_distribute.tasks_on_this_host(here) == 3
    assert training_distribute.tasks_on_this_host({"worker": ["a.example:1", "b.example:1"]}) == 1  # none here: 1
