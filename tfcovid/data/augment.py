"""The study's train augmentation as TensorFlow ops, fused into one resampling per image.

The study applies RandomRotation(30) -> RandomResizedCrop(S, scale, ratio) ->
RandomHorizontalFlip to each full-resolution image. Rotation (about the image centre, same
canvas, black fill), crop-and-resize and flip are all affine maps, so tfcovid samples the three
exactly as torchvision does and composes them into ONE affine map from output pixels to source
pixels, resampled once with bilinear interpolation straight to S x S. The statistics of the
crop box, angle and flip are the study's; only the work is less: no full-size rotated
intermediate image is ever made.

Anti-aliasing: bilinear sampling of a crop 2x or more larger than the output would alias
(PIL's resize antialiases), so such images are box-averaged by the integer factor first.
With the input pipeline's working resolution (see ``pipeline``) that happens for the largest
crops only (under a tenth of them for 1024 px files at 224 px).

The work is split in two: ``plan`` turns each image's size and random draws into its
transform, vectorised over any number of images (the pipeline plans a whole epoch in one go,
since per-image scalar ops cost more CPU than the arithmetic); ``apply`` resamples one image.
``random_resized_crop_rotate_flip`` does both for one image.

Augmentation runs in the tf.data pipeline, not in the model, so the model can be compiled with
XLA (Keras augmentation layers inside a model disable it).
"""
from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

# The OpenCV side (decoders, resample) lives in tfcovid.data.opencv.images, which imports no TensorFlow, so
# that the resample worker processes (tfcovid.data.opencv.process_pool) can run it.
from tfcovid.data.opencv.images import _affine, _rescaled, _warp, batch_buffer, cv2

"""Uniform draws per image: 10 area fractions, 10 log aspect ratios (torchvision's ten tries),
the box's top and left, the angle and the flip."""


DRAWS = 24


def draws(seed, n: int | None = None):
    """The ``DRAWS`` U[0, 1) numbers one image's augmentation is made of ([n, DRAWS] for n images).

    One stateless op: reproducible from ``seed`` (shape [2]) and cheap. The pipeline draws a
    whole epoch at once and gives row i to image i.
    """
    return tf.random.stateless_uniform([DRAWS] if n is None else [n, DRAWS], seed)


def crop_boxes(hw, u, scale, ratio):
    """RandomResizedCrop boxes sampled exactly as torchvision's ``get_params``, for N images at once.

    Ten tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); the first box
    that fits the image wins; if none fits, a centre crop clamped to the ratio range.

    Args:
        hw: [N, 2] float32 image sizes (height, width).
        u: [N, DRAWS] uniforms from ``draws``.
        scale, ratio: (low, high) pairs.

    Returns:
        (top, left, crop_height, crop_width), each [N] float32 with integer values.
    """
    h, w = hw[:, :1], hw[:, 1:]
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 10:20])
    cw = tf.round(tf.sqrt(area * aspect))
    ch = tf.round(tf.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1)  # index of the first True (0 if none)
    any_fit = tf.reduce_any(fits, axis=1)
    cw = tf.gather(cw, first, batch_dims=1)
    ch = tf.gather(ch, first, batch_dims=1)
    h, w = hw[:, 0], hw[:, 1]

    # torchvision's fallback: the whole image, narrowed to the nearest allowed aspect ratio.
    in_ratio = w / h
    fb_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    cw = tf.where(any_fit, cw, fb_w)
    ch = tf.where(any_fit, ch, fb_h)
    # randint(0, H - h + 1) for the random box; centred for the fallback.
    top = tf.where(any_fit, tf.floor(u[:, 20] * (h - ch + 1)), tf.floor((h - ch) / 2))
    left = tf.where(any_fit, tf.floor(u[:, 21] * (w - cw + 1)), tf.floor((w - cw) / 2))
    return top, left, ch, cw


def params_from_draws(hw, u, scale, ratio, max_angle, flip):
    """The study's three random choices for N images (see ``sample_params``), each [N]."""
    top, left, ch, cw = crop_boxes(hw, u, scale, ratio)
    angle = (2.0 * u[:, 22] - 1.0) * (max_angle * math.pi / 180.0)
    flipped = u[:, 23] < (0.5 if flip else 0.0)
    return {"top": top, "left": left, "height": ch, "width": cw, "angle": angle, "flip": flipped}


def sample_params(height, width, scale, ratio, max_angle, flip, seed):
    """Sample the study's three random choices for one image.

    Returns:
        dict of float32 scalars ``top, left, height, width`` (the crop box, in pixels of the
        rotated canvas), ``angle`` (radians, uniform in [-max_angle, max_angle] degrees,
        counter-clockwise as torchvision's) and bool ``flip``.
    """
    hw = tf.cast(tf.reshape(tf.stack([height, width]), [1, 2]), tf.float32)
    params = params_from_draws(hw, draws(seed)[None], scale, ratio, max_angle, flip)
    return {key: value[0] for key, value in params.items()}


def fused_transform(params, height, width, size):
    """The 8-number projective transform of rotate -> crop -> resize -> flip.

    It maps output pixel (u, v) of the S x S result to a point of the source image, as
    ``tf.raw_ops.ImageProjectiveTransformV3`` expects (pixel centres at integer coordinates).
    ``params`` (from ``sample_params`` or ``params_from_draws``), ``height`` and ``width`` are
    scalars (result [8]) or [N] vectors (result [N, 8]).
    """
    s = float(size)
    ch, cw, top, left = params["height"], params["width"], params["top"], params["left"]
    flipped = params["flip"]
    # Output pixel -> point in the rotated canvas (crop + resize, optionally mirrored).
    ax = tf.where(flipped, -cw / s, cw / s)
    bx = tf.where(flipped, left + (s - 0.5) * cw / s - 0.5, left + 0.5 * cw / s - 0.5)
    ay = ch / s
    by = top + 0.5 * ch / s - 0.5
    # Rotated canvas -> source: rotate about the image centre (torchvision's centre).
    cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
    cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
    cos, sin = tf.cos(params["angle"]), tf.sin(params["angle"])
    zero = tf.zeros_like(ax)
    return tf.stack([
        cos * ax, -sin * ay, cx + cos * (bx - cx) - sin * (by - cy),
        sin * ax, cos * ay, cy + sin * (bx - cx) + cos * (by - cy),
        zero, zero,
    ], axis=-1)


def plan(hw, u, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), max_angle=30.0, flip=True):
    """Everything about N images' augmentation that does not need their pixels.

    Args:
        hw: [N, 2] image sizes (height, width).
        u: [N, DRAWS] uniforms from ``draws``.

    Returns:
        (transforms [N, 8] for ``apply``, shrink factors k [N] int32: the integer factor the
        image is box-averaged by first, >= 2 only for crops 2x or more larger than S).
    """
    hw = tf.cast(hw, tf.float32)
    params = params_from_draws(hw, u, scale, ratio, max_angle, flip)
    transforms = fused_transform(params, hw[:, 0], hw[:, 1], size)
    zoom = tf.minimum(params["height"], params["width"]) / float(size)
    return transforms, tf.maximum(1, tf.cast(tf.floor(zoom), tf.int32))


def plan_one(hw, u, size, *aug):
    """``plan`` for one image: (transform [8], shrink factor k) from its (height, width) and
    its draws [DRAWS]; ``aug``: ``plan``'s scale, ratio, max_angle, flip."""
    transforms, k = plan(tf.reshape(hw, [1, 2]), tf.reshape(u, [1, DRAWS]), size, *aug)
    return transforms[0], k[0]


def scale_transform(transform, sy, sx):
    """Re-express ``transform`` for the same image shrunk by (sy, sx) (box/area filtered).

    Source coordinate x (pixel centres at integers) sits at (x + 0.5) / s - 0.5 in the shrunk
    image, which is where a k x k box average (or a JPEG decoded at 1/k scale) puts it.
    """
    return tf.stack(_rescaled(tf.unstack(transform[:6]), sy, sx) + [0.0, 0.0])


def resample(image, transform, size):
    """Bilinear resample of ``image`` (H, W, C) through ``transform`` to (S, S, C) float32."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform[None],
        output_shape=[size, size], fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return out[0]


def apply(image, transform, k, size):
    """Resample one image (H, W, C) through its planned ``transform`` and shrink factor ``k``
    (from ``plan``) to (S, S, C) float32."""

    def shrink():
        shape_f = tf.cast(tf.shape(image)[:2], tf.float32)
        small = tf.maximum(tf.floor(shape_f / tf.cast(k, tf.float32)), 1.0)
        pooled = tf.image.resize(tf.cast(image, tf.float32), tf.cast(small, tf.int32), method="area")
        return pooled, scale_transform(transform, shape_f[0] / small[0], shape_f[1] / small[1])

    # Anti-aliasing: average k x k blocks first when the crop is >= 2x the output size.
    image, transform = tf.cond(k > 1, shrink, lambda: (tf.cast(image, tf.float32), transform))
    return resample(image, transform, size)


FAST_HINT = ("OpenCV could not be imported; pip install opencv-python-headless for ~1.3x the "
             "first-epoch and ~3x the later-epoch images/s on a CPU")


def resampler() -> str:
    """Which library the pipelines resample with: "opencv" when it is installed, else "tensorflow"."""
    return "opencv" if cv2 is not None else "tensorflow"


def describe_resampler(name: str | None = None) -> str:
    """``name`` (default: ``resampler()``), with the install hint when it is not OpenCV."""
    name = name or resampler()
    return name if name == "opencv" else f"{name} ({FAST_HINT})"


def apply_uint8(image, transform, k, size):
    """``apply`` rounded to uint8 pixels (S, S, C), with TensorFlow's op.

    ``_warp`` is the same with OpenCV: the same map (pixel centres at integers, black
    outside the image, the same k x k area pre-shrink, in float); OpenCV's fixed-point bilinear
    weights move a few pixels by one grey level (``tests/test_augment.py``).
    """
    out = apply(image, transform, k, size)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


_THREADS = os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """Threads for ``on_all_cores``'s other chunks (OpenCV releases the GIL while it works)."""
    return ThreadPoolExecutor(max_workers=max(_THREADS - 1, 1), thread_name_prefix="tfcovid-warp")


def on_all_cores(count: int, work) -> None:
    """Call ``work(i)`` for i in 0 .. count - 1 on the calling thread (one of tf.data's) and
    up to one pool thread per other core. Rows are handed out one at a time, so a slow image
    (a decode, a large crop) does not leave a core idle at the end of the batch, and the
    caller waits only for rows in progress, never for a helper still queued behind another
    batch's call."""
    if count <= 0:
        return
    rows = iter(range(count))  # next() on it is atomic under the GIL: each row runs once
    lock, finished = threading.Lock(), threading.Event()
    done, failed = [0], []

    def drain():
        for i in rows:
            try:
                work(i)
            except Exception as error:  # noqa: BLE001  (re-raised by the caller)
                failed.append(error)
            with lock:
                done[0] += 1
                if done[0] == count:
                    finished.set()

    for _ in range(min(count, _THREADS) - 1):
        _pool().submit(drain)
    drain()
    finished.wait()
    if failed:
        raise failed[0]


def warp_rows(count: int, size: int, source) -> np.ndarray:
    """A uint8 batch (count, S, S, 3) of OpenCV views: ``source(i)`` gives row i's (image,
    transform, k); the rows are fetched and resampled on all cores (``on_all_cores``).

    One call per batch, inside one ``tf.numpy_function``: each call costs a fixed slice of
    Python's global lock, so one per image would cap throughput. Each row holds the lock only
    between OpenCV calls (which release it); a grey row is one OpenCV call into a grey batch,
    repeated to RGB once per batch. The measurements: docs/performance.md.
    """
    grey = batch_buffer((count, size, size))
    colour = {}

    def row(i):
        image, transform, k = source(i)
        image = np.ascontiguousarray(image)
        if image.shape[-1] != 1:
            colour[i] = _warp(image, transform, k, size)
        elif k > 1:  # pre-shrunk in float first
            grey[i] = _warp(image, transform, k, size)[..., 0]
        else:  # most rows: one OpenCV call, into the batch
            _affine(image[..., 0], transform, size, grey[i])

    on_all_cores(count, row)
    out = batch_buffer((count, size, size, 3))  # tf.data takes it as it is, no copy
    if len(colour) < count:  # some grey rows (an all-colour batch has nothing to repeat)
        cv2.cvtColor(grey.reshape(count * size, size), cv2.COLOR_GRAY2RGB, dst=out.reshape(count * size, size, 3))
    for i, warped in colour.items():
        out[i] = warped
    return out


def random_resized_crop_rotate_flip(image, seed, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                    max_angle=30.0, flip=True):
    """Apply the study's train augmentation to one image (H, W, C) and return (S, S, C) float32.

    Args:
        image: uint8 or float image of any size and channel count.
        seed: shape [2] int seed (stateless ops: reproducible and parallel-safe).
        size: output side S.
        scale, ratio: RandomResizedCrop's area fraction and aspect ratio ranges.
        max_angle: rotation range in degrees, uniform in [-max_angle, max_angle].
        flip: random horizontal flip with probability 0.5.
    """
    transforms, k = plan(tf.shape(image)[None, :2], draws(seed)[None], size, scale, ratio,
                         max_angle, flip)
    return apply(image, transforms[0], k[0], size)


def resize_eval(image, size):
    """The study's eval transform: resize to S x S (antialiased, as PIL does)."""
    return tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)
