"""The watchdog: an asynchronous thread that issues the prefetch copies the main loop could not start.

It waits until the copier has room (``SlotCache.wait_prefetch_room``), takes as many queued requests as may
start, in the one prefetch order (``prefetch.nearest_first``), in one wake-up (one GIL handoff for the lot),
and hands them to ``SlotCache.submit_prefetches``, which drops the stale ones, settles the resident ones,
issues what fits and returns what must wait, which goes back to the queue. Demand misses never enter this
queue: the model's thread issues them itself, at once. An exception in the thread is kept and raised in
the model's thread at its next call; ``close`` stops and joins the thread. Streams and events: the
protocol note in ``runtime/copier.py``.
"""
from __future__ import annotations

import logging
import threading

import torch

from ..cache import SlotCache
from ..prefetch import PrefetchRequest, nearest_first

log = logging.getLogger(__name__)


class Watchdog:
    """One daemon thread per offloaded model; started on construction, joined by ``close``."""

    def __init__(self, cache: SlotCache, device: torch.device) -> None:
        self._cache = cache
        self._device = device
        self._cond = threading.Condition()  # guards _queue, _stopping, _busy, error
        self._queue: list[PrefetchRequest] = []
        self._stopping = False
        self._busy = False  # requests taken from the queue are being submitted
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="specmd-watchdog", daemon=True)
        self._thread.start()

    def submit(self, requests: list[PrefetchRequest]) -> None:
        """Queue prefetch requests; does not block on copies."""
        if not requests:
            return
        with self._cond:
            self._queue.extend(requests)
            self._cond.notify()

    def raise_if_failed(self) -> None:
        """Re-raise, in the caller's thread, an exception the watchdog hit."""
        if self.error is not None:
            raise RuntimeError(f"specmd watchdog thread failed: {self.error!r}") from self.error

    def wait_idle(self) -> None:
        """Block until the queue is empty and the requests in hand are done (``stats``, tests)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and not self._busy or self._stopping or self.error)

    def close(self) -> None:
        """Stop and join the thread; queued requests are dropped. Safe to call twice."""
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _take(self, room: int | None) -> list[PrefetchRequest] | None:
        """The next requests to submit, as many as may start (None: stop)."""
        with self._cond:
            if self._stopping:
                return None
            self._queue = nearest_first(self._queue)
            # As many as may start now, in one go: every wake-up of this thread takes the GIL from the
            # model's thread (on the H100 the thread cost 5 ms per token at 25% even when it copied nothing).
            count = 1 if room is None else room  # None: no bound (plain copies, CPU): one at a time
            batch, self._queue = self._queue[:count], self._queue[count:]
            self._busy = bool(batch)
            return batch

    def _run(self) -> None:
        try:
            if self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            while True:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._queue or self._stopping)
                    if self._stopping:
                        return
                # Only then pick the requests: the queue may have moved on (stale ones are dropped).
                batch = self._take(self._cache.wait_prefetch_room())
                if batch is None:
                    return
                rest = self._cache.submit_prefetches(batch)  # the model's thread may have taken the room
                if rest:
                    with self._cond:
                        self._queue = rest + self._queue
        except BaseException as err:  # noqa: BLE001 - surfaced in the model's thread
            log.exception("specmd watchdog failed")
            with self._cond:
                self.error = err
                self._stopping = True
                self._busy = False
                self._queue.clear()
                self._cond.notify_all()
