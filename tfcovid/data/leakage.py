"""Leakage between splits, checked before training: a patient with images in two splits (an
error naming the patient and the files), and images with the same decoded pixels in two splits
(listed in pairs; an error unless ``data.allow_duplicates`` acknowledges them).

Pixels are decoded with Pillow at full resolution and hashed with their shape, so a PNG saved
again with other settings, or with other metadata, is still the same image; a file Pillow cannot
decode is hashed as bytes. A perceptual hash for resized copies is not used: see
docs/own-data.md for the measurement.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from tfcovid.data.types import DataError, Manifest
from tfcovid.utils.text import escape

SHOWN = 20  # pairs or patients listed; the rest are counted


def pixel_hash(path: str) -> str:
    """sha256 of the decoded pixels (mode, size and bytes); of the file's bytes if Pillow cannot
    decode it."""
    digest = hashlib.sha256()
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "RGB", "I;16", "I"):
                image = image.convert("RGB")
            digest.update(f"{image.mode} {image.size}".encode())
            digest.update(image.tobytes())
    except (OSError, ValueError, Image.DecompressionBombError):
        digest = hashlib.sha256(b"bytes ")
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def patients_in_two_splits(manifest: Manifest) -> None:
    """A DataError naming each patient with images in two splits, and their files."""
    if not manifest.patients:
        return
    where: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, split in manifest.splits.items():
        for path in split.paths:
            where[manifest.patients.get(path, path)][name].append(path)
    shared = {p: s for p, s in where.items() if len(s) > 1}
    if not shared:
        return
    lines = [f"  patient {escape(patient)}: " + "; ".join(
        f"{name}: {', '.join(_shown(manifest, p) for p in paths)}" for name, paths in splits.items())
        for patient, splits in sorted(shared.items())]
    more = len(lines) - SHOWN
    raise DataError(
        f"{len(shared):,} patient(s) have images in two splits, so the model would be tested on "
        "patients it trained on:\n" + "\n".join(lines[:SHOWN] + ([f"  ... and {more} more"] if more > 0 else []))
        + "\nPut each patient's images in one split (or leave the split column empty for them and "
        "let data.split: patient choose).")


def _shown(manifest: Manifest, path: str) -> str:
    base = os.path.dirname(manifest.root) if manifest.patients else manifest.root
    relative = os.path.relpath(path, base)
    return escape(path if relative.startswith("..") else relative)


def duplicates(manifest: Manifest, threads: int | None = None) -> list[tuple[str, str, str, str]]:
    """Pairs of files in different splits with the same decoded pixels: (split, file, other
    split, other file), each image paired with the first file of its content."""
    files = [(name, path) for name, split in manifest.splits.items() if not getattr(split, "shards", None)
             for path in split.paths]
    threads = threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow releases the GIL while decoding
        hashes = list(pool.map(pixel_hash, [p for _, p in files]))
    first: dict[str, tuple[str, str]] = {}
    pairs = []
    for (name, path), key in zip(files, hashes):
        if key in first and first[key][0] != name:
            pairs.append((*first[key], name, path))
        first.setdefault(key, (name, path))
    return pairs


def check(manifest: Manifest, allow: bool, log=print) -> list[tuple[str, str, str, str]]:
    """Report images repeated across splits; a DataError unless ``allow``. Returns the pairs."""
    pairs = duplicates(manifest)
    if not pairs:
        patients = "no patient and " if manifest.patients else ""
        log(f"Leakage check: {patients}no image (same decoded pixels) in two splits")
        return pairs
    lines = [f"  {_shown(manifest, a)} ({x}) = {_shown(manifest, b)} ({y})" for x, a, y, b in pairs]
    more = len(lines) - SHOWN
    report = (f"{len(pairs):,} image(s) have the same decoded pixels as an image in another split:\n"
              + "\n".join(lines[:SHOWN] + ([f"  ... and {more} more"] if more > 0 else [])))
    if not allow:
        raise DataError(report + "\nRemove the copies, or pass --allow-duplicates "
                        "(data.allow_duplicates: true) to train with them anyway.")
    log(report + "\n(kept: data.allow_duplicates)")
    return pairs
