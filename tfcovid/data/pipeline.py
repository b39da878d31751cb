"""tf.data input pipelines: indices -> (cached) decode -> augment or resize -> batch -> prefetch.

Train: once per epoch, a stateless shuffle and every image's augmentation plan (keyed on seed,
epoch and image, so a resumed run sees the same batches); then each image is decoded once at a
working resolution into the cache (``tfcovid.data.cache``) and resampled per batch by OpenCV
(``batches.resampler``) or per image by TensorFlow. Eval: antialiased resize to S x S, cached
as final uint8 pixels. How and why, step by step: docs/performance.md ("The input pipeline").
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import tensorflow as tf

from tfcovid.data import augment, batches, sampling
from tfcovid.data.batches import FROM_OPENCV, FROM_STORE, FROM_TENSORFLOW
from tfcovid.data.cache import ArrayStore, as_cache
from tfcovid.data.decode import (
    decode_image,
    gray_to_rgb,
    one_channel_if_gray,
    round_uint8,
)
from tfcovid.data.opencv.process_pool import WorkerStore
from tfcovid.data.sizes import estimate_bytes
from tfcovid.data.types import Split
from tfcovid.data.working import decode_base_or_refuse, file_plan, working_side


def eval_pixels(data, size: int):
    """uint8 (S, S, C) eval pixels, C = 1 or 3: exactly what ``data.load_image`` rounds to."""
    return one_channel_if_gray(round_uint8(augment.resize_eval(decode_image(data), size)))

# The plan row of one train image, as ``_one_epoch`` lays it out: augmentation draws, affine
# transform (8), pre-shrink halvings, planned (height, width), source, OpenCV's (channels, halvings).
_PLAN = [augment.DRAWS, 8, 1, 2, 1, 2]


@dataclass(frozen=True)
class _Stages:
    """What the stages of one split's pipeline share, decided once by ``_stages``."""

    split: Split
    image_size: int
    paths: tf.Tensor  # the split's files, by image index
    labels: tf.Tensor | None
    augmenting: bool
    min_side: int | None  # the working resolution's shorter side (None: full size)
    warp_batches: bool  # OpenCV resamples whole batches, after batching
    store: object = None  # the split's ImageStore, ArrayStore or WorkerStore (None: no cache)
    arrays: bool = False  # ``store`` is read and filled by the batch resampler
    opencv_decodes: bool = False  # the batch resampler also decodes the JPEGs and PNGs
    aug_args: tuple = ()  # crop scale, crop ratio, rotation, flip
    shapes: np.ndarray | None = None  # ``working.file_plan``'s: header sizes, decoder, OpenCV's kinds
    decode: Callable | None = None
    readable: np.ndarray | None = None
    groups: np.ndarray | None = None  # data.sampling balanced: each image's group (data/sampling.py)
    device: bool = False  # data.augment_on device: batches of decoded images for the train step
    resident: bool = False  # ... or of indices into the images the device holds (data.resident)


def dataset(
    split: Split,
    image_size: int,
    batch_size: int,
    training: bool = False,
    aug=None,
    seed: int = 0,
    drop_remainder: bool = False,
    cache=None,
    decode_scale: float = 2.0,
    epoch: tf.Variable | None = None,
    deterministic: bool = True,
    groups: np.ndarray | None = None,
    augment_on: str = "cpu",
    sizes: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Build the tf.data pipeline for one split: (uint8 images (N, S, S, 3), labels).

    Args:
        split: a labeled or unlabeled Split (unlabeled yields images only).
        image_size: output side S.
        batch_size: images per batch.
        training: reshuffle the whole split every epoch and apply ``aug`` (an AugmentConfig).
        aug: augmentation settings; None or disabled means resize only.
        seed: shuffling and augmentation seed.
        drop_remainder: drop the last partial batch (needed by some strategies).
        cache: None (no cache), "auto" | "memory" | "disk" | "none", or a ``cache.Cache``
            shared by several splits (one memory budget). Caching pays from the second pass.
        decode_scale: train images are decoded to a shorter side of at least
            ``decode_scale * image_size`` (powers of 2 below the original); 0: full size.
        epoch: training only: an int64 variable holding the epoch about to run. Each pass
            reads it once and keys its shuffle and augmentation on (seed, epoch, image), so
            epoch k is the same whether or not the run was interrupted before it. None: each
            pass draws a fresh key from a stream seeded with ``seed`` (standalone use).
        deterministic: keep the batch order fixed in training too (the default; costs little,
            see docs/performance.md). False hands batches over as they finish.
        groups: training only: each image's group for ``data.sampling: balanced``
            (``sampling.groups``); None keeps the natural order (each image once per epoch).
        augment_on: "cpu" (OpenCV, in tf.data) or "device": train batches are the decoded
            images padded to one shape with their plans (``batches.gatherer``), resampled in
            the train step by ``tfcovid.training.device_augment``. Needs OpenCV. "resident":
            the images are on the device already (``resident.decode_all``): batches of their
            indices and plans only, planned from ``sizes``, their decoded (height, width).
    """
    s = _stages(split, image_size, batch_size, training, aug, cache, decode_scale, augment_on, sizes)
    if groups is not None:
        s = replace(s, groups=np.asarray(groups, np.int64))
    if training:
        ds = _epoch_keys(seed, epoch).flat_map(functools.partial(_one_epoch, s))
    else:
        ds = tf.data.Dataset.range(len(split)).map(lambda index: (index, tf.zeros([0])))
    ds = _batched(s, ds, batch_size, drop_remainder, in_order=deterministic or not training)
    if training:  # flat_map hides the length; Keras's progress bar and step count want it
        n = len(split)
        batches = n // batch_size if drop_remainder else -(-n // batch_size)
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    # Prefetching overlaps decoding of the next batches with the training step on this one.
    return ds.prefetch(tf.data.AUTOTUNE)


def _stages(split: Split, image_size: int, batch_size: int, training: bool, aug, cache,
            decode_scale: float, augment_on: str = "cpu", sizes=None) -> _Stages:
    """How this split's images are planned, decoded, cached and resampled; starts the cache's
    worker processes, if it has them. Resident images (``sizes``) need neither headers nor cache."""
    augmenting = training and aug is not None and aug.enabled
    resident = augmenting and augment_on == "resident"
    min_side = working_side(image_size, decode_scale) if augmenting else None
    # With OpenCV a whole batch is resampled in one call after batching.
    warp_batches = augmenting and augment.resampler() == "opencv"
    device = warp_batches and augment_on in ("device", "resident")  # the same batches, resampled in the step
    planned = {}
    if augmenting:
        shapes, decode, readable = ((np.asarray(sizes, np.int32).reshape(-1, 2), None,
                                     np.zeros((max(len(split), 1), 2), np.int32)) if resident
                                    else file_plan(split.paths, min_side))
        planned = dict(shapes=shapes, decode=decode, readable=readable,
                       aug_args=(aug.crop_scale, aug.crop_ratio, aug.rotation, aug.flip))
    policy = None if resident else as_cache(cache)
    store = None
    if policy is not None:
        # RGB-saved grey is kept as one channel by the eval cache and by OpenCV's train store.
        estimated = estimate_bytes(split.paths, image_size, min_side, augmenting,
                                   gray_as_one=warp_batches or not augmenting)
        arrays = max(len(split), 1) if warp_batches else None
        store = policy.store_for(split.name, estimated, arrays=arrays, workers=not device)
    paths = tf.constant(list(split.paths) or [""], tf.string)
    labels = None if split.labels is None else tf.constant(split.labels)
    if policy is not None:  # worker processes started now (threads where they cannot start)
        store = policy.started(store, batch_size, image_size)
    arrays = isinstance(store, (ArrayStore, WorkerStore))  # the batch resampler reads and fills it
    # The batch resampler also decodes the JPEGs and PNGs (OpenCV, same pixels) unless a
    # TensorFlow table must be filled inside the per-image map.
    opencv_decodes = warp_batches and min_side is not None and (store is None or arrays) and not resident
    return _Stages(split, image_size, paths, labels, augmenting, min_side, warp_batches, store,
                   arrays, opencv_decodes, **planned, device=device, resident=resident)


def _epoch_keys(seed: int, epoch: tf.Variable | None) -> tf.data.Dataset:
    """One random key per pass over the data.

    Randomness is keyed on (seed, epoch, image), never on hidden generator state, so a
    resumed run sees exactly the batches an uninterrupted one would have. The epoch is read
    once per pass: from ``epoch`` (set by fit's callback before each epoch) or, for a
    standalone dataset, drawn fresh per pass from a seeded stream.
    """
    if epoch is not None:
        return tf.data.Dataset.range(1).map(
            lambda _: tf.random.experimental.stateless_fold_in(
                tf.constant([seed, 0], tf.int64), tf.cast(epoch.read_value(), tf.int32)))
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(
        2, drop_remainder=True).take(1)


def _one_epoch(s: _Stages, key) -> tf.data.Dataset:
    """One epoch's (index, plan) elements, planned at once, vectorised (far cheaper than
    per-image ops): a stateless permutation of the split (a full reshuffle) and each image's
    augmentation draws and plan, from the sizes its header gave."""
    n, m = len(s.split), max(len(s.split), 1)
    key = tf.reshape(tf.cast(key, tf.int64), [2])
    order = tf.random.experimental.index_shuffle(tf.range(n, dtype=tf.int64), key, max(n - 1, 0))
    if s.groups is not None:  # data.sampling balanced: one image may fill several slots
        order = sampling.order_op(s.groups)(key)
    if not s.augmenting:
        return tf.data.Dataset.from_tensor_slices((order, tf.zeros([n, 0])))
    draws = augment.draws(key, m)
    known, source = s.shapes, tf.fill([m], FROM_TENSORFLOW)
    if s.opencv_decodes:
        source = tf.where(s.readable[:, 0] > 0, FROM_OPENCV, source)
    if s.arrays:  # what the cache holds now, once per epoch: those are not decoded
        stored, held = tf.numpy_function(s.store.state, [], [tf.bool, tf.int32], stateful=True)
        stored = tf.reshape(stored, [m])
        known = tf.where(stored[:, None], tf.reshape(held, [m, 2]), s.shapes)
        source = tf.where(stored, FROM_STORE, source)
    readable = s.readable
    if s.groups is not None:  # planned per slot, so each copy of a repeated image has its own draws
        draws = augment.draws(tf.random.experimental.stateless_fold_in(key, 1), n)
        known, source, readable = (tf.gather(v, order) for v in (known, source, readable))
    transforms, shrink = augment.plan(known, draws, s.image_size, *s.aug_args)
    plans = tf.concat([draws, transforms, tf.cast(shrink, tf.float32)[:, None],
                       tf.cast(known, tf.float32), tf.cast(source, tf.float32)[:, None],
                       tf.cast(readable, tf.float32)], axis=1)
    return tf.data.Dataset.from_tensor_slices((order, plans if s.groups is not None else tf.gather(plans, order)))


def _decoded(s: _Stages, index, make):
    """``make()``'s image for ``index``, from the cache when it is there (and put there)."""
    if s.store is None or s.arrays:  # an ArrayStore is read and filled by the batch resampler
        return make()
    return s.store.through(index, make)


def _train_image(s: _Stages, index, plan):
    """TensorFlow resampler: the augmented image. OpenCV: what the batch resampler needs
    (the decoded image, or an empty placeholder when it reads the store or decodes the
    file's bytes itself)."""
    draws, transform, shrink, expected, source, coded = tf.split(plan, _PLAN)
    source = tf.cast(source[0], tf.int32)
    here = tf.equal(source, FROM_TENSORFLOW)
    base = tf.cond(here, lambda: _decoded(s, index, lambda: s.decode(tf.io.read_file(s.paths[index]))),
                   lambda: tf.zeros([0, 0, 1], tf.uint8))
    base.set_shape([None, None, None])
    hw = tf.shape(base)[:2]

    same = ~here | tf.reduce_all(tf.equal(tf.cast(expected, tf.int32), hw))
    # Where the header's size was not the decoded one, the image is planned from its pixels.
    transform, k = tf.cond(same, lambda: (transform, tf.cast(shrink[0], tf.int32)),
                           lambda: augment.plan_one(hw, draws, s.image_size, *s.aug_args))
    if not s.warp_batches:
        return gray_to_rgb(augment.apply_uint8(base, transform, k, s.image_size), s.image_size)
    coded = tf.cast(coded, tf.int32)
    opencv = tf.equal(source, FROM_OPENCV)
    data = tf.cond(opencv, lambda: tf.io.read_file(s.paths[index]), lambda: tf.constant(""))
    # The size the plan assumed (the header's, or the stored image's), else the decoded one.
    shape = tf.where(here, tf.shape(base), tf.concat([tf.cast(expected, tf.int32), coded[:1]], 0))
    return base, shape, transform, k, index, source, data, coded[1], draws


def _eval_image(s: _Stages, index):
    pixels = _decoded(s, index, lambda: eval_pixels(tf.io.read_file(s.paths[index]), s.image_size))
    return gray_to_rgb(pixels, s.image_size)


def _load(s: _Stages, index, plan):
    image = _train_image(s, index, plan) if s.augmenting else _eval_image(s, index)
    return image if s.labels is None else (image, tf.gather(s.labels, index))


def _fallback(s: _Stages, index, data, draws):
    """For the batch resampler, in eager TensorFlow: an image whose header misled OpenCV's
    decode (another size than planned), decoded by ``working.decode_base`` and planned from it."""
    image = decode_base_or_refuse(data, s.min_side, s.split.paths[index])
    transform, k = augment.plan_one(tf.shape(image)[:2], tf.constant(draws), s.image_size, *s.aug_args)
    return image, transform.numpy(), int(k)


def _batch_of_plans(s: _Stages, indices, plans):
    """A batch of (index, plan) as the batch resampler's element, with no pixels: it reads
    every file itself."""
    _, transforms, shrink, known, source, coded = tf.split(plans, _PLAN, axis=1)
    coded = tf.cast(coded, tf.int32)
    item = (tf.zeros([0, 0, 0, 1], tf.uint8), tf.concat([tf.cast(known, tf.int32), coded[:, :1]], 1),
            transforms, tf.cast(shrink[:, 0], tf.int32), indices, tf.cast(source[:, 0], tf.int32),
            tf.zeros([0], tf.string), coded[:, 1], plans[:, :augment.DRAWS])
    return item if s.labels is None else (item, tf.gather(s.labels, indices))


def _resident_batch(s: _Stages, indices, plans):
    """A batch of (index, plan) as ``device_augment.DeviceAugment`` takes it with resident images."""
    _, transforms, shrink, _, _, _ = tf.split(plans, _PLAN, axis=1)
    x = {"index": tf.cast(indices, tf.int32), "transform": transforms, "k": tf.cast(shrink[:, 0], tf.int32)}
    return x if s.labels is None else (x, tf.gather(s.labels, indices))


def _batched(s: _Stages, ds: tf.data.Dataset, batch_size: int, drop_remainder: bool,
             in_order: bool) -> tf.data.Dataset:
    """(index, plan) elements to batches of images: per-image map then batch, or with OpenCV
    batch then resample (``batches.resampler``)."""
    if s.resident:  # the device holds the pixels: each image's index and plan
        return ds.batch(batch_size, drop_remainder=drop_remainder).map(functools.partial(_resident_batch, s))
    store = s.store if s.arrays else None
    fallback = functools.partial(_fallback, s)
    if s.device:  # the same rows, padded to one shape for the device, not resampled here
        make = functools.partial(batches.gatherer, batches.device_pad(s.shapes, s.readable))
    else:
        make = functools.partial(batches.resampler, s.image_size)
    if s.opencv_decodes and (s.readable[:, 0] > 0).all():
        # Every file is one OpenCV decodes: no per-image TensorFlow work at all. Batches of
        # (index, plan) go straight to the batch resampler, which reads the files itself.
        warp = make(store, fallback, s.split.paths)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(functools.partial(_batch_of_plans, s))
        return ds.map(warp, num_parallel_calls=tf.data.AUTOTUNE, deterministic=in_order)
    ds = ds.map(functools.partial(_load, s), num_parallel_calls=tf.data.AUTOTUNE, deterministic=in_order)
    if not s.warp_batches:
        return ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.padded_batch(batch_size, drop_remainder=drop_remainder)
    warp = make(store, fallback)
    return ds.map(warp, num_parallel_calls=tf.data.AUTOTUNE, deterministic=in_order)
