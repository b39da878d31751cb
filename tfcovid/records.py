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
reading, exactly as for an ImageFolder tree (:func:`tfcovid.data.label_vectors`), so one
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
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcovid import augment, data, filecheck, pipeline, runstate
from tfcovid.cache import as_cache
from tfcovid.config import DataConfig
from tfcovid.data import DataError
from tfcovid.workers import DECODE, STORED, WorkerStore

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
class RecordSplit(data.Split):
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


def _write_json(path: str, value) -> str:
    text = json.dumps(value, indent=1)
    with tf.io.gfile.GFile(path, "w") as fh:
        fh.write(text)
    return hashlib.sha256(text.encode()).hexdigest()


def _reencode(path, max_side: int, encoding: str, quality: int):
    """Decode one file, store grayscale as one channel, shrink to max_side, encode."""
    image = data.decode_image(tf.io.read_file(path))
    gray_rgb = tf.logical_and(tf.shape(image)[-1] == 3,
                              tf.reduce_all(tf.equal(image, image[..., :1])))
    image = tf.cond(gray_rgb, lambda: image[..., :1], lambda: image)
    if max_side:
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = max_side / tf.reduce_max(hw)

        def shrink():
            size = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
            small = tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8)

        image = tf.cond(scale < 1, shrink, lambda: image)
    encoded = (tf.io.encode_png(image) if encoding == "png"
               else tf.io.encode_jpeg(image, quality=quality))
    return encoded, tf.shape(image)[-1]


def _example(image: bytes, label: int, name: str) -> bytes:
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "class": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _class_folders(root: Path) -> tuple[str, ...]:
    """Class folder names (sorted, ImageFolder order) of the train split, or of any split."""
    splits = data.find_splits(root)
    folder = splits.get("train") or next(iter(splits.values()), None)
    if folder is None:
        return ()
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))


def _write_split(out: str, split: data.Split, paths, root: Path, class_names, folders,
                 n_shards: int, reencode, check_stop=lambda: None) -> dict:
    """Write one split's images (in the given order) as n_shards shards; return its manifest
    entry. ``check_stop`` is called before each record (it raises to stop)."""
    names = [os.path.relpath(p, root) for p in paths]
    classes = [class_names.index(f) if split.labeled else -1 for f in folders]
    encoded = tf.data.Dataset.from_tensor_slices(paths).map(
        reencode, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    entries, gray = [], 0
    for s, group in enumerate(np.array_split(np.arange(len(paths)), n_shards)):
        path = _join(out, f"{split.name}-{s:05d}-of-{n_shards:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for i in group:
                check_stop()
                try:
                    image, channels = next(encoded)
                except tf.errors.OpError as err:  # images come in order, so image i failed
                    raise DataError(f"Cannot decode {paths[i]}: {err.message.splitlines()[0]}. "
                                    "Replace or remove the file.") from None
                gray += int(channels == 1)
                writer.write(_example(image, classes[i], names[i]))
        entries.append({"file": os.path.basename(path), "images": len(group),
                        "bytes": tf.io.gfile.stat(path).length, "sha256": _sha256(path)})
    index_file = f"{split.name}.index.json"
    index_sha = _write_json(_join(out, index_file), {"names": names, "classes": classes})
    return {
        "images": len(paths), "labeled": split.labeled,
        "classes": {c: classes.count(i) for i, c in enumerate(class_names)} if split.labeled else {},
        "grayscale": gray, "index": index_file, "index_sha256": index_sha, "shards": entries,
    }


def prepare(data_dir, out_dir, shards: int = 16, max_side: int = 512, encoding: str = "png",
            quality: int = 95, seed: int = 0, log=print,
            max_pixels: int = DataConfig.max_pixels, skip_bad: bool = False) -> dict:
    """Write an ImageFolder tree as sharded TFRecords plus a manifest; return the manifest.

    A local ``out_dir`` appears only when complete (written as ``out_dir.partial``, then
    renamed). SIGTERM, Ctrl-C or an error removes the partial output.

    Args:
        data_dir: a local ImageFolder tree (as ``fit --data`` takes).
        out_dir: new or empty folder, local or a tf.io.gfile URL (gs://...).
        shards: shards per split (fewer when a split has fewer images). Multi-worker training
            needs at least one train shard per worker; a multiple of the worker count is even.
        max_side: longest side after re-encoding (aspect kept, never upscaled); 0 keeps sizes.
        encoding: "png" (lossless) or "jpeg".
        quality: JPEG quality.
        seed: seed of the image-to-shard assignment.
        log: where progress lines go.
        max_pixels: larger images are refused (checked from their headers, before decoding).
        skip_bad: leave unusable files out (logged, and listed in the manifest's ``skipped``)
            instead of stopping.

    Raises:
        DataError: bad arguments, a bad tree, or images that cannot be used (all listed).
        FileExistsError: out_dir exists and is not empty (nothing is ever overwritten), or a
            partial output of another prepare is in the way.
        runstate.Interrupted: SIGTERM or Ctrl-C; nothing is left in out_dir.
    """
    if shards < 1:
        raise DataError(f"--shards must be at least 1, got {shards}.")
    if max_side and max_side < 16:
        raise DataError(f"--max-side must be 0 (keep sizes) or at least 16 px, got {max_side}.")
    if encoding not in ENCODINGS:
        raise DataError(f"Unknown encoding {encoding!r}. Valid encodings: {', '.join(ENCODINGS)}.")
    if max_pixels < 1:
        raise DataError(f"--max-pixels must be at least 1, got {max_pixels}.")
    if is_prepared(data_dir):
        if _is_incomplete(data_dir):
            raise _incomplete_error(data_dir)
        raise DataError(f"{data_dir} is already a prepared dataset; pass it to fit --data directly.")
    out = str(out_dir).rstrip("/") or "/"
    if tf.io.gfile.exists(out) and tf.io.gfile.listdir(out):
        if _is_incomplete(out):
            raise _incomplete_error(out)
        raise FileExistsError(f"{out} exists and is not empty; tfcovid prepare never overwrites. "
                              "Choose a new OUT_DIR or empty this one.")
    # A local folder is renamed into place whole; a URL's folder (gs://) cannot be, so it is
    # written in place with the manifest last.
    work = out + PARTIAL if "://" not in out else out
    if work != out and os.path.lexists(work):
        raise FileExistsError(f"{work} exists: a tfcovid prepare into {out} is running, or one was "
                              f"killed (SIGKILL, power loss). If none is running, delete {work} and "
                              "run tfcovid prepare again.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"Data folder not found: {root}. tfcovid prepare reads a local ImageFolder "
                        "tree (train/, validation/, optionally test/, one folder per class).")
    # SIGTERM / Ctrl-C are recorded, and raise runstate.Interrupted at the next record so that
    # the cleanup below runs: raised from the signal handler itself, the exception can land in
    # one of TensorFlow's finalizers (__del__), where Python prints it and carries on. A second
    # signal gets the usual handler (stops at once).
    with runstate.StopOnSignal() as stop:
        def check_stop():
            if stop.received is not None:
                raise runstate.Interrupted(stop.received)

        class_names = _class_folders(root)
        # Scanning as "one label per folder" checks the tree exactly as fit would, task-free.
        scanned = data.scan(root, "multilabel", class_names or ("-",), {c: (c,) for c in class_names},
                            strict=False)
        # Every file checked (and decoded once) before anything is written: one list of all
        # the unusable ones, found by the scan or by decoding.
        scanned, skipped = _usable(scanned, max_pixels, skip_bad, log)
        check_stop()
        existed = tf.io.gfile.exists(work)  # only where work is out: an empty OUT_DIR URL
        try:
            tf.io.gfile.makedirs(work)
            manifest = _write(scanned, work, root, class_names, shards, max_side, encoding, quality,
                              seed, skipped, log, check_stop)
        except BaseException:
            _remove_partial(work, existed)
            raise
        if work != out:
            _move_into_place(work, out)
    return manifest


def _usable(scanned: data.Manifest, max_pixels: int, skip_bad: bool, log):
    """The scanned tree without its unusable files (skip_bad) and those files; or raise the list."""
    for problem in scanned.problems:  # ignored system files, linked folders not followed
        log(f"note: {problem}")
    bad = [replace(b, reason=b.reason.replace("data.max_pixels", "--max-pixels"))  # prepare's option
           for b in filecheck.check(scanned, max_pixels, log)]
    if not bad:
        return scanned, []
    if not skip_bad:
        raise filecheck.problems_error(bad, scanned.root, "Fix or remove these files, or pass "
                                       "--skip-bad to leave them out (listed in the manifest).")
    kept = filecheck.leave_out(scanned, bad)
    log(f"Left out {len(bad):,} unusable file{'s' if len(bad) != 1 else ''} (listed in the manifest's "
        f"\"skipped\"):\n{filecheck.describe(bad, scanned.root)}")
    return kept, [{"file": os.path.relpath(b.path, scanned.root), "reason": b.reason} for b in bad]


def _write(scanned: data.Manifest, out: str, root: Path, class_names, shards: int, max_side: int,
           encoding: str, quality: int, seed: int, skipped, log, check_stop) -> dict:
    """Write every split's shards and index into ``out``, then the manifest; return it."""
    rng = np.random.default_rng(seed)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(root.resolve()), "encoding": encoding, "max_side": max_side,
        "jpeg_quality": quality if encoding == "jpeg" else None,
        "class_names": list(class_names),
        "labels": {
            "feature": "class",
            "class_index": {name: i for i, name in enumerate(class_names)},
            "unlabeled": -1,
            "tasks": "binary: the class index; multilabel: multi-hot over data.labels through "
                     "data.label_map (study: covid-19 -> covid-19 + pneumonia), made when reading",
        },
        "features": {"image": f"{encoding} bytes, 1 (gray) or 3 channels", "class": "int64",
                     "name": "path relative to the source folder"},
        "skipped": skipped,
        "splits": {},
    }
    for name, split in scanned.splits.items():
        order = rng.permutation(len(split))
        info = _write_split(out, split, [split.paths[i] for i in order], root, class_names,
                            [split.folders[i] for i in order], min(shards, len(split)),
                            lambda path: _reencode(path, max_side, encoding, quality), check_stop)
        manifest["splits"][name] = info
        size = sum(e["bytes"] for e in info["shards"])
        log(f"{name}: {len(split)} images in {len(info['shards'])} shard(s), {size / 2**20:.2f} MiB, "
            f"{info['grayscale']} grayscale")
    # Written last: a folder without it is an interrupted run, never mistaken for a dataset.
    check_stop()
    _write_json(_join(out, MANIFEST), manifest)
    return manifest


def _move_into_place(work: str, out: str) -> None:
    """Rename the complete local ``work`` folder to ``out`` (new, or an empty folder it replaces)."""
    try:
        os.replace(work, out)
    except OSError as err:  # out was filled meanwhile: keep both, say where the dataset is
        raise FileExistsError(f"Cannot rename {work} to {out} ({err.strerror}); the prepared dataset "
                              f"is complete in {work}.") from None


def _remove_partial(work: str, existed: bool) -> None:
    """Delete what an unfinished prepare wrote: ``work``, or its content where it was an empty
    OUT_DIR the user made."""
    try:
        if "://" not in work:
            shutil.rmtree(work, ignore_errors=True)
        elif not existed:
            tf.io.gfile.rmtree(work)
        else:
            for name in tf.io.gfile.listdir(work):
                tf.io.gfile.remove(_join(work, name))
    except (OSError, tf.errors.OpError):  # best effort: the error that stopped us matters more
        pass


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
         required=("train", "validation")) -> data.Manifest:
    """Read a prepared folder into a :class:`tfcovid.data.Manifest` of :class:`RecordSplit`.

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
    class_labels = data.label_vectors(class_names, task, class_names, output_names, label_map)
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
    return data.Manifest(root, task, class_names, output_names, splits, label_map, ())


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


def upsampling_note(manifest: data.Manifest, image_size: int) -> str | None:
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
                image = data.gray_to_rgb(augment.apply_uint8(image, transform, k, image_size), image_size)
        elif store is not None:
            image = data.gray_to_rgb(store.through(index, lambda: pipeline.eval_pixels(encoded, image_size)),
                                     image_size)
        else:
            image = data.to_rgb_uint8(augment.resize_eval(data.decode_image(encoded), image_size), image_size)
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
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), augment.JPEG_MAGIC)
    return tf.cond(is_jpeg, lambda: pipeline.exact_jpeg(encoded), lambda: data.decode_image(encoded))


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

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), augment.JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(encoded, 0, 8), augment.PNG_MAGIC) & (tf.strings.length(encoded) >= 26)
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
                image = augment.decode_file(files[i], channels, 0) if channels else None
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


def check_workers(manifest: data.Manifest, workers: int) -> list[str]:
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


def raise_if_damaged(manifest: data.Manifest, err: Exception) -> None:
    """After a read error: if a shard of this prepared dataset is damaged, raise a DataError naming it."""
    if not isinstance(err, READ_ERRORS) or not is_prepared(manifest.root):
        return
    problems = verify(manifest.root)
    if problems:
        said = (getattr(err, "message", None) or str(err)).strip().splitlines()[0]
        raise DataError(f"The prepared dataset {manifest.root} is damaged:\n  " + "\n  ".join(problems)
                        + f"\nCopy it again or run tfcovid prepare again. (TensorFlow said: {said})") from err
