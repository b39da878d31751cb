"""16-bit PNG samples -> 8 bits by the range they use: the rule shared by TensorFlow's decode
(``decode.decode_image``), OpenCV's (``opencv.images.decode_png``) and the TIFF decode
(``tiff.to_uint8``, a BitsPerSample under 16 as the sBIT). No TensorFlow here.

Medical PNGs often keep 10-14-bit values in a 16-bit container; scaled by 65535 they come out
nearly black. The bits used: the sBIT chunk's (its first channel's), when the values fit in
them (values past them were scaled to 16 bits as the PNG specification says: 16), else
the bit length of the image's largest value rounded up to an even count (10, 12,
14 or 16; at least 8), so that one collection's images share a scale whatever their
brightest pixel. An 8-bit pixel is the value shifted right by (bits - 8): for a full-range
image (bits 16) the high byte, as before. docs/dicom.md explains the choice.
"""
from __future__ import annotations

RULE = "used"  # data.high_bit: the rule above, recorded in every run's config


def png_sbit(data: bytes) -> int | None:
    """The first byte of a PNG's sBIT chunk (before its image data), or None."""
    head = data.split(b"IDAT", 1)[0]
    at = head.find(b"sBIT")
    return head[at + 4] if 0 <= at and at + 4 < len(head) else None


def used_bits(largest: int, sbit: int | None) -> int:
    """How many bits a 16-bit image's samples use (see the module doc)."""
    if sbit is not None and 8 <= sbit <= 16:  # values past sBIT's bits: scaled up as PNG's spec says
        return sbit if largest < (1 << sbit) else 16
    return max(8, (largest.bit_length() + 1) // 2 * 2)
