"""Precision policy, loss scaling, XLA and steps_per_execution take effect (settings, not speed)."""

import keras
import numpy as np
import pytest

from tfcovid import config
from tfcovid.training import devices, compile
from tfcovid.models import build_model


@pytest.mark.parametrize("cc,expected", [
    ((9, 0), "mixed_bfloat16"), ((8, 0), "mixed_bfloat16"), ((8, 6), "mixed_bfloat16"),
    ((7, 5), "mixed_float16"), ((7, 0), "mixed_float16"), ((6, 1), "float32"), (None, "float32"),
])
def test_auto_precision_follows_compute_capability(monkeypatch, cc, expected):
    monkeypatch.setattr(devices, "gpu_compute_capability", lambda: cc)
    assert devices.resolve_precision("auto") == expected
    assert devices.resolve_precision("float32") == "float32"  # explicit choices pass through
    assert devices.resolve_precision("mixed_float16") == "mixed_float16"


class _FakeJaxGpu:  # what jax.devices("gpu")[0] reports on an H100
    device_kind = "NVIDIA H100 80GB HBM3"
    compute_capability = "9.0"


@pytest.mark.parametrize("raw,expected", [("9.0", (9, 0)), ("7.5", (7, 5)), ((8, 6), (8, 6)), ("8", (8, 0)),
                                          (None, None)])
def test_compute_capability_is_read_from_jax_strings_and_tf_tuples(raw, expected):
    assert devices._cc_tuple(raw) == expected


def test_jax_backend_gpu_drives_auto_precision_and_device_name(monkeypatch):
    # Under KERAS_BACKEND=jax the model runs on JAX's GPU while tf.data's TensorFlow may be a
    # CPU-only build: precision and the device line must follow JAX's device, not TensorFlow's.
    monkeypatch.setattr(devices, "_jax_gpus", lambda: [_FakeJaxGpu(), _FakeJaxGpu()])
    assert devices.gpu_compute_capability() == (9, 0)
    assert devices.resolve_precision("auto") == "mixed_bfloat16"
    assert devices.describe_device() == "GPU NVIDIA H100 80GB HBM3 (cc 9.0) x2, JAX backend"


def test_auto_precision_on_this_cpu_machine_is_float32():
    assert devices.resolve_precision("auto") == ("float32" if devices.gpu_compute_capability() is None
                                                 else devices.resolve_precision("auto"))


def _exp(**train_keys):
    return config.from_dict({"data": {"image_size": 32}, "train": {"optimizer": "sgd", **train_keys}})


def _tiny(policy):
    """A small model with the study's float32 logits, built under ``policy``."""
    with devices.dtype_policy(policy):
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(2, dtype="float32", name="head_logits")(x)
        return keras.Model(inputs, outputs)


def _batches(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 16, 16, 3)).astype("uint8"), rng.integers(0, 2, n)


def test_mixed_bfloat16_computes_in_bfloat16_with_float32_logits_loss_and_metrics():
    before = keras.config.dtype_policy().name
    with devices.dtype_policy("mixed_bfloat16"):
        model = build_model("resnet18", 2, 32, "torch")
    assert keras.config.dtype_policy().name == before  # the global policy is restored
    conv = model.get_layer("conv1")
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    assert model.get_layer("head_fc1").compute_dtype == "bfloat16"
    assert model.outputs[0].dtype == "float32"
    compile.compile_model(model, _exp(precision="mixed_bfloat16"), positive_index=0)
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # bf16 needs none
    x, y = _batches()
    x = np.resize(x, (8, 32, 32, 3))
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and 0 <= logs["accuracy"] <= 1
    assert all(v.dtype == "float32" for m in model.metrics for v in m.variables)
    assert "compute bfloat16, variables float32, logits float32" in devices.describe_compute(model)


def test_mixed_float16_gets_dynamic_loss_scaling_and_trains():
    model = _tiny("mixed_float16")
    assert model.get_layer("conv").compute_dtype == "float16"
    compile.compile_model(model, _exp(precision="mixed_float16"), positive_index=0)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.initial_scale == 2.0**15  # Keras's default start, then dynamic
    logs = model.fit(*_batches(), batch_size=4, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])
    assert float(model.optimizer.dynamic_scale.numpy()) >= 1
    assert float(model.optimizer.scale_loss(1.0)) == float(model.optimizer.dynamic_scale.numpy())
    assert "dynamic loss scaling" in devices.describe_compute(model)


def test_float32_has_no_loss_scaling():
    model = _tiny("float32")
    compile.compile_model(model, _exp(precision="float32"), positive_index=0)
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.get_layer("conv").compute_dtype == "float32"


@pytest.mark.parametrize("setting,expected", [("true", True), ("false", False)])
def test_jit_compile_setting_takes_effect_and_xla_runs_the_study_metrics(setting, expected):
    model = _tiny("float32")
    compile.compile_model(model, _exp(jit_compile=setting, steps_per_execution=2), positive_index=0)
    assert model.jit_compile is expected and model.steps_per_execution == 2
    # The train step, with the study's loss and F1 metric, compiles and runs (under XLA too).
    history = model.fit(*_batches(), batch_size=2, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]) and 0 <= history["f1"][0] <= 1
    assert f"XLA {'on' if expected else 'off'}; steps_per_execution 2" in devices.describe_compute(model)


def test_jit_compile_auto_is_off_on_cpu_only_machines():
    model = _tiny("float32")
    compile.compile_model(model, _exp(jit_compile="auto"), positive_index=0)
    has_gpu = devices.gpu_compute_capability() is not None
    assert model.jit_compile is has_gpu


def test_augmentation_stays_out_of_the_model():
    # Keras preprocessing/augmentation layers would make Keras turn XLA off for the whole model.
    model = build_model("vgg16", 2, 32, "caffe")
    assert all(layer.supports_jit for layer in model._flatten_layers())
    assert not any(isinstance(layer, (keras.layers.RandomRotation, keras.layers.RandomFlip,
                                      keras.layers.RandomCrop, keras.layers.RandomZoom))
                   for layer in model.layers)


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_multilabel_loss_and_metrics_compile_under_xla_and_bfloat16(loss):
    with devices.dtype_policy("mixed_bfloat16"):
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(x))
    exp = config.from_dict({"data": {"task": "multilabel", "image_size": 32},
                            "train": {"loss": loss, "jit_compile": "true", "optimizer": "sgd"}})
    compile.compile_model(model, exp, positive_index=0)
    assert model.jit_compile is True
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (8, 16, 16, 3)).astype("uint8")
    y = rng.integers(0, 2, (8, 3)).astype("float32")
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]) and 0 <= history["jaccard"][0] <= 1


def test_deterministic_on_a_jax_gpu_needs_xlas_flag(monkeypatch):
    # TensorFlow's op determinism does not reach JAX: without XLA's flag --deterministic
    # would silently not hold, so fit refuses it before making a run directory.
    from tfcovid.config import ConfigError

    monkeypatch.setattr(devices, "_jax_gpus", lambda: [_FakeJaxGpu()])
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    devices.check_determinism(False)  # not asked for: nothing to check
    with pytest.raises(ConfigError, match="xla_gpu_deterministic_ops=true"):
        devices.check_determinism(True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true --xla_dump_to=/tmp/x")
    devices.check_determinism(True)
    monkeypatch.setattr(devices, "_jax_gpus", lambda: [])  # TensorFlow backend or no GPU
    monkeypatch.delenv("XLA_FLAGS")
    devices.check_determinism(True)
