"""Keep freed memory in the process's heap during passes that allocate the same buffers again and again.

glibc's ``malloc`` hands a freed block above its mmap threshold (at most 32 MiB) back to the kernel
at once, and trims the free top of the heap when it grows past the trim threshold. A network that
allocates the same activations at every batch then has every page of them faulted in again, by the
kernel, each time: scoring U2-NetP at 320 px on the CPU spent 40 % of its CPU time in the kernel
(``benchmarks/README.md``, "Freed memory kept in the heap"). :func:`keep_freed_memory` serves the
main thread's blocks from the heap and keeps up to :data:`TRIM_THRESHOLD` of freed memory there for
the next batch. (Other threads' arenas still map blocks above 64 MiB on their own.)

The price is memory: the process keeps what its largest batch needed for the rest of its life, plus
what fragmentation adds (18-33 % above glibc's peak in the measurements; a forked data-loader worker
inherits the setting). That suits training and scoring passes, which run one model over many
batches and then end, cleaning's shards, whose every pair allocates the same full-size decode
buffers, and the batch passes of background removal (``bgremoval remove`` on a folder, a
production shard), whose every photo does too (there it took the kernel's time from 33-37 to 9 ms a
photo with ONNX Runtime at batch 1); it is why only they call it (training and scoring only on the
CPU). The long-running servers (``bgremoval serve``, ``remove --watch``) leave glibc's defaults
alone.

The setting is process-wide and takes effect for allocations made after the call. It applies only
to glibc (on another C library the call does nothing) and is refused when ``BGREMOVAL_SYSTEM_MALLOC``
is ``1``, ``true`` or ``yes``, e.g. on a machine with little memory to spare.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["TRIM_THRESHOLD", "keep_freed_memory"]

#: Freed memory up to this many bytes stays in the heap (above it, the heap's free top is trimmed).
TRIM_THRESHOLD = 1 << 30

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed memory there (see the module docstring).

    Idempotent. Returns True when the setting is in force, False on a C library other than glibc or
    when ``BGREMOVAL_SYSTEM_MALLOC`` refuses it.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("BGREMOVAL_SYSTEM_MALLOC", "").strip().lower() in ("1", "true", "yes"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # pragma: no cover - a glibc without the usual soname
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
