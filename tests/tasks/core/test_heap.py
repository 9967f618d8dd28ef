"""Freed memory kept in the heap: fewer page faults for the same allocations, on glibc only, refusable,
and turned on by the scoring passes that run a PyTorch model on the CPU (not by loading a model)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

ROOT = Path(__file__).resolve().parents[3]

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


def _python(code: str, *args: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "BGREMOVAL_SYSTEM_MALLOC"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**environment, "PYTHONPATH": str(ROOT), **env})
    return done.stdout.strip()


def test_the_same_large_allocations_fault_their_pages_in_once_instead_of_every_time():
    kept, faults_kept = _python(ALLOCATE, "keep").split()
    default, faults_default = _python(ALLOCATE, "default").split()
    assert (kept, default) == ("True", "False")
    # by default every allocation is a fresh mapping, faulted in anew (numpy asks for huge pages, so
    # there are fewer faults than 4 KiB pages); kept, the first allocation's pages are reused
    assert int(faults_kept) * 5 < int(faults_default)


def test_the_setting_is_refused_from_the_environment():
    assert _python(ALLOCATE, "keep", BGREMOVAL_SYSTEM_MALLOC="1").split()[0] == "False"
    assert _python(ALLOCATE, "keep", BGREMOVAL_SYSTEM_MALLOC="yes").split()[0] == "False"
    assert _python(ALLOCATE, "keep", BGREMOVAL_SYSTEM_MALLOC="0").split()[0] == "True"


def test_scoring_on_the_cpu_turns_it_on_and_loading_a_model_does_not(write_model_folder, tmp_path):
    model = write_model_folder(tmp_path / "run")
    probe = ("import sys; import tasks.core.heap as heap; from tasks.model.io import load_model; "
             "from tasks.evaluation.scoring import load_model as load_for_scoring; "
             "load_model(sys.argv[1]); loaded = heap._applied; load_for_scoring(sys.argv[1]); "
             "print(loaded, heap._applied)")
    assert _python(probe, model) == "False True"
    assert _python(probe, model, BGREMOVAL_SYSTEM_MALLOC="1") == "False False"
