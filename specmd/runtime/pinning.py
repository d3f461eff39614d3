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
then, so the unmap always comes after the unregistration, whoever frees last.
"""
from __future__ import annotations

import logging
import mmap
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

log = logging.getLogger(__name__)

REGISTER_DEFAULT = 0  # cudaHostRegisterDefault: mapped and portable under unified addressing


def pageable(nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
    """``nbytes`` of host memory as a flat uint8 tensor, and the array owning it: an anonymous mapping, page
    aligned and untouched, so its pages are made by the first write into them and by nothing before."""
    mapping = mmap.mmap(-1, nbytes)
    owner = np.frombuffer(mapping, dtype=np.uint8)
    return torch.from_numpy(owner), owner


def _cuda_runtime():
    """torch's binding of the CUDA runtime and the current device (tests replace this). Raises where CUDA
    cannot start."""
    return torch.cuda.cudart(), torch.cuda.current_device()


def _unregister(cudart, address: int, mapping: mmap.mmap) -> None:
    # ``mapping`` is an argument only to keep the memory mapped until this has run.
    result = cudart.cudaHostUnregister(address)
    if int(result) != 0:
        log.warning("specmd: cudaHostUnregister of host memory at %#x failed (%s)", address,
                    cudart.cudaGetErrorString(result))


class Pinner:
    """Registers memory made by ``pageable`` with CUDA on one background thread, in the order submitted; after
    the first failure it registers nothing more. A registration is undone when its memory's owner dies.

    The registration runs off the caller's thread also because a failed CUDA runtime call leaves its error as
    that thread's last error, which torch's next kernel-launch check would raise."""

    def __init__(self) -> None:
        # On the caller's thread: torch's lazy CUDA initialisation, and the device whose context registers.
        self._cudart, device = _cuda_runtime()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="specmd-pin",
                                        initializer=None if device is None else torch.cuda.set_device,
                                        initargs=() if device is None else (device,))
        self.failure: tuple[int, str] | None = None  # (bytes, cause) of the first registration that failed
        self.busy_seconds = 0.0  # time the thread spent registering (much of it hidden behind reads)

    def submit(self, owner: np.ndarray) -> Future:
        """Queue the registration of ``owner``'s memory (returns at once)."""
        return self._pool.submit(self._register, owner)

    def wait(self) -> tuple[int, str] | None:
        """Wait for every queued registration and stop the thread; the first failure's (bytes, cause), or
        None. Safe to call twice; nothing can be submitted after."""
        self._pool.shutdown(wait=True)
        return self.failure

    def _register(self, owner: np.ndarray) -> None:
        if self.failure is not None:
            return
        start = time.perf_counter()
        address, size = owner.ctypes.data, owner.nbytes
        result = self._cudart.cudaHostRegister(address, size, REGISTER_DEFAULT)
        self.busy_seconds += time.perf_counter() - start
        if int(result) != 0:
            self.failure = (size, f"cudaHostRegister: {self._cudart.cudaGetErrorString(result)}")
            return
        # The finalizer holds the mapping (the array's base holds it too): unmapped only after unregistering.
        finalizer = weakref.finalize(owner, _unregister, self._cudart, address, owner.base.obj)
        finalizer.atexit = False  # at exit the driver releases everything; unregistering GiBs would only delay it
