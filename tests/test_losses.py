"""Tests for tfcovid.training.losses: focal loss against a NumPy reference, and the registry."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcovid.training.losses import LOSSES, TASK_LOSSES, SigmoidFocalCrossEntropy, check_loss_for_task, get_loss

EPS = 1e-7  # keras.config.epsilon(), the clip used for probabilities


def focal_reference(y_true, y_pred, *, from_logits, alpha=0.25, gamma=2.0):
    """The formula in float64: per-sample loss summed over the last axis."""
    y = np.asarray(y_true, np.float64)
    x = np.asarray(y_pred, np.float64)
    if from_logits:
        ce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
        p = 1.0 / (1.0 + np.exp(-x))
    else:
        clipped = np.clip(x, EPS, 1 - EPS)
        ce = -(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
        p = x
    p_t = y * p + (1 - y) * (1 - p)
    alpha_factor = 1.0 if alpha is None else y * alpha + (1 - y) * (1 - alpha)
    modulating = 1.0 if not gamma else (1 - p_t) ** gamma
    return np.sum(alpha_factor * modulating * ce, axis=-1)


def _inputs(from_logits, seed=0, shape=(8, 3)):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=shape).astype(np.float32)
    if from_logits:
        y_pred = rng.normal(0.0, 4.0, size=shape)
    else:
        y_pred = rng.uniform(0.001, 0.999, size=shape)
    return y_true, y_pred


REDUCE = {
    "none": lambda v: v,
    "sum": np.sum,
    "sum_over_batch_size": np.mean,
}

# float16/float32 inputs reach the float32 math unchanged, so only float32
# rounding (~2e-7 observed) separates us from the float64 reference; float64
# inputs are first rounded to float32, which can move (1 - p) ** gamma by ~1e-4
# relative when p is within 1e-3 of 1.
RTOL = {"float16": 2e-6, "float32": 2e-6, "float64": 1e-4}


@pytest.mark.parametrize("reduction", sorted(REDUCE))
@pytest.mark.parametrize("dtype", sorted(RTOL))
@pytest.mark.parametrize("from_logits", [False, True])
def test_matches_numpy_reference(from_logits, dtype, reduction):
    y_true, y_pred = _inputs(from_logits)
    y_pred = y_pred.astype(dtype)
    loss = SigmoidFocalCrossEntropy(from_logits=from_logits, reduction=reduction)
    got = loss(y_true, y_pred)
    assert got.dtype == "float32"
    # The reference sees the values the loss sees (already rounded to dtype).
    want = REDUCE[reduction](focal_reference(y_true, y_pred, from_logits=from_logits))
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=1e-7)


@pytest.mark.parametrize("alpha, gamma", [(0.5, 0.5), (0.9, 3.0), (0.0, 1.0), (1.0, 2.0)])
def test_other_alpha_gamma_and_soft_labels(alpha, gamma):
    rng = np.random.default_rng(1)
    y_true = rng.uniform(0, 1, size=(6, 4)).astype(np.float32)  # soft labels
    y_pred = rng.normal(0, 3, size=(6, 4)).astype(np.float32)
    loss = SigmoidFocalCrossEntropy(from_logits=True, alpha=alpha, gamma=gamma, reduction="none")
    want = focal_reference(y_true, y_pred, from_logits=True, alpha=alpha, gamma=gamma)
    np.testing.assert_allclose(loss(y_true, y_pred), want, rtol=2e-6, atol=1e-7)


def test_tensorflow_addons_docstring_example():
    loss = SigmoidFocalCrossEntropy(reduction="none")
    got = loss([[1.0], [1.0], [0.0]], [[0.97], [0.91], [0.03]])
    # tensorflow-addons' documented output. It used tf.keras 2's BCE, which also
    # added epsilon inside the log (log(p + 1e-7)); Keras 3 only clips, which
    # moves these values by < 6e-6 relative.
    want = [6.8532745e-06, 1.9097870e-04, 2.0559824e-05]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("from_logits", [False, True])
def test_keras_binary_focal_crossentropy_is_the_mean_and_balances_only_when_asked(from_logits):
    """Keras's own focal loss (docs/training.md names it): the same terms, but a MEAN over the
    labels, and alpha applied only with apply_class_balancing=True."""
    y_true = np.array([[1, 0, 0], [0, 1, 1]], np.float32)
    probs = np.array([[0.9, 0.2, 0.4], [0.3, 0.6, 0.05]], np.float32)
    y_pred = np.log(probs / (1 - probs)) if from_logits else probs
    ours = SigmoidFocalCrossEntropy(from_logits=from_logits, reduction="none")(y_true, y_pred)
    balanced = keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, alpha=0.25, gamma=2.0, from_logits=from_logits, reduction="none")
    np.testing.assert_allclose(ours, 3 * balanced(y_true, y_pred), rtol=1e-5)  # sum = 3 x mean
    first = (0.25 * 0.1**2 * -np.log(0.9) + 0.75 * 0.2**2 * -np.log(0.8)  # alpha_t (1 - p_t)^2 bce,
             + 0.75 * 0.4**2 * -np.log(0.6))  # summed over the first image's three labels
    np.testing.assert_allclose(ours[0], first, rtol=1e-5)
    default = keras.losses.BinaryFocalCrossentropy(from_logits=from_logits, reduction="none")
    unbalanced = SigmoidFocalCrossEntropy(from_logits=from_logits, alpha=None, reduction="none")
    np.testing.assert_allclose(unbalanced(y_true, y_pred), 3 * default(y_true, y_pred), rtol=1e-5)
    # Keras's default leaves alpha out: 0.74 and 0.26 of its 3 x mean here, not the same loss.
    np.testing.assert_allclose(ours / (3 * default(y_true, y_pred)), [0.744256, 0.255697], rtol=1e-4)


@pytest.mark.parametrize("gamma", [0.0, None])
@pytest.mark.parametrize("from_logits", [False, True])
def test_bce_limit(from_logits, gamma):
    y_true, y_pred = _inputs(from_logits, seed=2)
    y_pred = y_pred.astype(np.float32)
    focal = SigmoidFocalCrossEntropy(
        from_logits=from_logits, alpha=None, gamma=gamma, reduction="none"
    )
    bce = keras.losses.BinaryCrossentropy(from_logits=from_logits, reduction="none")
    # Keras's BCE averages over the label axis; focal loss sums over it.
    want = bce(y_true, y_pred) * y_true.shape[-1]
    np.testing.assert_allclose(focal(y_true, y_pred), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_extreme_logits_are_finite_and_correct(dtype):
    y_true = [[1.0, 1.0, 0.0, 0.0]]
    logits = tf.cast([[100.0, -100.0, 100.0, -100.0]], dtype)
    loss = SigmoidFocalCrossEntropy(from_logits=True, reduction="none")
    got = loss(y_true, logits)
    assert got.dtype == "float32"
    # Per label: right and confident -> 0; wrong by 100 -> alpha_t * 1 * 100.
    np.testing.assert_allclose(got, [0.25 * 100 + 0.75 * 100], rtol=1e-6)
    per_label = SigmoidFocalCrossEntropy(from_logits=True, reduction="none")
    np.testing.assert_allclose(per_label([[1.0]], [[100.0]]), [0.0], atol=1e-30)
    np.testing.assert_allclose(per_label([[1.0]], [[-100.0]]), [25.0], rtol=1e-6)


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_gradients_finite_at_extreme_logits(gamma):
    y_true = tf.constant([[1.0, 1.0, 0.0, 0.0]])
    logits = tf.Variable([[100.0, -100.0, 100.0, -100.0]])
    loss = SigmoidFocalCrossEntropy(from_logits=True, gamma=gamma, reduction="sum")
    with tf.GradientTape() as tape:
        value = loss(y_true, logits)
    grad = tape.gradient(value, logits).numpy()
    assert np.all(np.isfinite(grad))
    # Saturated: d/dx = alpha_t * (p - y) where wrong, 0 where right.
    np.testing.assert_allclose(grad, [[0.0, -0.25, 0.75, 0.0]], atol=1e-6)


def test_bfloat16_input():
    y_true, y_pred = _inputs(True, seed=3)
    y_pred_bf16 = tf.cast(y_pred, "bfloat16")
    loss = SigmoidFocalCrossEntropy(from_logits=True, reduction="none")
    got = loss(y_true, y_pred_bf16)
    assert got.dtype == "float32"
    want = focal_reference(y_true, tf.cast(y_pred_bf16, "float64").numpy(), from_logits=True)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_sample_weight_and_label_rank():
    y_true, y_pred = _inputs(True, seed=4, shape=(5, 1))
    weights = np.array([1.0, 0.0, 2.0, 0.5, 1.0], np.float32)
    loss = SigmoidFocalCrossEntropy(from_logits=True, reduction="sum")
    want = np.sum(weights * focal_reference(y_true, y_pred, from_logits=True))
    np.testing.assert_allclose(loss(y_true, y_pred, sample_weight=weights), want, rtol=2e-6)
    # Labels of shape (batch,) against predictions of shape (batch, 1).
    np.testing.assert_allclose(loss(y_true[:, 0], y_pred), loss(y_true, y_pred), rtol=1e-6)


def test_xla_matches_eager():
    y_true, y_pred = _inputs(True, seed=5)
    loss = SigmoidFocalCrossEntropy(from_logits=True, reduction="sum")
    logits = tf.constant(y_pred, tf.float32)

    def value_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss(y_true, x)
        return value, tape.gradient(value, x)

    eager = value_and_grad(logits)
    xla = tf.function(value_and_grad, jit_compile=True)(logits)
    np.testing.assert_allclose(xla[0], eager[0], rtol=1e-5)
    np.testing.assert_allclose(xla[1], eager[1], rtol=1e-4, atol=1e-7)


def test_config_round_trip():
    loss = SigmoidFocalCrossEntropy(
        from_logits=True, alpha=0.4, gamma=1.5, reduction="sum", name="focal", dtype="float64"
    )
    config = loss.get_config()
    assert config == {
        "name": "focal",
        "reduction": "sum",
        "dtype": "float64",
        "from_logits": True,
        "alpha": 0.4,
        "gamma": 1.5,
        "pos_weight": None,  # train.class_weight's per-label positive weights (tests/test_imbalance.py)
    }
    assert SigmoidFocalCrossEntropy.from_config(config).get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(revived, SigmoidFocalCrossEntropy)
    assert revived.get_config() == config
    none_config = SigmoidFocalCrossEntropy(alpha=None, gamma=None).get_config()
    assert SigmoidFocalCrossEntropy.from_config(none_config).get_config() == none_config


def test_saved_model_reloads_with_same_loss(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(6).normal(size=(8, 5)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(
        optimizer="sgd",
        loss=SigmoidFocalCrossEntropy(from_logits=True, alpha=0.3, gamma=1.0, reduction="sum"),
    )
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.loss, SigmoidFocalCrossEntropy)
    assert reloaded.loss.get_config() == model.loss.get_config()
    before = model.evaluate(x, y, batch_size=8, verbose=0)
    after = reloaded.evaluate(x, y, batch_size=8, verbose=0)
    np.testing.assert_allclose(after, before, rtol=1e-6)
    logits = model.predict(x, verbose=0)
    want = focal_reference(y, logits, from_logits=True, alpha=0.3, gamma=1.0).sum()
    np.testing.assert_allclose(before, want, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"gamma": -1.0}, "gamma=-1.0"),
        ({"gamma": "2"}, "gamma='2'"),
        ({"dtype": "float16"}, "dtype='float16'"),
    ],
)
def test_invalid_arguments_name_the_value(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        SigmoidFocalCrossEntropy(**kwargs)


def _task_batch(name):
    rng = np.random.default_rng(7)
    if name == "ce":
        return rng.integers(0, 2, size=(4,)), rng.normal(size=(4, 2)).astype(np.float32)
    multi_hot = rng.integers(0, 2, size=(4, 3)).astype(np.float32)
    return multi_hot, rng.normal(size=(4, 3)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_get_loss_builds_every_registered_loss(name):
    loss = get_loss(name, reduction="sum")
    assert isinstance(loss, keras.losses.Loss)
    assert loss.reduction == "sum"
    value = loss(*_task_batch(name))
    assert value.shape == () and np.isfinite(value)


def test_get_loss_kinds_and_focal_arguments():
    assert isinstance(get_loss("ce"), keras.losses.SparseCategoricalCrossentropy)
    assert isinstance(get_loss("bce"), keras.losses.BinaryCrossentropy)
    focal = get_loss("focal", alpha=0.4, gamma=1.0, reduction="none")
    assert isinstance(focal, SigmoidFocalCrossEntropy)
    settings = (focal.from_logits, focal.alpha, focal.gamma, focal.reduction)
    assert settings == (True, 0.4, 1.0, "none")
    for name in ("ce", "bce"):
        assert get_loss(name).get_config()["from_logits"] is True


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"^Unknown loss 'x'\. Valid losses: bce, ce, focal\.$"):
        get_loss("x")


def test_check_loss_for_task():
    for task, names in TASK_LOSSES.items():
        for name in names:
            check_loss_for_task(name, task)
    assert set(TASK_LOSSES) == {"binary", "multilabel"}
    assert {n for names in TASK_LOSSES.values() for n in names} == set(LOSSES)
    with pytest.raises(ValueError, match=r"'focal' does not fit task 'binary'.*--loss ce"):
        check_loss_for_task("focal", "binary")
    with pytest.raises(ValueError, match=r"'ce' does not fit task 'multilabel'.*bce or focal"):
        check_loss_for_task("ce", "multilabel")
    valid_tasks = r"Unknown task 'regression'\. Valid tasks: binary, multilabel\."
    with pytest.raises(ValueError, match=valid_tasks):
        check_loss_for_task("ce", "regression")
    with pytest.raises(ValueError, match="Unknown loss 'mse'"):
        check_loss_for_task("mse", "binary")
