"""Two processes (gloo, CPU) train to the same losses as one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xlstm7b

COMMON = ["--data.val_fraction=0.1", "--run.progress=false", "--train.seq_len=32", "--train.global_batch_tokens=256",
          "--train.micro_batch=4", "--run.eval_tokens=256", "--run.eval_every=0", "--run.log_every=1", "--train.steps=3",
          "--train.threads=1", "--train.loss_chunk_tokens=48"]  # the head runs outside forward(), in pieces


def train(nproc: int, run_dir: Path, corpus: Path, *extra: str) -> dict[int, float]:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m"] if nproc > 1 else [sys.executable, "-m"]
    args = [*launcher, "xlstm7b", "train", "debug", f"--data.source={corpus}", f"--data.cache_dir={corpus.parent / 'cache'}",
            f"--run.dir={run_dir}", *COMMON, *extra]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_match_one(tmp_path, corpus, parallel):
    one = train(1, tmp_path / "one", corpus, "--run.export=false")
    two = train(2, tmp_path / "two", corpus, f"--train.parallel={parallel}", "--run.export=true")
    assert list(one) == list(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    # The export gathers the shards into one loadable model.
    model = xlstm7b.from_pretrained(tmp_path / "two" / "model")
    assert torch.isfinite(model(torch.tensor([[0, 3, 4]]))[0]).all()
    # The sharded checkpoint resumes in one process.
    resumed = train(1, tmp_path / "two", corpus, "--train.parallel=none", "--train.steps=4", "--run.export=false")
    assert list(resumed) == [1, 2, 3, 4]
