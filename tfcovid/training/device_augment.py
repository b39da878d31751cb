"""``data.augment_on: device``: the planned augmentation resampled inside the compiled train step.

The host plans each epoch exactly as on the CPU path (``data.augment.plan``: the same draws,
keyed on seed, epoch and image) and ships, per batch, the decoded working-resolution images
as uint8, padded to one shape (``data.batches.gatherer``), with each one's true size, affine
transform and shrink factor. ``DeviceAugment`` resamples them with backend-agnostic
``keras.ops`` (TensorFlow or JAX): the same map, bilinear, black outside the image, and the
same anti-aliasing (a k x k box average first when the crop is k >= 2 times the output),
rounded to uint8 values. ``DeviceTrainer`` puts it before the classifier for ``fit``; the
classifier itself, what is saved and exported, never contains it.

Resident (``data.device_cache_mb``): the split's decoded images (``data.resident``) are a
non-trainable uint8 variable of ``DeviceAugment``, put on the device once; a batch is then
each image's index, transform and shrink factor, and the layer gathers its images itself.
"""
from __future__ import annotations

import keras
from keras import ops

from tfcovid.training import devices
from tfcovid.training.compile import compile_model

KEYS = ("source", "hw", "transform", "k")  # a streamed device batch's inputs (data.batches.gatherer)
RESIDENT_KEYS = ("index", "transform", "k")  # a resident one's (data.pipeline, augment_on resident)


def _levels(x, levels: int):
    """The batch (B, H, W, C) float and its k x k box averages for k = 2 .. ``levels``, each
    flattened to rows of C values and joined: (rows, per-level (H_k, W_k, first row))."""
    flats, geometry, start = [], [], 0
    for k in range(1, levels + 1):
        level = x if k == 1 else ops.average_pool(x, k, k, padding="valid")
        shape = ops.shape(level)
        flats.append(ops.reshape(level, (-1, shape[3])))
        geometry.append((shape[1], shape[2], start))
        start = start + shape[0] * shape[1] * shape[2]
    rows = flats[0] if levels == 1 else ops.concatenate(flats, axis=0)
    return rows, geometry


def resample(source, hw, transform, k, size: int, levels: int = 1):
    """Bilinear views (B, S, S, 3) float32 with integer values in [0, 255].

    Args:
        source: uint8 (B, H, W, C), C = 1 or 3, images in the top-left corner of a padded canvas
            (the padding is masked, whatever it holds).
        hw: int (B, 2): each image's true (height, width).
        transform: float (B, 8): ``augment.plan``'s output-to-source maps (pixel centres at
            integer coordinates, as ``ImageProjectiveTransformV3`` and OpenCV take them).
        k: int (B,): ``plan``'s shrink factors, clipped to 1 .. ``levels``.
        size: output side S. levels: the largest k the batch can hold (``pipeline.max_shrink``).
    """
    x = ops.cast(source, "float32")
    rows, geometry = _levels(x, levels)
    batch = ops.shape(x)[0]
    k = ops.clip(ops.cast(k, "int32"), 1, levels)
    level = k - 1
    height = ops.take(ops.stack([ops.cast(g[0], "int32") for g in geometry]), level)
    width = ops.take(ops.stack([ops.cast(g[1], "int32") for g in geometry]), level)
    first = ops.take(ops.stack([ops.cast(g[2], "int32") for g in geometry]), level)
    kf = ops.cast(k, "float32")
    t = ops.cast(transform, "float32")
    # Source pixel X of the full image is at (X + 0.5) / k - 0.5 in the k x k averaged one.
    a0, a1, a2 = t[:, 0] / kf, t[:, 1] / kf, (t[:, 2] + 0.5) / kf - 0.5
    b0, b1, b2 = t[:, 3] / kf, t[:, 4] / kf, (t[:, 5] + 0.5) / kf - 0.5
    valid_h = ops.cast(hw[:, 0], "int32") // k  # the averaged image's own size, padding left out
    valid_w = ops.cast(hw[:, 1], "int32") // k

    def per_image(v):  # (B,) -> (B, 1, 1) to broadcast over the output grid
        return ops.reshape(v, (-1, 1, 1))

    grid = ops.cast(ops.arange(size), "float32")
    u, v = grid[None, None, :], grid[None, :, None]  # output column and row
    xs = per_image(a0) * u + per_image(a1) * v + per_image(a2)
    ys = per_image(b0) * u + per_image(b1) * v + per_image(b2)
    x0, y0 = ops.floor(xs), ops.floor(ys)
    fx, fy = xs - x0, ys - y0
    x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
    base = per_image(first + ops.arange(batch, dtype="int32") * height * width)

    def tap(yy, xx):  # pixel (yy, xx) of each image's level, 0 outside the image
        inside = (yy >= 0) & (yy < per_image(valid_h)) & (xx >= 0) & (xx < per_image(valid_w))
        index = ops.where(inside, base + yy * per_image(width) + xx, 0)
        return ops.take(rows, index, axis=0) * ops.cast(inside, "float32")[..., None]

    fx, fy = fx[..., None], fy[..., None]
    top = (1.0 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1)
    bottom = (1.0 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)
    out = ops.round(ops.clip((1.0 - fy) * top + fy * bottom, 0.0, 255.0))
    return ops.broadcast_to(out, (batch, size, size, 3))  # grey repeated to RGB


@keras.saving.register_keras_serializable(package="tfcovid")
class DeviceAugment(keras.layers.Layer):
    """``resample`` as a layer: a device batch (a dict of ``KEYS``, or of ``RESIDENT_KEYS`` when
    built with ``resident`` images) in, views (B, S, S, 3) out."""

    def __init__(self, size: int, levels: int = 1, resident=None, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.size, self.levels = int(size), max(int(levels), 1)
        self.images = self.sizes = None
        if resident is not None:  # the values themselves as initializers: one copy to the device
            self.images = self.add_weight(shape=resident.images.shape, dtype="uint8", trainable=False,
                                          initializer=lambda shape, dtype=None: resident.images,
                                          name="resident_images")
            self.sizes = self.add_weight(shape=resident.hw.shape, dtype="int32", trainable=False,
                                         initializer=lambda shape, dtype=None: resident.hw,
                                         name="resident_sizes")

    def call(self, inputs):
        if "index" in inputs:
            index = ops.cast(inputs["index"], "int32")
            source, hw = ops.take(self.images, index, axis=0), ops.take(self.sizes, index, axis=0)
            return resample(source, hw, inputs["transform"], inputs["k"], self.size, self.levels)
        return resample(*(inputs[key] for key in KEYS), self.size, self.levels)

    def compute_output_shape(self, input_shape):
        first = input_shape["index" if "index" in input_shape else "source"][0]
        return (first, self.size, self.size, 3)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "levels": self.levels}


class DeviceTrainer(keras.Model):
    """What ``fit`` trains when augmenting on the device: a device batch goes through
    ``DeviceAugment`` then ``classifier``; pixels (validation, predict) go to ``classifier``
    as they are. The classifier's variables are its own (no copy), so are its saves: ``save``,
    ``save_weights`` and ``load_weights`` act on the classifier, and the checkpoints, backups
    and exported models are the same as on the CPU path."""

    def __init__(self, classifier: keras.Model, size: int, levels: int = 1, resident=None, **kwargs):
        super().__init__(name=f"{classifier.name}_device_augmented", dtype="float32", **kwargs)
        self.classifier = classifier
        self.augment = DeviceAugment(size, levels, resident, name="device_augment")

    def build(self, input_shape=None):  # the classifier is built; the augmentation has no state
        self.built = True

    def call(self, inputs, training=False):
        if isinstance(inputs, dict):
            inputs = self.augment(inputs)
        return self.classifier(inputs, training=training)

    def save(self, *args, **kwargs):
        return self.classifier.save(*args, **kwargs)

    def save_weights(self, *args, **kwargs):
        return self.classifier.save_weights(*args, **kwargs)

    def load_weights(self, *args, **kwargs):
        return self.classifier.load_weights(*args, **kwargs)


def trainer_for(model: keras.Model, exp, data) -> keras.Model:
    """What ``fit`` trains for ``inputs.Inputs`` ``data``: ``model`` itself, or with
    data.augment_on device a ``DeviceTrainer`` around it, compiled as ``model`` is and sharing
    its optimizer (so the checkpoints and backups save the state that trains)."""
    if data.augment_on != "device":
        return model
    trainer = DeviceTrainer(model, exp.data.image_size, data.shrink_levels, data.resident)
    compile_model(trainer, exp, data.positive_index, class_weight=data.class_weight,
                  optimizer=model.optimizer)
    return trainer


def choose(setting: str, augmenting: bool, folders: bool, replicas: int, opencv: bool) -> tuple[str, str]:
    """Where the train augmentation resamples: ("device" | "cpu", the line fit logs and records).

    ``setting``: data.augment_on. auto is the device where the model trains on a GPU or TPU,
    with one replica, an ImageFolder train split and OpenCV (the host's decoder); device asks
    for it anywhere those hold (also on a CPU: the same pixels, tested in CI).
    """
    where = devices.accelerator()
    if not augmenting:
        return "cpu", "augmentation off"
    why = ("augmentation on the device needs one replica (train.strategy one)" if replicas > 1
           else "a prepared TFRecord split is augmented on the CPU" if not folders
           else "augmentation on the device needs OpenCV to decode" if not opencv
           else None)
    wanted = setting == "device" or (setting == "auto" and where is not None)
    if wanted and why is None:
        return "device", f"augmentation on {where or 'CPU:0'} (in the train step; data.augment_on {setting})"
    note = f"; data.augment_on {setting} not used: {why}" if wanted else ""
    return "cpu", f"augmentation on CPU ({'OpenCV' if opencv else 'TensorFlow'}{note})"
