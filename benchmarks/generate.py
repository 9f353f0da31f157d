"""Generation speed and memory: xlstm7b.generate next to the official `xlstm` package's
xLSTMLarge.generate, on the same weights, in one run.

    python benchmarks/generate.py                 # CPU: the toy preset, fp32
    python benchmarks/generate.py --device cuda   # GPU: the 7B shape, random bf16 weights

Measures decode tok/s at several batch sizes, prefill tok/s and time to first token (TTFT) at several
prompt lengths, and peak memory while generating more and more tokens (constant for a recurrent model).
Prefill tok/s is one forward pass over the prompt (the prefill proper); TTFT is generate() of one
token, with whatever else that call does (ours, on CUDA: the decode step's first use). The two
models' last-position logits on one prompt are compared too (their relative difference).
The decoding modes (impl): "ours" is xlstm7b's generate with the uncompiled step (on CUDA replayed
from a CUDA graph), "eager" the same step without the graph (CUDA only), "compiled" with
generate(..., compile=True) (on CUDA, the compiled step captured: generate's default there); the
time its first call spends compiling is reported per batch size, with how many graphs inductor's
cache served. "official" is the official model's eager generate, "official-compiled" the official
model in its fastest documented mode, compiled and captured in a CUDA graph (benchmarks/decoding.py).
Only "ours" and "official" have prefill and memory rows (the others share their prefill, and fresh
processes would compile again). With --kernels-per-token, the kernels one decode step runs per mode
(CUDA: as the profiler sees them; CPU: the operators that compute). On CUDA the batch-1 rows carry
ms per token and its ratio to the card's weight-read floor.
Decode rate = B * (N - 1) / (t(N tokens) - t(1 token)), so prefill and the first token are excluded;
every time is the best of --repeats runs. Rows are written to the JSON as they are measured. With --profile, where the time of a prefill and of a decode
step goes, kernel by kernel (benchmarks/profiling.py). Writes benchmarks/results/generate_<device>.json and a PNG
beside it (when matplotlib is installed).
"""

import argparse
import datetime
import functools
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from xlstm7b import XLSTM, ModelConfig, generate
from xlstm7b.quantize import METHODS
from xlstm7b.decode import decoding_state, step_compilations, step_runner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoding import (LiveRows, bench_kernels_per_token, bench_quantized, best_time, cached_official, cpu_name,  # noqa: E402
                      official_graphed_generate, official_model, plot, prompt, version, weight_floor_ms)
from profiling import profile_kernels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(preset: str, device: str, dtype: torch.dtype, official: bool, state_dtype: str = "float32", seed: int = 0):
    """Our model and, if asked, the official xLSTMLarge (in its fused layout, ours) sharing its weights
    and decoding with its state in `state_dtype`, as ours does."""
    config = ModelConfig.from_preset(preset)
    torch.manual_seed(seed)
    with torch.device("meta"):
        ours = XLSTM(config)
    ours = ours.to_empty(device=device)
    ours.init_weights()
    ours = ours.to(dtype).eval()
    return ours, official_model(ours, state_dtype) if official else None


OURS = ("ours", "eager", "compiled")


def run_fn(impl: str, model, ids: torch.Tensor, n: int, graph: bool | None = None, state_dtype: str = "float32"):
    """One greedy generation of n tokens per row; returns the tokens. graph: "ours" with or without
    the CUDA graph (None: generate's default, which steps eagerly for fewer than GRAPH_MIN_TOKENS
    tokens). state_dtype: ours decodes with C and n in it (the official model's is set by `build`)."""
    if impl in OURS:
        graph = False if impl == "eager" else graph
        return generate(model, ids, max_new_tokens=n, compile=impl == "compiled", cuda_graph=graph,
                        state_dtype=DTYPES[state_dtype]).tokens
    if impl == "official-compiled":
        return official_graphed_generate(model, ids, n)
    with torch.no_grad():
        return model.generate(ids, max_length=n)[0]


def forward_fn(impl: str, model, ids: torch.Tensor) -> torch.Tensor:
    """One forward pass over the prompt, the prefill proper; returns the last position's logits (the
    official model computes them at every position: a small cost ours does not have)."""
    with torch.no_grad():
        if impl.startswith("official"):
            return model(ids)[0][:, -1]
        return model(ids, last_logits_only=True)[0][:, -1]


def decode_plan(args) -> list[tuple[int, str, str]]:
    """(batch, state dtype, impl) in the order measured. State dtypes past the first are measured at
    batches above 1 only: at batch 1 the state is about 1 % of a 7B step's traffic."""
    return [(B, sd, impl) for B in args.batches for sd in (args.state_dtypes if B > 1 else args.state_dtypes[:1])
            for impl in args.impls if B == 1 or impl not in args.batch1_only]


def bench_decode(ours: XLSTM, official, args, device: str, rows: list[dict]) -> None:
    """Appends a decode row per (batch, state dtype, impl) of decode_plan, and before a compiled
    mode's first row at a batch size its compilation row. official(state_dtype) -> the official model."""
    cuda = device.startswith("cuda")
    floor = weight_floor_ms(ours, torch.cuda.get_device_name()) if cuda else None
    for B, sd, impl in decode_plan(args):
        model = official(sd) if impl.startswith("official") else ours
        ids = prompt(B, 16, ours.config, device)
        if impl == "compiled":
            rows.append(compile_row(model, ids, B, sd, args))
        # Both calls decode the same way (on CUDA from a graph, captured in each), so the difference is
        # decoding alone.
        graph = True if cuda else None
        row = dict(impl=impl, metric="decode", batch=B, state_dtype=sd)
        try:
            t1 = best_time(lambda: run_fn(impl, model, ids, 1, graph, sd), args.repeats)
            tn = best_time(lambda: run_fn(impl, model, ids, args.decode_tokens, graph, sd), args.repeats)
        except Exception as e:  # out of memory (the state grows with the batch), a peer's compilation: the other rows stand
            row["error"] = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"[:300]
            print(f"decode   {impl:<17} batch {B:>3}, {sd} state: {row['error']}", flush=True)
            rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rate = B * (args.decode_tokens - 1) / (tn - t1)
        row.update(new_tokens=args.decode_tokens, tok_per_s=rate)
        floor_note = ""
        if floor is not None and B == 1:
            row.update(ms_per_token=1e3 / rate, weight_floor_ms=floor, floor_fraction=floor * rate / 1e3)
            floor_note = f" ({1e3 / rate:.2f} ms per token, {100 * floor * rate / 1e3:.0f} % of the weight-read floor)"
        rows.append(row)
        print(f"decode   {impl:<17} batch {B:>3}, {sd} state: {rate:9.1f} tok/s{floor_note}", flush=True)


def compile_row(model: XLSTM, ids: torch.Tensor, B: int, state_dtype: str, args) -> dict:
    """The compiled step's first use: the first call's extra time over later ones (once per model,
    batch size and weights), the compilation's own record of it, and whether it fell back."""
    known = {id(c) for c in step_compilations(model)}
    t0 = time.perf_counter()
    run_fn("compiled", model, ids, 1, state_dtype=state_dtype)
    first = time.perf_counter() - t0
    extra = first - best_time(lambda: run_fn("compiled", model, ids, 1, state_dtype=state_dtype), args.repeats)
    made = [c for c in step_compilations(model) if id(c) not in known]
    row = dict(impl="compiled", metric="compile", batch=B, state_dtype=state_dtype, seconds=extra,
               compile_seconds=sum(c.compile_seconds or 0 for c in made), fx_cache_hits=sum(c.cache_hits for c in made),
               error=next((f"{type(c.error).__name__}: {c.error}"[:300] for c in made if c.error), None))
    print(f"compile  compiled batch {B:>3}: {extra:9.1f} s (once per model, batch size and weights; "
          f"{row['fx_cache_hits']} graphs from inductor's cache)" + (f"; FAILED, uncompiled: {row['error']}" if row["error"] else ""),
          flush=True)
    return row


def bench_prefill(ours: XLSTM, official, args, device: str, rows: list[dict]) -> None:
    """Appends a prefill row per prompt length and model ("ours", "official"): the forward pass over
    the prompt, and unless --forward-only the time to first token through generate."""
    impls = [impl for impl in ("ours", "official") if impl in args.impls]
    for S in args.prompt_lengths:
        ids = prompt(1, S, ours.config, device)
        for impl in impls:
            model = official(args.state_dtypes[0]) if impl == "official" else ours
            row = dict(impl=impl, metric="prefill", prompt_tokens=S)
            try:
                repeats = 1 if S > 8192 else args.repeats
                forward = best_time(lambda: forward_fn(impl, model, ids), repeats)
                row.update(forward_s=forward, tok_per_s=S / forward)
                if not args.forward_only:
                    row["ttft_s"] = best_time(lambda: run_fn(impl, model, ids, 1, state_dtype=args.state_dtypes[0]), repeats)
            except torch.OutOfMemoryError:
                print(f"prefill  {impl:<8} {S:>6} tokens: out of memory", flush=True)
                rows.append(row | dict(error="out of memory"))
                continue
            rows.append(row)
            ttft = f", TTFT {row['ttft_s'] * 1e3:9.1f} ms" if "ttft_s" in row else ""
            print(f"prefill  {impl:<8} {S:>6} tokens: {S / forward:9.0f} tok/s (forward {forward * 1e3:.1f} ms){ttft}", flush=True)
            gc.collect()


def bench_profile(models: dict, args, config: ModelConfig, device, rows: list[dict]) -> None:
    """Where the time goes (profile_kernels): one forward pass over the longest prompt, per model, and
    one decode step of ours at batch 1, eager and replayed from its CUDA graph (compiled too, if
    measured): the same work, so their wall times over the device time show the launch overhead.
    Appends a row per profile to rows as it is taken (one that fails records its error)."""
    S = max(args.prompt_lengths)
    ids = prompt(1, S, config, device)
    cuda = device.startswith("cuda")
    token = torch.ones(1, dtype=torch.long, device=device)

    def decode_step(impl: str, graph: bool):
        state = decoding_state(None, config, 1, device, DTYPES[args.state_dtypes[0]])
        step = step_runner(models[impl], state, cuda_graph=graph, compile=impl == "compiled")
        return lambda: step(token)

    todo = [(impl, f"forward, {S} tokens", lambda impl=impl: (lambda: forward_fn(impl, models[impl], ids)))
            for impl in models if impl != "compiled"]
    todo += [(impl, "decode step, batch 1" + ", CUDA graph" * graph, lambda impl=impl, graph=graph: decode_step(impl, graph))
             for impl in models if impl != "official" for graph in ((False, True) if cuda and impl == "ours" else (cuda,))]
    for impl, what, make in todo:
        row = dict(impl=impl, metric="profile", what=what)
        try:
            with torch.no_grad():
                row.update(profile_kernels(make(), device))
            top = ", ".join(f"{k['name'][:40]} {k['us'] / 1e3:.2f}" for k in row["kernels"][:3])
            print(f"profile  {impl:<8} {what}: wall {row['wall_us'] / 1e3:.2f} ms, device {row['total_us'] / 1e3:.2f} ms "
                  f"in {row['launches']} launches; {top} ms", flush=True)
        except Exception as e:  # out of memory, say: the other rows stand
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"profile  {impl:<8} {what}: {row['error']}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)


def bench_in_process(ours: XLSTM, official, args, rows: list[dict]) -> None:
    """Every measurement but the memory rows, most important first."""
    bench_decode(ours, official, args, args.device, rows)
    if args.kernels_per_token:
        bench_kernels_per_token(ours, args, args.device, rows)
    bench_prefill(ours, official, args, args.device, rows)
    if args.profile:
        models = {i: ours for i in ("ours", "compiled") if i in args.impls}
        models |= {"official": official(args.state_dtypes[0])} if "official" in args.impls else {}
        bench_profile(models, args, ours.config, args.device, rows)


def memory_child(impl: str, n: int, args) -> dict:
    """In a fresh process: peak memory while generating n tokens, and its excess over the memory in
    use before (the model, and buffers kept from a warm-up run). CUDA: the allocator's peak; CPU: the
    process's peak RSS, reset through /proc/self/clear_refs after the warm-up."""
    device = args.device
    state_dtype = args.state_dtypes[0]
    ours, theirs = build(args.preset, device, DTYPES[args.dtype], official=impl == "official", state_dtype=state_dtype)
    model = theirs if impl == "official" else ours
    ids = prompt(1, 16, ours.config, device)
    run_fn(impl, model, ids, 2, state_dtype=state_dtype)  # warm-up: kernels compiled, caches filled
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_fn(impl, model, ids, n, state_dtype=state_dtype)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return dict(peak_bytes=peak, peak_extra_bytes=peak - base)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
    base = proc_status_bytes("VmRSS")
    run_fn(impl, model, ids, n, state_dtype=state_dtype)
    peak = proc_status_bytes("VmHWM")
    return dict(peak_bytes=peak, peak_extra_bytes=peak - base)


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def bench_memory(impls: list[str], args) -> list[dict]:
    rows = []
    for n in args.memory_tokens:
        for impl in impls:
            cmd = [sys.executable, __file__, "--memory-child", impl, str(n), "--device", args.device,
                   "--preset", args.preset, "--dtype", args.dtype, "--state-dtypes", args.state_dtypes[0]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"memory   {impl:<8} {n:>6} tokens: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            m = {k: v / 2**20 for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
            rows.append(dict(impl=impl, metric="memory", new_tokens=n, peak_mib=m["peak_bytes"], peak_extra_mib=m["peak_extra_bytes"]))
            print(f"memory   {impl:<8} {n:>6} tokens: peak {m['peak_bytes']:9.1f} MiB "
                  f"(+{m['peak_extra_bytes']:.1f} MiB over the models and warm-up)", flush=True)
    return rows


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", help="model shape (default: toy on CPU, 7b on CUDA)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--state-dtypes", choices=list(DTYPES), nargs="+", default=["float32"],
                   help="what both models keep the decoding state's C and n in (generate's state_dtype, the official's "
                        "inference_state_dtype); past the first, at batches above 1 only")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--impls", nargs="+", choices=["ours", "eager", "compiled", "official", "official-compiled"],
                   help="decoding modes (default: all there are: eager and official-compiled on CUDA only)")
    p.add_argument("--batch1-only", nargs="*", default=[], metavar="IMPL", help="modes measured at batch 1 only")
    p.add_argument("--decode-tokens", type=int, help="tokens per decode measurement (default: 32 CPU, 256 CUDA)")
    p.add_argument("--prompt-lengths", type=int, nargs="*", default=[2048, 8192, 16384, 65536])
    p.add_argument("--forward-only", action="store_true", help="prefill rows: the forward pass alone, no time to first token")
    p.add_argument("--memory-tokens", type=int, nargs="*", help="generated tokens for the memory rows "
                   "(default: 250 2500 on CPU, 1000 10000 100000 on CUDA; none: no memory rows)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: on a shared 2-core machine, "
                   "a second OpenMP thread waiting for a busy core stalls every small op for milliseconds)")
    p.add_argument("--no-official", action="store_true", help="measure xlstm7b only")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled decode step (its compilation "
                   "takes half a minute on CPU, more for the 7B on CUDA: e.g. for a quick check of the script)")
    p.add_argument("--kernels-per-token", action="store_true", help="the kernels one decode step runs, per mode")
    p.add_argument("--quantize", nargs="+", choices=METHODS, help="instead of the rest: batch-1 decoding with these "
                   "weight-only quantisations next to the unquantised model, and their logits' error against it "
                   "(writes generate_<device>_quantized.json)")
    p.add_argument("--profile", action="store_true", help="also the device time per kernel of a forward pass over "
                   "the longest prompt (each model) and of a decode step at batch 1 (ours: eager, graph, compiled)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    p.add_argument("--memory-child", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("7b" if cuda else "toy")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.decode_tokens = args.decode_tokens or (256 if cuda else 32)
    if args.memory_tokens is None:
        args.memory_tokens = [1000, 10000, 100000] if cuda else [250, 2500]
    available = ["ours", "eager", "compiled", "official", "official-compiled"] if cuda else ["ours", "compiled", "official"]
    dropped = ({"compiled"} if args.no_compiled else set()) | ({"official", "official-compiled"} if args.no_official else set())
    args.impls = [i for i in args.impls or available if i in available and i not in dropped]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device here: the GPU section (7B shape, bf16) is skipped; run the CPU section with --device cpu")
        return
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]), args)))
        return

    with_official = any(i.startswith("official") for i in args.impls) and not args.quantize
    ours, _ = build(args.preset, args.device, DTYPES[args.dtype], official=False)
    officials = {}  # state dtype -> the official model on our weights
    official = functools.partial(cached_official, officials, ours)

    c = ours.config
    agree = logits_diff = None
    if with_official:  # the same weights must give the same logits and (unless near-tied) greedy tokens
        sd, theirs = args.state_dtypes[0], official(args.state_dtypes[0])
        ids = prompt(2, 24, c, args.device)
        agree = bool(torch.equal(run_fn("ours", ours, ids, 16, state_dtype=sd), run_fn("official", theirs, ids, 16)))
        mine, ref = forward_fn("ours", ours, ids).double(), forward_fn("official", theirs, ids).double()
        logits_diff = ((mine - ref).norm() / ref.norm()).item()
        print(f"same greedy tokens as the official model: {agree}; last logits' relative difference {logits_diff:.2e}",
              flush=True)
    header = dict(
        device=args.device,
        device_name=torch.cuda.get_device_name() if cuda else cpu_name(),
        driver=torch.version.cuda if cuda else None,
        torch=torch.__version__,
        triton=version("triton"),
        xlstm=version("xlstm") if with_official else None,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        preset=args.preset, model=dict(embedding_dim=c.embedding_dim, num_blocks=c.num_blocks, num_heads=c.num_heads,
                                       vocab_size=c.vocab_size, params=ours.num_params()),
        dtype=args.dtype, state_dtypes=args.state_dtypes, impls=args.impls, threads=args.threads, repeats=args.repeats,
        same_greedy_tokens=agree, logits_rel_diff=logits_diff,
    )
    out = args.out / f"generate_{'cuda' if cuda else 'cpu'}{'_quantized' if args.quantize else ''}.json"
    rows, interrupted = LiveRows(out, header), False
    try:  # interrupted (Ctrl-C, or `timeout --signal=INT` in benchmarks/gpu.sh): the rows so far are written
        if args.quantize:
            bench_quantized(ours, args.quantize, args.decode_tokens, args.repeats, rows)
        else:
            bench_in_process(ours, official, args, rows)
            del ours, official  # the memory rows' fresh processes need the device's memory
            officials.clear()
            gc.collect()
            torch.cuda.empty_cache()
            rows += bench_memory([i for i in ("ours", "official") if i in args.impls], args)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} rows measured so far", flush=True)
    rows.write(interrupted=interrupted)
    print(f"wrote {out}")
    if not args.quantize:
        plot(dict(header, rows=list(rows)), out.with_suffix(".png"))


if __name__ == "__main__":
    main()
