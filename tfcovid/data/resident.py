"""The train split resident on the accelerator (``data.augment_on: device`` within
``data.device_cache_mb``): every train image decoded once at its working resolution into one
uint8 array (N, H, W, C), padded to the largest image, that the train step holds on the device
(``tfcovid.training.device_augment``). The pipeline then ships each batch's image indices and
augmentation plans only (``pipeline.dataset(augment_on="resident")``).

The pixels are the streamed device path's (``batches.gatherer``): OpenCV's decode where it
reads the file, TensorFlow's ``working.decode_base`` otherwise or where a header misled.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tfcovid.data import augment, batches
from tfcovid.data.opencv import images as opencv_images
from tfcovid.data.types import Split
from tfcovid.data.working import decode_base_or_refuse, file_plan, working_side

MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Resident:
    """A split's decoded train images, as the device holds them."""

    images: np.ndarray  # uint8 (N, H, W, C): image i in the top-left corner, zero padding
    hw: np.ndarray  # int32 (N, 2): each image's own (height, width)

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


def planned_bytes(split: Split, image_size: int, decode_scale: float, plan=None) -> int:
    """Bytes the split takes resident, from its files' headers (before any decode): images x
    the padded (height, width, channels) of ``batches.device_pad``. ``plan``: the split's
    ``working.file_plan``, when already read."""
    shapes, _, readable = plan or file_plan(split.paths, working_side(image_size, decode_scale))
    height, width, channels = batches.device_pad(shapes[: len(split)], readable[: len(split)])
    return len(split) * height * width * channels


def fits(nbytes: int, budget_mb: int) -> bool:
    """Whether ``nbytes`` fit ``budget_mb`` (data.device_cache_mb; 0: nothing is resident)."""
    return budget_mb > 0 and nbytes <= budget_mb * MB


def describe(nbytes: int, budget_mb: int) -> str:
    """The line fit logs after where the augmentation runs."""
    if fits(nbytes, budget_mb):
        return f"train images resident on the device: {nbytes / MB:,.1f} MB of data.device_cache_mb {budget_mb:,}"
    if budget_mb == 0:
        return "train images streamed to the device in uint8 batches (data.device_cache_mb 0)"
    return (f"train images streamed to the device in uint8 batches: {nbytes / MB:,.1f} MB is over "
            f"data.device_cache_mb {budget_mb:,}")


def held_if_fits(split: Split, image_size: int, decode_scale: float, budget_mb: int) -> tuple[Resident | None, str]:
    """The split decoded for the device when it fits ``budget_mb`` (data.device_cache_mb): by its
    headers, then by its decoded size (a header may understate it); else None. With the line
    saying which (``describe``). The headers are read once for both."""
    plan = file_plan(split.paths, working_side(image_size, decode_scale))
    nbytes = planned_bytes(split, image_size, decode_scale, plan)
    if not fits(nbytes, budget_mb):
        return None, describe(nbytes, budget_mb)
    held = decode_all(split, image_size, decode_scale, plan)
    return (held if fits(held.nbytes, budget_mb) else None), describe(held.nbytes, budget_mb)


def decode_all(split: Split, image_size: int, decode_scale: float, plan=None) -> Resident:
    """Every image of ``split`` decoded once, on all cores, at the working resolution of
    ``image_size`` and ``decode_scale``; RGB-saved grey kept as one channel, as the train
    cache keeps it. An undecodable file raises ValueError naming it. ``plan``: as for
    ``planned_bytes``."""
    min_side = working_side(image_size, decode_scale)
    shapes, _, readable = plan or file_plan(split.paths, min_side)
    decoded: list[np.ndarray | None] = [None] * len(split)

    def one(i: int) -> None:
        data = batches.read_file(split.paths[i])
        channels, halvings = readable[i].tolist()
        image = opencv_images.decode_file(data, channels, halvings) if channels else None
        if image is None or image.shape[:2] != tuple(shapes[i]):  # not OpenCV's, or its header misled
            image = decode_base_or_refuse(data, min_side, split.paths[i])
        decoded[i] = opencv_images.one_channel_if_gray(image)

    augment.on_all_cores(len(split), one)
    return pack(decoded)


def pack(decoded: list[np.ndarray]) -> Resident:
    """Images (h, w, 1 or 3) into one zero-padded uint8 batch; grey repeated where any is colour."""
    hw = np.array([image.shape[:2] for image in decoded], np.int32).reshape(-1, 2)
    height, width = (hw.max(axis=0).tolist() if len(decoded) else (1, 1))
    channels = max([image.shape[2] for image in decoded] + [1])
    images = np.zeros((len(decoded), height, width, channels), np.uint8)
    for i, image in enumerate(decoded):
        images[i, : hw[i, 0], : hw[i, 1]] = image
    return Resident(images, hw)
