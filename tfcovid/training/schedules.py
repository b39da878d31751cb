"""The optimizer and its learning rate per step: ``train.schedule`` constant | cosine | step after
``train.warmup_epochs`` of linear warm-up, and ``train.ema`` weight averaging (issue 25).

The schedules are Keras's own (``keras.optimizers.schedules``), evaluated at the optimizer's
``iterations``, which the resume backup restores, so a resumed run continues the schedule
exactly. Only the step schedule's warm-up needs :class:`WarmUp` (Keras's CosineDecay has its own).
"""
from __future__ import annotations

import keras
from keras import ops

from tfcovid.config import TrainConfig

schedules = keras.optimizers.schedules


@keras.saving.register_keras_serializable(package="tfcovid")
class WarmUp(schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``target`` over ``warmup_steps``, then ``after`` counted from the
    end of the warm-up: CosineDecay's warm-up, for schedules that have none."""

    def __init__(self, after, warmup_steps: int, target: float):
        self.after = after
        self.warmup_steps = int(warmup_steps)
        self.target = float(target)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = self.target * step / float(self.warmup_steps)
        return ops.where(step < self.warmup_steps, warm,
                         ops.cast(self.after(step - self.warmup_steps), "float32"))

    def get_config(self) -> dict:
        return {"after": keras.saving.serialize_keras_object(self.after),
                "warmup_steps": self.warmup_steps, "target": self.target}

    @classmethod
    def from_config(cls, config: dict) -> WarmUp:
        config = dict(config)
        config["after"] = keras.saving.deserialize_keras_object(config["after"])
        return cls(**config)


def learning_rate(t: TrainConfig, steps_per_epoch: int):
    """``t.lr`` (a constant rate without warm-up: the study's recipe, unchanged) or a schedule of
    the optimizer step; ``steps_per_epoch`` converts train's epochs to steps."""
    steps_per_epoch = max(1, int(steps_per_epoch))
    warmup = t.warmup_epochs * steps_per_epoch
    if t.schedule == "step":
        step = schedules.ExponentialDecay(t.lr, t.step_epochs * steps_per_epoch, t.step_gamma,
                                          staircase=True)  # PyTorch's StepLR
        return WarmUp(step, warmup, t.lr) if warmup else step
    if t.schedule == "constant" and not warmup:
        return t.lr
    # Cosine from lr to 0 over the epochs after the warm-up; alpha=1 keeps lr constant instead.
    return schedules.CosineDecay(0.0 if warmup else t.lr, max(1, (t.epochs - t.warmup_epochs) * steps_per_epoch),
                                 alpha=1.0 if t.schedule == "constant" else 0.0,
                                 warmup_target=t.lr if warmup else None, warmup_steps=warmup)


def steps_per_epoch(dataset, images: int, batch_size: int) -> int:
    """Optimizer steps per epoch: the train dataset's length where it is known, else the batches
    of ``images`` (a streamed prepared split)."""
    known = int(dataset.cardinality())
    return known if known > 0 else -(-images // batch_size)


def optimizer(t: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD (with momentum) or Adam at ``learning_rate``, averaging the weights when ``t.ema``."""
    ema = {"use_ema": True, "ema_momentum": t.ema} if t.ema else {}
    rate = learning_rate(t, steps_per_epoch)
    if t.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=t.momentum, **ema)
    return keras.optimizers.Adam(rate, **ema)
