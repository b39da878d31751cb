"""Image sizes before decoding: what a file's header says (PIL reads it), the shape a train
image has at its working resolution, and the cache size a split will take.

The pipeline plans a whole epoch's augmentation from these sizes before any pixel is decoded
(``working.file_plan``); the cache policy picks memory or disk from the estimate.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from tfcovid.data.opencv import pixel_files
from tfcovid.data.signatures import is_dicom

HEAD_BYTES = 132

_OVERHEAD = pixel_files.OVERHEAD  # bytes per cached image beyond its pixels: serialisation, table entry


class Header(NamedTuple):
    """What a file's header says: size, channels after decoding, PIL mode, format ("JPEG",
    "PNG", ...) and bits per sample (PIL reads 1-4 and 16-bit PNGs as 8-bit modes; the PNG
    header's own bit depth, 8 for other formats)."""

    height: int
    width: int
    channels: int
    mode: str
    format: str = ""
    depth: int = 8

    @property
    def jpeg(self) -> bool:
        return self.format == "JPEG"


def header(path: str) -> Header | None:
    """Read ``path``'s header (not its pixels); None when it cannot be read, or is a DICOM
    file's (decoded by pydicom, planned from its pixels; its preamble may fool PIL)."""
    try:
        with Image.open(path) as im:
            im.fp.seek(0)
            if is_dicom(im.fp.read(HEAD_BYTES)):
                return None
            width, height = im.size
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
            depth = 8
            if im.format == "PNG":
                im.fp.seek(24)  # IHDR: bit depth at byte 24
                depth = im.fp.read(1)[0]
            return Header(height, width, 1 if gray else 3, im.mode, im.format or "", depth)
    except (OSError, ValueError, IndexError, Image.DecompressionBombError):
        # PIL's own size guard (a GIF frame past its canvas counts): plan from the pixels, which
        # the file check bounded (data.bounds)
        return None


def halvings(short: int, min_side: int, jpeg: bool) -> int:
    """How many times ``working.decode_base`` halves an image whose shorter side is ``short``:
    as often as the shorter side stays >= ``min_side`` (libjpeg: 1/8 at most)."""
    cap = 3 if jpeg else 30
    return sum(short >= min_side * 2**j for j in range(1, cap + 1))


def working_shape(height: int, width: int, jpeg: bool, min_side: int | None) -> tuple[int, int]:
    """(height, width) of a train image at its working resolution (mirrors ``working.decode_base``)."""
    if not min_side:
        return height, width
    k = halvings(min(height, width), min_side, jpeg)
    if jpeg:  # libjpeg scales by 1/2, 1/4 or 1/8 and rounds up
        return -(-height // 2**k), -(-width // 2**k)
    return height // 2**k, width // 2**k  # repeated 2x2 pooling drops odd rows


def cached_pixels(height: int, width: int, channels: int, jpeg: bool, image_size: int,
                  min_side: int | None, training: bool) -> int:
    """Bytes of pixels one image takes in the cache (mirrors ``working.decode_base``)."""
    if not training:
        return image_size * image_size * channels
    height, width = working_shape(height, width, jpeg, min_side)
    return height * width * channels


_LOOK_PIXELS = 36_000_000  # 6000 x 6000: larger non-JPEG files are not decoded by looks_gray


def looks_gray(path: str) -> bool:
    """Whether an RGB file shows a grey image (all three channels equal), judged on a small
    decode (JPEGs at 1/8 scale): what the cache will keep as one channel."""
    try:
        with Image.open(path) as im:
            if im.format != "JPEG" and im.width * im.height > _LOOK_PIXELS:
                return False  # not decoded whole for an estimate (counted as RGB)
            im.draft("RGB", (max(im.width // 8, 1), max(im.height // 8, 1)))
            pixels = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    return bool((pixels == pixels[..., :1]).all())


def estimate_bytes(paths: Sequence[str], image_size: int, min_side: int | None, training: bool,
                   sample: int = 64, gray_as_one: bool = False, checks: int = 16) -> int:
    """Estimate a split's cache size from the headers of up to ``sample`` evenly spaced files.

    ``gray_as_one``: the store keeps an RGB image whose channels are equal as one channel
    (grey X-rays are often saved as RGB); the first ``checks`` sampled RGB files are decoded
    small to see how many are, and the others are counted alike.
    """
    if not paths:
        return 0
    step = max(1, len(paths) // sample)
    sizes, rgb, gray = [], [], []
    for path in list(paths)[::step][:sample]:
        head = header(path)
        if head is None:
            continue
        sizes.append(cached_pixels(head.height, head.width, head.channels, head.jpeg, image_size,
                                   min_side, training))
        if gray_as_one and head.channels == 3:
            rgb.append(len(sizes) - 1)
            if len(gray) < checks:
                gray.append(looks_gray(path))
    if not sizes:
        return len(paths) * image_size * image_size * 3
    if gray:  # RGB files that are grey take a third
        share = sum(gray) / len(gray)
        for i in rgb:
            sizes[i] = sizes[i] * (1 - share * 2 / 3)
    return int(len(paths) * (sum(sizes) / len(sizes) + _OVERHEAD))
