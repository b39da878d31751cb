"""Images for the benchmarks: generated X-ray-like JPEGs or a folder's, each file checked first."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tfcovid.data import checks, demo, folders, types


def synthetic_xrays(out_dir: str | Path, count: int = 300, side: int = 1024, seed: int = 0) -> list[str]:
    """Write ``count`` grayscale ``side`` x ``side`` chest-X-ray-like JPEGs (~160 KB at 1024 px).

    Four demo renders (``tfcovid.data.demo``), softened and re-noised per file with film-grain-like
    noise and exposure jitter, so files differ and compress like radiographs, not like noise.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = []
    for k in range(4):
        img, _ = demo._render(rng, "binary", ("infected", "normal")[k % 2], side, side)
        soft = Image.fromarray(np.round(img * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1.2))
        bases.append(np.asarray(soft, np.float32))
    grain = rng.normal(0.0, 2.0, (side, side)).astype(np.float32)
    paths = []
    for i in range(count):
        shift = rng.integers(0, side, 2)
        img = bases[i % 4] * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8) + np.roll(grain, shift, (0, 1))
        path = out / f"xray_{i:05d}.jpg"
        Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "L").save(path, quality=92)
        paths.append(str(path))
    return paths


def image_files(root: str | Path) -> list[str]:
    """Images to benchmark on: the train split of an ImageFolder tree, else every image under root."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise types.DataError(f"Benchmark data folder not found: {root}. Pass --data DIR or leave it out to generate images.")
    top = folders.find_splits(root).get("train", root)
    found = sorted(str(Path(d) / f) for d, _, files in os.walk(top) for f in files
                   if Path(f).suffix.lower() in folders.IMAGE_EXTENSIONS and not f.startswith("."))
    if not found:
        raise types.DataError(f"No images ({', '.join(folders.IMAGE_EXTENSIONS)}) under {top}.")
    return found


def as_split(paths: list[str]) -> types.Split:
    """A binary-labelled split over ``paths`` (labels alternate; speed does not depend on them)."""
    labels = np.arange(len(paths), dtype=np.int64) % 2
    return types.Split("train", os.path.commonpath(paths) if paths else "", tuple(paths), labels,
                      tuple("ab"[i] for i in labels))


def require_usable(paths: list[str], root: str | Path, max_pixels: int, log=print) -> None:
    """Check every file the benchmark will read, as ``fit`` does, before anything is timed.

    Each file is read and decoded once (``checks.check``), so a damaged one stops the
    benchmark here with every problem listed, instead of a TensorFlow error mid-pass that names
    no file. The check is not part of any timing.

    Raises:
        data.DataError: one or more files cannot be used; the message lists each with its reason.
    """
    root = Path(root).expanduser()
    manifest = types.Manifest(str(root), "binary", ("a", "b"), ("a", "b"), {"train": as_split(paths)})
    bad = checks.check(manifest, max_pixels, lambda line: log(f"  {line}"), setting="--max-pixels")
    if bad:
        raise checks.problems_error(bad, root, "Fix or remove these files: the benchmark reads "
                                       "every image it finds there.")
