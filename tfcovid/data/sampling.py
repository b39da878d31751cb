"""``data.sampling: balanced``: each epoch's train order drawn equally from every group (the
binary task's classes, the three-label task's class folders), from (seed, epoch) alone.

An epoch keeps the natural epoch's length (one slot per train image). The slots are split as
evenly as the groups allow (n // G each, the n % G spare slots to groups drawn at random), and
each group fills its slots by cycling through fresh permutations of its images: a small group's
images repeat about equally often (floor or ceil of slots / images), a large group's are each
seen at most once per epoch, a fresh random subset every epoch. The whole order is a NumPy draw from the pipeline's epoch key
(itself ``stateless_fold_in(seed, epoch)``), so a resumed run sees the same batches.
docs/imbalance.md.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfcovid.data.types import DataError, Split


def groups(split: Split, task: str) -> np.ndarray:
    """Each train image's group as an int: its class (binary) or its class folder (three-label)."""
    if task == "binary":
        return np.asarray(split.labels, np.int64).reshape(-1)
    if len(split.folders) != len(split):
        raise DataError(f"data.sampling balanced needs each image's class folder; {split.dir} does not "
                        "give them. Use data.sampling natural.")
    return np.unique(np.asarray(split.folders), return_inverse=True)[1].astype(np.int64)


def balanced_order(group_of: np.ndarray, key) -> np.ndarray:
    """The epoch's image indices (int64, one per slot; len(group_of) slots) drawn balanced over
    the groups present, deterministically from ``key`` (two integers)."""
    key = np.asarray(key, np.int64).reshape(-1)
    rng = np.random.default_rng([int(k) % 2**64 for k in key])
    n = len(group_of)
    present = np.unique(group_of)
    slots = np.full(len(present), n // len(present))
    slots[rng.permutation(len(present))[: n % len(present)]] += 1
    order = []
    for g, count in zip(present, slots):
        members = np.flatnonzero(group_of == g)
        cycles = -(-count // len(members))
        order.append(np.concatenate([rng.permutation(members) for _ in range(cycles)])[:count])
    return rng.permutation(np.concatenate(order)).astype(np.int64)


def order_op(group_of: np.ndarray):
    """``balanced_order`` as a TensorFlow function of the epoch key (for ``pipeline._one_epoch``)."""
    group_of = np.asarray(group_of, np.int64)

    def draw(key):
        order = tf.numpy_function(lambda k: balanced_order(group_of, k), [key], tf.int64, stateful=False)
        return tf.reshape(order, [len(group_of)])

    return draw


def refuse_records(split, sampling: str) -> None:
    """A prepared TFRecord split streams its shards in a fixed interleave: no balanced order."""
    if sampling == "balanced" and getattr(split, "shards", None):
        raise DataError(f"data.sampling balanced is not supported for a prepared (TFRecord) folder "
                        f"({split.dir}): its shards are streamed, not indexed. Train on the ImageFolder "
                        "tree it was prepared from, or use data.sampling natural (with "
                        "train.class_weight balanced for the imbalance).")
