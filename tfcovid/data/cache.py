"""A cache of decoded images for the input pipeline: in memory within a budget, else on disk.

Decoding an X-ray costs more CPU than everything else the train pipeline does to it
(docs/performance.md), and it gives the same pixels every epoch. So the first epoch
decodes each image once, at a bounded resolution (see ``working.decode_base``), and stores
it here; later epochs read it back instead of decoding.

The store is random access by image index, so every epoch is still a full reshuffle of the
whole split, as with PyTorch's ``shuffle=True``, with no shuffle buffer of images. For train
splits resampled with OpenCV it is an ``ArrayStore`` (NumPy arrays, or raw pixel files on disk,
filled and read by the batch resampler), else an ``ImageStore`` (a ``tf.lookup`` hash table,
or serialised tensor files on disk, read and filled inside tf.data). It fills itself during the first epoch: an image
missing from the store is decoded and added on the spot, so the first epoch trains while it
fills, and an interrupted epoch loses nothing.

A disk cache lives in a fresh temporary folder (under ``directory`` or ``$TMPDIR``) that is
deleted when the process exits; caches are never shared between processes.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading

import numpy as np
import tensorflow as tf

from tfcovid.data.opencv import pixel_files, process_pool
from tfcovid.utils.text import plural

MODES = ("auto", "memory", "disk", "none")


_OVERHEAD = pixel_files.OVERHEAD  # bytes per cached image beyond its pixels: serialisation, table entry


class ImageStore:
    """Decoded uint8 images by index, in memory (a hash table) or as files on disk.

    ``lookup(index)`` returns (found, image); ``put(index, image)`` adds one. Both are TF ops,
    usable inside tf.data map functions from many threads.

    Args:
        mode: "memory" or "disk".
        directory: parent folder of a disk cache (default: the system's temporary folder).
        name: a label for messages (e.g. the split).
    """

    def __init__(self, mode: str, directory: str | None = None, name: str = ""):
        if mode not in ("memory", "disk"):
            raise ValueError(f"Unknown store mode {mode!r}. Valid modes: memory, disk.")
        self.mode, self.name = mode, name
        # memory: index -> serialised image; disk: index -> "1" once its file is complete.
        self._table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.string, "")
        self._bytes = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.directory = _temporary_folder(directory, name) if mode == "disk" else None

    def _file(self, index):
        return tf.strings.join([self.directory, "/", tf.strings.as_string(index), ".tensor"])

    def lookup(self, index):
        """(found, uint8 image (H, W, C)); the image is a dummy (0, 0, 1) when not found."""
        index = tf.cast(index, tf.int64)
        value = self._table.lookup(index)
        found = tf.strings.length(value) > 0

        def read():
            data = value if self.mode == "memory" else tf.io.read_file(self._file(index))
            return tf.io.parse_tensor(data, tf.uint8)

        image = tf.cond(found, read, lambda: tf.zeros([0, 0, 1], tf.uint8))
        image.set_shape([None, None, None])
        return found, image

    def through(self, index, make):
        """The image stored under ``index``, else ``make()``'s image, stored on the way (TF ops,
        for a tf.data map function)."""
        found, cached = self.lookup(index)

        def fresh():
            image = make()
            with tf.control_dependencies([self.put(index, image)]):
                return tf.identity(image)

        image = tf.cond(found, lambda: cached, fresh)
        image.set_shape([None, None, None])
        return image

    def put(self, index, image):
        """Add ``image`` (uint8) under ``index``; returns the op (the entry is visible last)."""
        index = tf.cast(index, tf.int64)
        data = tf.io.serialize_tensor(tf.convert_to_tensor(image, tf.uint8))
        if self.mode == "memory":
            value, written = data, tf.no_op()
        else:
            value, written = tf.constant("1"), tf.io.write_file(self._file(index), data)
        with tf.control_dependencies([written]):
            counted = self._bytes.assign_add(tf.cast(tf.strings.length(data), tf.int64) + _OVERHEAD)
        with tf.control_dependencies([counted]):
            return self._table.insert(index[None], value[None])

    def count(self) -> int:
        """Images stored so far."""
        return int(self._table.size())

    def nbytes(self) -> int:
        """Bytes stored so far (pixels plus a small per-image overhead)."""
        return int(self._bytes.numpy())

    def describe(self) -> str:
        return _describe(self)


class ArrayStore:
    """Decoded images as NumPy arrays by index, in memory or as raw pixel files on disk: the
    train split's store when OpenCV resamples (``batches.resampler`` fills it and
    reads from it, with Python's lock released while it copies, writes or reads).

    ``ImageStore``'s memory table costs CPU per image to fill (serialising, copying into the
    table under its lock; figures in docs/performance.md) and two more copies to read
    back, all inside tf.data's per-image map; here the batch resampler keeps each new image
    (the array OpenCV decoded it into, or one copy) and reads it back in place, so a cached
    image never passes through TensorFlow again. ``state()`` tells an epoch, once, which
    images are stored (and their true sizes), so that epoch decodes only the others.

    Args:
        size: images in the split (indices 0 .. size - 1).
        name: a label for messages (e.g. the split).
        mode: "memory" or "disk".
        directory: parent folder of a disk cache (default: the system's temporary folder).
    """

    def __init__(self, size: int, name: str = "", mode: str = "memory", directory: str | None = None):
        if mode not in ("memory", "disk"):
            raise ValueError(f"Unknown store mode {mode!r}. Valid modes: memory, disk.")
        self.mode, self.name = mode, name
        self.directory = _temporary_folder(directory, name) if mode == "disk" else None
        # memory: the image; disk: its shape, once its file is complete. None: not stored.
        self._entries: list = [None] * size
        self._bytes = 0
        self._lock = threading.Lock()

    def _shape(self, entry) -> tuple:
        return entry.shape if self.mode == "memory" else entry

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """(stored bool [N], (height, width) int32 [N] of the stored images, -1 elsewhere)."""
        entries = list(self._entries)
        stored = np.array([e is not None for e in entries], bool)
        shapes = np.array([self._shape(e)[:2] if e is not None else (-1, -1) for e in entries], np.int32)
        return stored, shapes.reshape(len(entries), 2)

    def get(self, index: int) -> np.ndarray | None:
        """The stored image (H, W, C) uint8, or None. In memory it is not a copy (read-only)."""
        entry = self._entries[index]
        if entry is None or self.mode == "memory":
            return entry
        return pixel_files.read(self.directory, index, entry)  # its shape is kept here

    def put(self, index: int, image: np.ndarray, copy: bool = True) -> np.ndarray:
        """Keep ``image`` under ``index`` and return it as kept (an index is stored once: later
        puts of it change nothing). ``copy=False``: ``image`` is a fresh contiguous uint8 array
        nothing else writes to, which memory keeps as it is. On disk the file is written under
        a temporary name and renamed, so a stored index always has a whole file."""
        if copy or not image.flags.c_contiguous or image.dtype != np.uint8:
            image = np.array(image, np.uint8, order="C")
        if self.mode == "disk" and self._entries[index] is None:
            pixel_files.write(self.directory, index, image)
        image.flags.writeable = False
        with self._lock:
            if self._entries[index] is None:
                self._entries[index] = image if self.mode == "memory" else image.shape
                self._bytes += image.nbytes + _OVERHEAD
            return image if self.mode == "disk" else self._entries[index]

    def lookup(self, index):
        """(found, image) as ``ImageStore.lookup`` gives them, for inspection (eager)."""
        image = self.get(int(index))
        if image is None:
            return tf.constant(False), tf.zeros([0, 0, 1], tf.uint8)
        return tf.constant(True), tf.constant(image)

    def count(self) -> int:
        """Images stored so far."""
        return sum(e is not None for e in self._entries)

    def nbytes(self) -> int:
        """Bytes stored so far (pixels plus a small per-image overhead)."""
        return self._bytes

    def describe(self) -> str:
        return _describe(self)


def _describe(store) -> str:
    where = "memory" if store.mode == "memory" else f"disk ({store.directory})"
    return f"{store.name or 'cache'}: {plural(store.count(), 'image')}, {store.nbytes() / 2**20:.1f} MB in {where}"


def _temporary_folder(parent: str | None, name: str) -> str:
    """A fresh folder for a disk cache under ``parent`` (default: the system's temporary
    folder), deleted when the process exits (``parent`` too, if it is then empty)."""
    if parent:
        os.makedirs(parent, exist_ok=True)
        atexit.register(_remove_if_empty, parent)  # atexit runs last-in first-out
    folder = tempfile.mkdtemp(prefix=f"tfcovid-cache-{name}-", dir=parent or None)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}" if n < 10 * 2**20 else f"{n / 2**20:.0f}"


def _remove_if_empty(directory: str) -> None:
    try:
        os.rmdir(directory)
    except OSError:
        pass


class Cache:
    """The cache policy of one run: picks memory or disk per split within one memory budget.

    Args:
        mode: "auto" (memory while the estimate fits what is left of the budget, else disk),
            "memory", "disk" or "none".
        budget_mb: memory budget for all splits together, in MiB.
        directory: parent folder for disk caches (default: the system's temporary folder).
        processes: ``data.resample_processes``: worker processes for an OpenCV train split's
            rows and cache (``process_pool.processes_for``: "auto" or a number; 0: threads).
        share: training processes on this host, whose cores ``auto`` divides among them.
    """

    def __init__(self, mode: str = "auto", budget_mb: float = 2048, directory: str | None = None,
                 processes: int | str = 0, share: int = 1):
        if mode not in MODES:
            raise ValueError(f"Unknown cache mode {mode!r}. Valid modes: {', '.join(MODES)}.")
        if budget_mb < 0:
            raise ValueError(f"The cache budget must be >= 0 MB. Received: {budget_mb}")
        self.mode, self.budget = mode, int(budget_mb * 2**20)
        self.directory = directory
        self.processes = process_pool.processes_for(processes, share)  # "auto" -> a number (0: threads)
        self.processes_setting, self.share = processes, share
        self.worker_error: str | None = None  # why worker processes could not start (threads instead)
        self.used = 0
        self.stores: list = []
        self.plans: list[str] = []

    def store_for(self, name: str, estimated: int, arrays: int | None = None, workers: bool = False):
        """A new store for split ``name`` whose cache should take about ``estimated`` bytes.

        ``arrays``: the split's size, when its pipeline resamples with OpenCV: the store is
        then an ``ArrayStore`` (NumPy arrays or raw pixel files) instead of an ``ImageStore``
        (a TensorFlow table, or files it writes inside tf.data). ``workers``: the pipeline can
        run its rows in worker processes; with ``processes`` > 0 (and Linux) the store is then
        a ``process_pool.WorkerStore``, the cache split among them.
        """
        if self.mode == "none":
            return None
        mode = self.mode
        if mode == "auto":
            mode = "memory" if self.used + estimated <= self.budget else "disk"
        if mode == "memory":
            self.used += estimated
        if arrays is not None and workers and self.processes and process_pool.available():
            folder = _temporary_folder(self.directory, name) if mode == "disk" else None
            store = process_pool.WorkerStore(arrays, name, mode, folder, self.processes)
        elif arrays is not None:
            store = ArrayStore(arrays, name, mode, self.directory)
        else:
            store = ImageStore(mode, self.directory, name)
        self.stores.append(store)
        where = "memory" if mode == "memory" else f"disk, {store.directory}"
        self.plans.append(f"{name} ~{_mb(estimated)} MB in {where}")
        return store

    def started(self, store, count: int, size: int):
        """``store`` with its worker processes started for batches of ``count`` S x S views, when
        it is a ``process_pool.WorkerStore`` (else as it is). Where they cannot start, an
        ``ArrayStore`` takes its place (the rows run on threads) and ``worker_error`` says why:
        a default of ``auto`` must not stop a fit that threads can run."""
        if not isinstance(store, process_pool.WorkerStore):
            return store
        try:
            store.start(count, size)
            return store
        except (OSError, RuntimeError) as error:
            self.worker_error = str(error)
        if store.directory:
            _remove_if_empty(store.directory)
        threads = ArrayStore(store.size, store.name, store.mode, self.directory)
        i = self.stores.index(store)
        self.stores[i] = threads
        if store.directory:
            self.plans[i] = self.plans[i].replace(store.directory, threads.directory)
        return threads

    def describe(self) -> str:
        """One line: the plan per split and the budget (estimates, before anything is cached)."""
        if self.mode == "none":
            return "decoded-image cache off (data.cache none): every epoch decodes every image"
        if not self.plans:
            return "decoded-image cache: not used by these splits"
        return (f"decoded-image cache ({self.mode}): " + "; ".join(self.plans)
                + f" (memory budget {self.budget / 2**20:.0f} MB)")

    def usage(self) -> str:
        """One line: what the stores actually hold now."""
        return "; ".join(s.describe() for s in self.stores) or "nothing cached"

    def nbytes(self) -> int:
        """Bytes held by all stores now."""
        return sum(s.nbytes() for s in self.stores)


def as_cache(cache) -> Cache | None:
    """Accept None, a mode name or a Cache (shared by several splits)."""
    if cache is None or isinstance(cache, Cache):
        return cache
    if isinstance(cache, str):
        return Cache(cache)
    raise TypeError(f"cache must be None, a mode ({', '.join(MODES)}) or a Cache. Received: {cache!r}")
