"""What decoding a file will allocate, from its header, and the one limit every command applies.

``data.max_pixels`` bounds the decoded image: at most that many pixels, and at most as many
bytes as that many 8-bit RGB pixels (3 each). The bytes are what the decoders tfcovid uses
(TensorFlow's, OpenCV's, pydicom's) allocate: a PNG's channels, alpha included (16-bit samples decode to
8 bits); a progressive JPEG's coefficients too (2 bytes a sample, held for the whole image);
a GIF's every frame (giflib reads them all, though only the first is used) on a canvas as
large as its largest frame; a DICOM image's samples and working copies; Pillow's image of a
TIFF and its samples twice (Pillow joins them into bytes that NumPy takes). Nothing is decoded here; no TensorFlow either.
"""
from __future__ import annotations

from typing import NamedTuple

from tfcovid.data import dicom, headers, tiff
from tfcovid.data.headers import Unusable, _field

BYTES_PER_PIXEL = 3  # the byte limit is data.max_pixels pixels of 8-bit RGB

# Progressive (and arithmetic progressive) JPEG frames: libjpeg keeps every coefficient.
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}

# PNG colour type -> channels decoded (palette: RGB; a tRNS chunk adds alpha to any).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_NAMES = {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}


class Decoded(NamedTuple):
    """What a file decodes to: the image's width and height, the bytes the decoder allocates,
    what the file is (for messages) and a note on why its size is not the header's."""

    width: int
    height: int
    bytes: int
    what: str
    note: str = ""
    frames: int = 1


def _png(data: bytes) -> Decoded:
    if data[12:16] != b"IHDR":
        raise Unusable("damaged PNG header (no IHDR chunk first)")
    width, height = _field(data, 16, ">I"), _field(data, 20, ">I")
    depth, colour = _field(data, 24, "B"), _field(data, 25, "B")
    channels = _PNG_CHANNELS.get(colour, 4)
    idat = data.find(b"IDAT")
    if channels in (1, 3) and b"tRNS" in data[33:idat if idat > 0 else None]:
        channels += 1  # transparency decodes as an alpha channel
    what = f"{depth}-bit {_PNG_NAMES[channels]} PNG"
    return Decoded(width, height, width * height * channels, what)


def _jpeg(data: bytes) -> Decoded:
    at = headers.jpeg_frame(data)
    width, height = _field(data, at + 7, ">H"), _field(data, at + 5, ">H")
    components = _field(data, at + 9, "B")
    samples = width * height * components
    if data[at + 1] in _PROGRESSIVE:
        return Decoded(width, height, samples * 3, f"progressive JPEG ({components} components; "
                       "its coefficients, 2 bytes a sample, are held for the whole image)")
    return Decoded(width, height, samples, f"JPEG ({components} components)")


def _bmp(data: bytes) -> Decoded:
    width, height = headers.image_size(data, "BMP")  # refuses the variants TensorFlow misreads
    bpp = _field(data, 24 if _field(data, 14) == 12 else 28, "<H")
    return Decoded(width, height, width * height * (bpp // 8), f"{bpp}-bit BMP")


def _sub_blocks(data: bytes, at: int) -> int:
    """Where a GIF's run of data sub-blocks starting at ``at`` ends (past the data when cut)."""
    while at < len(data) and data[at]:
        at += 1 + data[at]
    return at + 1


def gif_frames(data: bytes) -> list[tuple[int, int, int, int]]:
    """(left, top, width, height) of every frame of a GIF, from its image descriptors.

    Walks the blocks as giflib does, to the trailer, a block it does not know (giflib stops
    there with an error) or the end of the data.
    """
    flags = _field(data, 10, "B")
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # past the global colour table
    frames = []
    while at < len(data) and data[at] != 0x3B:
        if data[at] == 0x21:  # extension: label, then sub-blocks
            at = _sub_blocks(data, at + 2)
        elif data[at] == 0x2C and at + 10 <= len(data):  # image descriptor
            frames.append(tuple(_field(data, at + 1 + 2 * i, "<H") for i in range(4)))
            flags = data[at + 9]
            at += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # local colour table
            at = _sub_blocks(data, at + 1)  # past the LZW code size byte
        else:
            break
    return frames


def _gif(data: bytes) -> Decoded:
    canvas = _field(data, 6, "<H"), _field(data, 8, "<H")
    frames = gif_frames(data)
    # TensorFlow's canvas is as large as the largest frame; giflib holds every frame's indices.
    width = max([canvas[0]] + [left + w for left, _, w, _ in frames])
    height = max([canvas[1]] + [top + h for _, top, _, h in frames])
    raster = sum(w * h for _, _, w, h in frames)
    note = "" if (width, height) == canvas else \
        f" (a frame reaches past its {canvas[0]}×{canvas[1]} canvas)"
    what = f"GIF of {len(frames)} frame{'s' if len(frames) != 1 else ''}" + (
        " (every frame is decoded, though tfcovid uses the first)" if len(frames) > 1 else "")
    return Decoded(width, height, width * height * 3 + raster, what, note, len(frames))


# A DICOM decode holds the stored samples and a float32 working copy (4 bytes a pixel), and
# the percentile window's sort another such copy: counted as 8 bytes a pixel beyond the samples.
_DICOM_WORK = 8


def _dicom(data: bytes) -> Decoded:
    try:  # the header only: a colour, multi-frame or pixel-less file is refused here too
        head = dicom.header(data)
    except dicom.DicomError as err:
        raise Unusable(str(err)) from None
    per_pixel = head.bytes_per_sample + _DICOM_WORK
    return Decoded(head.width, head.height, head.width * head.height * per_pixel,
                   f"{8 * head.bytes_per_sample}-bit DICOM image (with its float working copies, "
                   f"{per_pixel} bytes a pixel)")


def _tiff(data: bytes) -> Decoded:
    # From the first page's width, height and samples, never its strip sizes (which may lie);
    # a multi-page, float or other refused TIFF is refused here too.
    try:
        head = tiff.header(data)
    except tiff.TiffError as err:
        raise Unusable(str(err)) from None
    return Decoded(head.width, head.height, head.width * head.height * head.bytes_per_pixel,
                   f"{head.bits}-bit TIFF of {head.samples} sample{'s' if head.samples > 1 else ''} "
                   f"a pixel ({head.bytes_per_pixel} bytes a pixel as Pillow decodes it)")


_DECODED = {"PNG": _png, "JPEG": _jpeg, "BMP": _bmp, "GIF": _gif, "DICOM": _dicom, "TIFF": _tiff}


def decoded(data: bytes, kind: str) -> Decoded:
    """What ``data`` (a ``kind`` file, see ``headers.sniff``) decodes to, from its header.

    Raises:
        Unusable: a damaged header, or a BMP variant TensorFlow would decode wrongly.
    """
    return _DECODED[kind](data)


def limit_problem(image: Decoded, max_pixels: int, setting: str = "data.max_pixels") -> str | None:
    """Why ``image`` is larger than the limit (one line naming ``setting``, the option or key
    that raises it), or None."""
    pixels = image.width * image.height
    advice = f"downscale it or raise {setting}"
    if pixels > max_pixels:
        return (f"{image.width}×{image.height} = {pixels:,} pixels{image.note}: larger than the "
                f"limit of {max_pixels:,} pixels ({setting}); {advice}")
    if image.bytes > max_pixels * BYTES_PER_PIXEL:
        if image.frames > 1:
            advice = f"save its first frame as a PNG or raise {setting}"
        return (f"{image.width}×{image.height} {image.what}{image.note} decodes to "
                f"{image.bytes:,} bytes: larger than the limit of "
                f"{max_pixels * BYTES_PER_PIXEL:,} bytes ({setting} = {max_pixels:,} pixels of "
                f"{BYTES_PER_PIXEL} bytes); {advice}")
    return None


def problem(data: bytes, max_pixels: int, setting: str = "data.max_pixels") -> str | None:
    """Why a file's bytes cannot be decoded within the limit (one line), or None: empty, not an
    image format tfcovid reads, a damaged or refused header, or too large. The gate every
    command passes a file through before decoding it."""
    if not data:
        return "empty file (0 bytes)"
    kind = headers.sniff(data[:headers.HEAD_BYTES])
    if kind is None:
        return f"not a JPEG/PNG/BMP/GIF image ({headers.what_it_is(data[:headers.HEAD_BYTES])})"
    try:
        image = decoded(data, kind)
    except Unusable as err:
        return str(err)
    if image.width <= 0 or image.height <= 0:
        return f"{kind} header says {image.width}×{image.height} pixels: damaged file"
    return limit_problem(image, max_pixels, setting)
