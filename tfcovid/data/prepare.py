"""``tfcovid prepare``: an ImageFolder tree -> sharded TFRecords (re-encoded, shrunk to
``--max-side``), written to ``OUT.partial`` and renamed when complete; a signal removes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcovid.config import DataConfig
from tfcovid.data import checks, decode, types
from tfcovid.data import folders as data_folders
from tfcovid.data.records import (
    ENCODINGS,
    FORMAT,
    MANIFEST,
    PARTIAL,
    VERSION,
    _incomplete_error,
    _is_incomplete,
    _join,
    _sha256,
    is_prepared,
)
from tfcovid.data.types import DataError
from tfcovid.utils import signals


def _write_json(path: str, value) -> str:
    text = json.dumps(value, indent=1)
    with tf.io.gfile.GFile(path, "w") as fh:
        fh.write(text)
    return hashlib.sha256(text.encode()).hexdigest()


def _reencode(path, max_side: int, encoding: str, quality: int):
    """Decode one file, store grayscale as one channel, shrink to max_side, encode."""
    image = decode.decode_image(tf.io.read_file(path))
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
    splits = data_folders.find_splits(root)
    folder = splits.get("train") or next(iter(splits.values()), None)
    if folder is None:
        return ()
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))


def _write_split(out: str, split: types.Split, paths, root: Path, class_names, folders,
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
        signals.Interrupted: SIGTERM or Ctrl-C; nothing is left in out_dir.
    """
    _check_arguments(data_dir, shards, max_side, encoding, max_pixels)
    out = str(out_dir).rstrip("/") or "/"
    work = _work_folder(out)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"Data folder not found: {root}. tfcovid prepare reads a local ImageFolder "
                        "tree (train/, validation/, optionally test/, one folder per class).")
    # SIGTERM / Ctrl-C are recorded, and raise signals.Interrupted at the next record so that
    # the cleanup below runs: raised from the signal handler itself, the exception can land in
    # one of TensorFlow's finalizers (__del__), where Python prints it and carries on. A second
    # signal gets the usual handler (stops at once).
    with signals.DeferSignals() as stop:
        check_stop = stop.check

        class_names = _class_folders(root)
        # Scanning as "one label per folder" checks the tree exactly as fit would, task-free.
        scanned = data_folders.scan(root, "multilabel", class_names or ("-",), {c: (c,) for c in class_names},
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


def _check_arguments(data_dir, shards: int, max_side: int, encoding: str, max_pixels: int) -> None:
    """A DataError for an option out of range, or for a ``data_dir`` that is already prepared."""
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


def _work_folder(out: str) -> str:
    """Where the shards are written: ``out.partial`` for a local ``out``, else ``out`` itself;
    a FileExistsError when ``out`` is not empty or another prepare's partial output is there."""
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
    return work


def _usable(scanned: types.Manifest, max_pixels: int, skip_bad: bool, log):
    """The scanned tree without its unusable files (skip_bad) and those files; or raise the list."""
    for problem in scanned.problems:  # ignored system files, linked folders not followed
        log(f"note: {problem}")
    bad = [replace(b, reason=b.reason.replace("data.max_pixels", "--max-pixels"))  # prepare's option
           for b in checks.check(scanned, max_pixels, log)]
    if not bad:
        return scanned, []
    if not skip_bad:
        raise checks.problems_error(bad, scanned.root, "Fix or remove these files, or pass "
                                       "--skip-bad to leave them out (listed in the manifest).")
    kept = checks.leave_out(scanned, bad)
    log(f"Left out {len(bad):,} unusable file{'s' if len(bad) != 1 else ''} (listed in the manifest's "
        f"\"skipped\"):\n{checks.describe(bad, scanned.root)}")
    return kept, [{"file": os.path.relpath(b.path, scanned.root), "reason": b.reason} for b in bad]


def _write(scanned: types.Manifest, out: str, root: Path, class_names, shards: int, max_side: int,
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
