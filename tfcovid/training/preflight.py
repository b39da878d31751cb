"""Up-front checks: what would otherwise fail an hour into a run fails before its first step.

``fit`` calls these after the config is resolved and the data scanned, before it builds the
model's training loop: an output folder that cannot be written, too little free disk for the
checkpoints, and a batch larger than the train split. Each raises :class:`PreflightError`
naming the path or value and what to do. (An image size below the backbone's minimum is a
config error; see ``tfcovid.config.MIN_IMAGE_SIZE``.)
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Mapping

from tfcovid.utils.text import plural

BYTES_PER_VALUE = 4  # checkpoints hold float32 weights and optimizer slots, whatever the precision


# Optimizer slots per trainable weight: Adam keeps two moments, SGD with momentum one velocity.
SLOTS = {"adam": 2, "sgd": 1}


# best.keras, last.keras and the resume backup, plus the temporary file one of them is written
# to before it is renamed into place (atomic replace: old and new exist together for a moment).
CHECKPOINT_COPIES = 3 + 1


MARGIN_BYTES = 64 * 2**20  # history.csv, metrics.json, plots and TensorBoard logs


PROBE_NAME = ".tfcovid-write-probe"


class PreflightError(ValueError):
    """A run cannot start; the message names the path or value and what to do."""


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists.

    Raises:
        OSError: other than "no such file" (a name too long, a folder that cannot be searched):
            Path.exists would raise those too.
    """
    for candidate in (path, *path.parents):
        try:
            candidate.stat()
            return candidate
        except (FileNotFoundError, NotADirectoryError):
            continue
    return Path(path.anchor or ".")


def _write_probe(folder: Path) -> None:
    """Write and delete a small file in ``folder``: the only reliable test that it is writable.

    ``os.access`` answers for the real user id and ignores read-only mounts, ACLs and root's
    exemption from mode bits; writing a file answers for this process, here, now.
    """
    probe = folder / f"{PROBE_NAME}-{os.getpid()}"
    try:
        probe.write_bytes(b"tfcovid")
    finally:
        probe.unlink(missing_ok=True)


def _why(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "read-only file system"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    if isinstance(err, PermissionError) or err.errno in (errno.EACCES, errno.EPERM):
        return f"Permission denied (writing {err.filename})" if err.filename else "Permission denied"
    return err.strerror or str(err)


def check_output_dir(out: str | Path) -> Path:
    """Make sure run directories can be created under ``out``; return it as an absolute path.

    ``out`` may not exist yet: then its nearest existing ancestor must be a folder where it can
    be created. The check really creates ``out`` and writes and deletes a probe file in it;
    folders it created are removed again, so a run that stops later leaves nothing behind.

    Raises:
        PreflightError: ``out`` or an ancestor is a file, or the folder cannot be created or
            written (permissions, read-only file system, full disk).
    """
    out = Path(out).expanduser().absolute()
    try:
        base = _nearest_existing(out)
    except OSError as err:
        raise _unwritable(out, out, err) from None
    if base == out and not out.is_dir():
        raise PreflightError(f"--out {out} is a file, not a folder. Choose a folder for the run "
                             "directories (it is created if missing).")
    if not base.is_dir():
        raise PreflightError(f"--out {out} cannot be created: {base} is a file. Choose another "
                             "--out (a folder, or a path below one).")
    created = [p for p in (out, *out.parents) if base in p.parents]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_probe(out)
    except OSError as err:
        raise _unwritable(out, _nearest_existing(out), err) from None
    finally:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
    return out


def _unwritable(out: Path, where: Path, err: OSError) -> PreflightError:
    if err.errno == errno.ENOENT and where.is_dir():  # it exists, yet says "no such file": /proc, /sys
        missing = Path(err.filename) if err.filename else out
        return PreflightError(
            f"--out {out}: cannot create the folder {missing}: {where} takes no new folders "
            f"({err.strerror}; a virtual file system such as /proc or /sys). Choose another --out, "
            "a folder on a disk (e.g. --out runs).")
    return PreflightError(f"--out {out}: cannot write in {where}: {_why(err)}. Choose another "
                          "--out, or make that folder writable.")


def checkpoint_bytes(total_params: int, trainable_params: int, optimizer: str,
                     momentum: float) -> int:
    """Disk space the run's checkpoints need at their peak, in bytes.

    One copy is float32 weights plus the optimizer's float32 slots::

        copy = 4 * (total_params + slots * trainable_params)
        slots = 2 for Adam, 1 for SGD with momentum > 0, 0 for plain SGD

    and the peak is ``4 copies + 64 MiB``: best.keras, last.keras and the resume backup, one
    temporary copy while a file is replaced atomically, and a margin for history, metrics,
    plots and TensorBoard logs. It overestimates when only weights are saved, which is the
    safe side.
    """
    slots = SLOTS.get(optimizer, 2) if optimizer != "sgd" or momentum > 0 else 0
    copy = BYTES_PER_VALUE * (int(total_params) + slots * int(trainable_params))
    return CHECKPOINT_COPIES * copy + MARGIN_BYTES


def held_bytes(run: str | Path) -> int:
    """Bytes a run's checkpoints and backup weights hold now (a hard link counted once): a
    resumed run replaces these files, so their space counts towards what it needs."""
    seen, total = set(), 0
    for pattern in ("checkpoints/*.keras", "backup/*.h5"):
        for path in Path(run).glob(pattern):
            try:
                st = path.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def check_free_disk(path: str | Path, needed: int, resume: bool = False) -> None:
    """Fail unless the file system holding ``path`` (or its nearest existing ancestor) has
    ``needed`` bytes free; for a resumed run (``resume``: ``path`` is the run) the space its
    checkpoints already hold counts as available, since they are replaced.

    Raises:
        PreflightError: too little space; the message gives both sizes and the folder.
    """
    where = _nearest_existing(Path(path).expanduser().absolute())
    free = shutil.disk_usage(where).free
    held = held_bytes(where) if resume else 0
    if free + held < needed:
        # --resume keeps the run where it is (it refuses --out): only freeing space helps.
        advice = (f"free space there, then resume again: tfcovid fit --resume {where}" if resume
                  else "free space or choose another --out")
        kept = f" (plus {held / 1e9:.2f} GB its checkpoints hold now)" if held else ""
        raise PreflightError(
            f"The run needs about {needed / 1e9:.2f} GB for checkpoints (best, last, backup), "
            f"only {free / 1e9:.2f} GB free on {where}{kept}; {advice}.")


def check_batch_size(split_sizes: Mapping[str, int], batch_size: int) -> None:
    """Fail when the (global) batch is larger than the train split.

    Such a batch can never be filled: where the last partial batch is dropped (multi-replica
    strategies) an epoch has no step at all, and otherwise every step sees fewer images than
    the config says, so the learning rate no longer means what it was tuned for. Validation
    and test splits may be smaller than the batch: evaluation takes a partial batch.

    Raises:
        PreflightError: naming both numbers and the largest batch size that fits.
    """
    train = split_sizes.get("train")
    if train is not None and batch_size > train:
        raise PreflightError(
            f"--batch-size {batch_size} is larger than the train split ({plural(train, 'image')}); use "
            f"--batch-size {train} or less.")
