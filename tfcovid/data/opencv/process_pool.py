"""Worker processes for the OpenCV train pipeline's per-image work (``data.resample_processes``).

In one process, the batched call's rows run on threads that take Python's global lock back
after every OpenCV call. On many cores those hand-overs, not the work, set the pace
(measured on a GPU host: docs/performance.md, "Worker processes"). Here each worker process
has its own lock:

- ``WorkerStore`` is a train split's decoded-image cache split among N processes by image
  index (image i lives in worker i % N, in its memory or as a raw pixel file in the disk
  cache's folder). The parent keeps only each image's shape (what an epoch's plan needs).
- Per batch, the parent sends each worker its rows (index, transform, k, and for an image not
  yet cached where its pixels come from: a file to read and decode, or pixels TensorFlow
  decoded); the workers decode, keep, resample and write the RGB views straight into a shared
  batch buffer (Linux ``memfd``), which the parent copies out. Rows OpenCV cannot decode as
  planned come back as failed: the parent decodes them with TensorFlow (``fallback``, which
  names an undecodable file) and sends the pixels to their worker.

Same pixels as the threads (the same ``tfcovid.data.opencv.images`` functions; tested). The
processes and pipes are ``processes.WorkerProcesses``; what runs in each worker (``python -m
tfcovid.data.opencv.worker``, NumPy and OpenCV only) is ``worker``.
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np

from tfcovid.config.checks import resample_processes
from tfcovid.data.opencv import images
from tfcovid.data.opencv.processes import WorkerProcesses
from tfcovid.data.opencv.worker import PIXELS, STORED
from tfcovid.utils.text import plural

START_SECONDS = 120.0  # how long ``WorkerStore.start`` waits for every worker to be ready


def available() -> bool:
    """Worker processes need OpenCV and Linux's memfd (the shared batch buffers)."""
    return images.cv2 is not None and hasattr(os, "memfd_create")


# ``auto`` uses worker processes from this many usable cores: threads scale to ~4, beat
# processes on 2 cores, and from 8 the lock limits them (figures: docs/performance.md).
AUTO_MIN_CORES = 8


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def processes_for(setting: int | str, share: int = 1) -> int:
    """``data.resample_processes`` as a number of worker processes (0: threads). ``auto``: one
    per usable core but one (the training process's) on a host with at least
    ``AUTO_MIN_CORES`` where they can run (Linux, OpenCV), else 0; with ``share`` training
    processes on the host (multi-worker on one machine), of its cores divided among them. A
    number is taken as it is."""
    count = resample_processes(setting)
    if count is None:
        cores = usable_cores() // max(share, 1)
        return cores - 1 if cores >= AUTO_MIN_CORES and available() else 0
    return count


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a live process, from Linux's /proc: the sum of its threads' run time in
    nanoseconds (``task/*/schedstat``), else user + system time in clock ticks (``stat``, 10 ms
    steps: too coarse for a pass of a few hundredths of a second); 0 where neither can be read
    (the process has ended, or no /proc)."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        threads = []
    total, read = 0, False
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
            read = True
        except (OSError, ValueError, IndexError):  # a thread that ended since, or no schedstat
            continue
    if read:
        return total / 1e9
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class WorkerStore:
    """The decoded-image cache of a train split whose rows run in ``processes`` workers.

    Has ``ArrayStore``'s reporting side (``state``, ``count``, ``nbytes``, ``describe``) for the
    pipeline and the logs; ``resample`` replaces the threads' ``augment.warp_rows`` call.

    Args:
        size: images in the split (indices 0 .. size - 1).
        name: a label for messages (e.g. the split).
        mode: "memory" or "disk" (raw pixel files under ``directory``, one folder per run).
        directory: the disk cache's folder (a fresh one; required for "disk").
        processes: worker processes (at least 1).
    """

    def __init__(self, size: int, name: str = "", mode: str = "memory", directory: str | None = None,
                 processes: int = 2):
        if mode not in ("memory", "disk"):
            raise ValueError(f"Unknown store mode {mode!r}. Valid modes: memory, disk.")
        if mode == "disk" and not directory:
            raise ValueError("A disk WorkerStore needs its folder.")
        if processes < 1:
            raise ValueError(f"resample_processes must be >= 1, got {processes}.")
        self.mode, self.name, self.directory = mode, name, directory
        self.size, self.processes = size, processes
        self._shapes = np.full((size, 3), -1, np.int32)  # (h, w, c) of each stored image
        self._bytes = 0
        self._lock = threading.Lock()
        self._pool: WorkerProcesses | None = None
        self._pool_lock = threading.Lock()

    # ----------------------------------------------------------------- reporting (parent side)

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """(stored bool [N], (height, width) int32 [N] of the stored images, -1 elsewhere)."""
        with self._lock:
            shapes = self._shapes.copy()
        return shapes[:, 0] >= 0, shapes[:, :2].copy()

    def stored(self, indices) -> np.ndarray:
        """Whether each of ``indices`` is in the cache (bool array)."""
        return self._shapes[indices, 0] >= 0

    def count(self) -> int:
        return int((self._shapes[:, 0] >= 0).sum())

    def nbytes(self) -> int:
        return self._bytes

    def describe(self) -> str:
        where = "memory" if self.mode == "memory" else f"disk ({self.directory})"
        return (f"{self.name or 'cache'}: {plural(self.count(), 'image')}, {self._bytes / 2**20:.1f} MB in {where} "
                f"of {self.processes} resample processes")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) its worker processes have used so far; 0 before they start."""
        pool = self._pool
        return sum(map(process_cpu_seconds, pool.pids())) if pool is not None else 0.0

    def start(self, count: int, size: int, timeout: float = START_SECONDS) -> None:
        """Start the workers for batches of ``count`` S x S views now (the pipeline does, when
        it is built) and wait until each is ready (~0.3 s: Python, NumPy, OpenCV), so that a
        worker that cannot start is known here, not at the first batch.

        Raises:
            OSError, RuntimeError: they could not start (no memfd, a process limit, a worker
                that ended or did not answer within ``timeout`` seconds); they are stopped.
        """
        try:
            self._pool_for(count, size).wait_ready(timeout)
        except (OSError, RuntimeError):
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers (their cache goes with them); a later ``resample`` starts new ones."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        with self._lock:
            self._shapes[:] = -1
            self._bytes = 0

    # --------------------------------------------------------------------------- the batch

    def resample(self, size: int, indices, kinds, shapes, halvings, transforms, ks, payload,
                 fallback) -> np.ndarray:
        """The batch (count, S, S, 3) uint8: row i is image ``indices[i]`` resampled through
        ``transforms[i]`` (pre-shrunk by ``ks[i]``), as ``augment.warp_rows`` makes it.

        ``kinds[i]``: ``STORED`` (from the cache), ``DECODE`` (``payload(i)`` is a local path
        or the file's bytes), or ``PIXELS`` (``payload(i)`` is the image); ``shapes[i]`` (and
        ``halvings[i]``) are what the plan assumed. ``fallback(i)`` -> (image, transform, k)
        for a row whose image is not what the plan assumed (a misleading header, a file OpenCV
        cannot decode, a stored image of another size), planned from TensorFlow's pixels.
        """
        count = len(indices)
        pool = self._pool_for(count, size)
        rows = {"index": np.asarray(indices, np.int64), "kind": np.asarray(kinds, np.int8),
                "shape": np.asarray(shapes, np.int32).reshape(count, 3),
                "halvings": np.asarray(halvings, np.int32), "k": np.asarray(ks, np.int32),
                "transform": np.asarray(transforms, np.float32).reshape(count, -1)[:, :8]}
        extra = {i: payload(i) for i in np.flatnonzero(rows["kind"] != STORED).tolist()}
        slot = pool.take_slot()
        try:
            failed = self._run(pool, slot, np.arange(count), rows, extra)
            if failed:  # planned again from TensorFlow's pixels; their workers keep them
                again = np.asarray(failed)
                for i in failed:
                    image, transform, k = fallback(i)
                    extra[i] = np.ascontiguousarray(image, np.uint8)
                    rows["transform"][i], rows["k"][i] = np.asarray(transform, np.float32)[:8], k
                rows["kind"][again] = PIXELS
                failed = self._run(pool, slot, again, rows, extra)
                if failed:
                    raise RuntimeError(f"Resample worker could not take the pixels of images "
                                       f"{rows['index'][failed].tolist()} of {self.name}.")
            return pool.copy_out(slot, count, size)
        finally:
            pool.give_back(slot)

    def _run(self, pool, slot, which, rows, extra) -> list[int]:
        """Send rows ``which`` to their workers, wait, record what they stored; the failed rows."""
        owners = rows["index"][which] % self.processes
        requests = []
        for w in np.unique(owners).tolist():
            mine = which[owners == w]
            part = {key: value[mine] for key, value in rows.items()}
            part["row"] = mine.astype(np.int32)
            requests.append(pool.send(w, slot, part, [extra.get(i) for i in mine.tolist()]))
        failed = []
        for request in requests:
            bad, stored, added = pool.result(request)
            failed.extend(bad)
            if len(stored):
                with self._lock:
                    self._shapes[stored[:, 0]] = stored[:, 1:]
                    self._bytes += added
        return sorted(failed)

    def _pool_for(self, count: int, size: int) -> WorkerProcesses:
        with self._pool_lock:
            if self._pool is None:
                self._pool = WorkerProcesses(self.processes, size, count, self.mode, self.directory)
                weakref.finalize(self, self._pool.close)
            elif count > self._pool.slot_images or size != self._pool.size:  # one dataset, one shape
                raise ValueError(f"{self.name}: batches of {count} x {size} px, but the workers were "
                                 f"started for {self._pool.slot_images} x {self._pool.size} px.")
            return self._pool
