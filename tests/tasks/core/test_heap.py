"""Freed memory kept in the heap: fewer page faults for the same allocations, on glibc only, refusable."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

ALLOCATE = """
import resource, sys
import numpy as np
from tasks.core.heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # what a network's activations do at every batch: the same large blocks, anew
    block = np.ones(48 * 1024 * 1024, np.uint8)
    del block
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[bool, int]:
    done = subprocess.run([sys.executable, "-c", ALLOCATE, mode], capture_output=True, text=True, check=True,
                          env={**env, "PYTHONPATH": "."})
    kept, faults = done.stdout.split()
    return kept == "True", int(faults)


def test_the_same_large_allocations_fault_their_pages_in_once_instead_of_every_time():
    kept, faults_kept = _faults("keep")
    default, faults_default = _faults("default")
    assert kept and not default
    # by default every allocation is a fresh mapping, faulted in anew (numpy asks for huge pages, so
    # there are fewer faults than 4 KiB pages); kept, the first allocation's pages are reused
    assert faults_kept * 5 < faults_default


def test_the_setting_is_refused_from_the_environment_and_idempotent():
    assert _faults("keep", BGREMOVAL_SYSTEM_MALLOC="1")[0] is False
    done = subprocess.run([sys.executable, "-c", "from tasks.core.heap import keep_freed_memory as k; print(k(), k())"],
                          capture_output=True, text=True, check=True, env={"PYTHONPATH": "."})
    assert done.stdout.split() == ["True", "True"]
