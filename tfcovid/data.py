"""Datasets: scan ImageFolder trees into manifests, and turn manifests into tf.data pipelines.

``scan`` reads ``DATA_DIR/{train,validation,test}/<class>/<image>`` (split names are matched
case-insensitively, ``val``/``valid`` mean validation), checks its structure, and returns a
:class:`Manifest` with one :class:`Split` per folder: file paths and label vectors. A split
folder holding images directly (no class folders) is *unlabeled*, as the study's Part 2 test
set is. Files that cannot be used are collected, never guessed at (``tfcovid.filecheck``
checks their content before training). ``dataset`` decodes, augments or resizes, batches and prefetches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfcovid import augment, filecheck

IMAGE_EXTENSIONS = filecheck.IMAGE_EXTENSIONS
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid"),
    "test": ("test", "testing"),
}


class DataError(ValueError):
    """The dataset on disk cannot be used as it is; the message names the folder or file."""


class ClassCountError(DataError):
    """The binary task found other than 2 class folders (``class_names``) under ``root``."""

    def __init__(self, message: str, root, class_names):
        super().__init__(message)
        self.root, self.class_names = root, tuple(class_names)


@dataclass(frozen=True)
class Split:
    """One split of a dataset: image paths and their labels (None when unlabeled)."""

    name: str
    dir: str
    paths: tuple[str, ...]
    labels: np.ndarray | None  # binary: int class index (n,); multilabel: multi-hot (n, L)
    folders: tuple[str, ...] = ()  # the class folder of each image ("" when unlabeled)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labeled(self) -> bool:
        return self.labels is not None


@dataclass(frozen=True)
class Manifest:
    """What ``scan`` found: class folders, output names and the splits."""

    root: str
    task: str
    class_names: tuple[str, ...]  # class folders, sorted (ImageFolder order)
    output_names: tuple[str, ...]  # one per model output: classes (binary) or labels
    splits: Mapping[str, Split]
    label_map: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    problems: tuple[str, ...] = ()  # things ignored on the way, reported to the user
    # Files that cannot be used, left out of the splits (scan(strict=False); see filecheck).
    bad: tuple[filecheck.BadFile, ...] = ()

    def counts(self) -> dict:
        """Images per split and class folder."""
        out = {}
        for name, split in self.splits.items():
            folders, n = np.unique(np.array(split.folders or [""] * len(split)), return_counts=True)
            out[name] = {str(f) or "(unlabeled)": int(c) for f, c in zip(folders, n)}
        return out


def find_splits(root: Path) -> dict[str, Path]:
    """Map canonical split names to the folders found under ``root`` (case-insensitive)."""
    found: dict[str, Path] = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        for split, aliases in SPLIT_ALIASES.items():
            if child.name.lower() in aliases:
                if split in found:
                    raise DataError(
                        f"{root} has two folders for the {split} split: {found[split].name} and "
                        f"{child.name}. Keep one."
                    )
                found[split] = child
    return found


class _Found:
    """What scanning a tree turns up besides images: unusable files and ignored system files."""

    def __init__(self) -> None:
        self.bad: list[filecheck.BadFile] = []
        self.ignored = 0

    def note(self) -> list[str]:
        if not self.ignored:
            return []
        return [f"ignored {self.ignored} system or hidden file(s) and folder(s) "
                "(.DS_Store, Thumbs.db, desktop.ini, names starting with '.')"]


def _list_images(folder: Path, split: str, found: _Found) -> list[str]:
    """Image files under ``folder`` (recursively, sorted); the others go to ``found``."""
    images = []
    for dirpath, dirnames, filenames in os.walk(folder):
        found.ignored += sum(filecheck.is_system_file(d) for d in dirnames)
        dirnames[:] = sorted(d for d in dirnames if not filecheck.is_system_file(d))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if filecheck.is_system_file(name):
                found.ignored += 1
            elif (reason := filecheck.quick_check(path)) is not None:
                found.bad.append(filecheck.BadFile(path, reason, split))
            else:
                images.append(path)
    return images


def _outside_classes(folder: Path, split: str, found: _Found) -> None:
    """Files lying directly in a split folder that has class folders: their class is unknown."""
    for path in sorted(p for p in folder.iterdir() if not p.is_dir()):
        if filecheck.is_system_file(path.name):
            found.ignored += 1
            continue
        reason = filecheck.quick_check(path)
        found.bad.append(filecheck.BadFile(str(path), reason or filecheck.OUTSIDE_CLASS, split))


def label_vectors(
    folders: Sequence[str], task: str, class_names: Sequence[str], labels: Sequence[str],
    label_map: Mapping[str, Sequence[str]],
) -> np.ndarray:
    """Labels for images whose class folders are ``folders``.

    Binary: the folder's index in ``class_names`` (sorted, as ImageFolder does). Multilabel: a
    multi-hot vector over ``labels`` from ``label_map`` (study: covid-19 -> covid-19 + pneumonia).
    """
    if task == "binary":
        index = {name: i for i, name in enumerate(class_names)}
        return np.array([index[f] for f in folders], dtype=np.int64)
    missing = sorted(set(folders) - set(label_map))
    if missing:
        raise DataError(
            f"Class folder(s) {missing} have no entry in data.label_map, so their labels are "
            f"unknown. Add them to data.label_map in your config, e.g.\n  data:\n    label_map:\n"
            + "".join(f"      {m}: [{labels[0]}]\n" for m in missing)
            + f"(known labels: {', '.join(labels)})."
        )
    column = {name: j for j, name in enumerate(labels)}
    unknown = {f: [x for x in label_map[f] if x not in column] for f in sorted(set(folders))}
    unknown = {f: bad for f, bad in unknown.items() if bad}
    if unknown:
        raise DataError(
            "Class folder(s) map to labels that are not among the outputs "
            f"{list(labels)}: " + "; ".join(f"{f} -> {bad}" for f, bad in unknown.items())
            + " (data.label_map). Give data.label_map entries that use these labels, or data "
            "whose class folders do."
        )
    table = {f: np.isin(np.arange(len(labels)), [column[l] for l in label_map[f]]) for f in set(folders)}
    return np.array([table[f] for f in folders], dtype=np.float32).reshape(len(folders), len(labels))


def scan(
    root: str | Path,
    task: str = "binary",
    labels: Sequence[str] = (),
    label_map: Mapping[str, Sequence[str]] | None = None,
    required: Sequence[str] = ("train", "validation"),
    strict: bool = True,
) -> Manifest:
    """Read an ImageFolder tree and check its structure.

    Files that cannot be used (not an image, empty, unreadable, or outside any class folder)
    are left out of the splits and collected in ``Manifest.bad``; system files (``.DS_Store``,
    ``Thumbs.db``, hidden files) are ignored and counted in ``Manifest.problems``.

    Args:
        root: folder holding the split folders.
        task: "binary" or "multilabel".
        labels: multilabel output names, in order.
        label_map: multilabel folder -> labels mapping.
        required: splits that must exist (and be labeled).
        strict: raise one DataError listing every unusable file. False returns them in
            ``Manifest.bad`` for ``filecheck.verify`` (which can leave them out).

    Raises:
        DataError: a split is missing, a folder has no images, class folders differ between
            splits, a class folder has no label mapping, or (strict) files cannot be used.
    """
    from tfcovid import records  # imports this module

    if records.is_prepared(root):  # a `tfcovid prepare` output (local or gs://): its manifest
        return records.load(root, task, labels, label_map, required)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Data folder not found: {root}. Pass --data DIR (an ImageFolder tree) or --data demo.")
    folders = find_splits(root)
    missing = [s for s in required if s not in folders]
    if missing:
        have = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "nothing"
        raise DataError(
            f"{root} has no {' or '.join(missing)} split folder (found: {have}). Expected "
            f"train/, validation/ (or val/) and optionally test/, each with one folder per class."
        )
    found = _Found()
    splits: dict[str, Split] = {}
    labeled: list[str] = []
    class_names: tuple[str, ...] | None = None
    for name, folder in folders.items():
        subdirs = [p for p in folder.iterdir() if p.is_dir()]
        class_dirs = sorted(p for p in subdirs if not filecheck.is_system_file(p.name))
        found.ignored += len(subdirs) - len(class_dirs)
        if not class_dirs:  # images directly in the split folder: an unlabeled split
            before = len(found.bad)
            paths = _list_images(folder, name, found)
            if not paths and len(found.bad) == before:
                raise DataError(f"{folder} holds no images and no class folders.")
            if name in required:
                raise DataError(
                    f"{folder} has no class folders, so its images have no labels; the {name} "
                    f"split needs one folder per class."
                )
            splits[name] = Split(name, str(folder), tuple(paths), None, ("",) * len(paths))
            continue
        names = tuple(p.name for p in class_dirs)
        if class_names is None:
            class_names, first_folder = names, folder
        elif names != class_names:
            raise DataError(
                f"Class folders differ between splits: {folder} has {list(names)} but {first_folder} "
                f"has {list(class_names)}. Every split needs the same class folders."
            )
        _outside_classes(folder, name, found)
        paths, owners = [], []
        for class_dir in class_dirs:
            before = len(found.bad)
            images = _list_images(class_dir, name, found)
            if not images and len(found.bad) == before:  # unusable files are reported instead
                raise DataError(f"Class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            paths += images
            owners += [class_dir.name] * len(images)
        splits[name] = Split(name, str(folder), tuple(paths), None, tuple(owners))
        labeled.append(name)
    if class_names is None:
        raise DataError(f"No split under {root} has class folders.")

    label_map = {k: tuple(v) for k, v in (label_map or {}).items()}
    if task == "binary":
        if len(class_names) != 2:
            raise ClassCountError(
                f"The binary task needs exactly 2 class folders; {root} has {len(class_names)}: "
                f"{list(class_names)}. Use --task multilabel for more labels.", root, class_names
            )
        output_names = class_names
    elif task == "multilabel":
        output_names = tuple(labels)
    else:
        raise DataError(f"Unknown task {task!r}. Valid tasks: binary, multilabel.")
    for name in labeled:
        split = splits[name]
        vectors = label_vectors(split.folders, task, class_names, output_names, label_map)
        splits[name] = Split(name, split.dir, split.paths, vectors, split.folders)
    if strict and found.bad:
        raise filecheck.problems_error(found.bad, root, "Fix or remove these files.")
    return Manifest(str(root), task, class_names, output_names, splits, label_map,
                    tuple(found.note()), tuple(found.bad))


# --------------------------------------------------------------------------- tf.data pipeline


def decode_image(data):
    """Decode JPEG/PNG/BMP/GIF bytes to uint8 (H, W, C) with C = 1 (grayscale) or 3 (RGB).

    16-bit PNGs are scaled to 8 bits (decode_image converts dtypes by range), alpha is dropped,
    a GIF gives its first frame. Grayscale stays one channel until the end of the pipeline,
    which makes everything before that up to 3x cheaper.
    """
    image = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    channels = tf.shape(image)[-1]
    image = tf.cond(channels >= 3, lambda: image[..., :3], lambda: image[..., :1])
    image.set_shape([None, None, None])
    return image


def one_channel_if_gray(image):
    """An (H, W, 3) image whose three channels are equal everywhere (a grey X-ray saved as
    RGB) as its one channel; any other image as it is. Lossless: ``gray_to_rgb`` repeats it
    at the end and every resize treats channels alike (``augment.one_channel_if_gray`` is the
    same for NumPy images). Used on small (S x S) images: on a full-size one TensorFlow's
    check costs a quarter of the decode."""
    def gray():
        return tf.reduce_all(tf.equal(tf.reduce_max(image, -1), tf.reduce_min(image, -1)))

    same = tf.cond(tf.equal(tf.shape(image)[-1], 3), gray, lambda: tf.constant(False))
    image = tf.cond(same, lambda: image[..., :1], lambda: image)
    image.set_shape([None, None, None])
    return image


def round_uint8(image):
    """Round a float image to uint8 pixels, clipping to [0, 255]."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def gray_to_rgb(image, size: int):
    """Make an (S, S, 1 or 3) image 3-channel (grayscale is repeated) with a static shape."""
    image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image)
    image.set_shape([size, size, 3])
    return image


def to_rgb_uint8(image, size: int):
    """Round a float image to uint8 and make it 3-channel (grayscale is repeated)."""
    return gray_to_rgb(round_uint8(image), size)


def load_image(path, size: int, raw: bytes | None = None):
    """Read, decode and resize one file for evaluation or prediction: uint8 (S, S, 3).
    ``raw``: the file's bytes, when the caller has read them already."""
    raw = tf.io.read_file(path) if raw is None else tf.constant(raw)
    return to_rgb_uint8(augment.resize_eval(decode_image(raw), size), size)


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
    deterministic: bool = False,
    readers: int = 1,
) -> tf.data.Dataset:
    """Build the tf.data pipeline for one split: (uint8 images (N, S, S, 3), labels).

    The pipeline lives in :mod:`tfcovid.pipeline` (see there for the decoded-image cache and
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
            keyed on (seed, epoch, image) (see tfcovid.pipeline).
        deterministic: fixed element order in training too.
        readers: processes that each read a share of the split (multi-worker training of a
            prepared TFRecord split gives each whole shards); with one, a prepared split's
            training stream states its length, which Keras's epochs and progress bar use.
    """
    if getattr(split, "shards", None):  # a records.RecordSplit: stream its TFRecord shards
        from tfcovid import records

        return records.dataset(split, image_size, batch_size, training, aug, seed, drop_remainder, cache, readers)
    from tfcovid import pipeline  # imports this module

    return pipeline.dataset(split, image_size, batch_size, training, aug, seed, drop_remainder,
                            cache, decode_scale, epoch, deterministic)
