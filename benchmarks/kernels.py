"""mLSTM kernel benchmark: our Triton and PyTorch chunkwise kernels side by side with the peers.

    python benchmarks/kernels.py                 # on a GPU: everything, writes JSON + PNG
    python benchmarks/kernels.py --dry-run       # tiny shapes on CPU through the torch backend
    python benchmarks/kernels.py --tune          # on a GPU: our kernels' launch settings, swept

Chunkwise kernels: forward and forward+backward time and peak memory at a fixed token count
B*S = 65,536 (S from 512 to 65,536) for the xLSTM 7B head shape (NH 8, DK 256, DV 512, bf16) and
for NH 16 (DK 128, DV 256); ours at chunk 64 and 128, each also with the L2-aware launch order
(rows "-tiles": grid_order "tiles" on every per-chunk launch), and at chunk 128 tiled inside the
chunk (rows "-chunk128-intra": aot.VARIANTS' chunk128-intra), and at chunk 64 with the states pass
split over 16 segments (row "-split": aot.VARIANTS' split, for batch 1 at S 65,536; at S 8,192 the
row shows its cost where eight sequences already fill the GPU). Peers, each skipped with a message
when missing: the official TFLA kernel (mlstm_kernels, "chunkwise--triton_xl_chunk"),
flash-linear-attention's chunk_simple_gla,
and causal flash attention through torch SDPA (32 heads x 128, same token count).
Step kernel: latency at batch 1, 8, 64 with the 7B per-layer state, and the HBM bandwidth it reaches
(state bytes read + written per step / time), in both forms (STEP_FORMS: rows "xlstm7b-triton", two
launches, the default, and "xlstm7b-triton-one-launch"). With --profile: the device time per kernel of our
forward and forward+backward at the longest S (where the time goes, next to the roofline), for
both grid orders.
With --tune, only a sweep of our kernels' tiles, warps and pipeline stages against launch_config's
(bench_tune; results in tune-<date>.json; --dry-run runs it in Triton's interpreter).
Results go to benchmarks/results/kernels-<date>.json and .png (--out: another folder). Ours, the
official kernel and the step kernel run first, then the other peers. The JSON is rewritten after
every row and after each row's forward, so a run interrupted (Ctrl-C, `timeout --signal=INT` in
benchmarks/gpu.sh) or killed keeps what it measured so far.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_providers import measure, mlstm_inputs, provider_fla, provider_ours, provider_sdpa, provider_tfla  # noqa: E402
from plotting import pyplot  # noqa: E402
from profiling import profile_kernels  # noqa: E402
from xlstm7b.kernels import mlstm, mlstm_step_, zero_state  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def bench_profile(args, device, dtype, record) -> None:
    """Where the time of our chunkwise forward and forward+backward goes, at the first head shape and
    the longest S (profile_kernels); on a GPU for both grid orders of the per-chunk launches."""
    NH, DK, DV = args.heads[0]
    S = max(args.seq_lens)
    B = max(1, args.tokens // S)
    backend = "torch" if args.dry_run else "triton"
    for order in ("chunks",) if args.dry_run else ("chunks", "tiles"):
        make = provider_ours(backend, args.chunk_size, order)
        provider = f"xlstm7b-{backend}" + ("" if order == "chunks" else f"-{order}")
        for phase, grad in (("forward", False), ("forward+backward", True)):
            out = make(mlstm_inputs(B, NH, S, DK, DV, dtype, device, grad=grad))

            def run():
                with torch.set_grad_enabled(grad):
                    y = out()
                    if grad:
                        y.backward(torch.ones_like(y))

            record(dict(kernel="profile", provider=provider, phase=phase, B=B, S=S, NH=NH, DK=DK, DV=DV,
                        **profile_kernels(run, device)))


# Meta-parameters to try against launch_config's, per launch, each a change of its defaults. Every
# one compiles for sm_90 without spills at the 7B head shape, chunk 64 and 128, bf16 (kernels.aot,
# Triton 3.7.1); RB 32 with 4 warps lowers to mma.sync, the rest to wgmma.
# The variants first: the L2-aware launch order (the row "per-chunk" sets it on every per-chunk
# launch at once), the states pass at each chunk's own stabilizer and split over segments, then each
# launch's settings.
TILES_FIRST = dict(grid_order="tiles")
TUNE_CANDIDATES = {
    "per-chunk": [TILES_FIRST],
    "states": [dict(local_max=1), dict(segments=16), dict(segments=64), dict(num_warps=4), dict(BV=32),
               dict(BV=32, num_warps=4), dict(BK=128), dict(BV=128), dict(num_stages=2), dict(num_stages=4)],
    "output": [TILES_FIRST, dict(RB=32, num_warps=4), dict(BV=128), dict(BV=32), dict(BK=32), dict(num_stages=2),
               dict(num_stages=4), dict(TILES_FIRST, BV=128)],
    "dqk": [TILES_FIRST, dict(BK=64), dict(BK=16), dict(BV=32), dict(BV=128), dict(num_warps=4), dict(num_stages=2)],
    "dv": [TILES_FIRST, dict(BV=32), dict(BV=128), dict(BK=32), dict(num_warps=4), dict(num_stages=2),
           dict(TILES_FIRST, BV=128)],
    "scores": [TILES_FIRST, dict(RB=32, num_warps=4), dict(BK=32), dict(num_stages=2)],
}
# The one-pass forward (off by default), first in the sweep, at the chunk it is built for
# (FUSED_MAX_CHUNK = 16), against the two-pass forward at 16 and (in the summary) at 64.
FUSED_CANDIDATES = [(16, dict(enabled=1)), (16, dict(enabled=1, BV=32)), (16, dict(enabled=1, num_stages=2))]


def tune_plan(chunks: list[int], per_launch: int | None) -> list[tuple[int, str, dict]]:
    """(chunk, launch, change) in the order the sweep measures them: the fused forward's candidates,
    then every other launch's candidates at each of `chunks` in turn (at most per_launch of each)."""
    plan = [(c, "fused", change) for c, change in FUSED_CANDIDATES[:per_launch]]
    return plan + [(c, launch, change) for c in chunks for launch, changes in TUNE_CANDIDATES.items()
                   for change in changes[:per_launch]]


def bench_tune(args, device, dtype, record) -> None:
    """Our chunkwise kernels with other launch settings (tune_plan, through launch_overrides) at the
    first head shape and the longest S: the forward time for the forward's launches, forward+backward
    for the backward's ("states" runs in both), next to the defaults at the same chunk measured in
    the same run (a "defaults" row per chunk), and the relative difference of the output (h, or dq
    for the backward's launches) from the defaults' (summation order and rounding only)."""
    from xlstm7b.kernels.launch_settings import GRID_LAUNCHES, launch_config, launch_overrides

    NH, DK, DV = args.heads[0]
    S = max(args.seq_lens)
    B = max(1, args.tokens // S)
    fwd_x = mlstm_inputs(B, NH, S, DK, DV, dtype, device, grad=False)
    bwd_x = mlstm_inputs(B, NH, S, DK, DV, dtype, device, grad=True)

    def run(chunk: int, overrides: dict, phases: tuple[str, ...]) -> dict:
        out = {}
        with launch_overrides(**overrides):
            if "fwd" in phases:
                with torch.no_grad():
                    fwd = lambda: mlstm(*fwd_x, backend="triton", chunk_size=chunk)[0]  # noqa: E731
                    out["fwd_ms"], _ = measure(fwd, device, args.reps)
                    out["h"] = fwd()
            if "fwdbwd" in phases:
                dout = None

                def fwd_bwd():
                    nonlocal dout
                    for x in bwd_x:
                        x.grad = None
                    y = mlstm(*bwd_x, backend="triton", chunk_size=chunk)[0]
                    dout = torch.ones_like(y) if dout is None else dout
                    y.backward(dout)

                out["fwdbwd_ms"], _ = measure(fwd_bwd, device, args.reps)
                out["dq"] = bwd_x[0].grad.clone()
        return out

    bases, defaults = {}, {}
    for chunk, launch, change in tune_plan(args.tune_chunks, args.tune_per_launch):
        if chunk not in bases:
            defaults[chunk] = launch_config(fwd_x[0], fwd_x[2], chunk)
            bases[chunk] = run(chunk, {}, ("fwd", "fwdbwd"))
            record(dict(kernel="tune", launch="defaults", chunk=chunk, B=B, S=S, NH=NH, DK=DK, DV=DV,
                        settings={k: {p: v for p, v in cfg.items() if p not in ("L", "DT", "PREC")}
                                  for k, cfg in defaults[chunk].items()},
                        fwd_ms=bases[chunk]["fwd_ms"], fwdbwd_ms=bases[chunk]["fwdbwd_ms"]))
        overrides = {k: change for k in GRID_LAUNCHES} if launch == "per-chunk" else {launch: change}
        with launch_overrides(**overrides):
            if all(launch_config(fwd_x[0], fwd_x[2], chunk)[k] == defaults[chunk][k] for k in overrides):
                continue  # the default already (RB capped at the chunk, say)
        base = bases[chunk]
        phases = {"states": ("fwd", "fwdbwd"), "output": ("fwd",), "fused": ("fwd", "fwdbwd"),
                  "per-chunk": ("fwd", "fwdbwd")}.get(launch, ("fwdbwd",))
        row = dict(kernel="tune", launch=launch, chunk=chunk, change=change)
        try:
            got = run(chunk, overrides, phases)
            for phase in phases:
                key = f"{phase}_ms"
                row[key], row[f"{phase}_vs_default"] = got[key], base[key] / got[key]
            ref, new = (base["h"], got["h"]) if "fwd" in phases else (base["dq"], got["dq"])
            row["rel_diff"] = ((new.float() - ref.float()).norm() / ref.float().norm()).item()
        except Exception as e:  # out of shared memory, say: a finding, not the end of the sweep
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        record(row)


PROVIDERS = ("xlstm7b-triton", "xlstm7b-triton-chunk128", "xlstm7b-triton-tiles", "xlstm7b-triton-chunk128-tiles",
             "xlstm7b-triton-chunk128-intra", "xlstm7b-triton-chunk128-intra-tiles", "xlstm7b-triton-split",
             "tfla-exp-chunk128", "fla-simple-gla", "sdpa-flash-32x128", "xlstm7b-torch")


def bench_chunkwise(args, device, dtype, record, names: tuple[str, ...]) -> None:
    """Records one row per provider (of `names`) and shape."""
    providers = {}
    if not args.dry_run:  # the peers before our PyTorch form: the run may be cut short
        providers["xlstm7b-triton"] = lambda: provider_ours("triton", args.chunk_size)
        providers["xlstm7b-triton-chunk128"] = lambda: provider_ours("triton", 128)  # TFLA's chunk
        # the L2-aware launch order: every per-chunk launch with the tile index fastest
        providers["xlstm7b-triton-tiles"] = lambda: provider_ours("triton", args.chunk_size, "tiles")
        providers["xlstm7b-triton-chunk128-tiles"] = lambda: provider_ours("triton", 128, "tiles")
        # chunk 128 tiled in sub-blocks of 64 with chunk 64's operand tiles (aot.VARIANTS)
        providers["xlstm7b-triton-chunk128-intra"] = lambda: provider_ours("triton", 128, variant="chunk128-intra")
        providers["xlstm7b-triton-chunk128-intra-tiles"] = lambda: provider_ours("triton", 128, "tiles", "chunk128-intra")
        # the states pass split over 16 segments of each sequence (aot.VARIANTS)
        providers["xlstm7b-triton-split"] = lambda: provider_ours("triton", args.chunk_size, variant="split")
        providers["tfla-exp-chunk128"] = lambda: provider_tfla(128)
        providers["fla-simple-gla"] = provider_fla
        providers["sdpa-flash-32x128"] = lambda: provider_sdpa(device)
    providers["xlstm7b-torch"] = lambda: provider_ours("torch", args.chunk_size)
    for name, make_provider in providers.items():
        if name not in names or (args.providers and name not in args.providers):
            continue
        try:
            make = make_provider()
        except (ImportError, RuntimeError) as e:
            print(f"skip {name}: {e}")
            continue
        for NH, DK, DV in args.heads:
            for S in args.seq_lens:
                B = max(1, args.tokens // S)
                row = dict(kernel="chunkwise", provider=name, B=B, S=S, NH=NH, DK=DK, DV=DV, dtype=str(dtype))
                try:
                    fwd = make(mlstm_inputs(B, NH, S, DK, DV, dtype, device, grad=False))
                    with torch.no_grad():
                        row["fwd_ms"], row["fwd_peak_mib"] = measure(fwd, device, args.reps)
                    record(row)  # kept if compiling and tuning the backward outlasts the stage
                    x = mlstm_inputs(B, NH, S, DK, DV, dtype, device, grad=True)
                    out = make(x)
                    dout = None

                    def fwd_bwd():
                        nonlocal dout
                        y = out()
                        dout = torch.ones_like(y) if dout is None else dout
                        y.backward(dout)

                    row["fwdbwd_ms"], row["fwdbwd_peak_mib"] = measure(fwd_bwd, device, args.reps)
                except Exception as e:  # a peer failing on one shape must not stop the run
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    torch.cuda.empty_cache() if device == "cuda" else None
                record(row)


STEP_FORMS = {"xlstm7b-triton": {}, "xlstm7b-triton-one-launch": dict(step=dict(one_launch=1))}
"""The forms of the Triton step measured, by provider, as launch_overrides: n and m written by a
second small launch (the default) or by the last DV tile of each head (one launch); the faster one
should be the default."""


def bench_step(args, device, record) -> None:
    NH, DK, DV = args.step_shape
    backend = "torch" if args.dry_run else "triton"
    if backend == "triton":  # triton is optional for the CPU dry run
        from xlstm7b.kernels.launch_settings import launch_overrides
    forms = STEP_FORMS if backend == "triton" else {"xlstm7b-torch": None}
    for B in args.step_batches:
        state = zero_state(B, NH, DK, DV, device=device)
        q, k = torch.randn(B, NH, DK, device=device), torch.randn(B, NH, DK, device=device)
        v = torch.randn(B, NH, DV, device=device)
        i, f = torch.randn(B, NH, device=device), torch.randn(B, NH, device=device) + 4
        state_bytes = 4 * B * NH * (DK * DV + DK + 1)
        io_bytes = 4 * B * NH * (2 * DK + 2 * DV + 2)
        moved = 2 * state_bytes + io_bytes
        for provider, overrides in forms.items():
            with launch_overrides(**overrides) if overrides is not None else contextlib.nullcontext():
                ms, _ = measure(lambda: mlstm_step_(q, k, v, i, f, state, backend=backend), device, args.reps)
            record(dict(kernel="step", provider=provider, B=B, NH=NH, DK=DK, DV=DV, ms=ms, bytes=moved,
                        gb_per_s=moved / ms / 1e6))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def environment(device: str) -> dict:
    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__, python=platform.python_version())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            env["driver"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["device"] = platform.processor() or "cpu"
    return env


def plot(rows: list[dict], path: Path) -> None:
    if (plt := pyplot()) is None:
        return
    shapes = sorted({(r["NH"], r["DK"], r["DV"]) for r in rows if r["kernel"] == "chunkwise"})
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 4 * len(shapes)), squeeze=False)
    for row_axes, (NH, DK, DV) in zip(axes, shapes):
        for ax, key in zip(row_axes, ("fwd_ms", "fwdbwd_ms")):
            for name in dict.fromkeys(r["provider"] for r in rows if r["kernel"] == "chunkwise"):
                pts = [(r["S"], r[key]) for r in rows if r["kernel"] == "chunkwise" and r["provider"] == name and (r["NH"], r["DK"], r["DV"]) == (NH, DK, DV) and key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set(xscale="log", xlabel="sequence length S (B*S fixed)", ylabel="ms", title=f"{key[:-3]}: NH {NH}, DK {DK}, DV {DV}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def head_shape(text: str) -> tuple[int, int, int]:
    try:
        NH, DK, DV = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NH,DK,DV (three integers), got {text!r}") from None
    return NH, DK, DV


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the torch backend (checks the script)")
    p.add_argument("--tokens", type=int, default=65536, help="B * S for the chunkwise kernels")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--chunk-size", type=int, default=64, help="chunk size of our kernels")
    p.add_argument("--step-batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--reps", type=int, default=100, help="measurement time per point in ms (do_bench rep)")
    p.add_argument("--heads", type=head_shape, nargs="+", default=[(8, 256, 512), (16, 128, 256)],
                   metavar="NH,DK,DV", help="head shapes of the chunkwise rows (default 8,256,512 16,128,256)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, help="chunkwise rows of these only (default: all)")
    p.add_argument("--profile", action="store_true", help="also the time per kernel of our forward and forward+backward")
    p.add_argument("--tune", action="store_true",
                   help="only the sweep of our kernels' launch settings (tiles, warps, stages) against the defaults")
    p.add_argument("--tune-chunks", type=int, nargs="+", default=[64, 128],
                   help="chunk sizes of the --tune sweep's two-pass launches (the fused forward's are fixed)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    args = p.parse_args(argv)
    args.step_shape = (8, 256, 512)
    if args.dry_run:
        args.tokens, args.seq_lens, args.chunk_size = 128, [32, 64], 16
        args.heads, args.step_shape, args.step_batches, args.reps = [(2, 16, 32)], (2, 16, 32), [1, 2], 25
        args.tune_chunks, args.tune_per_launch = [16], 1
    else:
        args.tune_per_launch = None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        device, dtype = "cpu", torch.float32
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
    else:
        raise SystemExit("no CUDA device: run with --dry-run to check the script on CPU")
    if args.dry_run and args.tune:
        # the sweep is of our Triton kernels: on the CPU they run in Triton's interpreter, which must be
        # on before they are defined (they are imported on first use)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("tune" if args.tune else "kernels") + ("-dry-run" if args.dry_run else f"-{datetime.date.today().isoformat()}")
    path = args.out / f"{stem}.json"
    report = dict(environment=environment(device), tokens=args.tokens, chunk_size=args.chunk_size,
                  interrupted=True, rows=[])

    def write() -> None:  # after every row: a run killed in a peer's row keeps the rows before it
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)

    def record(row: dict) -> None:  # a row recorded again (completed) is rewritten, not repeated
        print(json.dumps(row), flush=True)
        if not any(r is row for r in report["rows"]):
            report["rows"].append(row)
        write()

    # Most important first, if the run is cut: ours and the official kernel, ours at its chunk, the
    # step kernel and the profile (quick), then the other peers (whose compiling and tuning is slow).
    first = ("xlstm7b-triton", "xlstm7b-triton-tiles", "tfla-exp-chunk128", "xlstm7b-triton-chunk128",
             "xlstm7b-triton-chunk128-tiles", "xlstm7b-triton-chunk128-intra", "xlstm7b-triton-chunk128-intra-tiles",
             "xlstm7b-triton-split")
    try:
        if args.tune:
            bench_tune(args, device, dtype, record)
        else:
            bench_chunkwise(args, device, dtype, record, first)
            bench_step(args, device, record)
            if args.profile:
                bench_profile(args, device, dtype, record)
            bench_chunkwise(args, device, dtype, record, tuple(p for p in PROVIDERS if p not in first))
        report["interrupted"] = False
    except KeyboardInterrupt:
        print(f"interrupted: writing the {len(report['rows'])} rows measured so far")
    write()
    print(f"wrote {path}")
    if not args.tune:
        plot(report["rows"], args.out / f"{stem}.png")
    return report


if __name__ == "__main__":
    main()
