"""Training throughput and MFU, and the toy run's compression against xz.

    python benchmarks/train.py                      # GPU: 125m/350m/1.3b tokens/s + MFU; CPU: toy tokens/s
    python benchmarks/train.py --run-dir runs/toy   # also: the run's val bpb next to xz -9 on the same files

    python benchmarks/train.py --presets 1.3b --optimizer foreach fused --compile both   # 4 rows, one process
    python benchmarks/train.py --presets 1.3b --micro-batch-sweep 4 8 16 32 --optimizer fused
    python benchmarks/train.py --presets 7b --micro-batch 1 --set train.cpu_offload=true   # 7B on one GPU

On a GPU each preset trains a few steps in bf16 (one process, one micro-batch of micro_batch x
seq_len per step, no data loading in the timed region) and reports tokens/s and MFU from the FLOP
count in xlstm7b/train/metrics.py (README, Training), peak GPU and host memory next to what
`xlstm7b plan` predicts, the optimizer's implementation and, with --compile, the compile time.
--micro-batch 0 takes the micro-batch the plan picks. With --profile, also the device time per
kernel of one step and, per step, the time in matrix products, mLSTM kernels, elementwise work,
the optimizer, copies and idle gaps (profiling.step_breakdown). On a CPU the toy preset is timed
the same way in float32 (the PyTorch mLSTM's products count as matrix products there). xz -9 is
Python's lzma at preset 9 | PRESET_EXTREME over the validation split's files, each compressed on
its own. JSON goes to benchmarks/results/train-<device>.json.
"""

import argparse
import dataclasses
import json
import lzma
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from xlstm7b.train.config import load_config
from xlstm7b.train.data import Corpus
from xlstm7b.train.metrics import peak_flops, train_flops_per_token
from xlstm7b.train.optim import build_optimizer, describe
from xlstm7b.train.parallel import Dist, build_model, mixed_precision_dtype
from xlstm7b.train.plan import GiB, estimate, with_micro_batch
from xlstm7b.train.trainer import sequence_loss

RESULTS = Path(__file__).parent / "results"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profiling import profile_kernels, step_breakdown  # noqa: E402


def reset_host_peak() -> None:
    """Starts the process's peak resident memory (Linux's VmHWM) afresh, so that each row reports
    its own peak, not the largest of the rows before it (getrusage's ru_maxrss never goes down)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: host_peak_gb falls back to the process's peak so far
        pass


def host_peak_gb() -> float:
    """Peak resident memory of this process since `reset_host_peak`, in GiB."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20  # kB
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_training(preset: str, device: torch.device, steps: int, micro_batch: int | None, seq_len: int | None,
                  profile: bool = False, compile: bool = False, optimizer: str = "auto", overrides: list[str] = ()) -> dict:
    """One row: `steps` timed training steps of `preset` (after a warm-up step, which compiles with
    --compile: compile_s is its excess over a timed step), with the plan's prediction beside the
    measured peak memory. micro_batch 0 lets the plan pick it."""
    extra = [f"--train.micro_batch={micro_batch}"] if micro_batch is not None else []
    extra += ["--train.compile=true"] if compile else []
    extra += [f"--train.seq_len={seq_len}", f"--train.global_batch_tokens={seq_len * (micro_batch or 512)}"] if seq_len else []
    job = load_config(preset, [*extra, f"--train.optimizer_impl={optimizer}", *overrides])
    trainer_plan = estimate(job, 1, device)  # with train.micro_batch = 0, the trainer's pick for the preset's global batch
    job = with_micro_batch(job, trainer_plan.micro_batch)
    # A timed step is one micro-batch (no accumulation): the plan of exactly that.
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, global_batch_tokens=job.train.micro_batch * job.train.seq_len))
    plan = estimate(job, 1, device)
    t = job.train
    reset_host_peak()
    model, plain, parallel = build_model(job.model, t, Dist(device=device), seed=0)
    opt = build_optimizer(model, t)
    dtype = mixed_precision_dtype(t, device)
    B, S = t.micro_batch, t.seq_len
    ids = torch.randint(2, job.model.vocab_size, (B, S + 1), device=device)
    ids[:, :: max(1, S // 4)] = 0  # document starts, as in packed training rows
    inputs, targets = ids[:, :-1], ids[:, 1:]

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and parallel != "fsdp")

    def step():
        sequence_loss(model, plain.logits, inputs, targets, inputs == 0, autocast, t.loss_chunk_tokens).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()  # warm-up (and compilation)
    sync()
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    tps = B * S / dt
    peak = peak_flops(device)
    row = {
        "preset": preset, "overrides": list(overrides), "parameters": plain.num_params(), "dtype": str(dtype).removeprefix("torch."),
        "compile": t.compile, "optimizer": describe(opt), "parallel": parallel, "cpu_offload": t.cpu_offload,
        "micro_batch": B, "micro_batch_picked": trainer_plan.picked, "seq_len": S, "steps": steps, "step_s": dt,
        "first_step_s": first, "compile_s": max(0.0, first - dt) if t.compile else None, "tokens_per_s": tps,
        "flops_per_token": train_flops_per_token(job.model), "mfu": tps * train_flops_per_token(job.model) / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None,
        "peak_host_gb": host_peak_gb(),
        "plan_gb": round(plan.total_gb, 3), "plan_host_gb": round(plan.host_gb, 3),
    }
    if profile:  # where the step's time goes, after the timed steps (their peak memory is recorded)
        row["profile"] = profile_kernels(step, str(device), top=16)
        row["breakdown"] = step_breakdown(step, str(device))
    return row


def time_rows(preset: str, device: torch.device, args, record) -> None:
    """The rows of one preset, in one process so that they compare: each of eager and compiled
    (--compile), each optimizer (--optimizer) and each micro-batch (--micro-batch-sweep, or the one
    of --micro-batch); and the sizes of a sweep that ran out of memory (the first ends its sweep),
    each with its error. Each goes to `record(kind, row)` as soon as it is measured, so a run cut
    short by its time budget keeps the rows it took."""
    steps = args.steps or (10 if device.type == "cuda" else 3)
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        for optimizer in args.optimizer:
            for m in args.micro_batch_sweep or [args.micro_batch]:
                try:
                    record("throughput", time_training(preset, device, steps, m, args.seq_len or None, args.profile, compiled,
                                                       optimizer, [f"--{o}" for o in args.set]))
                except torch.OutOfMemoryError as e:
                    if not args.micro_batch_sweep:
                        raise
                    record("out_of_memory", {"preset": preset, "compile": compiled, "optimizer": optimizer, "micro_batch": m,
                                             "error": f"out of memory: {str(e).splitlines()[0]}"})
                    break
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


def print_row(row: dict) -> None:
    mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
    mem = f", peak {row['peak_memory_gb']:.1f} GiB (plan {row['plan_gb']:.1f})" if row["peak_memory_gb"] is not None else ""
    comp = f" compiled in {row['compile_s']:.0f} s" if row["compile"] else ""
    print(f"{row['preset']:>6}{comp} micro_batch {row['micro_batch']} {row['optimizer']}: {row['tokens_per_s']:,.0f} tokens/s{mfu}{mem}, "
          f"host peak {row['peak_host_gb']:.1f} GiB (plan {row['plan_host_gb']:.1f})", flush=True)
    for n, b in enumerate(row.get("breakdown", [])):
        parts = ", ".join(f"{k.removesuffix('_us')} {v / 1e3:.1f}" for k, v in b.items() if k != "wall_us")
        print(f"        step {n}: wall {b['wall_us'] / 1e3:.1f} ms = {parts} ms", flush=True)


def xz_bpb(preset: str) -> dict:
    """Bits per byte of xz -9 on each validation document (file) of the preset's corpus."""
    corpus = Corpus(load_config(preset).data)
    raw = compressed = 0
    for _, text in corpus.documents("val"):
        data = text.encode("utf-8")
        raw += len(data)
        compressed += len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    return {"val_bytes": raw, "xz9_bytes": compressed, "xz9_bpb": 8 * compressed / raw}


def run_summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r]
    logs = [r for r in records if "tokens_per_s" in r]
    return {
        "run_dir": str(run_dir), "steps": records[-1]["step"], "val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"],
        "val_bpb_curve": [(r["step"], round(r["val_bpb"], 4)) for r in evals],
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in logs) / len(logs),
        "wall_s": records[-1]["time"] - records[0]["time"] if len(records) > 1 else None,
    }


def machine(device: torch.device) -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        import triton

        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda, "triton": triton.__version__}
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="*", help="default: 125m 350m 1.3b on a GPU, toy on a CPU")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 10 on GPU, 3 on CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="override train.micro_batch (0: the largest the plan fits)")
    p.add_argument("--micro-batch-sweep", type=int, nargs="*", help="one row per micro-batch, until one runs out of memory")
    p.add_argument("--seq-len", type=int, default=0, help="override train.seq_len")
    p.add_argument("--optimizer", nargs="+", default=["auto"], choices=["auto", "fused", "foreach", "loop"],
                   help="train.optimizer_impl; several: a row each (foreach is torch's own default on CUDA)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="config overrides, e.g. --set train.cpu_offload=true model.num_blocks=4")
    p.add_argument("--profile", action="store_true",
                   help="also the device time per kernel of one step, and per step the time in matrix products, "
                        "mLSTM kernels, elementwise work, the optimizer, copies and idle gaps")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                   help="torch.compile each block (train.compile; the warm-up step compiles, compile_s is its excess); "
                        "'both': an eager and a compiled row each")
    p.add_argument("--run-dir", type=Path, help="a finished toy run: report its val bpb next to xz -9")
    p.add_argument("--output", type=Path, help="default benchmarks/results/train-<cpu|gpu>.json")
    args = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    presets = args.presets or (["125m", "350m", "1.3b"] if device.type == "cuda" else ["toy"])
    result = {"machine": machine(device), "throughput": [], "out_of_memory": []}
    out = args.output or RESULTS / f"train-{device.type if device.type == 'cpu' else 'gpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(kind: str, row: dict) -> None:
        if kind == "throughput":
            print_row(row)
        else:
            print(f"{row['preset']:>6} micro_batch {row['micro_batch']}: {row['error']}", flush=True)
        result[kind].append(row)
        out.write_text(json.dumps(result, indent=2))

    for preset in presets:
        time_rows(preset, device, args, record)
    if args.run_dir:
        result["toy_run"] = run_summary(args.run_dir) | xz_bpb("toy")
        r = result["toy_run"]
        print(f"toy run: val bpb {r['val_bpb']:.3f} after {r['steps']} steps; xz -9 on the same validation files: {r['xz9_bpb']:.3f} bpb")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
