"""What loading a checkpoint cost (``from_pretrained``): wall time of the whole load and of its stages, bytes
read, and the process's resident host memory before the load and at its peak."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def _proc_status_bytes(field: str) -> int | None:
    """A memory field (kB) of /proc/self/status in bytes; None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def host_peak_bytes() -> int:
    """This process's peak resident memory so far (bytes). Linux: VmHWM of /proc/self/status, which starts
    afresh at exec. Elsewhere ru_maxrss, which Linux would carry over from the parent across exec (a benchmark
    whose parent wrote a 13 GB checkpoint read 15 GB there before loading anything)."""
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else _ru_maxrss_bytes()


def host_resident_bytes() -> int:
    """This process's resident memory now (bytes). Linux: VmRSS of /proc/self/status; elsewhere the peak so
    far (ru_maxrss), an upper bound."""
    resident = _proc_status_bytes("VmRSS")
    return resident if resident is not None else _ru_maxrss_bytes()


class StageClock:
    """Wall time of consecutive stages: ``lap(name)`` ends the stage that began at the previous lap."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def seconds(self) -> float:
        """From the start to the last lap."""
        return self._last - self.start


@dataclass(frozen=True)
class LoadReport:
    """What one ``from_pretrained`` cost. ``seconds``: its whole wall time; ``stages``: that time by stage, in
    order, as (name, seconds) pairs (skeleton: the model on the meta device; allocate: the host store; place:
    the other weights on the device; read: the checkpoint files; pin: waiting for the store's pinning after the
    reads, the rest of it being hidden behind them; engine: generation config and offloading). ``bytes_read``:
    tensor bytes read; ``read_threads``: the reader threads the load used. Host memory: ``host_before_bytes``
    resident when the load began, ``host_peak_bytes`` the process's peak when it ended (``host_peak_bytes()``:
    on Linux since exec, so a process that held more before the load reports that)."""

    seconds: float
    bytes_read: int
    host_peak_bytes: int
    host_before_bytes: int
    stages: tuple[tuple[str, float], ...]  # (name, seconds) pairs: a tuple keeps the frozen report hashable
    read_threads: int

    def summary(self) -> str:
        """One line: size, time, rate, the stages and the host peak."""
        rate = self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.stages)
        return (f"loaded {self.bytes_read / 2**30:.2f} GiB in {self.seconds:.1f} s ({rate:.2f} GB/s; {stages} s; "
                f"{self.read_threads} readers); host peak {self.host_peak_bytes / 2**30:.2f} GiB "
                f"(from {self.host_before_bytes / 2**30:.2f} GiB)")
