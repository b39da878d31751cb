"""Raw pixel files of the OpenCV path's disk cache (no TensorFlow: worker processes use them).

One file per image, ``DIR/INDEX.uint8``, its pixels and nothing else: the shape is kept in
memory by whoever wrote it. Written under a temporary name and renamed, so a file that exists
is whole.
"""
from __future__ import annotations

import os
import threading

import numpy as np

OVERHEAD = 200  # bytes counted per cached image beyond its pixels: bookkeeping


def path(directory: str, index: int) -> str:
    return os.path.join(directory, f"{index}.uint8")


def write(directory: str, index: int, image: np.ndarray) -> None:
    """Write ``image`` (contiguous uint8) as ``index``'s file, atomically."""
    target = path(directory, index)
    partial = f"{target}.{os.getpid()}.{threading.get_ident()}.partial"
    image.tofile(partial)
    os.replace(partial, target)


def read(directory: str, index: int, shape) -> np.ndarray:
    return np.fromfile(path(directory, index), np.uint8).reshape(shape)
