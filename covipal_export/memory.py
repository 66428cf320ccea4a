"""This process's memory and the machine's, from Linux's /proc (what export, build and bench report).

    peak_rss_bytes     the process's high-water mark of resident memory since it started (VmHWM; ru_maxrss
                       elsewhere): what `/usr/bin/time -v` reports as "Maximum resident set size"
    rss_bytes          resident now
    available_bytes    what the machine can still allocate without swapping (MemAvailable)
    release_memory     collect unreachable objects (an ONNX Runtime session in a reference cycle holds its weights
                       until then) and hand the C heap's free pages back to the system (glibc's malloc_trim)
    PeakMemory         the peak over a window (the benchmark's per call): VmHWM after resetting it through
                       /proc/self/clear_refs (Linux >= 4.0). The reset also lowers what `time -v` sees, so
                       export and build never reset it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from pathlib import Path

from covipal.errors import CovipalError

GIB = 2**30


def peak_rss_bytes() -> int:
    try:
        return _status_kib("VmHWM") << 10
    except (OSError, CovipalError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux


def rss_bytes() -> int:
    return _status_kib("VmRSS") << 10


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    raise CovipalError("/proc/meminfo has no MemAvailable")


def release_memory() -> None:
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):  # glibc
        ctypes.CDLL(libc).malloc_trim(0)


def gib(value: int) -> str:
    """Bytes as "13.52 GiB"."""
    return f"{value / GIB:.2f} GiB"


class PeakMemory:
    """This process's peak resident memory over a window: VmHWM after resetting it through
    /proc/self/clear_refs (Linux >= 4.0); where that is refused, the peak since the process started."""

    def __init__(self):
        self.mode = "per call" if self.reset() else "since process start"

    def reset(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak_mb(self) -> float:
        return peak_rss_bytes() / 2**20

    def rss_mb(self) -> float:
        return rss_bytes() / 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise CovipalError(f"/proc/self/status has no {field}")
