"""TIFF files -> the 8-bit image the model sees, with Pillow (a tfcovid dependency).

One path for every command: ``decode.decode_image`` calls :func:`to_uint8` for TIFF bytes,
predict, explain and the pre-fit check call it directly. Read: one page of 8-bit grey, 12- or
16-bit grey (scaled by ``highbit``'s rule, as 16-bit PNGs are; a BitsPerSample below 16
counts as PNG's sBIT does) or 8-bit RGB, alpha dropped, uncompressed or compressed as libtiff
reads it (LZW, deflate, PackBits...); MinIsWhite grey is inverted. Refused with a one-line
reason: several pages, float or signed samples, palette, bilevel and other kinds. Pillow
rather than OpenCV: it is always installed, reads the header without the pixels (the size
bound comes first, ``data.bounds``) and gives the tags the rule needs. No TensorFlow here.
"""
from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import TiffImagePlugin

from tfcovid.data import highbit
from tfcovid.data.signatures import is_tiff  # noqa: F401  (also read as tiff.is_tiff)

# Pillow's modes tfcovid reads -> (channels out, bytes a pixel in Pillow's own image).
_MODES = {"L": (1, 1), "LA": (1, 4), "La": (1, 4), "I;16": (1, 2), "I;16B": (1, 2),
          "I;16L": (1, 2), "RGB": (3, 4), "RGBA": (3, 4), "RGBX": (3, 4)}
_FORMATS = {2: "signed-integer", 3: "floating-point", 4: "undefined"}
_KINDS = {0: "grey (MinIsWhite)", 1: "grey", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK",
          6: "YCbCr", 8: "CIELab"}
HINT = "tfcovid reads 8- or 16-bit grey and 8-bit RGB TIFFs; convert it to a PNG"


class TiffError(ValueError):
    """A TIFF file tfcovid cannot use; the message is the one-line reason."""


class Header(NamedTuple):
    """What a TIFF's first page says, read without decoding the pixels."""

    width: int
    height: int
    channels: int  # after decoding: 1 (grey) or 3 (RGB)
    bits: int  # BitsPerSample (first sample)
    samples: int  # SamplesPerPixel, alpha included
    bytes_per_pixel: int  # what decoding holds at its peak (see _check)
    min_is_white: bool


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _open(data: bytes):
    # The plugin itself, not Image.open: Pillow's own size guard (and its warning) would
    # second-guess data.max_pixels, the one limit, which data.bounds applies before decoding.
    try:
        return TiffImagePlugin.TiffImageFile(io.BytesIO(data))
    except SyntaxError as err:  # Pillow's "unknown pixel mode": a kind it does not read
        raise TiffError(f"TIFF of a kind Pillow does not read ({_first_line(err)}); {HINT}") from None
    except Exception as err:  # noqa: BLE001  # Pillow's parse errors have no common base
        raise TiffError(f"damaged TIFF header ({_first_line(err)})") from None


def _check(im) -> Header:
    """The header of a TIFF tfcovid reads, or the reason it cannot."""
    try:
        pages = im.n_frames
    except Exception as err:  # noqa: BLE001  # a damaged chain of pages
        raise TiffError(f"damaged TIFF header ({_first_line(err)})") from None
    if pages > 1:
        raise TiffError(f"TIFF of {pages} pages: tfcovid reads single-page images; save the "
                        "page to use as a file of its own")
    tags = im.tag_v2
    bits = tuple(tags.get(258, (1,)))
    formats = set(tags.get(339, (1,)))
    samples = int(tags.get(277, 1))
    kind = _KINDS.get(int(tags.get(262, -1)), f"photometric {tags.get(262)}")
    if formats - {1}:
        name = _FORMATS.get(max(formats), f"format {max(formats)}")
        raise TiffError(f"TIFF of {name} samples ({bits[0]}-bit {kind}): {HINT}")
    depth_ok = bits[0] == 8 or (im.mode.startswith("I;16") and bits[0] in (12, 16))
    if im.mode not in _MODES or not depth_ok:
        raise TiffError(f"{bits[0]}-bit {kind} TIFF ({samples} sample{'s' if samples > 1 else ''} "
                        f"a pixel): {HINT}")
    channels, stored = _MODES[im.mode]
    # At the peak: Pillow's image, and its samples twice (tobytes joins them from chunks, NumPy
    # takes the joined copy); the 8-bit result comes after Pillow's image is freed.
    array = samples * (2 if bits[0] > 8 else 1)
    width, height = im.size
    return Header(width, height, channels, bits[0], samples, stored + 2 * array,
                  kind.startswith("grey (MinIsWhite)"))


def header(data: bytes) -> Header:
    """The size and kind of a TIFF's image, without decoding its pixels.

    Raises:
        TiffError: several pages, a kind tfcovid does not read, or a damaged header.
    """
    with _open(data) as im:
        return _check(im)


def to_uint8(data: bytes) -> np.ndarray:
    """A TIFF's image as uint8 (H, W, 1 or 3), as the model sees it (the rules: module doc).

    Raises:
        TiffError: the file cannot be used (one-line reason).
    """
    with _open(data) as im:
        head = _check(im)
        try:
            arr = np.asarray(im)
        except Exception as err:  # noqa: BLE001  # libtiff/Pillow decode errors vary
            raise TiffError(f"cannot decode its TIFF pixel data ({_first_line(err)})") from None
    if arr.shape[:2] != (head.height, head.width):
        raise TiffError(f"TIFF pixel data of shape {arr.shape[:2]}, not the header's "
                        f"{head.height}×{head.width}")
    arr = arr.reshape(head.height, head.width, -1)[..., :head.channels]
    if arr.dtype != np.uint8:  # 12 or 16 bits: the 16-bit PNG rule, BitsPerSample as sBIT
        bits = highbit.used_bits(int(arr.max(initial=0)), head.bits if head.bits < 16 else None)
        out = np.empty(arr.shape, np.uint8)  # shifted straight into 8 bits: no 16-bit temporary
        arr = np.right_shift(arr.astype(np.uint16, copy=False), bits - 8, out=out, casting="unsafe")
        if head.min_is_white:  # Pillow inverts 8-bit MinIsWhite itself, not 16-bit
            np.subtract(255, arr, out=arr)
    return np.ascontiguousarray(arr)


def decode_tensor(data) -> np.ndarray:
    """:func:`to_uint8` for ``tf.numpy_function`` (its argument: the bytes as a NumPy scalar)."""
    return to_uint8(bytes(data.item() if hasattr(data, "item") else data))
