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
across workers by file (``AutoShardPolicy.FILE``); evaluation reads them in order
(``record_stream.dataset``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tfcovid.data import folders as data_folders
from tfcovid.data import types
from tfcovid.data.types import DataError

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


FEATURES = {  # what each record holds
    "image": tf.io.FixedLenFeature([], tf.string),
    "class": tf.io.FixedLenFeature([], tf.int64),
    "name": tf.io.FixedLenFeature([], tf.string),
}


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
