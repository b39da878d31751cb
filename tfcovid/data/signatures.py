"""Image file signatures (first bytes), shared by the file checks, the decoders and OpenCV's."""
from __future__ import annotations

SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "BMP": (b"BM",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*"),  # read by ``tfcovid.data.tiff`` (Pillow); not BigTIFF
}


# DICOM (Part 10): "DICM" after a 128-byte preamble; read by ``tfcovid.data.dicom``.
DICOM_MAGIC_AT, DICOM_MAGIC = 128, b"DICM"
DICOM_EXTENSIONS = (".dcm", ".dicom")


def is_dicom(head: bytes) -> bool:
    """Whether a file's first bytes (at least 132) are a DICOM file's."""
    return head[DICOM_MAGIC_AT:DICOM_MAGIC_AT + 4] == DICOM_MAGIC


TIFF_EXTENSIONS = (".tif", ".tiff")


def is_tiff(head: bytes) -> bool:
    """Whether a file's first bytes are a (classic, not Big) TIFF's."""
    return head[:4] in SIGNATURES["TIFF"]
