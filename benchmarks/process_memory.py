"""Resident memory of this process, read from ``/proc``: a module of its own, without imports, so
that the processes whose peak the benchmarks report (torchrun workers, cleaning children) load
nothing more for it."""

from __future__ import annotations

import resource
from pathlib import Path


def proc_status_mib(field: str, pid: int | str = "self") -> float | None:
    """A ``kB`` field of ``/proc/<pid>/status`` in MiB; None where there is no such file or field."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_now_mib() -> float:
    """This process's current resident set size in MiB (``VmRSS`` from ``/proc/self/status``)."""
    now = proc_status_mib("VmRSS")
    return float("nan") if now is None else now


def peak_rss_self_mib() -> float:
    """This process's peak resident set size so far, in MiB: ``VmHWM``, the high-water mark of its
    own address space. ``getrusage``'s ``ru_maxrss`` (the fallback where ``/proc`` is missing) is,
    in a process started by ``fork`` + ``exec``, at least the parent's peak until then, which the
    kernel carries over at ``exec``: from a parent holding 600 MiB it reads 611 MiB for a bare
    interpreter whose ``VmHWM`` is 11."""
    peak = proc_status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak
