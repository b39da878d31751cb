"""Losses for the two tasks: sigmoid focal loss and the loss registry.

`SigmoidFocalCrossEntropy` reproduces tensorflow-addons' loss of the same name
(alpha-balanced focal loss, summed over the label axis) without depending on the
end-of-life package. `get_loss` resolves the `--loss` name; `check_loss_for_task`
rejects a loss that does not fit a task's outputs.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import keras
from keras import ops

__all__ = [
    "LOSSES",
    "TASK_LOSSES",
    "SigmoidFocalCrossEntropy",
    "WeightedBinaryCrossentropy",
    "WeightedSparseCategoricalCrossentropy",
    "check_loss_for_task",
    "get_loss",
]


# The base of (1 - p_t) ** gamma is clamped here before the power: at an extreme
# logit it is exactly 0 in float32 and d/dx x**gamma = gamma * x**(gamma - 1) is
# inf for 0 < gamma < 1, which turns the (zero) gradient into NaN. The clamp
# changes the loss by at most this**gamma * ce, where ce is itself ~0.
_MIN_MODULATING_BASE = 1e-30


@keras.saving.register_keras_serializable(package="tfcovid")
class SigmoidFocalCrossEntropy(keras.losses.Loss):
    """Sigmoid focal cross-entropy with tensorflow-addons' semantics.

    Per element, with ``p`` the predicted probability and ``y`` the label:
    ``alpha_t * (1 - p_t) ** gamma * bce(y, p)``, where
    ``p_t = y * p + (1 - y) * (1 - p)`` and
    ``alpha_t = y * alpha + (1 - y) * (1 - alpha)``. The per-sample loss is the
    SUM over the last (label) axis; Keras's ``reduction`` then reduces over
    samples (``"sum"`` gives the study's summed loss, ``"none"`` one value per
    sample). Everything is computed in float32, whatever the model's output dtype.

    Unlike tensorflow-addons, ``alpha=0.0`` means "weight positives by 0"; pass
    ``alpha=None`` to switch the balancing off (tensorflow-addons treated any
    falsy alpha as off).

    Args:
        from_logits: Whether ``y_pred`` holds logits (True) or probabilities.
        alpha: Weight of the positive class in [0, 1], or None for no balancing.
        gamma: Focusing exponent >= 0, or None (same as 0: plain BCE).
        reduction: Keras reduction: "sum_over_batch_size", "sum", "mean",
            "mean_with_sample_weight" or "none".
        name: Name of the loss.
        dtype: Keras dtype (policy) of the reduced loss; None uses
            ``keras.config.floatx()``. Half precision is rejected.
        pos_weight: None, or one weight > 0 per label multiplying the positive
            term (``y * ce``) before alpha and the modulating factor:
            ``train.class_weight`` (docs/imbalance.md).

    Raises:
        ValueError: If alpha is outside [0, 1], gamma is negative, or dtype is a
            half-precision type.
    """

    def __init__(
        self,
        from_logits=False,
        alpha=0.25,
        gamma=2.0,
        reduction="sum_over_batch_size",
        name="sigmoid_focal_crossentropy",
        dtype=None,
        pos_weight=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if alpha is not None and not (_is_real(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(
                f"alpha must be a number in [0, 1] or None. Received: alpha={alpha!r}"
            )
        if gamma is not None and not (_is_real(gamma) and gamma >= 0.0):
            raise ValueError(
                f"gamma must be a number >= 0 or None. Received: gamma={gamma!r}"
            )
        # Loss.__call__ converts y_pred to self.dtype before call(): a half
        # dtype would round the logits and the summed loss before our float32 math.
        if self.dtype not in ("float32", "float64"):
            raise ValueError(
                "SigmoidFocalCrossEntropy computes in float32 and needs a float32 "
                f"or float64 dtype (or None). Received: dtype={dtype!r}"
            )
        self.from_logits = bool(from_logits)
        self.alpha = None if alpha is None else float(alpha)
        self.gamma = None if gamma is None else float(gamma)
        self._dtype_arg = None if dtype is None else self._dtype_policy.name
        self.pos_weight = _weights(pos_weight, "pos_weight")

    def call(self, y_true, y_pred):
        """Returns the per-sample loss (summed over the last axis), float32."""
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "float32")
        # Tolerate labels of shape (batch,) against predictions of (batch, 1).
        if len(y_true.shape) == len(y_pred.shape) - 1:
            y_true = ops.expand_dims(y_true, -1)

        if self.from_logits:
            # Stable BCE with logits: finite for any finite logit.
            ce = (
                ops.maximum(y_pred, 0.0)
                - y_pred * y_true
                + ops.log1p(ops.exp(-ops.abs(y_pred)))
            )
            prob = ops.sigmoid(y_pred)
            # 1 - p as sigmoid(-x) keeps full relative precision when p ~ 1;
            # 1 - sigmoid(x) loses digits there and is exactly 0 from x ~ 17.
            one_minus_prob = ops.sigmoid(-y_pred)
        else:
            eps = keras.config.epsilon()
            clipped = ops.clip(y_pred, eps, 1.0 - eps)
            ce = -(y_true * ops.log(clipped) + (1.0 - y_true) * ops.log(1.0 - clipped))
            # tensorflow-addons uses the unclipped probability in p_t.
            prob = y_pred
            one_minus_prob = 1.0 - y_pred

        loss = ce
        if self.pos_weight is not None:
            loss = loss * _positive_factor(y_true, self.pos_weight)
        if self.alpha is not None:
            alpha = ops.convert_to_tensor(self.alpha, "float32")
            loss = loss * (y_true * alpha + (1.0 - y_true) * (1.0 - alpha))
        if self.gamma:
            # 1 - p_t, written so that neither term is a difference of near-equals.
            base = y_true * one_minus_prob + (1.0 - y_true) * prob
            base = ops.maximum(base, _MIN_MODULATING_BASE)
            loss = loss * ops.power(base, ops.convert_to_tensor(self.gamma, "float32"))
        return ops.sum(loss, axis=-1)

    def get_config(self):
        """Returns every constructor argument, for saving and `from_config`."""
        config = super().get_config()
        config.update(
            {
                "from_logits": self.from_logits,
                "alpha": self.alpha,
                "gamma": self.gamma,
                "dtype": self._dtype_arg,
                "pos_weight": self.pos_weight,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfcovid")
class WeightedSparseCategoricalCrossentropy(keras.losses.Loss):
    """Softmax cross-entropy of logits against integer labels, each sample's loss times its
    class's weight: what Keras's ``fit(class_weight=...)`` does to the training loss, as a loss,
    so the validation loss (and the best checkpoint) is weighted the same way.

    Args:
        class_weight: one weight > 0 per class (per logit).
        reduction, name: as any Keras loss; "sum_over_batch_size" divides the weighted sum by
            the number of samples, as Keras's class_weight does.
    """

    def __init__(self, class_weight, reduction="sum_over_batch_size",
                 name="weighted_sparse_categorical_crossentropy"):
        super().__init__(name=name, reduction=reduction)
        self.class_weight = _weights(class_weight, "class_weight")
        if self.class_weight is None:
            raise ValueError("class_weight must list one weight per class.")

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(ops.reshape(y_true, [-1]), "int32")
        ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        return ce * ops.take(ops.convert_to_tensor(self.class_weight, "float32"), y_true)

    def get_config(self):
        return {**super().get_config(), "class_weight": self.class_weight}


@keras.saving.register_keras_serializable(package="tfcovid")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """BCE with logits and a positive weight per label, PyTorch's
    ``BCEWithLogitsLoss(pos_weight=...)``: per label ``-(w * y * log p + (1 - y) * log(1 - p))``,
    averaged over the labels (as Keras's and PyTorch's BCE are), computed from the logits in the
    stable form ``(1 - y) x + (1 + (w - 1) y) (log1p(exp(-|x|)) + max(-x, 0))``.
    """

    def __init__(self, pos_weight, reduction="sum_over_batch_size",
                 name="weighted_binary_crossentropy"):
        super().__init__(name=name, reduction=reduction)
        self.pos_weight = _weights(pos_weight, "pos_weight")
        if self.pos_weight is None:
            raise ValueError("pos_weight must list one weight per label.")

    def call(self, y_true, y_pred):
        x = ops.cast(y_pred, "float32")
        y = ops.cast(y_true, "float32")
        w = ops.convert_to_tensor(self.pos_weight, "float32")
        loss = (1.0 - y) * x + (1.0 + (w - 1.0) * y) * (ops.log1p(ops.exp(-ops.abs(x))) + ops.maximum(-x, 0.0))
        return ops.mean(loss, axis=-1)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight}


def _weights(values, what: str) -> list[float] | None:
    """A list of finite weights > 0 (or None); anything else a ValueError naming ``what``."""
    if values is None:
        return None
    out = [float(v) for v in values]
    if not out or not all(_is_real(v) and 0 < v < math.inf for v in out):
        raise ValueError(f"{what} must be one or more finite numbers > 0. Received: {values!r}")
    return out


def _positive_factor(y_true, weights):
    # w for a positive element, 1 for a negative one (soft labels interpolate).
    return 1.0 + (ops.convert_to_tensor(weights, "float32") - 1.0) * y_true


def _is_real(value) -> bool:
    # numbers.Real covers NumPy scalars too; NaN would slip past range checks.
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and not math.isnan(value)
    )


def _cross_entropy(*, alpha, gamma, reduction, class_weight=None) -> keras.losses.Loss:
    # The study's binary loss: softmax cross-entropy over 2 logits, integer labels.
    del alpha, gamma
    if class_weight is not None:
        return WeightedSparseCategoricalCrossentropy(class_weight, reduction=reduction)
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=reduction
    )


def _binary_cross_entropy(*, alpha, gamma, reduction, class_weight=None) -> keras.losses.Loss:
    # The study's BCEWithLogitsLoss for the multi-hot labels. Keras averages over
    # the label axis, as PyTorch's default 'mean' reduction does.
    del alpha, gamma
    if class_weight is not None:
        return WeightedBinaryCrossentropy(class_weight, reduction=reduction)
    return keras.losses.BinaryCrossentropy(from_logits=True, reduction=reduction)


def _focal(*, alpha, gamma, reduction, class_weight=None) -> keras.losses.Loss:
    return SigmoidFocalCrossEntropy(
        from_logits=True, alpha=alpha, gamma=gamma, reduction=reduction, pos_weight=class_weight
    )


LOSSES: dict[str, Callable[..., keras.losses.Loss]] = {
    "bce": _binary_cross_entropy,
    "ce": _cross_entropy,
    "focal": _focal,
}


# Which losses fit each task's outputs: binary = 2 softmax logits with integer
# labels; multilabel = one sigmoid logit per label with multi-hot labels.
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "binary": ("ce",),
    "multilabel": ("bce", "focal"),
}


def get_loss(
    name: str,
    *,
    alpha: float | None = 0.25,
    gamma: float | None = 2.0,
    reduction: str = "sum_over_batch_size",
    class_weight=None,
) -> keras.losses.Loss:
    """Builds a loss by name; every loss takes logits.

    Args:
        name: One of `LOSSES`: "ce", "bce" or "focal".
        alpha: Focal loss's positive-class weight (ignored by "ce" and "bce").
        gamma: Focal loss's focusing exponent (ignored by "ce" and "bce").
        reduction: Keras reduction over samples, e.g. "sum" for the study's
            summed focal loss.
        class_weight: None (the study's losses), or one weight per output: per
            class for "ce", per label's positives for "bce" and "focal"
            (``data.class_weights.resolve``).

    Returns:
        A new `keras.losses.Loss`.

    Raises:
        ValueError: If the name is unknown (the message lists the valid ones) or
            alpha/gamma are out of range.
    """
    return LOSSES[_check_loss_name(name)](alpha=alpha, gamma=gamma, reduction=reduction,
                                          class_weight=class_weight)


def check_loss_for_task(loss: str, task: str) -> None:
    """Checks that a loss name fits a task, as listed in `TASK_LOSSES`.

    Args:
        loss: A loss name from `LOSSES`.
        task: "binary" or "multilabel".

    Raises:
        ValueError: If the loss or task is unknown, or the loss does not fit the
            task's outputs; the message names the losses that do.
    """
    loss = _check_loss_name(loss)
    if task not in TASK_LOSSES:
        raise ValueError(
            f"Unknown task {task!r}. Valid tasks: {', '.join(sorted(TASK_LOSSES))}."
        )
    allowed = TASK_LOSSES[task]
    if loss not in allowed:
        why = {
            "binary": "its model has 2 softmax logits and integer labels",
            "multilabel": "its model has one sigmoid logit per label and multi-hot labels",
        }[task]
        home = [t for t, names in TASK_LOSSES.items() if loss in names]
        raise ValueError(
            f"Loss {loss!r} does not fit task {task!r}: {why}. "
            f"Use --loss {' or '.join(allowed)} for this task"
            + (f" ({loss!r} is for the {' / '.join(home)} task)." if home else ".")
        )


def _check_loss_name(name: str) -> str:
    if name not in LOSSES:
        raise ValueError(
            f"Unknown loss {name!r}. Valid losses: {', '.join(sorted(LOSSES))}."
        )
    return name
