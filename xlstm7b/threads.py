"""CPU threads of the commands (`--threads` of generate, serve, eval and train).

torch's default, one OpenMP thread per core, collapses when another process keeps a core busy:
every small op of a decoding step waits for the thread whose core is taken (measured in
benchmarks/results/threads_cpu.json). The default therefore counts only the cores not already
busy: the cores this process may run on (its affinity, within a container's CPU quota), less their
share of the machine's load average over the last minute (rounded), at least 1. It is read once,
when a command starts; the load average moves, so two runs can get different counts, and CPU
results that depend on the thread count (the rounding of parallel reductions) can differ with
them: pass `--threads N` for reproducible runs.
"""

import argparse
import math
import os
from pathlib import Path

import torch


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU quota of this process's group (a container's CPU limit): 'QUOTA PERIOD' or 'max PERIOD'."""


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), capped by a container's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 quota here
        pass
    return cores


def default_threads(processes: int = 1) -> int:
    """The cores this process may use that other processes are not already keeping busy, divided
    among `processes` processes of the same job on this machine (at least 1).

    The load average is the whole machine's: where this process may use only some of its cores
    (an affinity mask, a container's cpuset), the busy cores counted are their share of it."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this system
        load = 0.0
    busy = round(load * min(1.0, cores / (os.cpu_count() or cores)))
    return max(1, (cores - busy) // max(1, processes))


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads_value, default=0, metavar="N",
                   help="CPU threads (default 0: the cores not busy with other processes, at least 1; "
                        "pass N for reproducible CPU results)")


MAX_THREADS_PER_CORE = 16
"""--threads may ask for at most this many threads per core of the machine (more is a typo)."""


def threads_value(text: str) -> int:
    """An argparse type: a thread count >= 0 (0: `default_threads`), at most MAX_THREADS_PER_CORE
    per core of the machine."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    cores = os.cpu_count() or 1
    if not 0 <= value <= MAX_THREADS_PER_CORE * cores:
        raise argparse.ArgumentTypeError(f"must be a number of threads from 1 to {MAX_THREADS_PER_CORE * cores} ({MAX_THREADS_PER_CORE} "
                                         f"per core of this machine's {cores}), or 0 for the idle cores; got {text!r}")
    return value


def threads_text(n: int) -> str:
    """'1 CPU thread', '2 CPU threads': how the commands' reports name the count."""
    return f"{n} CPU thread{'s' if n != 1 else ''}"


def set_threads(threads: int, processes: int = 1) -> int:
    """Sets torch's CPU threads (0: `default_threads(processes)`); returns the number set."""
    n = threads or default_threads(processes)
    torch.set_num_threads(n)
    return n
