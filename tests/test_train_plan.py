"""The memory plan: the automatic micro-batch (train.micro_batch = 0) in `xlstm7b plan` and the
trainer, and the 7B on one GPU with cpu_offload (the figures a GPU run checks)."""

import json

import pytest
import torch

from xlstm7b.train import trainer
from xlstm7b.train.cli import plan_main
from xlstm7b.train.config import load_config
from xlstm7b.train.plan import GiB, estimate
from test_train import job

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = torch.device("cuda")


def test_auto_micro_batch_is_the_largest_divisor_that_fits():
    job_ = load_config("1.3b", ["--train.micro_batch=0"])
    per_rank = job_.sequences_per_rank(1)
    sizes = {cap: estimate(job_, 1, CUDA, cap) for cap in (40.0, 80.0, 141.0)}
    picks = [sizes[cap].micro_batch for cap in sorted(sizes)]
    assert picks == sorted(picks) and picks[0] < picks[-1]
    for cap, plan in sizes.items():
        m = plan.micro_batch
        assert plan.fits and per_rank % m == 0 and f"{m} picked (train.micro_batch = 0)" in plan.picked
        given = load_config("1.3b", [f"--train.micro_batch={m}"])
        assert estimate(given, 1, CUDA, cap).total_gb == pytest.approx(plan.total_gb)
        bigger = next(d for d in range(m + 1, per_rank + 1) if per_rank % d == 0)  # the next divisor does not fit
        assert not estimate(load_config("1.3b", [f"--train.micro_batch={bigger}"]), 1, CUDA, cap).fits


def test_plan_command_reports_the_pick_or_why_none_fits(capsys):
    assert plan_main(["1.3b", "--gpu-memory-gb", "80", "--train.micro_batch=0"]) == 0
    out = capsys.readouterr().out
    assert "micro_batch  8 picked (train.micro_batch = 0): the largest divisor of the 256 sequences" in out
    assert plan_main(["7b", "--gpu-memory-gb", "80", "--train.micro_batch=0"]) == 1
    out = capsys.readouterr().out
    assert "none fits (train.micro_batch = 0): even 1 sequence of 8192 tokens needs" in out and "--train.cpu_offload=true" in out
    assert plan_main(["debug", "--gpus", "3", "--train.micro_batch=0"]) == 2
    assert "is 8 sequences of 64, not a multiple of the 3 process(es)" in capsys.readouterr().err


def test_the_trainer_trains_with_the_micro_batch_it_picked(tmp_path, corpus, cache, capsys):
    run = tmp_path / "r"
    assert trainer.train(job(corpus, cache, run, "--train.steps=1", "--train.micro_batch=0", "--run.gpu_memory_gb=4")) == 0
    out = capsys.readouterr().out
    assert "micro_batch  8 picked" in out and "1 micro-batch(es) of 8 x 32" in out  # 256 tokens = 8 sequences of 32
    assert json.loads((run / "config.json").read_text())["train"]["micro_batch"] == 8
    with pytest.raises(trainer.TrainingError, match=r"does not fit(.|\n)*none fits \(train.micro_batch = 0\)"):
        trainer.train(job(corpus, cache, tmp_path / "s", "--train.steps=1", "--train.micro_batch=0", "--run.gpu_memory_gb=0.5"))
    assert not (tmp_path / "s").exists()  # refused before the run directory is made


def test_7b_on_one_gpu_with_cpu_offload():
    """The figures the GPU run checks: peak GPU memory (unsharded groups in flight, activations,
    logits; with accumulation the float32 gradients FSDP accumulates unsharded) and host memory,
    which holds the fp32 parameters, gradients and both Adam moments (16 bytes per parameter) of
    all 6.87 B parameters."""
    one_step = load_config("7b", ["--train.cpu_offload=true", "--train.global_batch_tokens=8192"])  # as benchmarks/train.py
    plan = estimate(one_step, 1, CUDA, 80)
    P = plan.params
    assert plan.fits and plan.parallel == "fsdp" and plan.micro_batch == 1
    assert plan.parts_gb["optimizer"] == 0 and 16 * P / GiB < plan.host_gb < 16 * P / GiB + 4
    block_bf16 = 201_666_576 * 2 / GiB
    assert 2 * block_bf16 < plan.parts_gb["parameters"] < 2 * block_bf16 + 1  # + the root group (embedding, lm_head)
    assert 4 < plan.total_gb < 12  # a small part of the card
    recipe = estimate(load_config("7b", ["--train.cpu_offload=true"]), 1, CUDA, 80)  # 512 micro-batches per step
    assert recipe.parts_gb["gradients"] - plan.parts_gb["gradients"] == pytest.approx(4 * P / GiB)
    assert recipe.fits and recipe.total_gb < 0.95 * 80
    assert estimate(load_config("7b", ["--train.cpu_offload=true", "--train.micro_batch=0"]), 1, CUDA, 80).micro_batch > 1
    sharded = estimate(load_config("7b", ["--train.cpu_offload=true"]), 8, CUDA, 80)
    assert plan.host_problem(1, 128) is None and sharded.host_problem(8, 128) is None  # 8 shards of 16 P
    assert "1 process(es) need 104.3 GiB" in plan.host_problem(1, 64) and "this machine has 64.0 GiB" in plan.host_problem(1, 64)
    no_offload = estimate(load_config("7b"), 1, CUDA, 80)
    assert not no_offload.fits and no_offload.total_gb > 16 * P / GiB


def test_the_trainer_refuses_an_offload_the_host_cannot_hold(tmp_path, corpus, cache, monkeypatch):
    monkeypatch.setattr(trainer, "device_capacity_gb", lambda device, override: 1.0)  # a 1 GiB machine
    with pytest.raises(trainer.TrainingError, match=r"does not fit in host memory: 1 process\(es\) need 2.0 GiB"):
        trainer.train(job(corpus, cache, tmp_path / "r", "--train.cpu_offload=true"))
    assert not (tmp_path / "r").exists()
