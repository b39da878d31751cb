"""Sharded TFRecord datasets: ``tfcovid prepare`` writes them, ``fit --data DIR`` streams them.

A prepared folder (local, or any ``tf.io.gfile`` URL such as ``gs://bucket/covidx``)::

    tfcovid-records.json                the manifest: class names, label scheme, encoding and,
                                        per split and shard, image counts, bytes and sha256
    train-00000-of-00016.tfrecord ...   the shards (tf.train.Example records)
    train.index.json ...                each split's file names and classes, in record order

Each record holds ``image`` (re-encoded, longest side <= max_side, never upscaled; one channel
when the source is grayscale, including RGB files whose channels are equal), ``class`` (index
into the class names, in ImageFolder order; -1 in an unlabeled split) and ``name`` (the file's
path relative to DATA_DIR). PNG is the default encoding: lossless, so the records hold exactly
the resized source pixels; JPEG (quality 95) is smaller (1.6x on the noisy demo images)
and slightly lossy.

Images go to shards in a seeded random order, so every shard mixes the classes and reading a
few shards at a time still gives well-mixed batches. Labels for a task are derived when
reading, exactly as for an ImageFolder tree (:func:`tfcovid.data.folders.label_vectors`), so one
prepared dataset serves both the binary and the three-label task.

A local OUT_DIR is written as ``OUT_DIR.partial`` and renamed when complete, so OUT_DIR
never holds half a dataset; an interrupted or failed run removes its partial output. (On URLs,
where a folder cannot be renamed whole, it is written in place with the manifest last.) A
folder of shards without a manifest is named as an incomplete ``prepare`` output.

Reading checks that every shard and index file is there and each shard's size against the
manifest at start, and each shard's record count as it is read; a read failure is explained
by re-checking the sha256 checksums, so the error names the damaged shard. Training reads shards in parallel (interleaved) and shards them
across workers by file (``AutoShardPolicy.FILE``); evaluation reads them in order.
"""
from __future__ import annotations
import hashlib
import json
import os
import re
from dataclasses import dataclass
import numpy as np
import tensorflow as tf
from tfcovid.data import augment, decode, folders as data_folders, types, pipeline
from tfcovid.data.opencv import images as opencv_images
from tfcovid.data.cache import as_cache
from tfcovid.data.types import DataError
from tfcovid.data.opencv.process_pool import WorkerStore
from tfcovid.data.opencv.worker import DECODE, STORED


MANIFEST = "tfcovid-records.json"


FORMAT, VERSION = "tfcovid-tfrecords", 1


ENCODINGS = ("png", "jpeg")


PARTIAL = ".partial"  # suffix of the folder a local prepare writes before renaming it to OUT_DIR


# What prepare writes besides the manifest: a folder holding these but no manifest is the
# output of an interrupted (or older, killed) prepare, never an ImageFolder tree.
_WRITTEN = re.compile(r"^\w+(-\d{5}-of-\d{5}\.tfrecord|\.index\.json)$")


# What a damaged or altered shard raises from inside tf.data: bad record CRC or length, a
# record count that differs from the manifest, undecodable bytes, a vanished file.
READ_ERRORS = (tf.errors.DataLossError, tf.errors.FailedPreconditionError,
               tf.errors.InvalidArgumentError, tf.errors.NotFoundError)


_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "class": tf.io.FixedLenFeature([], tf.int64),
    "name": tf.io.FixedLenFeature([], tf.string),
}


_SHUFFLE_BYTES = 256 << 20  # memory for the record shuffle buffer (encoded images)


@dataclass(frozen=True)
class RecordSplit(types.Split):
    """A split stored as TFRecord shards; ``paths`` are the source names (relative to DATA_DIR)."""

    shards: tuple[str, ...] = ()  # full shard paths, in record order
    shard_counts: tuple[int, ...] = ()
    class_labels: np.ndarray | None = None  # label of each class index (row per class)
    mean_bytes: float = 0.0  # mean encoded record size, for the shuffle buffer
    max_side: int = 0  # prepare's --max-side (0: sizes kept), for the cache's estimate
    grayscale: int = 0  # records stored with one channel


def _join(root, name: str) -> str:
    return os.path.join(str(root), name)  # also right for gs://bucket/dir


def is_prepared(path) -> bool:
    """True when ``path`` holds a ``tfcovid prepare`` output: its manifest, or shards and index
    files without one (an interrupted run), which :func:`read_manifest` refuses by name."""
    try:
        return tf.io.gfile.exists(_join(path, MANIFEST)) or _is_incomplete(path)
    except tf.errors.OpError:  # e.g. a URL scheme this TensorFlow build cannot read
        return False


def _is_incomplete(path) -> bool:
    """Shards or index files of ``tfcovid prepare`` but no manifest."""
    if not tf.io.gfile.isdir(str(path)) or tf.io.gfile.exists(_join(path, MANIFEST)):
        return False
    return any(_WRITTEN.match(name) for name in tf.io.gfile.listdir(str(path)))


def _incomplete_error(path) -> DataError:
    return DataError(f"{path} is an incomplete tfcovid prepare output (no manifest {MANIFEST}: the "
                     "prepare was interrupted): delete it and run tfcovid prepare again.")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root) -> dict:
    """Load and check a prepared folder's manifest."""
    path = _join(root, MANIFEST)
    if _is_incomplete(root):
        raise _incomplete_error(root)
    try:
        with tf.io.gfile.GFile(path) as fh:
            manifest = json.loads(fh.read())
    except (tf.errors.OpError, json.JSONDecodeError) as err:
        raise DataError(f"Cannot read the manifest {path}: {err}. Run tfcovid prepare again.") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path} is not a {FORMAT} v{VERSION} manifest (format "
                        f"{manifest.get('format')!r}, version {manifest.get('version')!r}).")
    return manifest


def verify(root, checksums: bool = True) -> list[str]:
    """Problems with a prepared folder's shards and index files (missing, wrong size, wrong
    sha256); [] if none."""
    manifest, problems = read_manifest(root), []
    for split in manifest["splits"].values():
        index = _join(root, split["index"])
        if not tf.io.gfile.exists(index):
            problems.append(f"{index}: missing")
        elif checksums and split.get("index_sha256") and _sha256(index) != split["index_sha256"]:
            problems.append(f"{index}: sha256 differs from the manifest (damaged)")
        for entry in split["shards"]:
            path = _join(root, entry["file"])
            if not tf.io.gfile.exists(path):
                problems.append(f"{path}: missing")
            elif tf.io.gfile.stat(path).length != entry["bytes"]:
                problems.append(f"{path}: {tf.io.gfile.stat(path).length} bytes, the manifest says "
                                f"{entry['bytes']} (truncated or overwritten)")
            elif checksums and _sha256(path) != entry["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (damaged)")
    return problems


def load(root, task: str = "binary", labels=(), label_map=None,
         required=("train", "validation")) -> types.Manifest:
    """Read a prepared folder into a :class:`tfcovid.data.types.Manifest` of :class:`RecordSplit`.

    Sizes of all shards are checked (cheap); record counts are checked as shards are read.

    Raises:
        DataError: no manifest, a missing split, shard or index file, a size mismatch, or
            labels the task cannot use.
    """
    root = str(root)
    manifest = read_manifest(root)
    problems = verify(root, checksums=False)
    if problems:
        raise DataError(f"The prepared dataset {root} is damaged:\n  " + "\n  ".join(problems)
                        + "\nCopy it again or run tfcovid prepare again.")
    class_names = tuple(manifest["class_names"])
    missing = [s for s in required if s not in manifest["splits"]]
    if missing:
        raise DataError(f"The prepared dataset {root} has no {' or '.join(missing)} split "
                        f"(it has {', '.join(manifest['splits'])}).")
    if task == "binary" and len(class_names) != 2:
        raise DataError(f"The binary task needs exactly 2 classes; {root} has {len(class_names)}: "
                        f"{list(class_names)}. Use --task multilabel.")
    output_names = class_names if task == "binary" else tuple(labels)
    label_map = {k: tuple(v) for k, v in (label_map or {}).items()}
    class_labels = data_folders.label_vectors(class_names, task, class_names, output_names, label_map)
    splits = {}
    for name, info in manifest["splits"].items():
        names, classes = _read_index(_join(root, info["index"]))
        counts = [e["images"] for e in info["shards"]]
        if not len(names) == len(classes) == info["images"] == sum(counts):
            raise DataError(f"{_join(root, info['index'])} lists {len(names)} images; the "
                            f"manifest says {info['images']} (shards: {sum(counts)}). Run tfcovid prepare again.")
        if name in required and not info["labeled"]:
            raise DataError(f"The {name} split of {root} is unlabeled; it needs class folders.")
        classes = np.asarray(classes, np.int64)
        folders = tuple(class_names[c] if c >= 0 else "" for c in classes)
        split_labels = class_labels[classes] if info["labeled"] else None
        splits[name] = RecordSplit(
            name, root, tuple(names), split_labels, folders,
            shards=tuple(_join(root, e["file"]) for e in info["shards"]), shard_counts=tuple(counts),
            class_labels=class_labels if info["labeled"] else None,
            mean_bytes=sum(e["bytes"] for e in info["shards"]) / max(info["images"], 1),
            max_side=int(manifest.get("max_side") or 0), grayscale=int(info.get("grayscale", 0)))
    return types.Manifest(root, task, class_names, output_names, splits, label_map, ())


def _read_index(path: str) -> tuple[list, list]:
    """A split's index file: (names, classes) in record order."""
    try:
        with tf.io.gfile.GFile(path) as fh:
            index = json.loads(fh.read())
        return index["names"], index["classes"]
    except (tf.errors.OpError, json.JSONDecodeError, KeyError, TypeError) as err:
        said = getattr(err, "message", None) or (f"no {err} list" if isinstance(err, KeyError) else str(err))
        said = said.strip().splitlines()[0]
        raise DataError(f"Cannot read the index {path} ({said}): the prepared dataset is damaged. "
                        "Copy it again or run tfcovid prepare again.") from None


def upsampling_note(manifest: types.Manifest, image_size: int) -> str | None:
    """A one-line note when ``image_size`` is above the size prepared records were stored at
    (training would upsample every image, silently); None otherwise."""
    sides = {s.max_side for s in manifest.splits.values() if isinstance(s, RecordSplit)}
    max_side = max(sides, default=0)
    if not max_side or image_size <= max_side:  # 0: prepared at their own sizes
        return None
    return (f"the records in {manifest.root} were prepared at most {max_side} px on the longer side; "
            f"training at {image_size} px upsamples them (prepare with --max-side {2 * image_size} "
            f"or more for {image_size} px: the random crops zoom in)")


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
    firsts = np.concatenate([[0], np.cumsum(split.shard_counts)[:-1]]).astype(np.int64)
    files = tf.data.Dataset.from_tensor_slices(
        (tf.constant(split.shards), tf.constant(split.shard_counts, tf.int64), tf.constant(firsts)))
    policy = as_cache(cache)
    store = None
    if policy is not None and (warp_batches or not training):
        store = policy.store_for(split.name, cache_estimate(split, image_size, training),
                                 arrays=len(split) if warp_batches else None, workers=warp_batches)
        store = policy.started(store, batch_size, image_size)  # threads where workers cannot start

    def read(path, count, first):
        # A shard holding more or fewer records than the manifest says fails here. Each
        # record is numbered by its position in the split (the cache's key).
        return tf.data.TFRecordDataset(path, buffer_size=8 << 20).apply(
            tf.data.experimental.assert_cardinality(count)).enumerate(first)

    if training:
        files = files.shuffle(len(split.shards), seed=seed, reshuffle_each_iteration=True)
        records = files.interleave(read, cycle_length=min(len(split.shards), 16),
                                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        buffer = int(min(len(split), max(64, _SHUFFLE_BYTES // max(split.mean_bytes, 1))))
        records = records.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        records = files.flat_map(read).apply(tf.data.experimental.assert_cardinality(len(split)))

    def load(index, serialized):
        example = tf.io.parse_single_example(serialized, _FEATURES)
        encoded = example["image"]
        if augmenting:
            # Stateless seeds per image: its name, and a draw that changes with its position
            # in the shuffled stream (so every epoch differs). A tf.data.Dataset.random source
            # zipped in would stop TensorFlow from sharding the files across workers.
            draw = tf.random.uniform([], maxval=2**62, dtype=tf.int64, seed=seed)
            pair = tf.stack([tf.strings.to_hash_bucket_fast(example["name"], 2**62), draw])
            draws = augment.draws(pair)
            if warp_batches:
                # Planned from the header's size; decoded (or taken from the cache) and
                # resampled after batching, by OpenCV (``_batch_decoder``), which plans again
                # where the header misled.
                shape = encoded_shape(encoded)
                transform, k = augment.plan_one(tf.maximum(shape[:2], 1), draws, image_size, *aug_args)
                image = (encoded, shape, transform, k, draws, index)
            else:
                image = train_decode(encoded)
                transform, k = augment.plan_one(tf.shape(image)[:2], draws, image_size, *aug_args)
                image = decode.gray_to_rgb(augment.apply_uint8(image, transform, k, image_size), image_size)
        elif store is not None:
            image = decode.gray_to_rgb(store.through(index, lambda: pipeline.eval_pixels(encoded, image_size)),
                                     image_size)
        else:
            image = decode.to_rgb_uint8(augment.resize_eval(decode.decode_image(encoded), image_size), image_size)
        return image if table is None else (image, tf.gather(table, example["class"]))

    if augmenting:
        aug_args = (aug.crop_scale, aug.crop_ratio, aug.rotation, aug.flip)
    ds = records.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    if warp_batches:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        ds = ds.map(_batch_decoder(image_size, aug_args, store), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=not training)
    else:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if training and readers == 1:  # the interleave hides the length; Keras wants it per epoch
        n = len(split)
        ds = ds.apply(tf.data.experimental.assert_cardinality(n // batch_size if drop_remainder else -(-n // batch_size)))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.FILE if training else tf.data.experimental.AutoShardPolicy.DATA)
    return ds.with_options(options)


def train_decode(encoded):
    """``data.decode_image`` with libjpeg's exact IDCT for JPEGs, as the train side decodes
    them everywhere (``pipeline.decode_base``): OpenCV's pixels, so both resamplers' paths
    start from the same image."""
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), opencv_images.JPEG_MAGIC)
    return tf.cond(is_jpeg, lambda: pipeline.exact_jpeg(encoded), lambda: decode.decode_image(encoded))


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


def check_workers(manifest: types.Manifest, workers: int) -> list[str]:
    """Check a prepared train split against the worker count; return notes for the log.

    Raises:
        DataError: fewer train shards than workers (each worker reads whole shards).
    """
    split = manifest.splits.get("train")
    if not isinstance(split, RecordSplit) or workers <= 1:
        return []
    n = len(split.shards)
    if n < workers:
        raise DataError(f"{manifest.root}: the train split has {n} shard(s) for {workers} workers; "
                        f"each worker reads whole shards. Run tfcovid prepare again with --shards "
                        f"{workers} (or a multiple of it).")
    if n % workers:
        return [f"{n} train shards over {workers} workers: some workers read one shard more; "
                f"a multiple of {workers} balances them"]
    return []


def raise_if_damaged(manifest: types.Manifest, err: Exception) -> None:
    """After a read error: if a shard of this prepared dataset is damaged, raise a DataError naming it."""
    if not isinstance(err, READ_ERRORS) or not is_prepared(manifest.root):
        return
    problems = verify(manifest.root)
    if problems:
        said = (getattr(err, "message", None) or str(err)).strip().splitlines()[0]
        raise DataError(f"The prepared dataset {manifest.root} is damaged:\n  " + "\n  ".join(problems)
                        + f"\nCopy it again or run tfcovid prepare again. (TensorFlow said: {said})") from err
