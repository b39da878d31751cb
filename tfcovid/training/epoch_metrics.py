"""Keras metrics reported every epoch, matching the scikit-learn reports of ``results.scores``:
the sample-averaged Jaccard and F1 of the three-label task, and the binary task's disease F1.
"""
from __future__ import annotations

import keras
from keras import ops


def _sample_weights(sample_weight, n):
    """(n,) float32 weights; ones when none are given."""
    if sample_weight is None:
        return ops.ones((n,), dtype="float32")
    return ops.reshape(ops.cast(sample_weight, "float32"), (-1,))


class _SampleAveraged(keras.metrics.Metric):
    """Weighted mean over samples of a per-sample score of thresholded multi-label output.

    Subclasses define ``_per_sample(t, p)`` for 0/1 float32 tensors of shape (batch, L).
    State is a sum and a count, so the value is exact over the whole epoch, not a mean
    of batch means, and sums correctly across replicas.
    """

    def __init__(self, threshold=0.5, from_logits=True, name=None, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        threshold = float(threshold)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1). Received: threshold={threshold}")
        self.threshold = threshold
        self.from_logits = bool(from_logits)
        # Lets ModelCheckpoint / EarlyStopping with mode="auto" know higher is better.
        self._direction = "up"
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        # float32 whatever the model's compute dtype, so mixed precision cannot move the
        # threshold; the sigmoid matches how predict() turns logits into probabilities.
        y_pred = ops.cast(y_pred, "float32")
        if self.from_logits:
            y_pred = ops.sigmoid(y_pred)
        p = ops.cast(y_pred >= self.threshold, "float32")
        t = ops.cast(ops.cast(y_true, "float32") >= 0.5, "float32")
        score = self._per_sample(t, p)
        w = _sample_weights(sample_weight, ops.shape(score)[0])
        self.total.assign_add(ops.sum(score * w))
        self.count.assign_add(ops.sum(w))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def get_config(self):
        config = super().get_config()
        return {**config, "threshold": self.threshold, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="tfcovid")
class SampleJaccard(_SampleAveraged):
    """Sample-averaged Jaccard index, as ``jaccard_score(average="samples", zero_division=0)``.

    Per sample |pred ∧ true| / |pred ∨ true|; a sample with no true and no predicted
    label scores 0 and still counts in the mean (scikit-learn's convention).

    Args:
        threshold: decision threshold on the probability.
        from_logits: whether ``y_pred`` are logits (sigmoid applied first).
        name: metric name in logs.
        dtype: result dtype (computation is float32 regardless).
    """

    def __init__(self, threshold=0.5, from_logits=True, name="jaccard", dtype="float32"):
        super().__init__(threshold=threshold, from_logits=from_logits, name=name, dtype=dtype)

    def _per_sample(self, t, p):
        inter = ops.sum(t * p, axis=-1)
        union = ops.sum(ops.maximum(t, p), axis=-1)
        return ops.divide_no_nan(inter, union)


@keras.saving.register_keras_serializable(package="tfcovid")
class SampleF1(_SampleAveraged):
    """Sample-averaged F1, as ``f1_score(average="samples", zero_division=0)``.

    Per sample 2|pred ∧ true| / (|pred| + |true|); empty-and-empty scores 0.

    Args:
        threshold: decision threshold on the probability.
        from_logits: whether ``y_pred`` are logits (sigmoid applied first).
        name: metric name in logs.
        dtype: result dtype (computation is float32 regardless).
    """

    def __init__(self, threshold=0.5, from_logits=True, name="f1", dtype="float32"):
        super().__init__(threshold=threshold, from_logits=from_logits, name=name, dtype=dtype)

    def _per_sample(self, t, p):
        tp = ops.sum(t * p, axis=-1)
        return ops.divide_no_nan(2.0 * tp, ops.sum(t, axis=-1) + ops.sum(p, axis=-1))


@keras.saving.register_keras_serializable(package="tfcovid")
class BinaryF1(keras.metrics.Metric):
    """F1 of one class of an argmax classifier, over the epoch.

    Matches ``f1_score(y, argmax, pos_label=positive_index, zero_division=0)``:
    tp, fp and fn are summed over all batches, then F1 = 2tp / (2tp + fp + fn).
    The argmax is the same for logits and probabilities, so no ``from_logits``.

    Args:
        positive_index: class index whose F1 is reported (0 = infected in ImageFolder
            order; 1 gives the study's F1).
        name: metric name in logs.
        dtype: result dtype (computation is float32 regardless).
    """

    def __init__(self, positive_index=0, name="f1", dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        if int(positive_index) != positive_index or positive_index < 0:
            raise ValueError(
                "positive_index must be a class index >= 0. "
                f"Received: positive_index={positive_index}"
            )
        self.positive_index = int(positive_index)
        self._direction = "up"
        self.tp = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="tp")
        self.fp = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="fp")
        self.fn = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.convert_to_tensor(y_true)
        y_pred = ops.cast(y_pred, "float32")
        pred = ops.argmax(y_pred, axis=-1)
        # Integer labels arrive as (batch,) or (batch, 1); one-hot labels (same rank and
        # width as y_pred) are accepted too, so a switch to categorical CE keeps working.
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == y_pred.shape[-1] != 1:
            true = ops.argmax(y_true, axis=-1)
        else:
            true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        k = self.positive_index
        t = ops.cast(ops.equal(ops.cast(true, "int32"), k), "float32")
        p = ops.cast(ops.equal(ops.cast(pred, "int32"), k), "float32")
        w = _sample_weights(sample_weight, ops.shape(t)[0])
        self.tp.assign_add(ops.sum(w * t * p))
        self.fp.assign_add(ops.sum(w * (1.0 - t) * p))
        self.fn.assign_add(ops.sum(w * t * (1.0 - p)))

    def result(self):
        return ops.divide_no_nan(2.0 * self.tp, 2.0 * self.tp + self.fp + self.fn)

    def get_config(self):
        return {**super().get_config(), "positive_index": self.positive_index}
