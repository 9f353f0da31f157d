"""The argparse helpers every command shares (generate, eval, plan, ...): parsing that returns
argparse's exit code instead of raising, and number types that name the range they accept."""

import argparse
import math


def parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code of argparse's own message (--help: 0, a bad argument: 2)."""
    try:
        return p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def number(kind: type, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False, what: str):
    """An argparse type: a finite `kind` (int or float) in [low, high] (an end excluded with low_open, high_open)."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value > high or value < low or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return convert


NON_NEGATIVE_INT = number(int, 0, what="an integer >= 0")
POSITIVE_INT = number(int, 1, what="an integer >= 1")
