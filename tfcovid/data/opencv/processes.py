"""The parent side of the resample worker processes: ``WorkerProcesses`` starts them
(``python -m tfcovid.data.opencv.worker``), sends them rows, routes their replies and holds
the shared batch buffers they write into; ``process_pool.WorkerStore`` drives it.
"""
from __future__ import annotations

import atexit
import itertools
import mmap
import os
import queue
import subprocess
import sys
import threading
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

from tfcovid.data.opencv import images
from tfcovid.data.opencv.worker import READY


class WorkerProcesses:
    """The worker processes of one ``WorkerStore`` and its shared batch buffers."""

    def __init__(self, processes: int, size: int, slot_images: int, mode: str, directory: str | None):
        self.size, self.slot_images = size, slot_images
        self.slot_bytes = slot_images * size * size * 3
        slots = min(max(processes, 2), 8)  # batches in flight at once
        self._fd = os.memfd_create("tfcovid-batches", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.slot_bytes * slots)
        self._map = mmap.mmap(self._fd, self.slot_bytes * slots)
        self._free: queue.Queue = queue.Queue()
        for s in range(slots):
            self._free.put(s)
        self._ids = itertools.count()
        self._pending: dict[int, list] = {}
        self._pending_lock = threading.Lock()
        self._send_locks = [threading.Lock() for _ in range(processes)]
        self._error: str | None = None
        self._closed = False
        self._ready, self._all_ready = 0, threading.Event()
        # The folder holding the tfcovid package (this file is tfcovid/data/opencv/processes.py).
        root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        self._procs, self._to, self._from = [], [], []
        try:
            for _ in range(processes):
                self._start_one(size, mode, directory, slots, env)
        except BaseException:  # e.g. a process limit: those started end with their task pipes
            self.close()
            raise
        self._reader = threading.Thread(target=self._read, name="tfcovid-workers", daemon=True)
        self._reader.start()
        atexit.register(self.close)

    def _start_one(self, size: int, mode: str, directory: str | None, slots: int, env: dict) -> None:
        task_r, task_w = os.pipe()
        done_r, done_w = os.pipe()
        try:
            args = [sys.executable, "-m", "tfcovid.data.opencv.worker", str(task_r), str(done_w), str(self._fd),
                    str(self.slot_bytes * slots), str(size), mode, directory or ""]
            self._procs.append(subprocess.Popen(args, pass_fds=(task_r, done_w, self._fd), env=env,
                                                stdin=subprocess.DEVNULL))
        except BaseException:
            os.close(task_w)
            os.close(done_r)
            raise
        finally:
            os.close(task_r)
            os.close(done_w)
        self._to.append(Connection(task_w, readable=False))
        self._from.append(Connection(done_r, writable=False))

    def wait_ready(self, timeout: float) -> None:
        """Return once every worker has said it is ready; raise RuntimeError when one ended
        first or ``timeout`` seconds passed."""
        if not self._all_ready.wait(timeout):
            raise RuntimeError(f"{len(self._procs) - self._ready} of {len(self._procs)} resample worker "
                               f"processes had not started after {timeout:.0f} s")
        if self._error:
            raise RuntimeError(self._error)

    def take_slot(self) -> int:
        return self._free.get()

    def give_back(self, slot: int) -> None:
        self._free.put(slot)

    def send(self, worker: int, slot: int, rows: dict, extra: list):
        if self._error:
            raise RuntimeError(self._error)
        request, done = next(self._ids), threading.Event()
        holder = [done, None]
        with self._pending_lock:
            self._pending[request] = holder
        with self._send_locks[worker]:
            self._to[worker].send((request, slot * self.slot_bytes, rows, extra))
        return request

    def result(self, request):
        holder = self._pending[request]
        while not holder[0].wait(1.0):
            if self._error:
                raise RuntimeError(self._error)
        with self._pending_lock:
            del self._pending[request]
        if isinstance(holder[1], str):
            raise RuntimeError(holder[1])
        return holder[1]

    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def copy_out(self, slot: int, count: int, size: int) -> np.ndarray:
        view = np.frombuffer(self._map, np.uint8, count * size * size * 3, slot * self.slot_bytes)
        out = images.batch_buffer((count, size, size, 3))  # tf.data takes it as it is, no copy
        np.copyto(out, view.reshape(count, size, size, 3))
        return out

    def _read(self) -> None:
        """Route the workers' replies to the waiting batches; a worker's death fails them all."""
        conns = list(self._from)
        while conns and not self._closed:
            try:
                ready = wait(conns)
            except (OSError, ValueError):  # closed under us
                return
            for conn in ready:
                try:
                    request, result = conn.recv()
                except (EOFError, OSError):
                    conns.remove(conn)
                    if not self._closed:
                        try:
                            code = self._procs[self._from.index(conn)].wait(timeout=2)
                        except subprocess.TimeoutExpired:
                            code = None
                        self._error = (f"A resample worker process stopped (exit code {code}); "
                                       "set data.resample_processes to 0 to resample in threads.")
                        self._all_ready.set()  # wakes wait_ready, which reports the error
                        with self._pending_lock:
                            for holder in self._pending.values():
                                holder[1] = self._error
                                holder[0].set()
                    continue
                if request == READY:
                    self._ready += 1
                    if self._ready == len(self._procs):
                        self._all_ready.set()
                    continue
                with self._pending_lock:
                    holder = self._pending.get(request)
                if holder is not None:
                    holder[1] = result
                    holder[0].set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self._to:
            conn.close()  # a worker exits when its task pipe ends
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for conn in self._from:
            conn.close()
        try:
            self._map.close()
        except BufferError:  # a batch view still exported: freed with the process
            pass
        os.close(self._fd)
