"""Reading ahead on a background thread, within a memory budget.

The converter is I/O bound: while the main thread transposes and hands one tensor to the writer,
this thread `pread`s the next ones (the GIL is released during the read), so the disk never idles.
Tensors larger than `largest` are not copied: the caller streams them from the file mapping in
slabs, keeping memory at one slab.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np

from glm_jax.hf_io import WeightFile


class Prefetcher:
    """Iterates `(weights, key, array)` over `items` in order; `array` is an in-memory copy read ahead
    of time, or None for tensors over `largest` bytes (read them from `weights.tensors[key]`)."""

    def __init__(self, items: list[tuple[WeightFile, str]], *, budget: int = 512 << 20, largest: int = 256 << 20):
        self._items = items
        self._budget, self._largest = budget, largest
        self._results: queue.Queue = queue.Queue()
        self._in_flight = 0
        self._condition = threading.Condition()
        self._stopped = False

    def _read_ahead(self) -> None:
        try:
            for weights, key in self._items:
                size = weights.tensors[key].nbytes
                if size > self._largest:
                    self._results.put((weights, key, None))
                    continue
                with self._condition:
                    while self._in_flight and self._in_flight + size > self._budget and not self._stopped:
                        self._condition.wait()
                    if self._stopped:
                        return
                    self._in_flight += size
                self._results.put((weights, key, weights.read(key)))
        except BaseException as e:  # handed to the consuming thread
            self._results.put(e)

    def __iter__(self) -> Iterator[tuple[WeightFile, str, np.ndarray | None]]:
        thread = threading.Thread(target=self._read_ahead, name="prefetch", daemon=True)
        thread.start()
        try:
            for _ in self._items:
                item = self._results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[2] is not None:
                    with self._condition:
                        self._in_flight -= item[2].nbytes
                        self._condition.notify()
        finally:
            with self._condition:
                self._stopped = True
                self._condition.notify()
