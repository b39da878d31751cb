"""Image file signatures (first bytes), shared by the file checks and the OpenCV decoders."""
from __future__ import annotations

SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "BMP": (b"BM",),
    "GIF": (b"GIF87a", b"GIF89a"),
}
