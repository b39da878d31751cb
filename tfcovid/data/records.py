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
manifest at start (``fit`` also their sha256: :func:`check_digests`), and each shard's record
count as it is read; a read failure is explained by re-checking the sha256 checksums and
decoding the damaged shards' records, so the error names the shard and the records whose
image does not decode (:func:`explain_read_error`). Training reads shards in parallel (interleaved) and shards them
across workers by file (``AutoShardPolicy.FILE``); evaluation reads them in order
(``record_stream.dataset``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tfcovid.data import decode, types
from tfcovid.data import folders as data_folders
from tfcovid.data.types import DataError

MANIFEST = "tfcovid-records.json"


FORMAT, VERSION = "tfcovid-tfrecords", 1


ENCODINGS = ("png", "jpeg")


PARTIAL = ".partial"  # suffix of the folder a local prepare writes before renaming it to OUT_DIR


# What prepare writes besides the manifest: a folder holding these but no manifest is the
# output of an interrupted (or older, killed) prepare, never an ImageFolder tree.
_WRITTEN = re.compile(r"^\w+(-\d{5}-of-\d{5}\.tfrecord|\.index\.json)$")


# What a damaged or altered shard raises from inside tf.data: bad record CRC or length, a
# record count that differs from the manifest, undecodable bytes, a vanished file; an image
# that fails in the OpenCV batch decoder's tf.numpy_function surfaces as UnknownError.
READ_ERRORS = (tf.errors.DataLossError, tf.errors.FailedPreconditionError,
               tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError)


# A read error that came from decoding an image (op names and decoders' messages).
_DECODE_ERROR = re.compile(r"Decode|ExtractJpegShape|JPEG|PNG|GIF|BMP|image", re.IGNORECASE)


_LISTED = 3  # undecodable records named per shard; more are counted


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
    if "://" not in path:  # a local file: hashlib reads it 2.5x faster than GFile (performance.md)
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
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


def verify(root, checksums: bool = True, splits=None) -> list[str]:
    """Problems with a prepared folder's shards and index files (missing, wrong size, wrong
    sha256) as "path: problem" lines; [] if none. ``splits``: only these (None: all)."""
    return [f"{path}: {problem}" for path, problem in _problems(root, checksums, splits)]


def _problems(root, checksums: bool, splits=None) -> list[tuple[str, str]]:
    """(path, problem) for each missing, resized or (``checksums``) altered file of ``splits``."""
    manifest, problems = read_manifest(root), []
    for name, split in manifest["splits"].items():
        if splits is not None and name not in splits:
            continue
        index = _join(root, split["index"])
        if not tf.io.gfile.exists(index):
            problems.append((index, "missing"))
        elif checksums and split.get("index_sha256") and _sha256(index) != split["index_sha256"]:
            problems.append((index, DIGEST_DIFFERS))
        for entry in split["shards"]:
            path = _join(root, entry["file"])
            if not tf.io.gfile.exists(path):
                problems.append((path, "missing"))
            elif tf.io.gfile.stat(path).length != entry["bytes"]:
                size = tf.io.gfile.stat(path).length
                problems.append((path, f"{size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)"))
            elif checksums and _sha256(path) != entry["sha256"]:
                problems.append((path, DIGEST_DIFFERS))
    return problems


DIGEST_DIFFERS = "sha256 differs from the manifest (damaged)"


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


def check_digests(manifest: types.Manifest, log=print) -> None:
    """Before training: every shard and index file of the manifest's prepared splits against the
    manifest's sha256 (``data.verify_records``; speed in performance.md). Nothing for a folder.

    Raises:
        DataError: naming each damaged file and, in a damaged shard, its undecodable records.
    """
    splits = [s for s in manifest.splits.values() if isinstance(s, RecordSplit)]
    if not splits:
        return
    start = time.perf_counter()
    problems = _problems(manifest.root, True, {s.name for s in splits})
    if problems:
        raise _damaged(manifest.root, problems)
    shards = [path for s in splits for path in s.shards]
    mib = sum(tf.io.gfile.stat(path).length for path in shards) / 2**20
    log(f"Verified {len(shards)} shards ({mib:,.1f} MiB) against the manifest's sha256 in "
        f"{time.perf_counter() - start:.1f} s (data.verify_records: false skips this)")


def raise_if_damaged(manifest: types.Manifest, err: Exception) -> None:
    """After a read error: if a shard of this prepared dataset is damaged, raise a DataError
    naming it and its undecodable records (``explain_read_error``)."""
    explain_read_error(manifest.root, err)


def explain_read_error(root, err: Exception) -> None:
    """After ``err`` while reading the prepared dataset at ``root`` (nothing if it is not one):
    raise a DataError naming each file whose sha256 differs and the records in it that cannot
    be decoded; when every checksum matches but ``err`` came from decoding an image, look for
    that image in every shard. Returns when it finds nothing (the caller re-raises ``err``)."""
    if not isinstance(err, READ_ERRORS) or not is_prepared(root):
        return
    said = _said(err)
    problems = _problems(root, True)
    if not problems and _DECODE_ERROR.search(said):
        manifest = read_manifest(root)
        shards = [_join(root, e["file"]) for split in manifest["splits"].values() for e in split["shards"]]
        problems = [(path, "") for path in shards if _bad_records(path)]
    if problems:
        raise _damaged(root, problems, f" (TensorFlow said: {said})") from err


def _damaged(root, problems, said: str = "") -> DataError:
    """The error listing ``problems`` ((path, problem) pairs), with each damaged shard's
    undecodable records, and what to do."""
    lines = []
    for path, problem in problems:
        bad = _bad_records(path) if path.endswith(".tfrecord") and problem in ("", DIGEST_DIFFERS) else []
        lines.append(f"{path}: " + "; ".join(([problem] if problem else []) + bad))
    return DataError(f"The prepared dataset {root} is damaged:\n  " + "\n  ".join(lines)
                     + f"\nCopy it again or run tfcovid prepare again.{said}")


def _bad_records(path: str) -> list[str]:
    """Which records of one shard cannot be used, as "record I of N (name): why" (counting from
    1; the first few named, the rest counted); [] when all decode."""
    found, count = [], 0
    try:
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            count += 1
            why = _record_problem(serialized)
            if why:
                found.append((count, why))
    except tf.errors.OpError as err:  # framing (length or CRC) damaged: the rest is unreadable
        found.append((count + 1, f"unreadable from here on ({_said(err)})"))
    named = [f"record {i} of {count} {why}" for i, why in found[:_LISTED]]
    return named + ([f"{len(found) - _LISTED} more such records"] if len(found) > _LISTED else [])


def _record_problem(serialized: bytes) -> str | None:
    """Why one serialized record is unusable, or None."""
    try:
        example = tf.io.parse_single_example(serialized, FEATURES)
    except tf.errors.OpError as err:
        return f"is not a tfcovid record ({_said(err)})"
    name = repr(example["name"].numpy().decode("utf-8", "backslashreplace"))[1:-1]  # escaped
    try:
        decode.decode_image(example["image"])
    except tf.errors.OpError as err:
        return f"({name}): its image cannot be decoded ({_said(err)})"
    return None


def _said(err: Exception) -> str:
    """TensorFlow's message, its first line, without ``{{function_node ...}}`` and ``[Op:...]``."""
    message = ((getattr(err, "message", None) or str(err)).strip().splitlines() or [type(err).__name__])[0]
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message)
    message = re.split(r"\b[A-Z]\w*Error: ", message)[-1]  # tf.data's wrapping: the inner error's text
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", message).strip() or type(err).__name__
