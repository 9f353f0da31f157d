"""Decoding speed by CPU thread count, with no core, one core (by default), or more kept busy by
other processes: the measurement behind `--threads`' default (xlstm7b/threads.py).

    python benchmarks/threads.py --preset debug --tokens 200
    python benchmarks/threads.py --busy 0 1 2     # also with both cores of a 2-core machine taken

Writes benchmarks/results/threads_cpu.json (tokens/s per threads x busy cores, and the machine).
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import torch

from xlstm7b import XLSTM, ModelConfig, generate
from xlstm7b.threads import usable_cores


def spin(stop) -> None:
    while not stop.is_set():
        pass


def tokens_per_s(model: XLSTM, threads: int, tokens: int) -> float:
    torch.set_num_threads(threads)
    generate(model, [[0, 5, 6]], max_new_tokens=8)  # warm-up
    t0 = time.perf_counter()
    generate(model, [[0, 5, 6]], max_new_tokens=tokens)
    return tokens / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="cores kept busy by spinning processes, a pass each")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "threads_cpu.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = XLSTM(ModelConfig.from_preset(args.preset)).eval()
    cores = usable_cores()
    rows = []
    for busy in args.busy:
        stop = mp.Event()
        spinners = [mp.Process(target=spin, args=(stop,)) for _ in range(busy)]
        for s in spinners:
            s.start()
        try:
            for threads in range(1, cores + 1):
                rate = tokens_per_s(model, threads, args.tokens)
                rows.append({"busy_cores": busy, "threads": threads, "tokens_per_s": round(rate, 1)})
                print(f"busy cores {busy}  threads {threads}: {rate:8.1f} tok/s", flush=True)
        finally:
            stop.set()
            for s in spinners:
                s.join()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"preset": args.preset, "tokens": args.tokens, "rows": rows, "load_average_before": os.getloadavg(),
              "machine": {"cpu": cpu, "cores": cores, "torch": torch.__version__, "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
              "note": "measured on a machine shared with other work: other processes' load adds to the busy cores"}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
