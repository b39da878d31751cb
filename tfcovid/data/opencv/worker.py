"""The worker side of ``process_pool``: what runs in each resample worker process, started by
``WorkerProcesses`` as ``python -m tfcovid.data.opencv.worker`` (NumPy and OpenCV only, no
TensorFlow). It holds its share of the cache and answers the parent's batches of rows until
its task pipe ends.
"""
from __future__ import annotations

import mmap
import os
import signal
import sys
from multiprocessing.connection import Connection

import numpy as np

from tfcovid.data.opencv import images, pixel_files

STORED, DECODE, PIXELS = 0, 1, 2  # how a row's image is had (request "kinds")


READY = -1  # the request id of a worker's first message: started, imports done


class _Cache:
    """One worker's share of the cache: images in memory, or raw pixel files on disk."""

    def __init__(self, mode: str, directory: str):
        self.mode, self.directory = mode, directory
        self.entries: dict[int, object] = {}

    def get(self, index: int):
        entry = self.entries.get(index)
        if entry is None or self.mode == "memory":
            return entry
        return pixel_files.read(self.directory, index, entry)

    def put(self, index: int, image: np.ndarray) -> int:
        """Keep ``image``; the bytes it adds (0 if it was there)."""
        if index in self.entries:
            return 0
        image = np.ascontiguousarray(image, np.uint8)
        if self.mode == "disk":
            pixel_files.write(self.directory, index, image)
            self.entries[index] = image.shape
        else:
            self.entries[index] = image
        return image.nbytes + pixel_files.OVERHEAD


def serve(task_fd: int, done_fd: int, buffer_fd: int, buffer_bytes: int, size: int, mode: str,
           directory: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C; EOF stops us
    tasks, done = Connection(task_fd, writable=False), Connection(done_fd, readable=False)
    shared = mmap.mmap(buffer_fd, buffer_bytes)
    out = np.frombuffer(shared, np.uint8)
    cache = _Cache(mode, directory)
    done.send((READY, os.getpid()))
    while True:
        try:
            request, offset, rows, extra = tasks.recv()
        except (EOFError, OSError):
            return
        try:
            failed, stored, added = [], [], 0
            for j, row in enumerate(rows["row"].tolist()):
                index, kind = int(rows["index"][j]), int(rows["kind"][j])
                h, w, c = rows["shape"][j].tolist()
                if kind == STORED:  # planned from its stored size, which must be the one kept
                    image = cache.get(index)
                    if image is None or image.shape[:2] != (h, w):
                        failed.append(row)
                        continue
                elif kind == DECODE:
                    data = extra[j]
                    if isinstance(data, str):
                        with open(data, "rb") as f:
                            data = f.read()
                    image = images.decode_file(data, c, int(rows["halvings"][j])) if c in (1, 3) else None
                    if image is None or image.shape[:2] != (h, w):  # the header misled
                        failed.append(row)
                        continue
                else:  # PIXELS: decoded by TensorFlow (and planned from them) in the parent
                    image = images.one_channel_if_gray(extra[j])
                new = cache.put(index, image)
                if new:
                    added += new
                    stored.append((index, *image.shape))
                start = offset + row * size * size * 3
                view = out[start:start + size * size * 3].reshape(size, size, 3)
                images.warp_rgb_into(view, image, rows["transform"][j], int(rows["k"][j]), size)
            result = (failed, np.asarray(stored, np.int64).reshape(-1, 4), added)
        except Exception as error:  # noqa: BLE001  (reported to the parent, which raises it)
            result = f"Resample worker: {type(error).__name__}: {error}"
        done.send((request, result))


if __name__ == "__main__":
    task, done_, buffer_, total, side, store_mode, folder = sys.argv[1:8]
    serve(int(task), int(done_), int(buffer_), int(total), int(side), store_mode, folder)
