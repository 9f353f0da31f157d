"""What generate's check for non-finite logits costs per decoded token, next to the decode step.

    python benchmarks/finite_check.py               # CPU: the debug, toy and 125m presets, batch 1 and 8

Per token, generate accumulates `nonfinite |= ~logits.isfinite().all()` on the device and reads the
flag at its syncs (every token on CPU). This times one eager `model.step` and that check (flag
update and read) on the same logits, each the median of --repeats timed loops of --tokens tokens, and
writes benchmarks/results/finite_check_cpu.json.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from xlstm7b import XLSTM, ModelConfig, State

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoding import cpu_name, version  # noqa: E402


def per_token(fn, tokens: int, repeats: int) -> float:
    """Median over `repeats` of the seconds per call of `fn` over `tokens` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(tokens):
            fn()
        times.append((time.perf_counter() - t0) / tokens)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["debug", "toy", "125m"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        model = XLSTM(ModelConfig.from_preset(preset)).eval()
        for B in args.batch:
            state = State.zeros(model.config, B)
            token = torch.randint(2, model.config.vocab_size, (B,))
            with torch.no_grad():
                logits = model.step(token, state)
                step_s = per_token(lambda: model.step(token, state), args.tokens, args.repeats)
                nonfinite = torch.zeros((), dtype=torch.bool)

                def check():
                    nonfinite.logical_or_(~logits.isfinite().all())
                    return bool(nonfinite)

                check_s = per_token(check, args.tokens * 20, args.repeats)
            rows.append(dict(preset=preset, batch=B, vocab=model.config.vocab_size, step_ms=step_s * 1e3,
                             check_us=check_s * 1e6, check_share=check_s / step_s))
            print(f"{preset:>6} B={B:<2} step {step_s * 1e3:8.3f} ms   check {check_s * 1e6:7.1f} us "
                  f"({100 * check_s / step_s:.2f} % of the step)", flush=True)
    result = dict(device="cpu", device_name=cpu_name(), torch=torch.__version__, triton=version("triton"),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  threads=args.threads, tokens=args.tokens, repeats=args.repeats,
                  load_average_1min=os.getloadavg()[0], rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "finite_check_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
