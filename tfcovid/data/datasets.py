"""The one entry point from a split to its tf.data pipeline: ImageFolder images go through
``pipeline``, prepared TFRecord shards through ``record_stream``.
"""
from __future__ import annotations

import tensorflow as tf

from tfcovid.data import pipeline, record_stream, sampling
from tfcovid.data.types import Split


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
    epoch=None,
    deterministic: bool = True,
    readers: int = 1,
    balanced: str | None = None,
    augment_on: str = "cpu",
    sizes=None,
) -> tf.data.Dataset:
    """Build the tf.data pipeline for one split: (uint8 images (N, S, S, 3), labels).

    The pipeline lives in :mod:`tfcovid.data.pipeline` (see there for the decoded-image cache and
    the working resolution); this is its entry point.

    Args:
        split: a labeled or unlabeled Split (unlabeled yields images only).
        image_size: output side S.
        batch_size: images per batch.
        training: shuffle every epoch and apply ``aug`` (an AugmentConfig); else resize only.
        aug: augmentation settings; None or disabled means resize only.
        seed: shuffling and augmentation seed.
        drop_remainder: drop the last partial batch (needed by some strategies).
        cache: None, "auto" | "memory" | "disk" | "none", or a shared ``cache.Cache``.
        decode_scale: train images are decoded to a shorter side >= decode_scale * S; 0: full.
        epoch: training: a tf.Variable holding the coming epoch; shuffle and augmentation are
            keyed on (seed, epoch, image) (see tfcovid.data.pipeline).
        deterministic: fixed batch order in training too (the default: same seed, same batches
            in the same order); False hands batches over as they finish.
        readers: processes that each read a share of the split (multi-worker training of a
            prepared TFRecord split gives each whole shards); with one, a prepared split's
            training stream states its length, which Keras's epochs and progress bar use.
        balanced: training only: the task ("binary" or "multilabel") whose groups each epoch
            draws equally from (``data.sampling: balanced``, tfcovid.data.sampling); None: natural.
        augment_on: "cpu", or "device" for an ImageFolder split (see ``pipeline.dataset``);
            prepared TFRecord splits are always augmented on the CPU. "resident": the device
            holds the decoded images (``tfcovid.data.resident``), whose (height, width) are ``sizes``.
    """
    if balanced:
        sampling.refuse_records(split, "balanced")
    if getattr(split, "shards", None):  # a records.RecordSplit: stream its TFRecord shards

        return record_stream.dataset(split, image_size, batch_size, training, aug, seed, drop_remainder, cache, readers)

    return pipeline.dataset(split, image_size, batch_size, training, aug, seed, drop_remainder,
                            cache, decode_scale, epoch, deterministic,
                            sampling.groups(split, balanced) if balanced and training else None, augment_on,
                            sizes)
