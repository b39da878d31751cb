"""Decoding with TensorFlow's ops: JPEG/PNG/BMP/GIF, grey/RGB/RGBA, 8 or 16 bit -> uint8 RGB.
"""
from __future__ import annotations

import tensorflow as tf

from tfcovid.data import augment


def decode_image(data):
    """Decode JPEG/PNG/BMP/GIF bytes to uint8 (H, W, C) with C = 1 (grayscale) or 3 (RGB).

    16-bit PNGs are scaled to 8 bits (decode_image converts dtypes by range), alpha is dropped,
    a GIF gives its first frame. Grayscale stays one channel until the end of the pipeline,
    which makes everything before that up to 3x cheaper.
    """
    image = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    channels = tf.shape(image)[-1]
    image = tf.cond(channels >= 3, lambda: image[..., :3], lambda: image[..., :1])
    image.set_shape([None, None, None])
    return image


def one_channel_if_gray(image):
    """An (H, W, 3) image whose three channels are equal everywhere (a grey X-ray saved as
    RGB) as its one channel; any other image as it is. Lossless: ``gray_to_rgb`` repeats it
    at the end and every resize treats channels alike (``augment.one_channel_if_gray`` is the
    same for NumPy images). Used on small (S x S) images: on a full-size one TensorFlow's
    check costs a quarter of the decode."""
    def gray():
        return tf.reduce_all(tf.equal(tf.reduce_max(image, -1), tf.reduce_min(image, -1)))

    same = tf.cond(tf.equal(tf.shape(image)[-1], 3), gray, lambda: tf.constant(False))
    image = tf.cond(same, lambda: image[..., :1], lambda: image)
    image.set_shape([None, None, None])
    return image


def round_uint8(image):
    """Round a float image to uint8 pixels, clipping to [0, 255]."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def gray_to_rgb(image, size: int):
    """Make an (S, S, 1 or 3) image 3-channel (grayscale is repeated) with a static shape."""
    image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image)
    image.set_shape([size, size, 3])
    return image


def to_rgb_uint8(image, size: int):
    """Round a float image to uint8 and make it 3-channel (grayscale is repeated)."""
    return gray_to_rgb(round_uint8(image), size)


def load_image(path, size: int, raw: bytes | None = None):
    """Read, decode and resize one file for evaluation or prediction: uint8 (S, S, 3).
    ``raw``: the file's bytes, when the caller has read them already."""
    raw = tf.io.read_file(path) if raw is None else tf.constant(raw)
    return to_rgb_uint8(augment.resize_eval(decode_image(raw), size), size)
