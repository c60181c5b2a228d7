"""Peak resident memory of a piece of CPU code, for the merge-on-export memory tests and benchmark.

Linux only (``/proc/self``). :func:`malloc_returns_memory_at_once` makes glibc serve every allocation
above 64 KiB by ``mmap``, so freed tensors leave the process at once and the resident size follows the
live tensor bytes; :func:`peak_during` resets the high-water mark (``/proc/self/clear_refs``), runs the
code and returns how far the resident size rose above where it started. (``tracemalloc`` cannot be
used: it sees Python's allocator, not torch's.)
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from typing import Any

_M_MMAP_THRESHOLD = -3


def malloc_returns_memory_at_once(threshold_bytes: int = 64 * 1024) -> None:
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold_bytes)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status")


def peak_during(run: Callable[[], Any]) -> int:
    """Bytes by which the resident size peaked above its value when ``run`` started."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - start) * 1024
