"""What the data layer hands on, with no TensorFlow: a :class:`Split` (paths and labels), a
:class:`Manifest` (class folders, output names, splits, the files that cannot be used) and the
errors a user can fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


class DataError(ValueError):
    """The dataset on disk cannot be used as it is; the message names the folder or file."""


class ClassCountError(DataError):
    """The binary task found other than 2 class folders (``class_names``) under ``root``."""

    def __init__(self, message: str, root, class_names):
        super().__init__(message)
        self.root, self.class_names = root, tuple(class_names)


@dataclass(frozen=True)
class BadFile:
    """A file a run cannot use, and why (one line, for the user)."""

    path: str
    reason: str
    split: str = ""


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
    # Files that cannot be used, left out of the splits (scan(strict=False); see checks.verify).
    bad: tuple[BadFile, ...] = ()
    # Label files (data/label_files.py): each image's patient id, by path ({} for folder trees).
    patients: Mapping[str, str] = field(default_factory=dict)

    def counts(self) -> dict:
        """Images per split and class folder."""
        out = {}
        for name, split in self.splits.items():
            folders, n = np.unique(np.array(split.folders or [""] * len(split)), return_counts=True)
            out[name] = {str(f) or "(unlabeled)": int(c) for f, c in zip(folders, n)}
        return out
