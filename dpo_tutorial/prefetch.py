"""Batches prepared in the background while the model trains on the previous one.

Decoding two JPEGs per pair, resizing, cropping and flipping them (or reading the latent cache) does
not depend on the weights, so it can run while the UNet passes run. :class:`Prefetcher` drives any
batch stream with a ``state_dict()`` (:class:`dpo_tutorial.data.PairStream`) in one background thread,
``depth`` batches ahead, and keeps three promises:

- **the same batches in the same order** as iterating the stream directly (one producer, and every
  random choice of the data path is seeded per row, not drawn from a shared generator);
- **exact resume**: :meth:`Prefetcher.state_dict` is the stream's state right after the last batch the
  *trainer* took, not after the batches still waiting in the queue;
- **measured waiting**: :attr:`Prefetcher.last_wait` is how long the trainer waited for its last batch
  (``data_seconds`` in ``history.jsonl``); near zero means the run is not input-bound.

An exception in the producer is raised in the trainer at the batch where it happened.
"""
from __future__ import annotations

import queue
import threading
import time


class Prefetcher:
    """Iterate ``stream`` in a background thread, ``depth`` batches ahead (``depth=0``: no thread)."""

    _DONE = object()

    def __init__(self, stream, depth: int = 2):
        self.stream = stream
        self.depth = depth
        self.last_wait = 0.0  # seconds the last next() waited for its batch
        self.total_wait = 0.0  # seconds waited over all batches
        self._state = stream.state_dict()
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._iter = iter(stream)
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._produce, name="dpo-prefetch", daemon=True)
            self._thread.start()

    def _produce(self) -> None:
        try:
            for batch in self._iter:
                item = (batch, self.stream.state_dict())  # the state a resume needs after this batch
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put((self._DONE, None))
        except BaseException as err:  # handed to the trainer, raised there
            self._queue.put((err, None))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """The next batch; records how long it had to wait for it."""
        t0 = time.perf_counter()
        if self._thread is None:
            batch = next(self._iter)
            state = self.stream.state_dict()
        else:
            batch, state = self._queue.get()
        self.last_wait = time.perf_counter() - t0
        self.total_wait += self.last_wait
        if batch is self._DONE:
            raise StopIteration
        if isinstance(batch, BaseException):
            raise batch
        self._state = state
        return batch

    def state_dict(self) -> dict:
        """The stream's state after the last batch this prefetcher handed out (what a checkpoint stores)."""
        return self._state

    def close(self) -> None:
        """Stop the background thread (batches already prepared are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
