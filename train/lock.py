"""The run directory's lock: one training job per run.dir at a time.

Rank 0 holds an exclusive `flock` on RUN_DIR/train.lock for the whole run; the other ranks of a
torchrun job share it through rank 0. The operating system drops the lock when its process dies, so
the lock of a killed run is stale by construction and the next run takes it over. The file holds
the holder's pid, host, start time and command, for the message the next job prints. It is never
deleted: a job that unlinked it could leave two jobs holding locks on two different files.
"""

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from xlstm7b.written import adopt_earlier_export, foreign_files


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


def describe_holder(text: str) -> str:
    """The holder of a lock, from the lock file's record."""
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"process {holder['pid']} on {holder['host']} (started {started}: {holder['command']})"
    except (ValueError, KeyError, TypeError):  # written by a job that died before recording itself
        return "another process"


def check_run_dir(run_dir: Path) -> None:
    """A ValueError if `run_dir` holds files but no train.lock: every run creates its lock file first
    and never deletes it, so such a folder is someone else's, whose files a run would overwrite. Also
    if its export folder, RUN_DIR/model, holds a file xlstm7b did not write (an earlier version's
    export is adopted first: `xlstm7b.written.adopt_earlier_export`)."""
    if (run_dir / "train.lock").exists():
        adopt_earlier_export(run_dir / "model")
        if foreign := foreign_files(run_dir / "model"):  # found now, not when the export fails after training
            raise ValueError(f"{foreign[0]} was not written by xlstm7b (a file of yours, or one an earlier version's "
                             f"export did not provably write); the run's export into {run_dir / 'model'} would not replace it. Move it away, then rerun")
        return
    entries = sorted(p.name for p in run_dir.iterdir())
    if entries:
        raise ValueError(f"run.dir {run_dir} is not empty ({entries[0]}{f' and {len(entries) - 1} more' if len(entries) > 1 else ''}) "
                         "and is not a training run's folder (it has no train.lock); its files are left untouched. "
                         "Train into a new or empty --run.dir")


class RunLock:
    """`with RunLock(run_dir):` holds the lock or raises RunDirBusy naming the holder."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "train.lock"
        self.fh = None

    def __enter__(self) -> "RunLock":
        check_run_dir(self.path.parent)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = describe_holder(fh.read())
            fh.close()
            raise RunDirBusy(
                f"run directory {self.path.parent} is in use by {holder}; wait for that run to finish or stop it, "
                "or train into another --run.dir") from None
        fh.seek(0)
        fh.truncate()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc) -> None:
        self.fh.truncate(0)
        self.fh.close()  # closing releases the flock
        self.fh = None
