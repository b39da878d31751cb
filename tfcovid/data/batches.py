"""The OpenCV batch stage of the train pipeline: one ``tf.numpy_function`` per batch gets each
image (from the cache, from its file's bytes, or decoded by TensorFlow in the per-image map)
and resamples them all on all cores, on threads or in the worker processes of a
``WorkerStore``. ``pipeline.dataset`` puts it after batching when OpenCV resamples.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfcovid.data import augment
from tfcovid.data.cache import ArrayStore
from tfcovid.data.opencv import images as opencv_images
from tfcovid.data.opencv.process_pool import WorkerStore
from tfcovid.data.opencv.worker import DECODE, PIXELS, STORED

# Where the batch resampler gets each train image (OpenCV path): from the ArrayStore, from the
# file's bytes with OpenCV's JPEG decoder, or decoded by TensorFlow in the per-image map. The
# same codes as the worker processes' request kinds, so a batch's sources go to them as they are.
FROM_STORE, FROM_OPENCV, FROM_TENSORFLOW = STORED, DECODE, PIXELS


def read_file(path: str) -> bytes:
    """A file's bytes: local paths with ``open``, URL-like ones through TensorFlow's file systems."""
    if "://" in path:  # a URL-like path (gs://, s3://, ...): TensorFlow's file systems
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _row_source(store, fallback, paths, images, shapes, transforms, ks_, indices_, sources_, files,
                halvings, draws):
    """``source(i)``: row i's (image, transform, k), from the store, its file's bytes
    (``opencv_images.decode_file``) or the batch; new images are kept in ``store``."""
    def source(i):
        index, transform, k, kind = indices_[i], transforms[i], ks_[i], sources_[i]
        if kind == FROM_STORE:
            return store.get(index), transform, k
        h, w, c = shapes[i].tolist()
        if kind == FROM_OPENCV:
            data = files[i] if paths is None else read_file(paths[index])
            image = opencv_images.decode_file(data, c, int(halvings[i]))
            if image is None or image.shape[:2] != (h, w):  # its header was wrong
                image, transform, k = fallback(index, data, draws[i])
        else:  # decoded by TensorFlow's per-image map (decode_file did this for its decodes)
            image = opencv_images.one_channel_if_gray(images[i, :h, :w, :c])
        if store is not None:
            image = store.put(index, image, copy=kind == FROM_TENSORFLOW)
        return image, transform, k

    return source


def resampler(size: int, store: ArrayStore | WorkerStore | None, fallback, paths=None):
    """A tf.data map function for padded batches of OpenCV train elements[, labels] (what
    ``pipeline._train_image`` gives): one ``tf.numpy_function`` per batch (see
    ``augment.warp_rows`` for why per batch) that
    gets each image from the store, from its file's bytes (``augment.decode_file``) or from the
    batch, keeps the new ones in ``store``, and resamples them all on all cores: on threads,
    or with a ``WorkerStore`` in its worker processes, which hold the cache. With ``paths``
    the files are read here (or by the workers), from ``paths[index]``, not from the batch."""
    def run(images, shapes, transforms, ks, indices, sources, files, halvings, draws):
        # Python ints, once per batch: each row's few microseconds under the Python lock count
        # on many cores (see augment.warp_rows).
        indices_, ks_, sources_ = indices.tolist(), ks.tolist(), sources.tolist()
        if isinstance(store, WorkerStore):
            return in_workers(images, shapes, transforms, ks_, indices_, sources_, files, halvings, draws)
        source = _row_source(store, fallback, paths, images, shapes, transforms, ks_, indices_,
                             sources_, files, halvings, draws)
        return augment.warp_rows(len(indices), size, source)

    def in_workers(images, shapes, transforms, ks_, indices_, sources_, files, halvings, draws):
        def data(i):
            return files[i] if paths is None else read_file(paths[indices_[i]])

        def payload(i):
            if sources_[i] == FROM_TENSORFLOW:
                h, w, c = shapes[i].tolist()
                return np.ascontiguousarray(images[i, :h, :w, :c])
            if paths is not None and "://" not in paths[indices_[i]]:
                return paths[indices_[i]]  # the worker reads it
            return data(i)

        return store.resample(size, indices_, sources_, shapes, halvings, transforms,
                              ks_, payload, lambda i: fallback(indices_[i], data(i), draws[i]))

    def warp(item, label=None):
        images = tf.numpy_function(run, list(item), tf.uint8, stateful=store is not None or paths is not None)
        images.set_shape([item[4].shape[0], size, size, 3])
        return images if label is None else (images, label)

    return warp


def device_pad(shapes: np.ndarray, readable: np.ndarray) -> tuple[int, int, int]:
    """(height, width, channels) every device batch of a split is padded to, so the compiled
    step sees one shape: the largest working size the headers give; one channel when every
    file is one OpenCV decodes as grey (an RGB-saved grey file counts as three)."""
    known = shapes[(shapes > 0).all(axis=1)]
    height, width = (known.max(axis=0).tolist() if len(known) else (1, 1))
    return int(height), int(width), 1 if (readable[:, 0] == 1).all() else 3


def max_shrink(shapes: np.ndarray, image_size: int) -> int:
    """The largest pre-shrink factor ``augment.plan`` can give for these working sizes: the
    device resampler makes that many box-averaged levels."""
    known = shapes[(shapes > 0).all(axis=1)]
    side = int(known.min(axis=1).max()) if len(known) else image_size
    return max(1, side // image_size)


def gatherer(pad: tuple[int, int, int], store: ArrayStore | None, fallback, paths=None):
    """``resampler``'s twin for ``data.augment_on: device``: the same rows, not resampled but
    copied into one uint8 batch (B, H, W, C) of the split's padded shape ``pad`` (larger only
    for an image bigger than its header said), with each row's true (height, width), its
    transform and shrink factor: ``tfcovid.training.device_augment`` resamples them on the
    device. Rows are filled on all cores; the padding is left as it is (the device masks it)."""
    def run(images, shapes, transforms, ks, indices, sources, files, halvings, draws):
        indices_, ks_, sources_ = indices.tolist(), ks.tolist(), sources.tolist()
        source = _row_source(store, fallback, paths, images, shapes, transforms, ks_, indices_,
                             sources_, files, halvings, draws)
        count = len(indices_)
        rows = [None] * count

        def fetch(i):
            rows[i] = source(i)

        augment.on_all_cores(count, fetch)
        height = max([pad[0]] + [row[0].shape[0] for row in rows])
        width = max([pad[1]] + [row[0].shape[1] for row in rows])
        channels = max([pad[2]] + [row[0].shape[2] for row in rows])
        out = opencv_images.batch_buffer((count, height, width, channels))
        hw = np.zeros((count, 2), np.int32)
        for i, (image, _, _) in enumerate(rows):  # grey repeated where the batch is colour
            hw[i] = image.shape[:2]
            out[i, : hw[i, 0], : hw[i, 1]] = image
        moved = np.stack([np.asarray(row[1], np.float32) for row in rows]) if rows else transforms
        return out, hw, moved.astype(np.float32), np.asarray([row[2] for row in rows], np.int32).reshape(count)

    def gather(item, label=None):
        source, hw, transform, k = tf.numpy_function(
            run, list(item), (tf.uint8, tf.int32, tf.float32, tf.int32), stateful=True)
        batch = item[4].shape[0]
        source.set_shape([batch, None, None, None])
        hw.set_shape([batch, 2])
        transform.set_shape([batch, 8])
        k.set_shape([batch])
        x = {"source": source, "hw": hw, "transform": transform, "k": k}
        return x if label is None else (x, label)

    return gather
