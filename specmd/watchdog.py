"""The watchdog: an asynchronous thread that drains the prefetch queue into the slot cache.

Requests are ``(distance, sequence, target, key)``: nearest layer first, then submission order. The
thread waits until fewer than ``max_inflight`` prefetch copies are running, pops as many as may start
(one wake-up, one GIL handoff, for the lot), asks ``SlotCache.prefetch_if_room`` to copy each (which
queues it again when the model's thread took the room meanwhile, and drops requests whose layer already
ran, keys already resident, and requests that would need to evict a pinned slot or another pending
prefetch). Demand misses never enter this queue: the model's thread issues them itself, at once, so no
demand ever waits behind a queued prefetch. An exception in the thread is kept and raised in the model's
thread at its next call; ``close`` stops and joins the thread.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading

import torch

from .cache import Key, SlotCache

log = logging.getLogger(__name__)


class Watchdog:
    """One daemon thread per offloaded model; started on construction, joined by ``close``."""

    def __init__(self, cache: SlotCache) -> None:
        self._cache = cache
        self._cond = threading.Condition()  # guards _heap, _stopping, error
        self._heap: list[tuple[int, int, int, Key]] = []
        self._sequence = itertools.count()
        self._stopping = False
        self._busy = False  # a popped request is being processed
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="specmd-watchdog", daemon=True)
        self._thread.start()

    def submit(self, requests: list[tuple[int, int, Key]]) -> None:
        """Queue ``(distance, target position, key)`` prefetch requests; does not block on copies."""
        if not requests:
            return
        with self._cond:
            for distance, target, key in requests:
                heapq.heappush(self._heap, (distance, next(self._sequence), target, key))
            self._cond.notify()

    def raise_if_failed(self) -> None:
        """Re-raise, in the caller's thread, an exception the watchdog hit."""
        if self.error is not None:
            raise RuntimeError(f"specmd watchdog thread failed: {self.error!r}") from self.error

    def wait_idle(self) -> None:
        """Block until the queue is empty and the request in hand is done (``Engine.stats``, tests)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._heap and not self._busy or self._stopping or self.error)

    def close(self) -> None:
        """Stop and join the thread; queued requests are dropped. Safe to call twice."""
        with self._cond:
            self._stopping = True
            self._heap.clear()
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        try:
            if self._cache.device.type == "cuda":
                torch.cuda.set_device(self._cache.device)
            while True:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._heap or self._stopping)
                    if self._stopping:
                        return
                # Only then pick the requests: the queue may have moved on (stale ones are dropped).
                room = self._cache.wait_for_prefetch_room()
                with self._cond:
                    if self._stopping:
                        return
                    if not self._heap:
                        continue
                    # As many as may start now, in one go: every wake-up of this thread takes the GIL
                    # from the model's thread (on the H100 the thread cost 5 ms per token at 25%
                    # even when it copied nothing).
                    batch = [heapq.heappop(self._heap) for _ in range(min(room or 1, len(self._heap)))]
                    self._busy = True
                for i, (_, _, target, key) in enumerate(batch):
                    if self._cache.prefetch_if_room(key, target) is None:  # the model's thread took the room
                        with self._cond:
                            for request in batch[i:]:
                                heapq.heappush(self._heap, request)
                        break
        except BaseException as err:  # noqa: BLE001 - surfaced in the model's thread
            log.exception("specmd watchdog failed")
            with self._cond:
                self.error = err
                self._stopping = True
                self._busy = False
                self._heap.clear()
                self._cond.notify_all()
