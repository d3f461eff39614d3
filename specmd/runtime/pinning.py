"""Pinning host memory in place (issue 13): the store's buffers are allocated pageable and untouched, written
once (by the checkpoint reader, or by a copy), and registered with CUDA (cudaHostRegister) layer by layer on one
background thread, while later layers are still being read.

Why not ``torch.empty(pin_memory=True)``: on the H200 host, pinning a 12 GiB store that way took 6.0 s
(cudaHostAlloc zeroes and locks every page before anything is written), against 1.3 s to touch the same pages
pageable plus 0.9 s to register them (benchmarks/load_h100.py, pinning row). Registered memory is pinned
memory to torch (``is_pinned()``: cudaPointerGetAttributes says host memory) and, with unified addressing
(every 64-bit CUDA host), mapped and portable: copies from it run at link speed, and where the device's
CanUseHostPointerForRegisteredMem is 1 (Hopper on x86) the GPU reads it at the host address
(``gather.host_words`` checks the address and refuses otherwise).

Lifetime: a registration must be undone before its memory is unmapped. The memory is an anonymous mapping owned
by a numpy array, and every tensor over it (the store's buffer, the model's expert views) holds that array;
``weakref.finalize`` on the array unregisters when the last of them dies, and holds the mapping itself until
then, so the unmap always comes after the unregistration, whoever frees last. The store must not be freed while
copies from it are in flight (unregistering memory a copy still reads is undefined): the engines' ``close()``
synchronizes the device before the slots and the store can go.
"""
from __future__ import annotations

import functools
import logging
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

log = logging.getLogger(__name__)

REGISTER_DEFAULT = 0  # cudaHostRegisterDefault: mapped and portable under unified addressing
LOCKED_MEMORY_FIX = "Raise the locked-memory limit (ulimit -l) or free host memory to pin them"

# (bytes of the buffer that could not be pinned, the cause, what the user can do about it)
Failure = tuple[int, str, str]


def pageable(nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
    """``nbytes`` of host memory as a flat uint8 tensor, and the array owning it: an anonymous mapping, page
    aligned and untouched, so its pages are made by the first write into them and by nothing before."""
    # MAP_PRIVATE, not mmap's default MAP_SHARED: a shared anonymous mapping is shmem, which gets no transparent
    # huge pages (shmem_enabled is "never" by default) and which a forked child (a DataLoader worker) would
    # share, writes included. Private anonymous memory is copied on write instead and may use huge pages.
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Huge pages where the kernel's THP mode is "madvise" (the usual default): the first write faults in
        # 2 MiB at a time instead of 4 KiB, and cudaHostRegister locks 512 times fewer pages
        # (Documentation/admin-guide/mm/transhuge.rst). Only a hint: a kernel without THP refuses it.
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    owner = np.frombuffer(mapping, dtype=np.uint8)
    return torch.from_numpy(owner), owner


def _cuda_runtime(device: torch.device) -> tuple[object, Callable[[], None]]:
    """torch's binding of the CUDA runtime (CUDA started on the calling thread), and a call that makes
    ``device`` current on the thread that runs it (tests replace this). Raises where CUDA cannot start."""
    return torch.cuda.cudart(), functools.partial(torch.cuda.set_device, device)


def _unregister(cudart, address: int, mapping: mmap.mmap, pid: int) -> None:
    # ``mapping`` is an argument only to keep the memory mapped until this has run.
    if os.getpid() != pid:  # a forked child's copy of the mapping: the registration is the parent's context's
        return
    result = cudart.cudaHostUnregister(address)
    if int(result) != 0:
        # This runs on whichever thread frees last (usually the model's): a failed runtime call leaves its error
        # as that thread's last error, which torch's next kernel-launch check would raise as its own.
        clear = getattr(cudart, "cudaGetLastError", None)
        if clear is not None:
            clear()
        log.warning("specmd: cudaHostUnregister of host memory at %#x failed (%s)", address,
                    cudart.cudaGetErrorString(result))


class Pinner:
    """Registers memory made by ``pageable`` with ``device``'s CUDA context on one background thread, in the
    order submitted; after the first failure it registers nothing more. A registration is undone when its
    memory's owner dies.

    Create it on the thread that owns the load (CUDA starts there), before anything submits: ``submit`` may be
    called from any thread, and the pinning thread selects ``device`` itself, so no caller's current device
    matters. The registration runs off the caller's thread also because a failed CUDA runtime call leaves its
    error as that thread's last error, which torch's next kernel-launch check would raise."""

    def __init__(self, device: torch.device) -> None:
        assert device.type == "cuda" and device.index is not None, "resolve_device gives a CUDA device an index"
        self.device = device
        self._cudart, self._select_device = _cuda_runtime(device)  # raises where CUDA cannot start
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="specmd-pin")
        self._futures: list[Future] = []
        self._lock = threading.Lock()  # guards failure: set on the pinning thread or by a failed submit
        self.failure: Failure | None = None  # the first registration that failed
        self.busy_seconds = 0.0  # time the thread spent registering (much of it hidden behind reads)

    def submit(self, owner: np.ndarray) -> None:
        """Queue the registration of ``owner``'s memory (returns at once). Where the thread cannot take it
        (stopped, or broken), that is this buffer's failure: it stays pageable, the load goes on."""
        try:
            self._futures.append(self._pool.submit(self._register, owner))
        except Exception as err:  # RuntimeError after shutdown, BrokenThreadPool
            self._fail(owner.nbytes, f"{type(err).__name__}: {err}", f"check that CUDA works on {self.device}")

    def wait(self) -> Failure | None:
        """Wait for every queued registration and stop the thread; the first failure, or None. Safe to call
        twice; a later ``submit`` only records a failure."""
        self._pool.shutdown(wait=True)
        for future in self._futures:  # _register catches Exception; anything else it let through is a failure too
            error = None if future.cancelled() else future.exception()
            if error is not None:
                self._fail(0, f"{type(error).__name__}: {error}", f"check that CUDA works on {self.device}")
        return self.failure

    def _fail(self, nbytes: int, cause: str, fix: str) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = (nbytes, cause, fix)

    def _register(self, owner: np.ndarray) -> None:
        if self.failure is not None:
            return
        start = time.perf_counter()
        try:
            if self._select_device is not None:  # the thread's first task: registrations go to device's context
                select, self._select_device = self._select_device, None
                select()
            address, size = owner.ctypes.data, owner.nbytes
            result = self._cudart.cudaHostRegister(address, size, REGISTER_DEFAULT)
            if int(result) != 0:
                self._fail(size, f"cudaHostRegister: {self._cudart.cudaGetErrorString(result)}", LOCKED_MEMORY_FIX)
                return
            # At once after the registration, so nothing can leave it without its undoing. The finalizer holds
            # the mapping (the array's base holds it too): unmapped only after unregistering.
            finalizer = weakref.finalize(owner, _unregister, self._cudart, address, owner.base.obj, os.getpid())
            finalizer.atexit = False  # at exit the driver releases everything; unregistering GiBs would only delay it
        except Exception as err:  # a lost error would leave store.pin True over pageable memory
            self._fail(owner.nbytes, f"{type(err).__name__}: {err}", f"check that CUDA works on {self.device}")
        finally:
            self.busy_seconds += time.perf_counter() - start
