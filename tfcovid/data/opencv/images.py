"""The train pipeline's OpenCV work on NumPy images: JPEG and PNG decodes to TensorFlow's pixels,
the grey check, and the bilinear resample of a planned view.

No TensorFlow here: ``tfcovid.data.opencv.process_pool`` runs these in processes of their own. The plans
(``tfcovid.data.augment.plan``) and the TensorFlow equivalents (``augment.apply_uint8``,
``working.decode_base``) are elsewhere; ``tests/test_pipeline.py`` and
``tests/test_augment.py`` check that both sides give the same pixels.
"""
from __future__ import annotations

import collections
import functools
import math
import mmap
import weakref

import numpy as np

from tfcovid.data import highbit
from tfcovid.data.signatures import SIGNATURES

try:  # a dependency. Where it cannot be imported (no wheel for the platform, or a broken install
    # such as opencv-python and opencv-python-headless side by side) the pipelines use
    # TensorFlow's ops, and fit's log says so.
    import cv2

    cv2.setNumThreads(0)  # tf.data already runs one image per core; no pool inside each call
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the environment
    cv2 = None


JPEG_MAGIC, PNG_MAGIC = SIGNATURES["JPEG"][0], SIGNATURES["PNG"][0]


# tf.data takes a ``tf.numpy_function``'s result as its tensor without a copy when the array's
# data is aligned to this many bytes (TensorFlow's EIGEN_MAX_ALIGN_BYTES, 64 with AVX-512);
# otherwise it copies it, with Python's lock held. A (256, 224, 224, 3) batch is 38.5 MB.
BATCH_ALIGN = 64


class _Recycled:
    """Page-aligned buffers (uint8 batches; float scratch too) that come back for reuse once
    nothing uses them.

    A fresh multi-megabyte array per batch costs page faults every time: glibc gives the freed
    one back to the kernel (above 32 MB it is a mapping of its own; below, the heap's top is
    trimmed), and NumPy marks arrays of 4 MB or more for huge pages, whose zeroing then also
    lands on the small arrays the cache keeps in the same heap. Here a buffer is an anonymous
    mapping handed out as a NumPy view; when that view dies (tf.data has dropped the tensor
    that shares it, or the function that used it returned) its mapping returns to a free list
    of its size. Every array made from the view keeps the view alive (NumPy's base of a view
    of it is the view, not the mapping), so a buffer is never reused while anything reads it.
    """

    KEEP_BYTES = 256 << 20  # free buffers kept, all sizes together; more are unmapped

    def __init__(self):
        self._free: dict[int, collections.deque] = {}

    def take(self, shape, dtype=np.uint8, bucket: bool = False) -> np.ndarray:
        """A view of ``shape`` and ``dtype``. ``bucket``: round the mapping up to one of 8 sizes
        per doubling (at most 12.5 % more), so images of many sizes share buffers."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        nbytes = max(count * dtype.itemsize, 1)
        if bucket:
            step = max(1 << max(nbytes.bit_length() - 4, 0), mmap.PAGESIZE)
            nbytes = -(-nbytes // step) * step
        free = self._free.setdefault(nbytes, collections.deque())
        try:  # deque's pop and append are atomic: no lock that a finalizer could wait on
            mem = free.pop()
        except IndexError:
            mem = mmap.mmap(-1, nbytes, **_PRIVATE)
        view = np.frombuffer(mem, np.uint8, nbytes)
        weakref.finalize(view, self._give_back, mem, nbytes).atexit = False  # nothing to do at exit
        return view[:count * dtype.itemsize].view(dtype).reshape(shape)

    def _give_back(self, mem, nbytes: int) -> None:
        if self.kept_bytes() + nbytes <= self.KEEP_BYTES:
            self._free[nbytes].append(mem)

    def kept_bytes(self) -> int:
        """Bytes in free buffers now."""
        return sum(size * len(free) for size, free in list(self._free.items()))


# Not shared with child processes (Python's anonymous mmap default is MAP_SHARED).
_PRIVATE = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}


_RECYCLED = _Recycled()


def batch_buffer(shape) -> np.ndarray:
    """An uninitialised uint8 array of ``shape`` whose data starts on a page (so on a
    ``BATCH_ALIGN`` boundary), recycled once nothing uses it (``_Recycled``): for a batch
    returned to tf.data, and for a batch's scratch arrays."""
    return _RECYCLED.take(shape)


def scratch(shape, dtype) -> np.ndarray:
    """An uninitialised array for one image's intermediate result, recycled like
    ``batch_buffer``'s and shared across nearby sizes (``_Recycled.take``'s ``bucket``)."""
    return _RECYCLED.take(shape, dtype, bucket=True)


def _rescaled(t, sy, sx):
    """``scale_transform``'s arithmetic on any six numbers (TensorFlow or NumPy)."""
    a0, a1, a2, b0, b1, b2 = t[:6]
    return [a0 / sx, a1 / sx, (a2 + 0.5) / sx - 0.5, b0 / sy, b1 / sy, (b2 + 0.5) / sy - 0.5]


def _affine(image, transform, size, dst=None):
    """OpenCV's bilinear resample of ``image`` through ``transform`` (``plan``'s 8 numbers, an
    output-to-input map) to S x S, into ``dst`` when given (uint8 (S, S) for an (H, W) image)."""
    matrix = np.asarray(transform[:6], np.float64).reshape(2, 3)
    return cv2.warpAffine(image, matrix, (size, size), dst=dst, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _warp(image, transform, k, size):
    """``apply_uint8``'s result (S, S, C) for one NumPy image, with OpenCV (see ``warp_rows``)."""
    if k > 1:
        h, w = image.shape[:2]
        small_h, small_w = max(h // k, 1), max(w // k, 1)
        # In float, as TensorFlow's path does: rounding the shrunk image would add its own error.
        # Both float images are recycled scratch: a fresh one per image (4 bytes a pixel of a
        # large crop's image) cost more in page faults than the shrink itself.
        whole = scratch(image.shape, np.float32)
        np.copyto(whole, image)
        small = scratch((small_h, small_w) + image.shape[2:], np.float32)
        image = cv2.resize(whole, (small_w, small_h), dst=small, interpolation=cv2.INTER_AREA)
        transform = np.array(_rescaled(transform, h / small_h, w / small_w))
    out = _affine(image, transform, size)
    if out.dtype != np.uint8:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.reshape(size, size, -1)


def warp_rgb_into(out, image, transform, k, size) -> None:
    """``_warp`` one image into ``out`` (S, S, 3) uint8, grey repeated to three channels."""
    warped = _warp(np.ascontiguousarray(image), transform, k, size)
    if warped.shape[-1] == 1:
        cv2.cvtColor(warped[..., 0], cv2.COLOR_GRAY2RGB, dst=out)
    else:
        out[...] = warped


@functools.lru_cache(maxsize=1)
def _jpeg_flags() -> dict:
    """imdecode flags by (channels, halvings), built once (cv2 may be missing at import)."""
    return {(1, 0): cv2.IMREAD_GRAYSCALE, (1, 1): cv2.IMREAD_REDUCED_GRAYSCALE_2,
            (1, 2): cv2.IMREAD_REDUCED_GRAYSCALE_4, (1, 3): cv2.IMREAD_REDUCED_GRAYSCALE_8,
            (3, 0): cv2.IMREAD_COLOR, (3, 1): cv2.IMREAD_REDUCED_COLOR_2,
            (3, 2): cv2.IMREAD_REDUCED_COLOR_4, (3, 3): cv2.IMREAD_REDUCED_COLOR_8}


def decode_jpeg(data: bytes, channels: int, halvings: int) -> np.ndarray | None:
    """Decode a grey (``channels`` 1) or colour (3) JPEG at 1 / 2**``halvings`` scale with
    OpenCV: uint8 (H, W, channels), RGB, or None when it cannot be decoded.

    The same pixels as ``tf.io.decode_jpeg(data, channels, ratio=2**halvings,
    dct_method="INTEGER_ACCURATE")`` (both are libjpeg-turbo with its exact integer IDCT;
    ``tests/test_pipeline.py`` checks it), without a TensorFlow op per image: it runs inside
    the batch resampler's ``numpy_function``, on its threads, with the GIL released. EXIF
    orientation is ignored, as TensorFlow ignores it.
    """
    flags = _jpeg_flags()[(channels, halvings)] | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        return None
    if channels == 1:
        return image[..., None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place: no second image


# PNG colour types OpenCV decodes to TensorFlow's pixels, by the channels they decode to:
# grey and grey + alpha; RGB and RGBA (alpha dropped, as ``data.decode_image`` drops it).
_PNG_TYPES = {1: (0, 4), 3: (2, 6)}


def decode_png(data: bytes, channels: int, halvings: int) -> np.ndarray | None:
    """Decode a grey (``channels`` 1) or RGB (3) PNG, 8 or 16 bits per sample, alpha or not,
    with OpenCV and halve it ``halvings`` times: uint8 (H // 2**halvings, W // 2**halvings,
    channels), RGB, or None for any other PNG (palette, 1-4 bits: TensorFlow's
    ``decode_base`` converts those) or a broken file.

    The same pixels as ``working.decode_base``: 16-bit samples are scaled by the bits they
    use (``highbit``), as ``decode.decode_image`` scales them, alpha is dropped; its repeated 2 x 2 box average in float,
    with the odd last row or column dropped at each step, rounded once, is the mean of each
    2**h x 2**h block of the cropped image, which an area resize of the float image computes
    exactly (the sums are exact in float32; ``tests/test_pipeline.py`` checks both).
    """
    # PNG's IHDR: bit depth at byte 24, colour type at byte 25.
    if (len(data) < 26 or data[:8] != PNG_MAGIC or data[24] not in (8, 16)
            or data[25] not in _PNG_TYPES[channels]):
        return None
    flags = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    if data[24] == 16:  # decoded as 16 bits, scaled by the bits used (``highbit``)
        flags |= cv2.IMREAD_ANYDEPTH
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        return None
    if image.dtype == np.uint16:
        bits = highbit.used_bits(int(image.max()), highbit.png_sbit(data))
        image = np.right_shift(image, bits - 8).astype(np.uint8)
    if channels == 3:
        cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
    if halvings:
        f = 2**halvings
        h, w = image.shape[0] // f, image.shape[1] // f
        if not h or not w:
            return None
        whole = scratch((h * f, w * f) + image.shape[2:], np.float32)  # recycled, as in _warp
        np.copyto(whole, image[: h * f, : w * f])
        area = cv2.resize(whole, (w, h), dst=scratch((h, w) + image.shape[2:], np.float32),
                          interpolation=cv2.INTER_AREA)
        image = np.rint(area, out=area).astype(np.uint8)
    return image.reshape(image.shape[0], image.shape[1], channels)


def one_channel_if_gray(image: np.ndarray) -> np.ndarray:
    """An RGB image whose three channels are equal everywhere (a grey X-ray saved as RGB) as
    its one channel (H, W, 1), contiguous; any other image as it is. Lossless: the batch
    repeats grey to 3 channels at the end, and resampling treats channels alike, so the
    views are the same, at a third of the cache memory and resampling work."""
    if image.shape[-1] != 3:
        return image
    r, g, b = cv2.split(image)
    if cv2.norm(r, g, cv2.NORM_INF) == 0 and cv2.norm(g, b, cv2.NORM_INF) == 0:
        return g[..., None]
    return image


def decode_file(data: bytes, channels: int, halvings: int) -> np.ndarray | None:
    """A train file's working-resolution pixels with OpenCV (``decode_jpeg`` or ``decode_png``,
    by the file's first bytes; the same pixels as ``working.decode_base``), grey content kept
    as one channel; None where OpenCV cannot give them."""
    if data[:3] == JPEG_MAGIC:
        image = decode_jpeg(data, channels, halvings)
    else:
        image = decode_png(data, channels, halvings)
    return None if image is None else one_channel_if_gray(image)
