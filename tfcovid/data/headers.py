"""What a file is, before anything decodes it: its kind from its first bytes, its size from
its header, and the quick structural checks ``data.scan`` makes on every file it lists.

No TensorFlow here: the full check (a decode with the pipeline's ops) is ``tfcovid.data.checks``.
Sizes are read from the header bytes by hand rather than by a library, so that a damaged
header gives a reason instead of a decoder's own lines on stderr, and a huge image is refused
before anything allocates its pixels.
"""
from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from tfcovid.data.signatures import (
    DICOM_EXTENSIONS,
    SIGNATURES,
    TIFF_EXTENSIONS,
    is_dicom,
)
from tfcovid.utils.text import not_utf8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif") + DICOM_EXTENSIONS + TIFF_EXTENSIONS


# Written by file managers, never images: ignored (and counted) instead of reported.
SYSTEM_FILES = ("thumbs.db", "desktop.ini")


# What a non-image with an image extension often is, so the reason can say it.
_OTHER_SIGNATURES = (
    (b"II+\x00", "a BigTIFF image"), (b"MM\x00+", "a BigTIFF image"), (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip archive"), (b"<", "HTML or XML text"),
)


_HINTS = {".webp": "convert it to PNG", ".jp2": "convert it to PNG"}


HEAD_BYTES = 132  # enough for every signature above and DICOM's "DICM" at byte 128


class Unusable(ValueError):
    """A file cannot be used; the message is the one-line reason."""


def is_system_file(name: str) -> bool:
    """Hidden files and folders (``.DS_Store``, AppleDouble ``._x``), ``Thumbs.db``, ``desktop.ini``."""
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def read_bytes(path, limit: int = -1) -> bytes:
    """Read a file (its first ``limit`` bytes): the one place the checks touch the disk."""
    with open(path, "rb") as fh:
        return fh.read(limit)


def sniff(head: bytes) -> str | None:
    """The image format a file's first bytes announce ("DICOM", "JPEG", "PNG", "BMP", "GIF", "TIFF"),
    or None. DICOM first: its 128-byte preamble may hold anything, another format's header too."""
    if is_dicom(head):
        return "DICOM"
    for kind, signatures in SIGNATURES.items():
        if any(head.startswith(s) for s in signatures):
            return kind
    return None


def what_it_is(head: bytes) -> str:
    for signature, what in _OTHER_SIGNATURES:
        if head.startswith(signature):
            return f"it is {what}"
    if head[:64].isascii() and all(c >= 32 or c in b"\t\r\n" for c in head[:64]):
        return "it is text"
    return "its content is not a format tfcovid reads"


def unreadable(path, err: OSError) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return f"broken link to {os.readlink(path)}: the file it points to does not exist"
    reason = err.strerror or str(err)
    if isinstance(err, PermissionError):
        return f"cannot be read ({reason}); give read permission (chmod a+r) or remove it"
    return f"cannot be read ({reason})"


# What a path that is not a regular file is, by its stat mode (after following links).
_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISDIR, "a folder"))


def not_regular(path) -> str | None:
    """Why ``path`` must not be opened (one line), or None for a regular file.

    Checked before any read: opening a named pipe waits for a writer forever, and a device
    such as /dev/zero never ends.
    """
    try:
        mode = os.stat(path).st_mode  # follows links: the kind of what is read
    except OSError as err:
        return unreadable(path, err)
    if stat.S_ISREG(mode):
        return None
    what = next((kind for test, kind in _NOT_REGULAR if test(mode)), "not a file")
    link = f", through the link to {os.readlink(path)}" if os.path.islink(path) else ""
    return f"not a regular file: {what}{link}; replace it with the image file itself or remove it"


def unreadable_folder(err: OSError) -> str:
    """The reason for a folder whose listing cannot be read."""
    reason = err.strerror or str(err)
    if isinstance(err, PermissionError):
        return (f"folder cannot be read ({reason}), so its images are unknown; give read "
                "permission (chmod a+rx) or remove it")
    return f"folder cannot be read ({reason}), so its images are unknown"


def _head(path) -> bytes:
    try:
        head = read_bytes(path, HEAD_BYTES)
    except OSError as err:
        raise Unusable(unreadable(path, err)) from None
    if not head:
        raise Unusable("empty file (0 bytes)")
    return head


def quick_check(path) -> str | None:
    """Why a file in a class folder cannot be a training image (None: it may be one).

    Cheap, structural checks only (a regular file, extension, readable, non-empty,
    signature), done while scanning; ``checks.check_file`` does the full check.
    """
    if (reason := not_regular(path)) is not None:  # before the name: a broken link says so
        return reason
    if (reason := not_utf8(path)) is not None:  # TensorFlow, CSV and JSON need UTF-8 (issue 22.7)
        return reason
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        return _not_image_name(path, suffix)
    try:
        head = _head(path)
    except Unusable as err:
        return str(err)
    if sniff(head) is None:
        if suffix in DICOM_EXTENSIONS:  # the DICOM reader's words, not the other formats'
            return (f"has a {suffix} name but is not a DICOM file (no 'DICM' marker at byte 128; "
                    f"{what_it_is(head)})")
        return f"has a {suffix} name but is not a JPEG/PNG/BMP/GIF image ({what_it_is(head)})"
    return None


def _not_image_name(path, suffix: str) -> str:
    """Why a file named other than an image is left out; a DICOM file (many PACS exports have
    no extension) is told to be renamed, since files are listed by their names."""
    try:
        dicom = is_dicom(read_bytes(path, HEAD_BYTES))
    except OSError:
        dicom = False
    if dicom:
        return f"a DICOM file without a .dcm name: rename it to {Path(path).stem}.dcm"
    hint = f" ({_HINTS[suffix]})" if suffix in _HINTS else ""
    return f"not an image file{hint}: tfcovid reads {', '.join(IMAGE_EXTENSIONS)} files"


def _field(data: bytes, at: int, fmt: str = "<I") -> int:
    """The integer at byte ``at`` (struct format ``fmt``) of a header that may be cut short."""
    size = struct.calcsize(fmt)
    if len(data) < at + size:
        raise Unusable("truncated header")
    return struct.unpack_from(fmt, data, at)[0]


# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not frames.
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from a JPEG's frame header (see :func:`jpeg_frame`)."""
    at = jpeg_frame(data)
    return _field(data, at + 7, ">H"), _field(data, at + 5, ">H")


def jpeg_frame(data: bytes) -> int:
    """Where a JPEG's frame header (its SOF marker) starts, found by walking its marker segments.

    Done in Python rather than with ``tf.io.extract_jpeg_shape``: as fast, and a damaged
    header gives a reason instead of libjpeg's own lines on stderr.
    """
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise Unusable(f"damaged JPEG header (no marker at byte {at})")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
        elif marker in _JPEG_FRAMES:
            return at
        elif marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            break
        else:
            at += 2 + _field(data, at + 2, ">H")
    raise Unusable("damaged JPEG header (no frame header before the image data)")


def _bmp_size(data: bytes) -> tuple[int, int]:
    """Width and height of a BMP, refusing the kinds TensorFlow's decoder would misread.

    ``tf.io.decode_bmp`` ignores the palette and the compression field: a palette BMP would
    come out as its colour *indices* read as gray levels, an RLE one as noise.
    """
    dib = _field(data, 14)
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes, no compression field
        width, height = _field(data, 18, "<H"), _field(data, 20, "<H")
        bpp, compression = _field(data, 24, "<H"), 0
    else:
        width, height = _field(data, 18, "<i"), abs(_field(data, 22, "<i"))
        bpp, compression = _field(data, 28, "<H"), _field(data, 30)
    if bpp not in (8, 24, 32):
        raise Unusable(f"{bpp}-bit BMP, which TensorFlow cannot decode; convert it to PNG")
    standard_masks = compression == 3 and bpp == 32 and data[54:66] == struct.pack(
        "<III", 0x00FF0000, 0x0000FF00, 0x000000FF)
    if compression != 0 and not standard_masks:
        raise Unusable(f"compressed BMP (compression type {compression}), which TensorFlow "
                        "would misread; convert it to PNG")
    if bpp == 8:
        colours = (dib != 12 and _field(data, 46)) or 256
        entry = 3 if dib == 12 else 4
        table = data[14 + dib:14 + dib + entry * colours]
        if len(table) < entry * colours or any(
                table[i * entry:i * entry + 3] != bytes((i, i, i)) for i in range(colours)):
            raise Unusable("8-bit colour-palette BMP: TensorFlow would read its palette "
                            "indices as gray levels; convert it to PNG")
    return width, height


def image_size(data: bytes, kind: str) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels.

    Raises:
        Unusable: a damaged header, or a BMP variant TensorFlow would decode wrongly.
    """
    if kind == "JPEG":
        return _jpeg_size(data)
    if kind == "PNG":
        if data[12:16] != b"IHDR":
            raise Unusable("damaged PNG header (no IHDR chunk first)")
        return _field(data, 16, ">I"), _field(data, 20, ">I")
    if kind == "GIF":
        return _field(data, 6, "<H"), _field(data, 8, "<H")
    return _bmp_size(data)
