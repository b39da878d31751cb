"""ImageFolder trees -> manifests: split and class folders, label vectors, the positive class.

``scan`` reads ``DATA_DIR/{train,validation,test}/<class>/<image>`` (split names are matched
case-insensitively, ``val``/``valid`` mean validation), checks its structure, and returns a
:class:`Manifest` with one :class:`Split` per folder: file paths and label vectors. A split
folder holding images directly (no class folders) is *unlabeled*, as the study's Part 2 test
set is. Files that cannot be used are collected, never guessed at (``tfcovid.data.checks``
checks their content before training). ``dataset`` decodes, augments or resizes, batches and prefetches.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tfcovid.config import ConfigError
from tfcovid.data import checks, headers, records
from tfcovid.data.types import BadFile, ClassCountError, DataError, Manifest, Split

IMAGE_EXTENSIONS = headers.IMAGE_EXTENSIONS


SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid"),
    "test": ("test", "testing"),
}


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
    """What scanning a tree turns up besides images: unusable files, ignored system files and
    linked folders that were not followed (they lead to a folder already read)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bad: list[BadFile] = []
        self.ignored = 0
        self.repeated: list[str] = []  # "link -> target" for each linked folder not followed

    def note(self) -> list[str]:
        notes = []
        if self.ignored:
            notes.append(f"ignored {self.ignored} system or hidden file(s) and folder(s) "
                         "(.DS_Store, Thumbs.db, desktop.ini, names starting with '.')")
        if self.repeated:
            more = len(self.repeated) - 5
            shown = self.repeated[:5] + ([f"{more} more"] if more > 0 else [])
            notes.append(f"did not follow {len(self.repeated)} linked folder(s) that lead back to a "
                         "folder already read (a link loop, or a second link to the same folder), so "
                         f"no image is read twice: {'; '.join(shown)}")
        return notes

    def shown(self, path: str) -> str:
        """``path`` relative to the data folder when it is under it."""
        relative = os.path.relpath(path, self.root)
        return path if relative.startswith("..") else relative


def _list_images(folder: Path, split: str, found: _Found, above: Sequence[Path] = ()) -> list[str]:
    """Image files under ``folder`` (recursively, sorted); the others go to ``found``.

    Each folder's files come first, then its subfolders in name order. Links to files and to
    folders are followed, but a folder is read once per call: a linked folder whose target was
    read already, or that contains a folder being read (``above``: the split and data folders
    holding ``folder``) -- a link loop -- is noted in ``found`` and not followed.
    """
    images: list[str] = []
    seen: set[str] = set()

    def walk(directory: str, chain: tuple[str, ...]) -> None:
        real = os.path.realpath(directory)
        seen.add(real)
        chain += (real,)
        try:
            with os.scandir(directory) as scanned:
                entries = sorted(scanned, key=lambda e: e.name)
        except OSError as err:  # os.walk would skip it without a word
            found.bad.append(BadFile(directory, headers.unreadable_folder(err), split))
            return
        subdirs = []
        for entry in entries:
            if headers.is_system_file(entry.name):
                found.ignored += 1
            elif entry.is_dir():  # follows links
                subdirs.append(entry.path)
            elif (reason := headers.quick_check(entry.path)) is not None:
                found.bad.append(BadFile(entry.path, reason, split))
            else:
                images.append(entry.path)
        for path in subdirs:
            target = os.path.realpath(path)
            # A target holding a folder of the chain would walk into itself: a loop.
            inside = target.rstrip(os.sep) + os.sep
            if target in seen or any(c == target or c.startswith(inside) for c in chain):
                found.repeated.append(checks.escape_field(f"{found.shown(path)} -> {target}"))
            else:
                walk(path, chain)

    walk(str(folder), tuple(os.path.realpath(p) for p in above))
    return images


def _outside_classes(folder: Path, split: str, found: _Found) -> None:
    """Files lying directly in a split folder that has class folders: their class is unknown."""
    for path in sorted(p for p in folder.iterdir() if not p.is_dir()):
        if headers.is_system_file(path.name):
            found.ignored += 1
            continue
        reason = headers.quick_check(path)
        found.bad.append(BadFile(str(path), reason or checks.OUTSIDE_CLASS, split))


def _class_mismatch(folder: Path, names, first_folder: Path, class_names) -> DataError:
    """The error for two splits whose class folders differ; it says when they differ only in
    Unicode normalization (a macOS copy writes "á" as "a" + accent, NFD; most systems as one
    character, NFC): the names then print alike but are different folders."""
    def nfc(values):
        return sorted(unicodedata.normalize("NFC", v) for v in values)

    if nfc(names) != nfc(class_names):
        return DataError(
            f"Class folders differ between splits: {folder} has {list(names)} but {first_folder} "
            f"has {list(class_names)}. Every split needs the same class folders."
        )

    def form(name):
        return "NFC" if unicodedata.is_normalized("NFC", name) else "NFD"

    spelled = {unicodedata.normalize("NFC", n): n for n in class_names}
    pairs = [(n, spelled[unicodedata.normalize("NFC", n)]) for n in names if n not in class_names]
    return DataError(
        "Class folders differ between splits only in Unicode normalization: "
        + "; ".join(f"{folder / n} is spelled {ascii(n)} ({form(n)}) but {first_folder / m} is "
                    f"{ascii(m)} ({form(m)})" for n, m in pairs)
        + ". The names look the same but are different folder names (a copy made on macOS "
        "often spells accented letters decomposed, NFD). Rename one of each pair so every split "
        "spells the class the same way (`convmv -r -f utf8 -t utf8 --nfc --notest "
        f"{first_folder.parent}` renames every name under it to NFC)."
    )


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

    Images may sit in subfolders of a class folder; links are followed (see ``_list_images``
    for link loops). Files that cannot be used (not an image, empty, unreadable, not a regular
    file, or outside any class folder) are left out of the splits and collected in
    ``Manifest.bad``; system files (``.DS_Store``, ``Thumbs.db``, hidden files) are ignored and
    counted, and linked folders not followed are named, in ``Manifest.problems``.

    Args:
        root: folder holding the split folders.
        task: "binary" or "multilabel".
        labels: multilabel output names, in order.
        label_map: multilabel folder -> labels mapping.
        required: splits that must exist (and be labeled).
        strict: raise one DataError listing every unusable file. False returns them in
            ``Manifest.bad`` for ``checks.verify`` (which can leave them out).

    Raises:
        DataError: a split is missing, a folder has no images, class folders differ between
            splits, a class folder has no label mapping, or (strict) files cannot be used.
    """

    if records.is_prepared(root):  # a `tfcovid prepare` output (local or gs://): its manifest
        return records.load(root, task, labels, label_map, required)
    root = Path(root).expanduser()
    folders = _split_folders(root, required)
    found = _Found(root)
    splits: dict[str, Split] = {}
    labeled: list[str] = []
    class_names: tuple[str, ...] | None = None
    for name, folder in folders.items():
        subdirs = [p for p in folder.iterdir() if p.is_dir()]
        class_dirs = sorted(p for p in subdirs if not headers.is_system_file(p.name))
        found.ignored += len(subdirs) - len(class_dirs)
        if not class_dirs:  # images directly in the split folder: an unlabeled split
            splits[name] = _unlabeled_split(name, folder, root, required, found)
            continue
        names = tuple(p.name for p in class_dirs)
        if class_names is None:
            class_names, first_folder = names, folder
        elif names != class_names:
            raise _class_mismatch(folder, names, first_folder, class_names)
        splits[name] = _class_split(name, folder, class_dirs, root, found)
        labeled.append(name)
    if class_names is None:
        raise DataError(f"No split under {root} has class folders.")

    label_map = {k: tuple(v) for k, v in (label_map or {}).items()}
    output_names = _output_names(task, labels, class_names, root)
    for name in labeled:
        split = splits[name]
        vectors = label_vectors(split.folders, task, class_names, output_names, label_map)
        splits[name] = Split(name, split.dir, split.paths, vectors, split.folders)
    if strict and found.bad:
        raise checks.problems_error(found.bad, root, "Fix or remove these files.")
    return Manifest(str(root), task, class_names, output_names, splits, label_map,
                    tuple(found.note()), tuple(found.bad))


def _split_folders(root: Path, required: Sequence[str]) -> dict[str, Path]:
    """The split folders under ``root``; a DataError when it or a required split is missing."""
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
    return folders


def _unlabeled_split(name: str, folder: Path, root: Path, required: Sequence[str], found: _Found) -> Split:
    """A split folder with its images directly in it (no class folders, so no labels)."""
    before = len(found.bad)
    paths = _list_images(folder, name, found, above=(root,))
    if not paths and len(found.bad) == before:
        raise DataError(f"{folder} holds no images and no class folders.")
    if name in required:
        raise DataError(
            f"{folder} has no class folders, so its images have no labels; the {name} "
            f"split needs one folder per class."
        )
    return Split(name, str(folder), tuple(paths), None, ("",) * len(paths))


def _class_split(name: str, folder: Path, class_dirs: list[Path], root: Path, found: _Found) -> Split:
    """A split folder's images, class folder by class folder (labels are added for the task)."""
    _outside_classes(folder, name, found)
    paths, owners = [], []
    for class_dir in class_dirs:
        before = len(found.bad)
        images = _list_images(class_dir, name, found, above=(root, folder))
        if not images and len(found.bad) == before:  # unusable files are reported instead
            raise DataError(f"Class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        paths += images
        owners += [class_dir.name] * len(images)
    return Split(name, str(folder), tuple(paths), None, tuple(owners))


def _output_names(task: str, labels: Sequence[str], class_names: tuple[str, ...], root: Path) -> tuple[str, ...]:
    """The model's outputs: the two class folders (binary) or ``labels`` (multilabel)."""
    if task == "binary":
        if len(class_names) != 2:
            raise ClassCountError(
                f"The binary task needs exactly 2 {'classes' if root.is_file() else 'class folders'}; "
                f"{root} has {len(class_names)}: "
                f"{list(class_names)}. Use --task multilabel for more labels.", root, class_names
            )
        return class_names
    if task == "multilabel":
        return tuple(labels)
    raise DataError(f"Unknown task {task!r}. Valid tasks: binary, multilabel.")


def disease_class(positive: str, class_names) -> tuple[str, str | None]:
    """(the binary task's disease class, a note on how it was chosen or None).

    ``data.positive`` when it names a class folder. Else, where one of the two folders is
    ``normal`` (any case; e.g. Kaggle's NORMAL/PNEUMONIA), the other one, said in the note: the
    fallback to class index 0 picked ``normal`` for such trees, which turned sensitivity and
    specificity around without a word. Else a ConfigError asks for ``data.positive``.
    """
    names = list(class_names)
    if positive in names:
        return positive, None
    others = [n for n in names if n.lower() not in ("normal", "negative")]  # negative: COVIDx 9+
    if len(names) == 2 and len(others) == 1:
        return others[0], (f"disease class {others[0]!r}: data.positive {positive!r} is not a class "
                           f"folder ({', '.join(names)}), and {others[0]!r} is the one that is not "
                           f"normal (--set data.positive=NAME to choose)")
    raise ConfigError(
        f"data.positive {positive!r} is not one of the class folders {names}, so the disease class "
        f"(whose F1, sensitivity and specificity are reported) is unknown. Set it, e.g. "
        f"--set data.positive={names[0]}"
    )
