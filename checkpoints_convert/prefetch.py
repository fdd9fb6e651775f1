"""Producing ahead on a background thread, within a memory budget.

The converters are I/O bound: while the main thread writes one tensor, a second thread reads (and,
for the export, merges and transposes) the next ones. File reads and NumPy copies release the GIL,
so the two overlap even in Python.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
_DONE = object()


def read_ahead(items: Iterable[Item], nbytes: Callable[[Item], int], budget: int = 512 << 20) -> Iterator[Item]:
    """Yields `items`, computed on a background thread that stays at most `budget` bytes (plus one item)
    ahead of the consumer; an exception raised while producing is raised here, in order."""
    results: queue.Queue = queue.Queue()
    condition = threading.Condition()
    state = {"ahead": 0, "stopped": False}

    def produce() -> None:
        try:
            for item in items:
                size = nbytes(item)
                with condition:
                    while state["ahead"] and state["ahead"] + size > budget and not state["stopped"]:
                        condition.wait()
                    if state["stopped"]:
                        return
                    state["ahead"] += size
                results.put((item, size))
            results.put(_DONE)
        except BaseException as e:  # handed to the consuming thread
            results.put(e)

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while (entry := results.get()) is not _DONE:
            if isinstance(entry, BaseException):
                raise entry
            item, size = entry
            yield item
            with condition:
                state["ahead"] -= size
                condition.notify()
    finally:
        with condition:
            state["stopped"] = True
            condition.notify()
