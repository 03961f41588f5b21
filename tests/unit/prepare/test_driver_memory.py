"""The driver's peak memory in the step log is its own, not that of the process that started it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import REPO

# A parent holds 1 GiB, then execs a driver: `ru_maxrss` would carry the parent's peak over.
PARENT = """
import os, sys
held = bytearray(1 << 30)
held[::4096] = b"x" * len(held[::4096])  # touched: resident
os.execv(sys.executable, [sys.executable, "-c", "from jobs.prepare.driver import peak_rss_mib; print(peak_rss_mib())"])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM is Linux's")
def test_peak_memory_is_the_drivers_own_after_an_exec():
    out = subprocess.run([sys.executable, "-c", PARENT], cwd=REPO, capture_output=True, text=True, check=True)
    assert 20 < float(out.stdout) < 700, out.stdout  # the import alone, far below the parent's 1024 MiB
