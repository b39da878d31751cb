"""Stream a prepared split's TFRecord shards as batches (``records`` is the format and its
checks): shards read interleaved and records shuffled for training, in order otherwise;
augmented with the TensorFlow resampler per record, or planned per record and decoded and
resampled per batch by OpenCV.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tfcovid.data import augment, decode, pipeline, working
from tfcovid.data.cache import as_cache
from tfcovid.data.opencv import images as opencv_images
from tfcovid.data.opencv.process_pool import WorkerStore
from tfcovid.data.opencv.worker import DECODE, STORED
from tfcovid.data.records import FEATURES, RecordSplit

_SHUFFLE_BYTES = 256 << 20  # memory for the record shuffle buffer (encoded images)


def cache_estimate(split: RecordSplit, image_size: int, training: bool) -> int:
    """Bytes a split's decoded-image cache will take: records at their prepared size (at most
    ``max_side`` on the longest side; with sizes kept, ~8x the encoded bytes) for training,
    S x S for evaluation; grey records one channel."""
    n, grey = len(split), min(split.grayscale, len(split))
    if training:
        per_channel = split.max_side ** 2 if split.max_side else 8 * split.mean_bytes
    else:
        per_channel = image_size ** 2
    return int(per_channel * (grey + 3 * (n - grey)))

def dataset(split: RecordSplit, image_size: int, batch_size: int, training: bool = False,
            aug=None, seed: int = 0, drop_remainder: bool = False, cache=None,
            readers: int = 1) -> tf.data.Dataset:
    """Stream a prepared split: (uint8 images (N, S, S, 3), labels), as ``data.dataset`` does.

    Training: shard order reshuffled each epoch, shards read interleaved in parallel, records
    shuffled in a buffer, augmented; split across workers by file. Otherwise: shards in order,
    so outputs line up with ``split.labels``; split across workers by element.

    ``cache`` (as ``data.dataset``'s): decoded records are kept by their position in the
    split, so later epochs still read the shards but decode nothing: training keeps each
    record's pixels for OpenCV's batched resample (not with TensorFlow's resampler), evaluation
    its resized S x S image.
    """
    augmenting = training and aug is not None and aug.enabled
    warp_batches = augmenting and augment.resampler() == "opencv"
    table = None if split.class_labels is None else tf.constant(split.class_labels)
    records = _records(split, training, seed)
    policy = as_cache(cache)
    store = None
    if policy is not None and (warp_batches or not training):
        store = policy.store_for(split.name, cache_estimate(split, image_size, training),
                                 arrays=len(split) if warp_batches else None, workers=warp_batches)
        store = policy.started(store, batch_size, image_size)  # threads where workers cannot start
    aug_args = (aug.crop_scale, aug.crop_ratio, aug.rotation, aug.flip) if augmenting else None
    load = functools.partial(_load, _Loading(image_size, seed, table, aug_args, warp_batches, store))
    ds = records.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if warp_batches:
        ds = ds.map(_batch_decoder(image_size, aug_args, store), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=not training)
    if training and readers == 1:  # the interleave hides the length; Keras wants it per epoch
        n = len(split)
        ds = ds.apply(tf.data.experimental.assert_cardinality(n // batch_size if drop_remainder else -(-n // batch_size)))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.FILE if training else tf.data.experimental.AutoShardPolicy.DATA)
    return ds.with_options(options)


def _records(split: RecordSplit, training: bool, seed: int) -> tf.data.Dataset:
    """(index in the split, serialized record): shards shuffled and interleaved and records
    shuffled in a buffer for training, else every record in order."""
    firsts = np.concatenate([[0], np.cumsum(split.shard_counts)[:-1]]).astype(np.int64)
    files = tf.data.Dataset.from_tensor_slices(
        (tf.constant(split.shards), tf.constant(split.shard_counts, tf.int64), tf.constant(firsts)))

    def read(path, count, first):
        # A shard holding more or fewer records than the manifest says fails here. Each
        # record is numbered by its position in the split (the cache's key).
        return tf.data.TFRecordDataset(path, buffer_size=8 << 20).apply(
            tf.data.experimental.assert_cardinality(count)).enumerate(first)

    if not training:
        return files.flat_map(read).apply(tf.data.experimental.assert_cardinality(len(split)))
    files = files.shuffle(len(split.shards), seed=seed, reshuffle_each_iteration=True)
    records = files.interleave(read, cycle_length=min(len(split.shards), 16),
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    buffer = int(min(len(split), max(64, _SHUFFLE_BYTES // max(split.mean_bytes, 1))))
    return records.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)


@dataclass(frozen=True)
class _Loading:
    """What ``_load`` needs for every record of one split."""

    image_size: int
    seed: int
    table: tf.Tensor | None  # each class index's label row (None: an unlabeled split)
    aug_args: tuple | None  # crop scale, crop ratio, rotation, flip (None: not augmented)
    warp_batches: bool  # OpenCV decodes and resamples after batching
    store: object = None  # the split's cache (None: none)


def _load(s: _Loading, index, serialized):
    """One record's image (or, for OpenCV, what the batch decoder needs)[, label]."""
    example = tf.io.parse_single_example(serialized, FEATURES)
    encoded = example["image"]
    if s.aug_args is not None:
        # Stateless seeds per image: its name, and a draw that changes with its position
        # in the shuffled stream (so every epoch differs). A tf.data.Dataset.random source
        # zipped in would stop TensorFlow from sharding the files across workers.
        draw = tf.random.uniform([], maxval=2**62, dtype=tf.int64, seed=s.seed)
        pair = tf.stack([tf.strings.to_hash_bucket_fast(example["name"], 2**62), draw])
        draws = augment.draws(pair)
        if s.warp_batches:
            # Planned from the header's size; decoded (or taken from the cache) and
            # resampled after batching, by OpenCV (``_batch_decoder``), which plans again
            # where the header misled.
            shape = encoded_shape(encoded)
            transform, k = augment.plan_one(tf.maximum(shape[:2], 1), draws, s.image_size, *s.aug_args)
            image = (encoded, shape, transform, k, draws, index)
        else:
            image = train_decode(encoded)
            transform, k = augment.plan_one(tf.shape(image)[:2], draws, s.image_size, *s.aug_args)
            image = decode.gray_to_rgb(augment.apply_uint8(image, transform, k, s.image_size), s.image_size)
    elif s.store is not None:
        image = decode.gray_to_rgb(s.store.through(index, lambda: pipeline.eval_pixels(encoded, s.image_size)),
                                   s.image_size)
    else:
        image = decode.to_rgb_uint8(augment.resize_eval(decode.decode_image(encoded), s.image_size), s.image_size)
    return image if s.table is None else (image, tf.gather(s.table, example["class"]))


def train_decode(encoded):
    """``data.decode_image`` with libjpeg's exact IDCT for JPEGs, as the train side decodes
    them everywhere (``working.decode_base``): OpenCV's pixels, so both resamplers' paths
    start from the same image."""
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), opencv_images.JPEG_MAGIC)
    return tf.cond(is_jpeg, lambda: working.exact_jpeg(encoded), lambda: decode.decode_image(encoded))


def encoded_shape(encoded):
    """(height, width, channels) int32 of a JPEG or PNG from its header, without decoding it;
    channels 1 (grey, grey + alpha) or 3 (colour), 0 where OpenCV's ``augment.decode_file``
    is not to be tried (not a JPEG or PNG, a CMYK JPEG)."""
    def jpeg():
        size = tf.io.extract_jpeg_shape(encoded, tf.int32)
        channels = tf.where(size[2] == 1, 1, tf.where(size[2] == 3, 3, 0))
        return tf.stack([size[0], size[1], channels])

    def png():  # IHDR: width and height (big-endian) at bytes 16 and 20, colour type at 25
        head = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 10), tf.uint8), tf.int32)
        width = head[0] * 2**24 + head[1] * 2**16 + head[2] * 2**8 + head[3]
        height = head[4] * 2**24 + head[5] * 2**16 + head[6] * 2**8 + head[7]
        colour = head[9]
        channels = tf.where((colour == 0) | (colour == 4), 1, tf.where((colour == 2) | (colour == 6), 3, 0))
        return tf.stack([height, width, channels])

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), opencv_images.JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(encoded, 0, 8), opencv_images.PNG_MAGIC) & (tf.strings.length(encoded) >= 26)
    return tf.cond(is_jpeg, jpeg, lambda: tf.cond(is_png, png, lambda: tf.constant([-1, -1, 0])))


def _batch_decoder(image_size: int, aug_args, store=None):
    """A tf.data map function for batches of (encoded image, header shape, transform, k,
    draws, index)[, labels]: one ``tf.numpy_function`` per batch takes each image from
    ``store`` (an ``ArrayStore`` by record index, a ``WorkerStore`` whose worker processes do
    all this, or None) or decodes it with OpenCV
    (``augment.decode_file``: the same pixels as ``train_decode``) and keeps it there, and
    resamples them all on all cores (``augment.warp_rows``). An image whose header's size or
    kind was not what OpenCV decoded is decoded by TensorFlow and planned from its pixels,
    with its draws (and is not cached: it is planned again each epoch)."""
    def replan(encoded, draws):
        image = train_decode(tf.constant(encoded))
        transform, k = augment.plan_one(tf.shape(image)[:2], tf.constant(draws), image_size, *aug_args)
        return image.numpy(), transform.numpy(), int(k)

    def run(files, shapes, transforms, ks, draws, indices):
        indices_ = indices.tolist()
        if isinstance(store, WorkerStore):  # stored or not: what the workers reported keeping
            return store.resample(image_size, indices_, np.where(store.stored(indices_), STORED, DECODE), shapes,
                                  np.zeros(len(indices_), np.int32), transforms, ks.tolist(),
                                  lambda i: files[i], lambda i: replan(files[i], draws[i]))

        def source(i):
            height, width, channels = shapes[i].tolist()
            image = None if store is None else store.get(indices_[i])
            if image is None:
                image = opencv_images.decode_file(files[i], channels, 0) if channels else None
                if image is None or image.shape[:2] != (height, width):
                    return replan(files[i], draws[i])
                if store is not None:
                    image = store.put(indices_[i], image, copy=False)
            return image, transforms[i], int(ks[i])

        return augment.warp_rows(len(files), image_size, source)

    def warp(item, label=None):
        images = tf.numpy_function(run, list(item), tf.uint8, stateful=store is not None)
        images.set_shape([item[0].shape[0], image_size, image_size, 3])
        return images if label is None else (images, label)

    return warp
