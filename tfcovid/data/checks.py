"""Check every file a run will read, before its first step.

A broken file found mid-epoch costs the hours already trained and says little about which file
it was. So ``fit`` checks everything up front: ``data.scan`` finds the structural problems
(a file that is not an image, is empty, cannot be read, or lies outside any class folder) and
:func:`check` reads every remaining file, takes its size from the header *without decoding*
(so a 40,000 x 40,000 "decompression bomb" is refused before it can use memory) and then
decodes it with the TensorFlow ops the pipeline uses. :func:`verify` stops the run with one
list of every problem, or, with ``data.skip_bad``, leaves those files out and lists them in the
run directory's ``skipped.txt``.
"""
from __future__ import annotations
import os
import stat
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
import tensorflow as tf
from tfcovid.utils.atomic import atomic_write_text
from tfcovid.data.signatures import SIGNATURES  # noqa: F401  (also read as filecheck.SIGNATURES)
from tfcovid.data.types import BadFile, DataError


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


# Written by file managers, never images: ignored (and counted) instead of reported.
SYSTEM_FILES = ("thumbs.db", "desktop.ini")


# What a non-image with an image extension often is, so the reason can say it.
_OTHER_SIGNATURES = (
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip archive"), (b"<", "HTML or XML text"),
)


_HINTS = {".dcm": "DICOM: convert it to PNG", ".dicom": "DICOM: convert it to PNG",
          ".tif": "convert it to PNG", ".tiff": "convert it to PNG", ".webp": "convert it to PNG"}


HEAD_BYTES = 132  # enough for every signature above and DICOM's "DICM" at byte 128


OUTSIDE_CLASS = "outside any class folder: its class is unknown; move it into a class folder"


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
    """The image format a file's first bytes announce ("JPEG", "PNG", "BMP", "GIF"), or None."""
    for kind, signatures in SIGNATURES.items():
        if any(head.startswith(s) for s in signatures):
            return kind
    return None


def _what_it_is(head: bytes) -> str:
    if head[128:132] == b"DICM":
        return "it is a DICOM file; convert it to PNG"
    for signature, what in _OTHER_SIGNATURES:
        if head.startswith(signature):
            return f"it is {what}"
    if head[:64].isascii() and all(c >= 32 or c in b"\t\r\n" for c in head[:64]):
        return "it is text"
    return "its content is not a format tfcovid reads"


def _unreadable(path, err: OSError) -> str:
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
        return _unreadable(path, err)
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
        raise Unusable(_unreadable(path, err)) from None
    if not head:
        raise Unusable("empty file (0 bytes)")
    return head


def quick_check(path) -> str | None:
    """Why a file in a class folder cannot be a training image (None: it may be one).

    Cheap, structural checks only (a regular file, extension, readable, non-empty,
    signature), done while scanning; :func:`check_file` does the full check.
    """
    if (reason := not_regular(path)) is not None:  # before the name: a broken link says so
        return reason
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        hint = f" ({_HINTS[suffix]})" if suffix in _HINTS else ""
        return f"not an image file{hint}: tfcovid reads {', '.join(IMAGE_EXTENSIONS)} files"
    try:
        head = _head(path)
    except Unusable as err:
        return str(err)
    if sniff(head) is None:
        return f"has a {suffix} name but is not a JPEG/PNG/BMP/GIF image ({_what_it_is(head)})"
    return None


def _field(data: bytes, at: int, fmt: str = "<I") -> int:
    """The integer at byte ``at`` (struct format ``fmt``) of a header that may be cut short."""
    size = struct.calcsize(fmt)
    if len(data) < at + size:
        raise Unusable("truncated header")
    return struct.unpack_from(fmt, data, at)[0]


# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not frames.
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from a JPEG's frame header, found by walking its marker segments.

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
            return _field(data, at + 7, ">H"), _field(data, at + 5, ">H")
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


def _tf_reason(err: tf.errors.OpError) -> str:
    """TensorFlow's message, first line, without the ``{{function_node ...}}`` and ``[Op:...]`` parts."""
    message = (err.message or type(err).__name__).splitlines()[0]
    if message.startswith("{{"):
        message = message.split("}}", 1)[-1].strip()
    return message.split(" [Op:", 1)[0].strip()


def _decode(data: bytes, kind: str) -> None:
    if kind == "JPEG":
        # ratio=8 still entropy-decodes every block (so truncation and corrupt data fail),
        # but skips most of the inverse DCT: a full check at a fraction of a decode's cost.
        tf.io.decode_jpeg(data, channels=0, ratio=8)
    else:  # the op data.decode_image uses
        tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)


def check_file(path, max_pixels: int) -> str | None:
    """Why ``path`` cannot be used (one line), or None when it decodes as the pipeline will."""
    if (reason := not_regular(path)) is not None:  # it may have changed since the scan
        return reason
    try:
        data = read_bytes(path)
    except OSError as err:
        return _unreadable(path, err)
    if not data:
        return "empty file (0 bytes)"
    kind = sniff(data[:HEAD_BYTES])
    if kind is None:
        return f"not a JPEG/PNG/BMP/GIF image ({_what_it_is(data[:HEAD_BYTES])})"
    try:
        width, height = image_size(data, kind)
    except Unusable as err:
        return str(err)
    if width <= 0 or height <= 0:
        return f"{kind} header says {width}×{height} pixels: damaged file"
    if width * height > max_pixels:
        return (f"{width}×{height} = {width * height:,} pixels is over data.max_pixels "
                f"({max_pixels:,}); downscale it or raise data.max_pixels")
    try:
        _decode(data, kind)
    except tf.errors.OpError as err:
        return f"cannot be decoded as {kind}, truncated or corrupt ({_tf_reason(err)})"
    return None


def _files(manifest) -> list[tuple[str, str]]:
    """(path, split) of every file the manifest's splits will read from disk."""
    out = []
    for name, split in manifest.splits.items():
        if getattr(split, "shards", None):  # a prepared dataset: checked when it was written
            continue
        out += [(path, name) for path in split.paths]
    return out


def check(manifest, max_pixels: int, log=print, threads: int | None = None) -> list[BadFile]:
    """Every problem with the manifest's files: ``manifest.bad`` plus a full check of each file.

    Args:
        manifest: a ``data.Manifest`` (from ``data.scan(..., strict=False)``).
        max_pixels: larger images are refused from their header, before any decode.
        log: gets one summary line (and a progress line every ~10 s on large datasets).
        threads: parallel checks; None: one per CPU core (TensorFlow's decode ops release
            the GIL, so threads scale).

    Returns:
        The problems, sorted by path.
    """
    files = _files(manifest)
    threads = threads or min(16, os.cpu_count() or 1)
    start = last = time.perf_counter()
    found = list(getattr(manifest, "bad", ()))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = pool.map(lambda item: check_file(item[0], max_pixels), files)
        for n, ((path, split), reason) in enumerate(zip(files, reasons), 1):
            if reason is not None:
                found.append(BadFile(path, reason, split))
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                log(f"Checking files: {n:,}/{len(files):,}")
    seconds = time.perf_counter() - start
    if files or found:
        # Files the scan refused (by name, emptiness, ...) were checked too: count them here, so
        # the line adds up to the files under the data folder (system files aside).
        total = len(files) + len(getattr(manifest, "bad", ()))
        log(f"Checked {total:,} files in {seconds:.1f} s: "
            + (f"{total - len(found):,} usable, {len(found):,} unusable" if found else "all usable"))
    else:  # prepared records only: each image was checked when the shards were written
        log("Prepared records: their images were checked by `tfcovid prepare`; shard sizes are "
            "checked at the start and each record's checksum when it is read")
    return sorted(found, key=lambda b: b.path)


def describe(bad, root=None) -> str:
    """One line per problem, "path: reason" (paths relative to ``root`` when under it)."""
    def shown(path):
        prefix = str(root).rstrip(os.sep) + os.sep if root is not None else None
        return path[len(prefix):] if prefix and path.startswith(prefix) else path
    return "\n".join(f"  {shown(b.path)}: {b.reason}" for b in bad)


def problems_error(bad, root, advice: str):
    """The ``data.DataError`` listing every problem, then what to do."""

    noun = "file" if len(bad) == 1 else "files"
    return DataError(f"{len(bad):,} {noun} under {root} cannot be used:\n{describe(bad, root)}\n{advice}")


def only_split(manifest, name: str):
    """The manifest reduced to one split (and that split's ``bad`` files), for checking it alone."""
    return replace(manifest, splits={name: manifest.splits[name]},
                   bad=tuple(b for b in getattr(manifest, "bad", ()) if b.split == name))


def require_usable(manifest, max_pixels: int, log=print) -> None:
    """Raise one DataError listing every unusable file (for commands without ``--skip-bad``)."""
    bad = check(manifest, max_pixels, log)
    if bad:
        raise problems_error(bad, manifest.root, "Fix or remove these files.")


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def escape_field(text: str) -> str:
    r"""``text`` for one field of a tab-separated line: backslash, tab, newline and carriage
    return become ``\\``, ``\t``, ``\n`` and ``\r`` (file names may hold any of them)."""
    return text.translate(_ESCAPES)


def write_skipped(run_dir, bad) -> Path:
    """Write ``run_dir/skipped.txt`` ("path<TAB>reason" lines, fields escaped with
    :func:`escape_field`) atomically; return its path."""
    target = Path(run_dir) / "skipped.txt"
    lines = ["# files left out of this run (data.skip_bad): path<TAB>reason, with backslash, "
             "tab, newline and carriage return in them written as \\\\, \\t, \\n and \\r"]
    lines += [f"{escape_field(b.path)}\t{escape_field(b.reason)}" for b in bad]
    return atomic_write_text(target, "\n".join(lines) + "\n")


def leave_out(manifest, bad, required=("train", "validation")):
    """The manifest without the ``bad`` files: paths, labels and folders filtered together.

    A split outside ``required`` that loses every file is dropped.

    Raises:
        DataError: a class folder of a required split would be left with no images.
    """

    drop = {b.path for b in bad}
    splits, emptied = {}, []
    for name, split in manifest.splits.items():
        keep = [i for i, p in enumerate(split.paths) if p not in drop]
        folders = tuple(split.folders[i] for i in keep) if split.folders else ()
        labels = None if split.labels is None else split.labels[keep]
        kept = replace(split, paths=tuple(split.paths[i] for i in keep), labels=labels, folders=folders)
        if name in required and split.labeled:
            emptied += [os.path.join(split.dir, c) for c in manifest.class_names if c not in folders]
        if keep or name in required:
            splits[name] = kept
    if emptied:
        inside = [b for b in bad if any(b.path.startswith(d + os.sep) for d in emptied)]
        raise DataError(
            f"Leaving out the unusable files leaves no images in {', '.join(emptied)}:\n"
            f"{describe(inside, manifest.root)}\nFix or replace these files."
        )
    return replace(manifest, splits=splits, bad=())


def verify(manifest, data_config, run_dir, log=print):
    """Check every file of ``manifest``; stop with the full list, or leave them out (skip_bad).

    Args:
        manifest: from ``data.scan(..., strict=False)``.
        data_config: a ``config.DataConfig`` (``skip_bad``, ``max_pixels``).
        run_dir: where ``skipped.txt`` goes when files are left out.
        log: progress and summary lines.

    Returns:
        The manifest, unchanged when every file is usable, else without the unusable files.

    Raises:
        DataError: unusable files and not ``skip_bad`` (the message lists every one), or
            leaving them out would empty a class folder of the train or validation split.
    """
    bad = check(manifest, data_config.max_pixels, log)
    if not bad:
        return manifest
    if not data_config.skip_bad:
        raise problems_error(bad, manifest.root, "Fix or remove these files, or pass --skip-bad "
                             "(data.skip_bad: true) to leave them out of the run.")
    kept = leave_out(manifest, bad)
    try:
        where = write_skipped(run_dir, bad)
    except OSError as err:
        raise problems_error(bad, manifest.root, f"Could not write the list to {run_dir}: {err}.") from None
    log(f"Left out {len(bad):,} unusable file{'s' if len(bad) != 1 else ''} (listed in {where})")
    return kept
