"""Faults during training, asserting that nothing is lost: concurrent runs on one run directory,
damaged checkpoints, a damaged metrics log, a changed corpus, a damaged token cache."""

import json
import signal
import time

from test_train import losses, overrides, run_cli
from xlstm7b.cli import main
from xlstm7b.train import checkpointing


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


# --- one job per run directory --------------------------------------------------------------------

def test_second_run_on_a_busy_dir_fails_and_a_killed_runs_lock_is_taken_over(tmp_path, corpus, cache, capsys):
    run = tmp_path / "r"
    first = run_cli(overrides(corpus, cache, run, "--train.steps=1000", "--run.ckpt_every=2", "--train.threads=1"))
    try:
        wait_for(lambda: len(checkpointing.checkpoints(run)) >= 1)
        assert main(["train", "debug", *overrides(corpus, cache, run, "--train.steps=3")]) == 1
        err = capsys.readouterr().err
        assert f"run directory {run} is in use by process {first.pid} on " in err and "train debug" in err, err
        assert "another --run.dir" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The first run's log is its own: one record per step, in order, none from the refused second run.
    logged = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == list(range(1, len(logged) + 1))
    step = int(checkpointing.checkpoints(run)[-1].name.split("_")[1])
    # The killed run's lock is stale: the next run takes it over and resumes.
    assert main(["train", "debug", *overrides(corpus, cache, run, f"--train.steps={step + 1}", "--run.ckpt_every=2")]) == 0
    assert f"resuming {run} at step {step}" in capsys.readouterr().out
    assert sorted(losses(run)) == list(range(1, step + 2))
