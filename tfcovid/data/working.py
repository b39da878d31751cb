"""Train images decoded at their working resolution: the shorter side halved while it stays at
least ``decode_scale * S`` (JPEGs by libjpeg's DCT scaling, other formats by 2 x 2 box
averages), and each file's working size and decoder read from its header before any pixel is
decoded, so a whole epoch can be planned at once (``pipeline``). TensorFlow's side; OpenCV's
decoders give the same pixels (``opencv.images``).
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfcovid.data.decode import decode_image
from tfcovid.data.opencv import images as opencv_images
from tfcovid.data.sizes import halvings, header, working_shape
from tfcovid.data.types import Split

# libjpeg's exact integer IDCT (TensorFlow's default is the fast one). It is OpenCV's default,
# so a JPEG decoded by either library has the same pixels (see ``augment.decode_jpeg``).
_DCT = "INTEGER_ACCURATE"


def working_side(image_size: int, decode_scale: float) -> int | None:
    """The smallest shorter side train images are decoded to (None: full resolution)."""
    if not decode_scale:
        return None
    return int(math.ceil(decode_scale * image_size))


def _halvings(short, min_side: int, cap: int):
    """How many times (at most ``cap``) an image can be halved and keep its shorter side >=
    min_side; integer arithmetic, the same count as ``sizes.halvings``."""
    steps = tf.constant([min_side * 2**j for j in range(1, cap + 1)], tf.int64)
    return tf.reduce_sum(tf.cast(tf.cast(short, tf.int64) >= steps, tf.int32))


def _one_or_three(image):
    image = tf.cond(tf.shape(image)[-1] >= 3, lambda: image[..., :3], lambda: image[..., :1])
    image.set_shape([None, None, None])
    return image


def _halve(x):
    """2 x 2 box average of a float (H, W, C) image, odd last row/column dropped: what
    ``avg_pool2d(x, 2, 2, "VALID")`` gives (exactly: sums of 4 values / 4), at a fraction of its
    CPU (docs/performance.md), by adding neighbouring rows, then neighbouring columns, of
    reshaped views."""
    h, w, c = tf.shape(x)[0] // 2, tf.shape(x)[1] // 2, tf.shape(x)[2]
    rows = tf.reshape(x[: 2 * h, : 2 * w], [h, 2, 2 * w * c])
    cols = tf.reshape(rows[:, 0] + rows[:, 1], [h, w, 2, c])
    return (cols[:, :, 0] + cols[:, :, 1]) * 0.25


def exact_jpeg(data, ratio: int = 1):
    """A JPEG decoded at 1/``ratio`` scale with libjpeg's exact IDCT (OpenCV's pixels, see
    ``_DCT``): uint8 (H, W, C), C = 1 or 3."""
    return _one_or_three(tf.io.decode_jpeg(data, channels=0, ratio=ratio, dct_method=_DCT))


def decode_base(data, min_side: int | None):
    """Decode image bytes to uint8 (H, W, C), C = 1 or 3, halved while the shorter side stays
    >= ``min_side`` (never upscaled; None decodes at full resolution).

    JPEGs are decoded directly at 1/2, 1/4 or 1/8 scale by libjpeg (the DCT does the
    filtering, and it is faster than a full decode); other formats are decoded fully and
    box-averaged 2x2 per halving. Either way pixel x of the result covers source pixels
    [k*x, k*x + k), the mapping the augmentation's coordinates assume.
    """
    if min_side is None:
        return decode_image(data)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(data)
        k = _halvings(tf.minimum(shape[0], shape[1]), min_side, 3)
        return tf.switch_case(k, [lambda r=r: exact_jpeg(data, r) for r in (1, 2, 4, 8)])

    def other():
        image = decode_image(data)
        shape = tf.shape(image)
        k = _halvings(tf.minimum(shape[0], shape[1]), min_side, 30)

        def pool():
            x = tf.while_loop(lambda i, x: i < k, lambda i, x: (i + 1, _halve(x)),
                              (0, tf.cast(image, tf.float32)),
                              shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None, None])))[1]
            return tf.cast(tf.round(x), tf.uint8)

        out = tf.cond(k > 0, pool, lambda: image)
        out.set_shape([None, None, None])
        return out

    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), opencv_images.JPEG_MAGIC)
    if_dicom = tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, 132), b"\0" * 132]), 128, 4)
    is_jpeg = tf.logical_and(is_jpeg, tf.not_equal(if_dicom, b"DICM"))  # a preamble may look like one
    return tf.cond(is_jpeg, jpeg, other)


def file_plan(paths, min_side: int | None):
    """Every train file's working-resolution (height, width) from its header, its decoder,
    and what OpenCV would need to decode it.

    The sizes let a whole epoch's augmentation be planned at once (``augment.plan``), before
    any pixel is decoded; an unreadable header gives (-1, -1) and that image is planned from
    its pixels instead. When every file is a JPEG of one kind (grey or RGB, one DCT scale) the
    decoder is a single ``decode_jpeg`` with that scale, else the general ``decode_base``:
    the same pixels either way. ``readable``: int32 [N, 2], (channels, halvings) of each file
    OpenCV decodes to ``decode_base``'s pixels (``augment.decode_file``'s arguments: grey or
    RGB JPEGs; PNGs of 8 or 16 bits, grey or RGB, alpha or not), (0, 0) for any other file.
    """
    shapes = np.full((max(len(paths), 1), 2), -1, np.int32)
    readable = np.zeros((max(len(paths), 1), 2), np.int32)
    jpeg = np.zeros(max(len(paths), 1), bool)
    for i, path in enumerate(paths):
        head = header(path)
        if head is None:
            continue
        shapes[i] = working_shape(head.height, head.width, head.jpeg, min_side)
        if (head.jpeg and head.mode in ("L", "RGB")) or (head.format == "PNG" and head.depth in (8, 16)
                                                         and head.mode not in ("P", "PA", "1")):
            k = halvings(min(head.height, head.width), min_side, head.jpeg) if min_side else 0
            readable[i], jpeg[i] = (head.channels, k), head.jpeg
    kinds = np.unique(readable[: len(paths)], axis=0)
    if min_side and len(kinds) == 1 and kinds[0, 0] > 0 and jpeg[: len(paths)].all():
        channels, ratio = int(kinds[0, 0]), 2 ** int(kinds[0, 1])
        return shapes, lambda data: tf.io.decode_jpeg(data, channels=channels, ratio=ratio, dct_method=_DCT), readable
    return shapes, lambda data: decode_base(data, min_side), readable


def working_sizes(split: Split, image_size: int, decode_scale: float) -> np.ndarray:
    """Each train file's working (height, width) from its header; (-1, -1) where unknown."""
    return file_plan(split.paths, working_side(image_size, decode_scale))[0][: len(split)]


def decode_base_or_refuse(data: bytes, min_side: int | None, path: str) -> np.ndarray:
    """``decode_base`` in eager TensorFlow, for the OpenCV side's fallbacks: uint8 (H, W, C), or
    ValueError naming ``path`` when the file's bytes cannot be decoded."""
    try:
        return decode_base(tf.constant(data), min_side).numpy()
    except tf.errors.OpError as error:
        raise ValueError(f"{path}: cannot be decoded ({error.message}). Replace or remove the file.") from None
