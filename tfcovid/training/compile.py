"""Compile a model for its experiment: optimizer, the task's loss and the report's metrics.
"""
from __future__ import annotations

import keras

from tfcovid.config import Experiment
from tfcovid.training import epoch_metrics, losses


def compile_model(model: keras.Model, exp: Experiment, positive_index: int, optimizer=None) -> None:
    """Compile with the experiment's optimiser, loss and the report's metrics (float32).
    ``optimizer``: an optimizer to share (the classifier's, for ``device_augment.DeviceTrainer``,
    so that its state is the one checkpoints save); default a new one."""
    t = exp.train
    if optimizer is None:
        optimizer = (keras.optimizers.SGD(t.lr, momentum=t.momentum) if t.optimizer == "sgd"
                     else keras.optimizers.Adam(t.lr))
    # "sum" is not rescaled per replica by Keras, so it stays the global batch's sum under
    # tf.distribute too.
    reduction = "sum" if t.loss == "focal" and t.focal_reduction == "sum" else "sum_over_batch_size"
    loss = losses.get_loss(t.loss, alpha=t.focal_alpha, gamma=t.focal_gamma, reduction=reduction)
    if exp.data.task == "binary":
        tracked = [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                   epoch_metrics.BinaryF1(positive_index=positive_index, name="f1")]
    else:
        tracked = [epoch_metrics.SampleJaccard(threshold=t.threshold, name="jaccard"),
                   epoch_metrics.SampleF1(threshold=t.threshold, name="f1")]
    jit = {"auto": "auto", "true": True, "false": False}[t.jit_compile.lower()]
    model.compile(optimizer=optimizer, loss=loss, metrics=tracked, jit_compile=jit,
                  steps_per_execution=t.steps_per_execution)
