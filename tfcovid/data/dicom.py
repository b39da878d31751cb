"""DICOM files -> the 8-bit grey image the model sees, with pydicom (the ``dicom`` extra).

One path for every command: ``decode.decode_image`` calls :func:`to_uint8` for DICOM bytes,
predict, explain and the pre-fit check call it directly. The rules (docs/dicom.md): the
modality LUT (rescale slope/intercept or a Modality LUT Sequence) on the stored values
(BitsStored respected), then the VOI LUT Sequence or the first window centre/width
(LINEAR, LINEAR_EXACT or SIGMOID, as PS3.3 C.11.2 defines them) when the file has one, else a
window from the 0.5th to the 99.5th percentile of its values; MONOCHROME1 is inverted so that
bone is bright. No TensorFlow here.
"""
from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np

from tfcovid.data.signatures import DICOM_MAGIC, DICOM_MAGIC_AT, is_dicom  # noqa: F401

try:  # optional: pip install "tfcovid[dicom]"
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
except ImportError:  # pragma: no cover - depends on the environment
    pydicom = None

MAGIC_AT, MAGIC = DICOM_MAGIC_AT, DICOM_MAGIC  # after the 128-byte preamble (PS3.10 7.1)
MISSING = 'a DICOM file, and pydicom is not installed: pip install "tfcovid[dicom]"'
PERCENTILES = (0.5, 99.5)  # the window of a file that has none
GREY = ("MONOCHROME1", "MONOCHROME2")


class DicomError(ValueError):
    """A DICOM file tfcovid cannot use; the message is the one-line reason."""


class Header(NamedTuple):
    """What a DICOM header says, read without decoding the pixels."""

    width: int
    height: int
    frames: int
    bytes_per_sample: int  # BitsAllocated rounded up to bytes
    photometric: str


def _read(data: bytes):
    if pydicom is None:
        raise DicomError(MISSING)
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001  # pydicom's errors have no common base
        raise DicomError(f"damaged DICOM file ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _check(ds) -> Header:
    """The header of a file tfcovid reads, or the reason it cannot."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError("DICOM file without pixel data (not an image: a report, a "
                         "structured report or a presentation state?)")
    try:
        width, height = int(ds.Columns), int(ds.Rows)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as err:
        raise DicomError(f"damaged DICOM header ({_first_line(err)})") from None
    if frames > 1:
        raise DicomError(f"DICOM file of {frames} frames: tfcovid reads single-frame images; "
                         "save the frame to use as a file of its own")
    if samples != 1 or photometric not in GREY:
        raise DicomError(f"colour DICOM image ({photometric or '?'}, {samples} samples a "
                         "pixel): tfcovid reads grey radiographs (MONOCHROME1/2)")
    return Header(width, height, frames, -(-bits // 8), photometric)


def header(data: bytes) -> Header:
    """The size and kind of a DICOM file's image, without decoding its pixels.

    Raises:
        DicomError: pydicom is missing, or the file has no pixel data, several frames, a colour
            image or a damaged header.
    """
    return _check(_read(data))


def _stored(ds) -> np.ndarray:
    """The stored values, only their BitsStored low bits (sign-extended when signed)."""
    try:
        arr = ds.pixel_array
    except Exception as err:  # noqa: BLE001  # no decoder, or damaged compressed data
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = getattr(syntax, "name", syntax)
        try:  # pydicom's own list of what would decode it
            missing = get_decoder(syntax).missing_dependencies if syntax else []
        except (NotImplementedError, ValueError):
            missing = []
        if "missing" in str(err).lower() and missing:
            raise DicomError(f"its pixel data is compressed as {name}, which no installed "
                             f"decoder reads; pydicom can use: {'; '.join(missing)} "
                             "(docs/dicom.md)") from None
        raise DicomError(f"cannot decode its pixel data ({name}): {_first_line(err)}") from None
    stored = int(ds.get("BitsStored", 0) or 0)
    if arr.dtype.kind in "ui" and 0 < stored < arr.dtype.itemsize * 8:
        mask = (1 << stored) - 1
        arr = arr.astype(np.int32 if arr.dtype.itemsize <= 2 else np.int64) & mask
        if int(ds.get("PixelRepresentation", 0)) == 1:  # two's complement in BitsStored bits
            sign = 1 << (stored - 1)
            arr = (arr ^ sign) - sign
    return arr


def _first(value) -> float:
    """A window value, the first of several (a file may offer a choice of windows)."""
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        raise DicomError(f"damaged DICOM window value {value!r}") from None


def _window(ds, x: np.ndarray) -> np.ndarray:
    """Modality values -> [0, 1] by the file's VOI LUT or first window, else the percentiles."""
    if "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        # A LUT is indexed by whole modality values: rounded (pydicom warns on floats).
        out = apply_voi_lut(np.rint(x).astype(np.int32), ds, index=0, prefer_lut=True).astype(np.float32)
        bits = int(lut.LUTDescriptor[2])
        return out / float(max((1 << bits) - 1, 1))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = (_first(ds[key].value) for key in ("WindowCenter", "WindowWidth"))
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if function == "SIGMOID" and width > 0:
            return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        if function == "LINEAR" and width >= 1:
            center, width = center - 0.5, width - 1.0
        if width > 0 and function in ("LINEAR", "LINEAR_EXACT"):
            return np.clip((x - center) / width + 0.5, 0.0, 1.0)
        if width == 0 and function == "LINEAR" and center >= 0.5:  # width 1: a threshold
            return (x > center).astype(np.float32)
        raise DicomError(f"DICOM window {function} with width {width}: not a window tfcovid "
                         "can apply (PS3.3 C.11.2)")
    low, high = np.percentile(x, PERCENTILES)
    return np.clip((x - low) / max(high - low, 1e-6), 0.0, 1.0)


def to_uint8(data: bytes) -> np.ndarray:
    """A DICOM file's image as uint8 (H, W, 1), as the model sees it (the rules: module doc).

    Raises:
        DicomError: pydicom is missing, or the file cannot be used (one-line reason).
    """
    ds = _read(data)
    head = _check(ds)
    stored = _stored(ds)
    if "ModalityLUTSequence" in ds:
        x = np.asarray(apply_modality_lut(stored, ds), np.float32)
    else:  # rescale in float32 (pydicom's is float64: twice the memory)
        x = stored.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if (slope, intercept) != (1.0, 0.0):
            x = x * np.float32(slope) + np.float32(intercept)
    grey = _window(ds, x) * 255.0
    if head.photometric == "MONOCHROME1":
        grey = 255.0 - grey
    if grey.shape != (head.height, head.width):
        raise DicomError(f"DICOM pixel data of shape {grey.shape}, not the header's "
                         f"{head.height}×{head.width}")
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]


def decode_tensor(data) -> np.ndarray:
    """:func:`to_uint8` for ``tf.numpy_function`` (its argument: the bytes as a NumPy scalar)."""
    return to_uint8(bytes(data.item() if hasattr(data, "item") else data))
