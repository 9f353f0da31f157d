"""CPU threads of the inference commands (`--threads` of generate, serve and eval).

torch's default, one OpenMP thread per core, collapses when another process keeps a core busy:
every small op of a decoding step waits for the thread whose core is taken (measured in
benchmarks/results/threads_cpu.json). The default therefore counts only the cores not already
busy: the cores this process may run on, less the load average of the last minute.
"""

import argparse
import os

import torch


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """The cores this process may use that other processes are not already keeping busy (at least 1)."""
    cores = usable_cores()
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average on this system
        busy = 0
    return max(1, min(cores, cores - busy))


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads_value, default=0, metavar="N",
                   help="CPU threads (default 0: the cores not busy with other processes, at least 1)")


def threads_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of threads >= 1, or 0 for the idle cores; got {text!r}")
    return value


def set_threads(threads: int) -> int:
    """Sets torch's CPU threads (0: `default_threads()`); returns the number set."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n
