"""Decoding with TensorFlow's ops: JPEG/PNG/BMP/GIF, grey/RGB/RGBA, 8 or 16 bit -> uint8 RGB;
DICOM through ``data.dicom``, TIFF through ``data.tiff``.
"""
from __future__ import annotations

import tensorflow as tf

from tfcovid.data import augment, dicom, tiff
from tfcovid.data.signatures import SIGNATURES

PNG_MAGIC = SIGNATURES["PNG"][0]


def decode_image(data, dicom_files: bool = True):
    """Decode JPEG/PNG/BMP/GIF (and DICOM, TIFF) bytes to uint8 (H, W, C), C = 1 (grey) or 3 (RGB).

    16-bit PNGs are scaled to 8 bits by the bits they use (``highbit``), alpha is dropped,
    a GIF gives its first frame, a DICOM file gives ``dicom.to_uint8``'s image (through
    ``tf.numpy_function``), a TIFF ``tiff.to_uint8``'s (the same way; ``dicom_files=False``
    leaves both out of graphs saved without Python, the exported SavedModel's). Grayscale stays one channel until the end of the pipeline,
    which makes everything before that up to 3x cheaper.
    """
    # The 132 first bytes, padded: substr past a short file's end would fail.
    head = tf.strings.join([tf.strings.substr(data, 0, 132), b"\0" * 132])

    def other():
        is_png16 = tf.logical_and(tf.equal(tf.strings.substr(head, 0, 8), PNG_MAGIC),
                                  tf.equal(tf.strings.substr(head, 24, 1), b"\x10"))
        image = tf.cond(is_png16, lambda: _png16(data), lambda: _one_or_three(
            tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)))
        image.set_shape([None, None, None])
        return image

    if not dicom_files:
        return other()
    is_dicom = tf.equal(tf.strings.substr(head, dicom.MAGIC_AT, 4), dicom.MAGIC)
    is_tiff = tf.reduce_any(tf.equal(tf.strings.substr(head, 0, 4), list(SIGNATURES["TIFF"])))

    def python(decoder):  # a decoder that needs Python (pydicom, Pillow)
        return lambda: tf.numpy_function(decoder, [data], tf.uint8, stateful=False)

    image = tf.cond(is_dicom, python(dicom.decode_tensor),
                    lambda: tf.cond(is_tiff, python(tiff.decode_tensor), other))
    image.set_shape([None, None, None])
    return image


def _one_or_three(image):
    image = tf.cond(tf.shape(image)[-1] >= 3, lambda: image[..., :3], lambda: image[..., :1])
    image.set_shape([None, None, None])
    return image


def _png16(data):
    """A 16-bit PNG to 8 bits by the bits it uses: ``highbit``'s rule in TensorFlow's ops."""
    image = _one_or_three(tf.io.decode_png(data, channels=0, dtype=tf.uint16))
    largest = tf.cast(tf.reduce_max(image), tf.int32)
    length = tf.reduce_sum(tf.cast(largest >= tf.constant([1 << j for j in range(16)]), tf.int32))
    bits = tf.maximum(8, (length + 1) // 2 * 2)
    parts = tf.strings.split(tf.strings.split(data, "IDAT", maxsplit=1)[0], "sBIT", maxsplit=1)
    sbit = tf.cond(tf.logical_and(tf.size(parts) == 2, tf.strings.length(parts[-1]) > 0),
                   lambda: tf.cast(tf.io.decode_raw(tf.strings.substr(parts[-1], 0, 1), tf.uint8)[0], tf.int32),
                   lambda: tf.constant(0))
    known = tf.logical_and(sbit >= 8, sbit <= 16)  # values past its bits: scaled up to 16 (PNG spec)
    bits = tf.where(known, tf.where(largest < tf.bitwise.left_shift(1, sbit), sbit, 16), bits)
    return tf.cast(tf.bitwise.right_shift(image, tf.cast(bits - 8, tf.uint16)), tf.uint8)


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
