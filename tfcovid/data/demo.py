"""Synthetic chest-X-ray-like ImageFolder dataset: the offline demo data and the test fixture.

Each image is a stylised frontal chest radiograph (body, ribcage, two dark lung fields,
mediastinum and heart) with per-image jitter of position, scale, brightness, contrast and
noise. Disease classes add soft opacities inside the lungs; the exact region of every added
opacity is saved as a binary lesion mask, so explanations (Grad-CAM) can be checked against
ground truth. Synthetic, not medical data: it exists so that every command runs with no
download, and it says nothing about real X-rays.

Image size, colour mode and file format are drawn from the per-image random generator with
the same distribution for every class, so none of them can leak the label.
"""
from __future__ import annotations

import json
import operator
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image

DEMO_CLASSES = {"binary": ("infected", "normal"), "multilabel": ("covid-19", "normal", "pneumonia")}


SPLITS = ("train", "validation", "test")


DEFAULT_PER_CLASS = {"binary": 200, "multilabel": 160}


# The class ``--imbalance`` makes rare: the disease class, as covid-19 is in public collections.
MINORITY = {"binary": "infected", "multilabel": "covid-19"}


def parse_imbalance(text: str) -> tuple[int, int]:
    """``demo-data --imbalance M:N`` read: M minority images for every N of each other class
    (whole numbers, 1 <= M <= N). A ValueError names anything else."""
    left, sep, right = str(text).partition(":")
    if not (sep and left.strip().isdigit() and right.strip().isdigit()):
        raise ValueError(f"--imbalance {text!r}: expected M:N, e.g. 1:9 (M minority images per N of "
                         "each other class).")
    m, n = int(left), int(right)
    if not 1 <= m <= n:
        raise ValueError(f"--imbalance {text!r}: use 1 <= M <= N (the minority class is the first number).")
    return m, n


def minority_count(n: int, imbalance: tuple[int, int] | None) -> int:
    """The minority class's images in a split whose other classes have ``n``: round(n * M / N),
    at least 2 (so validation and test hold both classes)."""
    if imbalance is None:
        return n
    return max(round(n * imbalance[0] / imbalance[1]), 2)


# (mode, format, probability). About half grayscale, mostly PNG/JPEG, a few of the awkward
# encodings (16-bit, RGBA, BMP) that real collections contain and the loader must handle.
_FORMATS = (
    ("L", "PNG", 0.27), ("L", "JPEG", 0.20), ("RGB", "PNG", 0.20), ("RGB", "JPEG", 0.23),
    ("I;16", "PNG", 0.04), ("RGBA", "PNG", 0.03), ("L", "BMP", 0.015), ("RGB", "BMP", 0.015),
)


_EXT = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp"}


_LUNG_X, _LUNG_Y, _LUNG_AX, _LUNG_AY = 0.42, -0.05, 0.27, 0.60  # lung ellipses, unit coords


def _soft_ellipse(x, y, cx, cy, ax, ay, soft=0.08):
    """A 0..1 ellipse with a sigmoid edge, so anatomy has no aliased borders."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / soft, -50, 50)))


def _smooth_noise(rng, h, w, cells):
    """Low-frequency noise in about [-1, 1] with `cells` blobs across the longer side.

    Coarse Gaussian noise upsampled bicubically; the grain scales with the image, so
    large and small images look alike once resized.
    """
    step = max(h, w) / cells
    coarse = rng.standard_normal((max(round(h / step), 2), max(round(w / step), 2)))
    coarse = coarse.astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.BICUBIC)) / 1.5


def _lesion_specs(rng, task, label):
    """Opacities as (side, u, v, radius as a fraction of width, amplitude, ground glass).

    (u, v) are in lung coordinates (unit disk, u > 0 towards the outer edge, v > 0 lower).
    """
    if label == "normal":
        return []
    if task == "binary":  # 1-3 bright soft blobs anywhere in either lung
        specs = []
        for _ in range(rng.integers(1, 4)):
            a, r = rng.uniform(0, 2 * np.pi), 0.7 * np.sqrt(rng.uniform())  # uniform in a disk
            specs.append((rng.integers(2), r * np.cos(a), r * np.sin(a),
                          rng.uniform(0.08, 0.18), rng.uniform(0.35, 0.50), False))
        return specs
    if label == "covid-19":  # bilateral, multifocal, faint, peripheral, lower zones
        n = int(rng.integers(3, 7))
        sides = np.concatenate([[0, 1], rng.integers(0, 2, n - 2)])
        return [(s, rng.uniform(0.25, 0.7), rng.uniform(-0.1, 0.6), rng.uniform(0.08, 0.13),
                 rng.uniform(0.22, 0.32), True) for s in sides]
    # pneumonia: one dense, large lobar consolidation in one lung's lower zone
    return [(rng.integers(2), rng.uniform(-0.2, 0.3), rng.uniform(0.2, 0.55),
             rng.uniform(0.17, 0.24), rng.uniform(0.45, 0.60), False)]


def _render(rng, task, label, h, w):
    """Draws one image; returns (image in [0, 1], lesion mask as bool), both h x w."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = (xx + 0.5) / w * 2 - 1, (yy + 0.5) / h * 2 - 1
    # Jitter the anatomy as a whole so the model cannot rely on fixed pixel positions.
    scale, dx, dy = rng.uniform(0.88, 1.06), rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)
    ax, ay = (x - dx) / scale, (y - dy) / scale

    body = _soft_ellipse(ax, ay, 0.0, 0.25, 0.93, 1.2, 0.05)
    heart = _soft_ellipse(ax, ay, 0.13, 0.36, 0.32, 0.26, 0.15)
    lungs = np.maximum(*(_soft_ellipse(ax, ay, s * _LUNG_X, _LUNG_Y, _LUNG_AX, _LUNG_AY, 0.1)
                         for s in (-1, 1))) * (1 - heart)
    spine = np.exp(-(ax / 0.08) ** 2) * body
    mediastinum = np.exp(-(ax / 0.2) ** 2) * body
    # Ribs: narrow bands curving down towards the sides, visible mostly over the lungs.
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * 5 * (ay - 0.6 * ax ** 2))) ** 6 * body
    img = 0.06 + 0.48 * body - 0.36 * lungs + 0.16 * spine + 0.08 * mediastinum + 0.12 * heart
    img += 0.06 * ribs * (0.3 + lungs) + 0.03 * _smooth_noise(rng, h, w, 32) * lungs

    added = np.zeros((h, w), np.float32)
    for side, u, v, rad, amp, glass in _lesion_specs(rng, task, label):
        sign = -1 if side == 0 else 1  # u points outwards in both lungs
        cx = (sign * (_LUNG_X + u * _LUNG_AX)) * scale + dx
        cy = (_LUNG_Y + v * _LUNG_AY) * scale + dy
        sigma = rad * w / 1.8  # so the 20 % mask threshold lands at about `rad`
        blob = np.exp(-(((x - cx) * w / 2) ** 2 + ((y - cy) * h / 2) ** 2) / (2 * sigma ** 2))
        if glass:  # ground glass is mottled, not uniform
            blob *= np.clip(1 + 0.5 * _smooth_noise(rng, h, w, 40), 0.3, 1.7)
        added += amp * blob
    # Opacities live inside the lung fields; overlapping ones saturate rather than add up.
    added = np.minimum(added * np.clip(lungs * 1.3, 0, 1), 0.6)
    img += added
    mask = added > 0.2 * added.max() if added.max() > 0 else np.zeros((h, w), bool)

    # Exposure differences between machines: global contrast, brightness and gamma.
    img = (img - 0.3) * rng.uniform(0.8, 1.2) + 0.3 + rng.uniform(-0.07, 0.07)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1) ** rng.uniform(0.85, 1.15)
    return img, mask


def _encode(img, mode):
    """Float [0, 1] gray image to a PIL image in `mode`."""
    if mode == "I;16":
        return Image.fromarray(np.round(img * 65535).astype(np.uint16))
    gray = Image.fromarray(np.round(img * 255).astype(np.uint8), "L")
    return gray if mode == "L" else gray.convert(mode)


def _draw_image(rng, image_size):
    """Draws size, mode and format first, from the same distribution for every class."""
    lo, hi = image_size
    h = int(rng.integers(lo, hi + 1))
    w = max(int(round(h * rng.uniform(0.85, 1.15))), 8)
    k = rng.choice(len(_FORMATS), p=[f[2] for f in _FORMATS])
    return h, w, _FORMATS[k][0], _FORMATS[k][1]


def _check_args(task, per_class, image_size):
    if task not in DEMO_CLASSES:
        raise ValueError(f"Unknown demo task {task!r}; valid tasks: {', '.join(DEMO_CLASSES)}.")
    if per_class is None:
        per_class = DEFAULT_PER_CLASS[task]
    try:
        per_class = operator.index(per_class)
    except TypeError:
        raise ValueError(f"per_class must be a positive integer. Received: {per_class!r}") from None
    if per_class < 1:
        raise ValueError(f"per_class must be a positive integer. Received: {per_class}")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    lo, hi = (int(s) for s in image_size)
    if not 16 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 16 <= min <= max. Received: {image_size}")
    return per_class, (lo, hi)


def make_demo_data(out_dir, task="binary", per_class=None, seed=0, image_size=(96, 256), imbalance=None):
    """Writes a synthetic chest-X-ray-like ImageFolder dataset with lesion masks.

    Layout: OUT/{train,validation,test}/<class>/<class>_<split>_<index>.<ext>, masks in
    OUT/masks/<split>/<class>/<stem>.png (0/255, same size as the image), plus
    OUT/README.txt and OUT/demo.json. The same arguments give byte-identical files.

    Args:
        out_dir: Directory to create; it may exist only if empty.
        task: "binary" (infected, normal) or "multilabel" (covid-19, normal, pneumonia).
        per_class: Train images per class (default 200 binary, 160 multilabel);
            validation and test get max(per_class // 4, 2) each.
        seed: Seed of every random choice.
        image_size: (min, max) side length in pixels; each image draws its own.
        imbalance: None, or (M, N): the minority class (``MINORITY``) gets ``minority_count``
            images in every split (its first images are the balanced set's).

    Returns:
        The dataset directory as a pathlib.Path.

    Raises:
        ValueError: Unknown task, per_class < 1 or a bad image_size.
        FileExistsError: out_dir exists and is not empty.
    """
    per_class, image_size = _check_args(task, per_class, image_size)
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new directory.")
    classes = DEMO_CLASSES[task]
    n_split = {"train": per_class, "validation": max(per_class // 4, 2), "test": max(per_class // 4, 2)}
    counts = {}
    for si, split in enumerate(SPLITS):
        counts[split] = {}
        for ci, label in enumerate(classes):
            img_dir, mask_dir = out / split / label, out / "masks" / split / label
            img_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            n = minority_count(n_split[split], imbalance) if label == MINORITY[task] else n_split[split]
            for i in range(n):
                rng = np.random.default_rng([seed, si, ci, i])
                h, w, mode, fmt = _draw_image(rng, image_size)
                img, mask = _render(rng, task, label, h, w)
                stem = f"{label}_{split}_{i:04d}"
                kwargs = {"quality": 90} if fmt == "JPEG" else {}
                _encode(img, mode).save(img_dir / (stem + _EXT[fmt]), fmt, **kwargs)
                Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_dir / f"{stem}.png")
            counts[split][label] = n
    total = sum(sum(c.values()) for c in counts.values())
    meta = {"task": task, "seed": seed, "per_class": per_class, "image_size": list(image_size),
            "classes": list(classes), "counts": counts,
            "imbalance": None if imbalance is None else f"{imbalance[0]}:{imbalance[1]}"}
    (out / "demo.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"tfcovid demo dataset: synthetic, not medical data ({task}, seed {seed}).",
             "Stylised chest-X-ray-like images with added opacities, for demos and tests only.",
             f"{total} images; train has {per_class} per class"
             + (f" ({MINORITY[task]}: {imbalance[0]}:{imbalance[1]} of that)" if imbalance else "")
             + ". Lesion masks are in masks/.", ""]
    lines += [f"{split}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for split, c in counts.items()]
    (out / "README.txt").write_text("\n".join(lines) + "\n")
    return out


def default_cache_dir():
    """Where generated demo data lives: $TFCOVID_HOME or ~/.cache/tfcovid."""
    return pathlib.Path(os.environ.get("TFCOVID_HOME", "~/.cache/tfcovid")).expanduser()


def ensure_demo_data(task="binary", seed=0, per_class=None, cache_dir=None, log=print):
    """Returns the cached demo dataset, generating it on first use.

    Args:
        task: "binary" or "multilabel".
        seed: Dataset seed.
        per_class: Train images per class; None for the task's default.
        cache_dir: Parent directory; default_cache_dir() when None.
        log: Called with one line when the data is generated (not when it is reused).

    Returns:
        Path of <cache>/demo-<task>-s<seed>-n<per_class>.
    """
    per_class, _ = _check_args(task, per_class, (96, 256))
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"demo-{task}-s{seed}-n{per_class}"
    if (final / "demo.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    n_eval = max(per_class // 4, 2)
    total = (per_class + 2 * n_eval) * len(DEMO_CLASSES[task])
    log(f"Generating the demo dataset ({task}, {total} images) in {final} ...")
    # Build beside the target and rename: an interrupted run leaves only a temp directory,
    # never a half dataset that a later call would take for a complete one.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        make_demo_data(tmp, task=task, per_class=per_class, seed=seed)
        os.replace(tmp, final)
    except OSError:
        if (final / "demo.json").is_file():  # another process finished first
            return final
        if final.exists():
            raise FileExistsError(f"{final} exists but is not a complete demo dataset; "
                                  "delete it and run again.") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
