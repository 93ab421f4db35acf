"""Read a remote source ahead of the stream that consumes it.

A stream fills a shuffle window (data.shuffle_buffer raw samples), then decodes it into batches.
Read in turn, the window's network reads and its decoding never overlap: over `hf://` (a 1000-
sample window of 512 px JPEGs is ~70 MB, seconds at one connection's speed) the stream gives no
batch while it refills, and the training loop, which takes batches from the streams in turn,
waits for it. `read_ahead` runs the reading in a thread, up to `size` items ahead, so the next
window arrives while this one is decoded (socket reads and PIL's decoding release the GIL).
The items and their order are those of the plain iterator: batches and resume are unchanged.
Memory: up to `size` more raw samples held per stream.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")


class _End:
    """The reader finished (`error` None) or failed with `error`, to be raised by the consumer."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def read_ahead(items: Iterator[T], size: int) -> Iterator[T]:
    """The items of `items`, produced by a daemon thread up to `size` (at least 1) ahead.
    Closing this generator (or dropping it) stops the thread at its next item and closes
    `items` there; an exception raised by `items` is raised here, after the items before it."""
    ready: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_End())
        except BaseException as err:  # handed to the consumer, raised there
            put(_End(err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # in the thread that iterated it: open files and streams closed now

    thread = threading.Thread(target=produce, name="t2i-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
