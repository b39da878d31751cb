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
crops only, about a quarter of them.

Augmentation runs in the tf.data pipeline, not in the model, so the model can be compiled with
XLA (Keras augmentation layers inside a model disable it).
"""

from __future__ import annotations

import math

import tensorflow as tf


def sample_crop(height, width, scale, ratio, seed):
    """Sample a RandomResizedCrop box exactly as torchvision's ``get_params`` does.

    Ten tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); the first box
    that fits the image wins; if none fits, a centre crop clamped to the ratio range.

    Args:
        height, width: image size (scalar int tensors).
        scale, ratio: (low, high) pairs.
        seed: shape [2] int seed for stateless random ops.

    Returns:
        (top, left, crop_height, crop_width) as float32 scalars.
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    area = h * w * tf.random.stateless_uniform([10], seeds[0], scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform(
        [10], seeds[1], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    cw = tf.round(tf.sqrt(area * aspect))
    ch = tf.round(tf.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first True (0 if none)

    # torchvision's fallback: the whole image, narrowed to the nearest allowed aspect ratio.
    in_ratio = w / h
    fb_w = tf.where(in_ratio < ratio[0], w, tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    any_fit = tf.reduce_any(fits)
    cw = tf.where(any_fit, cw[first], fb_w)
    ch = tf.where(any_fit, ch[first], fb_h)
    u = tf.random.stateless_uniform([2], seeds[2])
    # randint(0, H - h + 1) for the random box; centred for the fallback.
    top = tf.where(any_fit, tf.floor(u[0] * (h - ch + 1)), tf.floor((h - ch) / 2))
    left = tf.where(any_fit, tf.floor(u[1] * (w - cw + 1)), tf.floor((w - cw) / 2))
    return top, left, ch, cw


def sample_params(height, width, scale, ratio, max_angle, flip, seed):
    """Sample the study's three random choices for one image.

    Returns:
        dict of float32 scalars ``top, left, height, width`` (the crop box, in pixels of the
        rotated canvas), ``angle`` (radians, uniform in [-max_angle, max_angle] degrees,
        counter-clockwise as torchvision's) and bool ``flip``.
    """
    seeds = tf.random.experimental.stateless_split(seed, 3)
    top, left, ch, cw = sample_crop(height, width, scale, ratio, seeds[0])
    angle = tf.random.stateless_uniform([], seeds[1], -max_angle, max_angle) * (math.pi / 180.0)
    flipped = tf.random.stateless_uniform([], seeds[2]) < (0.5 if flip else 0.0)
    return {"top": top, "left": left, "height": ch, "width": cw, "angle": angle, "flip": flipped}


def fused_transform(params, height, width, size):
    """The 8-number projective transform of rotate -> crop -> resize -> flip.

    It maps output pixel (u, v) of the S x S result to a point of the source image, as
    ``tf.raw_ops.ImageProjectiveTransformV3`` expects (pixel centres at integer coordinates).
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
    return tf.stack([
        cos * ax, -sin * ay, cx + cos * (bx - cx) - sin * (by - cy),
        sin * ax, cos * ay, cy + sin * (bx - cx) + cos * (by - cy),
        0.0, 0.0,
    ])


def augment_params(height, width, size, scale, ratio, max_angle, flip, seed):
    """Sample crop box, angle and flip; return (fused transform, zoom = crop side / S)."""
    params = sample_params(height, width, scale, ratio, max_angle, flip, seed)
    transform = fused_transform(params, height, width, size)
    return transform, tf.minimum(params["height"], params["width"]) / float(size)


def scale_transform(transform, sy, sx):
    """Re-express ``transform`` for the same image shrunk by (sy, sx) (box/area filtered).

    Source coordinate x (pixel centres at integers) sits at (x + 0.5) / s - 0.5 in the shrunk
    image, which is where a k x k box average (or a JPEG decoded at 1/k scale) puts it.
    """
    a0, a1, a2, b0, b1, b2 = tf.unstack(transform[:6])
    return tf.stack([a0 / sx, a1 / sx, (a2 + 0.5) / sx - 0.5,
                     b0 / sy, b1 / sy, (b2 + 0.5) / sy - 0.5, 0.0, 0.0])


def resample(image, transform, size):
    """Bilinear resample of ``image`` (H, W, C) through ``transform`` to (S, S, C) float32."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform[None],
        output_shape=[size, size], fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return out[0]


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
    shape = tf.shape(image)
    transform, zoom = augment_params(shape[0], shape[1], size, scale, ratio, max_angle, flip, seed)
    # Anti-aliasing: average k x k blocks first when the crop is >= 2x the output size.
    k = tf.maximum(1, tf.cast(tf.floor(zoom), tf.int32))

    def shrink():
        shape_f = tf.cast(shape[:2], tf.float32)
        small = tf.maximum(tf.floor(shape_f / tf.cast(k, tf.float32)), 1.0)
        pooled = tf.image.resize(tf.cast(image, tf.float32), tf.cast(small, tf.int32), method="area")
        return pooled, scale_transform(transform, shape_f[0] / small[0], shape_f[1] / small[1])

    image, transform = tf.cond(k > 1, shrink, lambda: (tf.cast(image, tf.float32), transform))
    return resample(image, transform, size)


def resize_eval(image, size):
    """The study's eval transform: resize to S x S (antialiased, as PIL does)."""
    return tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)
