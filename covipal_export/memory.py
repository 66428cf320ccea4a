"""This process's memory and the machine's, from Linux's /proc (what export, build and bench report).

    peak_rss_bytes     the process's high-water mark of resident memory since it started (VmHWM; ru_maxrss
                       elsewhere): what `/usr/bin/time -v` reports as "Maximum resident set size"
    rss_bytes          resident now
    available_bytes    what the machine can still allocate without swapping (MemAvailable)
    total_bytes        the machine's physical memory
    release_memory     collect unreachable objects (an ONNX Runtime session in a reference cycle holds its weights
                       until then) and hand the C heap's free pages back to the system (glibc's malloc_trim)
    PeakMemory         the peak over a window (the benchmark's per call): VmHWM after resetting it through
                       /proc/self/clear_refs (Linux >= 4.0). The reset also lowers what `time -v` sees, so
                       export and build never reset it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import resource
from pathlib import Path

from covipal.errors import CovipalError

GIB = 2**30


def peak_rss_bytes() -> int:
    try:
        return _proc_kib("self/status", "VmHWM") << 10
    except (OSError, CovipalError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux


def rss_bytes() -> int:
    return _proc_kib("self/status", "VmRSS") << 10


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo."""
    return _proc_kib("meminfo", "MemAvailable") << 10


def total_bytes() -> int:
    """Physical memory (POSIX sysconf; raises where the system has no such figure)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def release_memory() -> None:
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (find_library runs ldconfig); None elsewhere."""
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc is not None else None


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


def _proc_kib(file: str, field: str) -> int:
    """A "Field:  N kB" line of a /proc file, in KiB."""
    for line in Path("/proc", file).read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise CovipalError(f"/proc/{file} has no {field}")
