"""`jobs.prepare`'s CLI as a driver joining a running cluster (what `ray job submit` starts),
measured: its peak resident memory and how far its address space grew after start-up, optionally
capped (RLIMIT_AS) at its start-up size plus a budget. Used by the scale tests and the benchmark."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from support import REPO

_MEASURED_MAIN = """
import json, resource, sys
from jobs.common import ray_runtime, tokenizer_files
from jobs.prepare import ray_pass  # noqa: F401 - imported before the cap, as any run imports it
from jobs.prepare.__main__ import main
budget, argv = int(sys.argv[1]), sys.argv[2:]
tokenizer_files.load(tokenizer_files.fetch(json.loads(argv[argv.index("--spec") + 1])["tokenizer"]))
ray_runtime.init()
def status(field):
    return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith(field))
start = status("VmSize:")
if budget:
    resource.setrlimit(resource.RLIMIT_AS, (start + budget, start + budget))
code = main(argv)
print(json.dumps({"address_space_growth": status("VmPeak:") - start, "rss_peak": status("VmHWM:")}))
sys.exit(code)
"""


def _small_thread_stacks() -> None:
    # Each thread reserves its stack in the address space (8 MiB by default) and Ray starts
    # a few: 2 MiB is plenty for them and keeps a cap about the data.
    resource.setrlimit(resource.RLIMIT_STACK, (2 << 20, 2 << 20))


def start(spec: dict, cluster_env: dict[str, str], *args: str, cap_growth: int = 0) -> subprocess.Popen:
    """Start the driver (Ray path forced); `communicate()` it, then `measured()` its stdout.
    With `cap_growth`, its address space may grow by at most that many bytes after start-up (what
    Ray maps on connecting, about 7 GB of object-store reservations, is the same whatever the data)."""
    return subprocess.Popen(
        [sys.executable, "-c", _MEASURED_MAIN, str(cap_growth), "--spec", json.dumps(spec), "--in-process-max-bytes", "0",
         *args], cwd=REPO, env=os.environ | cluster_env | {"MALLOC_ARENA_MAX": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=_small_thread_stacks)


def measured(stdout: str) -> dict[str, int]:
    """{"address_space_growth", "rss_peak"} in bytes, from the driver's last line."""
    return json.loads(stdout.strip().splitlines()[-1])
