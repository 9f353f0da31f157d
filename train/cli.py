"""`xlstm7b train CONFIG [--section.key=value ...]`."""

import argparse
import sys

from .config import SECTIONS, load_config


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
    from .trainer import TrainingError, train

    try:
        return train(job)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"xlstm7b train: {e}", file=sys.stderr)
        return 1
