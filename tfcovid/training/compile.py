"""Compile a model for its experiment: optimizer, the task's loss and the report's metrics.
"""
from __future__ import annotations

import keras

from tfcovid.config import Experiment
from tfcovid.training import epoch_metrics, losses, schedules


def compile_model(model: keras.Model, exp: Experiment, positive_index: int, steps_per_epoch: int = 1,
                  class_weight=None, optimizer=None) -> None:
    """Compile with the experiment's optimiser, loss and the report's metrics (float32);
    ``steps_per_epoch`` turns the learning-rate schedule's epochs into steps; ``class_weight``:
    train.class_weight's weights per output (``data.class_weights.resolve``); ``optimizer``: an
    optimizer to share (the classifier's, for ``device_augment.DeviceTrainer``, so that its state
    is the one checkpoints save), default a new one."""
    t = exp.train
    if optimizer is None:
        optimizer = schedules.optimizer(t, steps_per_epoch)
    # "sum" is not rescaled per replica by Keras, so it stays the global batch's sum under
    # tf.distribute too.
    reduction = "sum" if t.loss == "focal" and t.focal_reduction == "sum" else "sum_over_batch_size"
    loss = losses.get_loss(t.loss, alpha=t.focal_alpha, gamma=t.focal_gamma, reduction=reduction,
                           class_weight=class_weight)
    if exp.data.task == "binary":
        tracked = [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                   epoch_metrics.BinaryF1(positive_index=positive_index, name="f1")]
    else:
        tracked = [epoch_metrics.SampleJaccard(threshold=t.threshold, name="jaccard"),
                   epoch_metrics.SampleF1(threshold=t.threshold, name="f1")]
    jit = {"auto": "auto", "true": True, "false": False}[t.jit_compile.lower()]
    model.compile(optimizer=optimizer, loss=loss, metrics=tracked, jit_compile=jit,
                  steps_per_execution=t.steps_per_execution)
