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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import tensorflow as tf

from tfcovid.data import bounds, dicom, headers, tiff
from tfcovid.data.headers import not_regular  # noqa: F401  (also read as checks.not_regular)
from tfcovid.data.types import BadFile, DataError
from tfcovid.utils.atomic import atomic_write_text
from tfcovid.utils.text import escape, one_line

OUTSIDE_CLASS = "outside any class folder: its class is unknown; move it into a class folder"


def _tf_reason(err: tf.errors.OpError) -> str:
    """TensorFlow's message, first line, without the ``{{function_node ...}}`` and ``[Op:...]`` parts."""
    message = (err.message or type(err).__name__).splitlines()[0]
    if message.startswith("{{"):
        message = message.split("}}", 1)[-1].strip()
    return message.split(" [Op:", 1)[0].strip()


def _decode(data: bytes, kind: str) -> None:
    if kind == "DICOM":  # the decode data.decode_image calls; DicomError: a one-line reason
        dicom.to_uint8(data)
    elif kind == "TIFF":  # likewise with data.tiff (Pillow); TiffError: a one-line reason
        tiff.to_uint8(data)
    elif kind == "JPEG":
        # ratio=8 still entropy-decodes every block (so truncation and corrupt data fail),
        # but skips most of the inverse DCT: a full check at a fraction of a decode's cost.
        tf.io.decode_jpeg(data, channels=0, ratio=8)
    else:  # the op data.decode_image uses
        tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)


def check_file(path, max_pixels: int, setting: str = "data.max_pixels") -> str | None:
    """Why ``path`` cannot be used (one line), or None when it decodes as the pipeline will.

    The size is bounded before any decode (``bounds.problem``: pixels, and what decoding
    allocates); ``setting`` names what raises ``max_pixels`` in the message."""
    if (reason := headers.not_regular(path)) is not None:  # it may have changed since the scan
        return reason
    try:
        data = headers.read_bytes(path)
    except OSError as err:
        return headers.unreadable(path, err)
    if (reason := bounds.problem(data, max_pixels, setting)) is not None:
        return reason
    kind = headers.sniff(data[:headers.HEAD_BYTES])
    try:
        _decode(data, kind)
    except (dicom.DicomError, tiff.TiffError) as err:
        return str(err)
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


def check(manifest, max_pixels: int, log=print, threads: int | None = None,
          setting: str = "data.max_pixels") -> list[BadFile]:
    """Every problem with the manifest's files: ``manifest.bad`` plus a full check of each file.

    Args:
        manifest: a ``data.Manifest`` (from ``data.scan(..., strict=False)``).
        max_pixels: larger images are refused from their header, before any decode.
        setting: what raises ``max_pixels``, named in the reason (a key or an option).
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
        reasons = pool.map(lambda item: check_file(item[0], max_pixels, setting), files)
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
    """One line per problem, "path: reason" (paths relative to ``root`` when under it), both
    escaped (:func:`escape_field`): a name may hold a newline, or bytes that are not UTF-8."""
    def shown(path):
        prefix = str(root).rstrip(os.sep) + os.sep if root is not None else None
        return path[len(prefix):] if prefix and path.startswith(prefix) else path
    return "\n".join(f"  {escape(shown(b.path))}: {one_line(b.reason)}" for b in bad)


def problems_error(bad, root, advice: str):
    """The ``data.DataError`` listing every problem, then what to do."""

    noun = "file" if len(bad) == 1 else "files"
    return DataError(f"{len(bad):,} {noun} under {root} cannot be used:\n{describe(bad, root)}\n{advice}")


def only_split(manifest, name: str):
    """The manifest reduced to one split (and that split's ``bad`` files), for checking it alone."""
    return replace(manifest, splits={name: manifest.splits[name]},
                   bad=tuple(b for b in getattr(manifest, "bad", ()) if b.split == name))


def require_usable(manifest, max_pixels: int, log=print, setting: str = "data.max_pixels") -> None:
    """Raise one DataError listing every unusable file (for commands without ``--skip-bad``)."""
    bad = check(manifest, max_pixels, log, setting=setting)
    if bad:
        raise problems_error(bad, manifest.root, "Fix or remove these files.")


# One escaping for every file name tfcovid prints or writes to a line-based file (utils.text).
escape_field = escape


def write_skipped(run_dir, bad) -> Path:
    """Write ``run_dir/skipped.txt`` ("path<TAB>reason" lines, fields escaped with
    :func:`escape_field`) atomically; return its path."""
    target = Path(run_dir) / "skipped.txt"
    lines = [("# files left out of this run (data.skip_bad): path<TAB>reason, with backslash, "
              "tab, newline and carriage return in them written as \\\\, \\t, \\n and \\r, "
              "other unprintable characters as \\uXXXX and bytes that are not UTF-8 as \\xNN")]
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
