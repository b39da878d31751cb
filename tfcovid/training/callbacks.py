"""Keras callbacks of a run besides Keras's own: the NaN guard, and the TensorBoard images
(augmented training batch, validation confusion matrices).
"""
from __future__ import annotations

import math
from pathlib import Path

import keras
import matplotlib
import numpy as np
import tensorflow as tf

from tfcovid.data import datasets
from tfcovid.results import scores

matplotlib.use("Agg")  # before pyplot: no display on servers and in CI
from tfcovid.models.outputs import probabilities
from tfcovid.results.plots import confusion_figure, figure_png, image_grid_figure


class NaNGuard(keras.callbacks.Callback):
    """Stop at the first non-finite loss and remember where, so fit() can say so clearly."""

    def __init__(self):
        super().__init__()
        self.bad = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad = (batch, float(loss))
            self.model.stop_training = True


class TensorBoardImages(keras.callbacks.Callback):
    """TensorBoard images: augmented training inputs once, the validation confusion matrix per epoch.

    Writes to ``LOG_DIR/images`` (shown as the run "images" beside Keras's train/validation).
    The grid comes from its own small pipeline over the train split, built exactly as the
    training one (same augmentation settings), so it shows what the model really sees without
    touching the training iterator. The confusion matrix costs one prediction pass over the
    validation data per ``every`` epochs.

    Args:
        log_dir: the run's tensorboard/ folder.
        exp: the Experiment (image size, augmentation, task, threshold, positive class).
        manifest: the scanned data (train and validation splits, output names).
        val_ds: the validation dataset used by fit(), (images, labels) batches in file order.
        grid_size: training images in the grid.
        every: write the confusion matrix every this many epochs.
    """

    def __init__(self, log_dir, exp, manifest, val_ds, grid_size: int = 16, every: int = 1):
        super().__init__()
        self.log_dir, self.exp, self.manifest = str(Path(log_dir) / "images"), exp, manifest
        self.val_ds, self.grid_size, self.every = val_ds, grid_size, max(1, int(every))
        self._writer = None

    def _write(self, tag: str, png: bytes, step: int, description: str) -> None:

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            tf.summary.image(tag, tf.image.decode_png(png, channels=4)[None], step=step,
                             description=description)
        self._writer.flush()

    def _caption(self, label) -> str:
        names = self.manifest.output_names
        if self.exp.data.task == "binary":
            return names[int(label)]
        return "+".join(n for n, v in zip(names, np.asarray(label)) if v > 0.5) or "(none)"

    def on_train_begin(self, logs=None):

        split = self.manifest.splits["train"]
        ds = datasets.dataset(split, self.exp.data.image_size, self.grid_size, training=True,
                          aug=self.exp.augment, seed=self.exp.train.seed)
        images, labels = next(iter(ds))
        fig = image_grid_figure(images.numpy(), [self._caption(y) for y in labels.numpy()])
        self._write("augmented_training_images", figure_png(fig), 0,
                    "A batch of training images after augmentation, as the model sees them.")

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return

        split, task = self.manifest.splits["validation"], self.exp.data.task
        probs = probabilities(self.model.predict(self.val_ds.map(lambda x, y: x), verbose=0), task)
        if not np.isfinite(probs).all():  # a diverged model: fit()'s NaN guard reports it
            return
        if task == "binary":
            report = scores.binary_report(split.labels, probs, self.manifest.class_names,
                                           self.exp.data.positive, self.exp.train.threshold)
        else:
            report = scores.multilabel_report(split.labels, probs, self.manifest.output_names,
                                               self.exp.train.threshold)
        fig = confusion_figure(report, task, f"validation, epoch {epoch + 1}")
        self._write("validation_confusion_matrix", figure_png(fig), epoch,
                    "Validation confusion matrix (counts and normalised by true class).")

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
