"""The training half's commands: `xlstm7b train | tokenizer | plan | plot`, run by xlstm7b/cli.py
through `main(command, argv)`."""

import argparse
import sys
from pathlib import Path

import torch

from .config import SECTIONS, load_config
from .data import Corpus
from .plan import device_capacity_gb, estimate
from .plot import plot
from .tokenizer import train_bpe
from .trainer import TrainingError, train


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="xlstm7b train",
        description="pretrain an xLSTM from a preset or TOML config; rerun on the same run.dir to resume",
        epilog=f"overrides: --section.key=value for sections {', '.join(SECTIONS)} (e.g. --train.steps=100 --run.dir=runs/x). "
               "Several processes: torchrun --nproc-per-node N -m xlstm7b train CONFIG")
    p.add_argument("config", help="preset name (debug, toy, 125m, 350m, 1.3b, 7b) or a .toml path")
    args, overrides = p.parse_known_args(argv)
    try:
        job = load_config(args.config, overrides)
    except ValueError as e:
        print(f"xlstm7b train: {e}", file=sys.stderr)
        return 2
    try:
        return train(job)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"xlstm7b train: {e}", file=sys.stderr)
        return 1


def tokenizer_main(argv: list[str]) -> int:
    """`xlstm7b tokenizer train`: train a byte-level BPE on a config's training split."""
    p = argparse.ArgumentParser(prog="xlstm7b tokenizer", description="train a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on the training split of a config's [data] source")
    t.add_argument("config", help="preset name or .toml path (its [data] section and model.vocab_size)")
    t.add_argument("--output", "-o", required=True, help="where to write tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=0, help="default: the config's model.vocab_size")
    args, overrides = t.parse_known_args(argv[1:]) if argv[:1] == ["train"] else (p.parse_args(argv), [])
    job = load_config(args.config, overrides)
    corpus = Corpus(job.data)
    tok = train_bpe((text for _, text in corpus.documents("train")), args.vocab_size or job.model.vocab_size)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    print(f"wrote {out}: {tok.get_vocab_size()} tokens trained on the training split of {job.data.source!r}")
    return 0


def plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="xlstm7b plan", description="parameter count and per-GPU memory of a training config")
    p.add_argument("config", help="preset name or .toml path")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (processes) to plan for")
    p.add_argument("--gpu-memory-gb", type=float, default=0, help="memory per GPU (default: this machine's GPU, else 80)")
    args, overrides = p.parse_known_args(argv)
    try:
        job = load_config(args.config, overrides)
    except ValueError as e:
        print(f"xlstm7b plan: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    capacity = args.gpu_memory_gb or job.run.gpu_memory_gb or (device_capacity_gb(device, 0) if torch.cuda.is_available() else 80.0)
    plan = estimate(job, args.gpus, device, capacity)
    print(plan.report(job))
    return 0 if plan.fits else 1


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="xlstm7b plot", description="loss, bits-per-byte and throughput curves from metrics.jsonl as a PNG")
    p.add_argument("run_dir")
    p.add_argument("--output", "-o", help="PNG path (default RUN_DIR/metrics.png)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        out = plot(run_dir, Path(args.output) if args.output else run_dir / "metrics.png")
    except ImportError:
        print("xlstm7b plot needs matplotlib: pip install 'xlstm7b[plot]'")
        return 1
    print(f"wrote {out}")
    return 0


COMMANDS = {"train": train_main, "tokenizer": tokenizer_main, "plan": plan_main, "plot": plot_main}


def main(command: str, argv: list[str]) -> int:
    return COMMANDS[command](argv)
