"""A label file for a demo tree (``tfcovid demo-data OUT --label-file``): every image of
OUT's splits listed in ``OUT/labels.csv`` with a made-up patient id (1-4 images per patient, one
class each) and no split, so that ``fit --data OUT/labels.csv`` splits it by patient. The
images of one "patient" are unrelated pictures: the ids only exercise the splitting."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from tfcovid.utils.atomic import atomic_write_text

NAME = "labels.csv"


def write_label_file(root, seed: int = 0) -> Path:
    """Write ``root/labels.csv`` (path, label, patient_id) for the demo tree ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = {}
    for split in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "masks"):
        for class_dir in sorted(p for p in split.iterdir() if p.is_dir()):
            by_class.setdefault(class_dir.name, []).extend(
                str(f.relative_to(root)) for f in sorted(class_dir.iterdir()) if f.is_file())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "patient_id"])
    patient = 0
    for label, paths in sorted(by_class.items()):
        order = rng.permutation(len(paths))
        i = 0
        while i < len(paths):
            n = int(rng.integers(1, 5))
            patient += 1
            for j in order[i:i + n]:
                writer.writerow([paths[j], label, f"P{patient:04d}"])
            i += n
    return atomic_write_text(root / NAME, buffer.getvalue())
