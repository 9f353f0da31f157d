"""Generation speed and memory: xlstm7b.generate next to the official `xlstm` package's
xLSTMLarge.generate, on the same weights, in one run.

    python benchmarks/generate.py                 # CPU: the toy preset, fp32
    python benchmarks/generate.py --device cuda   # GPU: the 7B shape, random bf16 weights

Measures decode tok/s at several batch sizes, prefill tok/s and time to first token (TTFT) at several
prompt lengths, and peak memory while generating more and more tokens (constant for a recurrent model).
Prefill tok/s is one forward pass over the prompt (the prefill proper); TTFT is generate() of one
token, with whatever else that call does (ours, on CUDA: the decode step's first use). The two
models' last-position logits on one prompt are compared too (their relative difference).
"compiled" is xlstm7b with generate(..., compile=True) (its prefill is ours, so it has no prefill
rows; on CUDA it has no memory rows either, whose fresh processes would compile again); the time its
first call spends compiling is reported per batch size.
Decode rate = B * (N - 1) / (t(N tokens) - t(1 token)), so prefill and the first token are excluded;
every time is the best of --repeats runs. With --profile, where the time of a prefill and of a decode
step goes, kernel by kernel (benchmarks/profiling.py). Writes benchmarks/results/generate_<device>.json and a PNG
beside it (when matplotlib is installed).
"""

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from xlstm7b import XLSTM, ModelConfig, generate
from xlstm7b.decode import decoding_state, step_runner

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    if not official:
        return ours, None
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    on_gpu = device.startswith("cuda")
    kernels = (
        dict(chunkwise_kernel="chunkwise--triton_xl_chunk", sequence_kernel="native_sequence__triton", step_kernel="triton")
        if on_gpu
        else dict(chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native", step_kernel="native")
    )
    c = config
    theirs_config = xLSTMLargeConfig(
        embedding_dim=c.embedding_dim, num_heads=c.num_heads, num_blocks=c.num_blocks, vocab_size=c.vocab_size,
        qk_dim_factor=c.qk_dim_factor, v_dim_factor=c.v_dim_factor, ffn_proj_factor=c.ffn_proj_factor,
        ffn_round_up_to_multiple_of=c.ffn_round_up_to_multiple_of, gate_soft_cap=c.gate_soft_cap,
        output_logit_soft_cap=c.output_logit_soft_cap, chunk_size=c.chunk_size, weight_mode="fused",
        mode="inference", return_last_states=True, inference_state_dtype=state_dtype,
        autocast_kernel_dtype="bfloat16" if dtype == torch.bfloat16 else "float32", **kernels,
    )
    with torch.device("meta"):
        theirs = xLSTMLarge(theirs_config)
    # Same tensors, no copy: only the embedding's name differs.
    sd = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(sd, strict=True, assign=True)
    # On the GPU their gate pre-activations in float32, as ours are: in bfloat16 they reach the TFLA
    # prefill kernel as a bfloat16 vecI, whose compilation aborts in Triton 3.6.0's LLVM (an
    # SLPVectorizer assertion); their CPU forms take float32 gates only with float32 q and k.
    for name, module in theirs.named_modules() if on_gpu else ():
        if name.endswith("ifgate_preact"):
            module.register_forward_hook(lambda module, args, out: out.float())
    return ours, theirs.eval()


def run_fn(impl: str, model, ids: torch.Tensor, n: int, graph: bool | None = None, state_dtype: str = "float32"):
    """One greedy generation of n tokens per row; returns the tokens. graph: ours with or without the
    CUDA graph (None: generate's default, which steps eagerly for fewer than GRAPH_MIN_TOKENS tokens).
    state_dtype: ours decodes with C and n in it (the official model's is set by `build`)."""
    if impl in ("ours", "compiled"):
        return generate(model, ids, max_new_tokens=n, compile=impl == "compiled", cuda_graph=graph,
                        state_dtype=DTYPES[state_dtype]).tokens
    with torch.no_grad():
        return model.generate(ids, max_length=n)[0]


def forward_fn(impl: str, model, ids: torch.Tensor) -> torch.Tensor:
    """One forward pass over the prompt, the prefill proper; returns the last position's logits (the
    official model computes them at every position: a small cost ours does not have)."""
    with torch.no_grad():
        if impl == "official":
            return model(ids)[0][:, -1]
        return model(ids, last_logits_only=True)[0][:, -1]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def prompt(batch: int, length: int, config: ModelConfig, device) -> torch.Tensor:
    ids = torch.randint(2, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length)).to(device)
    ids[:, 0] = config.bos_token_id
    return ids


def bench_speed(models: dict, args, config: ModelConfig, device, rows: list[dict]) -> None:
    """Appends the decode and prefill rows to rows (kept by the caller if interrupted)."""
    for B in args.batches:
        ids = prompt(B, 16, config, device)
        for impl, model in models.items():
            if impl == "compiled":
                t0 = time.perf_counter()
                run_fn(impl, model, ids, 1, state_dtype=args.state_dtype)
                first = time.perf_counter() - t0
                compile_s = first - best_time(lambda: run_fn(impl, model, ids, 1, state_dtype=args.state_dtype), args.repeats)
                rows.append(dict(impl=impl, metric="compile", batch=B, seconds=compile_s))
                print(f"compile  {impl:<8} batch {B:>3}: {compile_s:9.1f} s (once per model, batch size and weights)", flush=True)
            # Both calls decode the same way (on CUDA from a graph, captured in each), so the difference is
            # decoding alone.
            graph = True if device.startswith("cuda") else None
            try:
                t1 = best_time(lambda: run_fn(impl, model, ids, 1, graph, args.state_dtype), args.repeats)
                tn = best_time(lambda: run_fn(impl, model, ids, args.decode_tokens, graph, args.state_dtype), args.repeats)
            except torch.OutOfMemoryError:  # the recurrent state grows with the batch: keep the other rows
                print(f"decode   {impl:<8} batch {B:>3}: out of memory", flush=True)
                rows.append(dict(impl=impl, metric="decode", batch=B, error="out of memory"))
                gc.collect()
                torch.cuda.empty_cache()
                continue
            rate = B * (args.decode_tokens - 1) / (tn - t1)
            rows.append(dict(impl=impl, metric="decode", batch=B, new_tokens=args.decode_tokens, tok_per_s=rate))
            print(f"decode   {impl:<8} batch {B:>3}: {rate:9.1f} tok/s", flush=True)
    for S in args.prompt_lengths:
        ids = prompt(1, S, config, device)
        for impl, model in models.items():
            if impl == "compiled":
                continue  # the same prefill as "ours"
            try:
                repeats = 1 if S > 8192 else args.repeats
                ttft = best_time(lambda: run_fn(impl, model, ids, 1, state_dtype=args.state_dtype), repeats)
                forward = best_time(lambda: forward_fn(impl, model, ids), repeats)
            except torch.OutOfMemoryError:
                print(f"prefill  {impl:<8} {S:>6} tokens: out of memory", flush=True)
                rows.append(dict(impl=impl, metric="prefill", prompt_tokens=S, error="out of memory"))
                continue
            rows.append(dict(impl=impl, metric="prefill", prompt_tokens=S, ttft_s=ttft, forward_s=forward, tok_per_s=S / forward))
            print(f"prefill  {impl:<8} {S:>6} tokens: {S / forward:9.0f} tok/s (forward {forward * 1e3:.1f} ms), "
                  f"TTFT {ttft * 1e3:9.1f} ms", flush=True)
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
        state = decoding_state(None, config, 1, device, DTYPES[args.state_dtype])
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


def memory_child(impl: str, n: int, args) -> dict:
    """In a fresh process: peak memory while generating n tokens, and its excess over the memory in
    use before (the model, and buffers kept from a warm-up run). CUDA: the allocator's peak; CPU: the
    process's peak RSS, reset through /proc/self/clear_refs after the warm-up."""
    device = args.device
    ours, theirs = build(args.preset, device, DTYPES[args.dtype], official=impl == "official", state_dtype=args.state_dtype)
    model = theirs if impl == "official" else ours
    ids = prompt(1, 16, ours.config, device)
    run_fn(impl, model, ids, 2, state_dtype=args.state_dtype)  # warm-up: kernels compiled, caches filled
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_fn(impl, model, ids, n, state_dtype=args.state_dtype)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return dict(peak_bytes=peak, peak_extra_bytes=peak - base)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
    base = proc_status_bytes("VmRSS")
    run_fn(impl, model, ids, n, state_dtype=args.state_dtype)
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
                   "--preset", args.preset, "--dtype", args.dtype, "--state-dtype", args.state_dtype]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"memory   {impl:<8} {n:>6} tokens: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            m = {k: v / 2**20 for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
            rows.append(dict(impl=impl, metric="memory", new_tokens=n, peak_mib=m["peak_bytes"], peak_extra_mib=m["peak_extra_bytes"]))
            print(f"memory   {impl:<8} {n:>6} tokens: peak {m['peak_bytes']:9.1f} MiB "
                  f"(+{m['peak_extra_bytes']:.1f} MiB over the models and warm-up)", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (metric, x, y, xlabel, ylabel) in zip(axes, [
        ("decode", "batch", "tok_per_s", "batch size", "decode tok/s"),
        ("prefill", "prompt_tokens", "ttft_s", "prompt tokens", "time to first token (s)"),
        ("memory", "new_tokens", "peak_mib", "generated tokens", "peak memory while generating (MiB)"),
    ]):
        for impl, color in (("ours", "C0"), ("compiled", "C1"), ("official", "C2")):
            pts = sorted((r[x], r[y]) for r in result["rows"] if r["impl"] == impl and r["metric"] == metric and y in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl, color=color)
        xs = sorted({r[x] for r in result["rows"] if r["metric"] == metric})
        ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.minorticks_off()
        ax.legend()
    fig.suptitle(f"generate, {result['preset']} preset, {result['dtype']}, {result['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", help="model shape (default: toy on CPU, 7b on CUDA)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--state-dtype", choices=list(DTYPES), default="float32",
                   help="what both models keep the decoding state's C and n in (generate's state_dtype)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--decode-tokens", type=int, help="tokens per decode measurement (default: 32 CPU, 256 CUDA)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[2048, 8192, 16384, 65536])
    p.add_argument("--memory-tokens", type=int, nargs="+", help="generated tokens for the memory rows "
                   "(default: 250 2500 on CPU, 1000 10000 100000 on CUDA)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: on a shared 2-core machine, "
                   "a second OpenMP thread waiting for a busy core stalls every small op for milliseconds)")
    p.add_argument("--no-official", action="store_true", help="measure xlstm7b only")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled decode step (its compilation "
                   "takes half a minute on CPU, more for the 7B on CUDA: e.g. for a quick check of the script)")
    p.add_argument("--profile", action="store_true", help="also the device time per kernel of a forward pass over "
                   "the longest prompt (each model) and of a decode step at batch 1 (ours: eager, graph, compiled)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    p.add_argument("--memory-child", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device here: the GPU section (7B shape, bf16) is skipped; run the CPU section with --device cpu")
        return
    args.preset = args.preset or ("7b" if cuda else "toy")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.decode_tokens = args.decode_tokens or (256 if cuda else 32)
    args.memory_tokens = args.memory_tokens or ([1000, 10000, 100000] if cuda else [250, 2500])
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]), args)))
        return

    ours, theirs = build(args.preset, args.device, DTYPES[args.dtype], official=not args.no_official, state_dtype=args.state_dtype)
    ours_impls = ["ours"] + ([] if args.no_compiled else ["compiled"])
    models = {impl: ours for impl in ours_impls} | ({} if theirs is None else {"official": theirs})
    vocab = ours.config.vocab_size
    c = ours.config
    model_shape = dict(embedding_dim=c.embedding_dim, num_blocks=c.num_blocks, num_heads=c.num_heads,
                       vocab_size=vocab, params=ours.num_params())
    agree = logits_diff = None
    if theirs is not None:  # the same weights must give the same logits and (unless near-tied) greedy tokens
        ids = prompt(2, 24, c, args.device)
        agree = bool(torch.equal(run_fn("ours", ours, ids, 16, state_dtype=args.state_dtype), run_fn("official", theirs, ids, 16)))
        mine, ref = forward_fn("ours", ours, ids).double(), forward_fn("official", theirs, ids).double()
        logits_diff = ((mine - ref).norm() / ref.norm()).item()
        print(f"same greedy tokens as the official model: {agree}; last logits' relative difference {logits_diff:.2e}",
              flush=True)
    rows, interrupted = [], False
    try:  # interrupted (Ctrl-C, or `timeout --signal=INT` in benchmarks/gpu.sh): the rows so far are written
        bench_speed(models, args, c, args.device, rows)
        if args.profile:
            bench_profile(models, args, c, args.device, rows)
        del models, ours, theirs
        gc.collect()
        rows += bench_memory([i for i in ours_impls if not (cuda and i == "compiled")] + ([] if args.no_official else ["official"]), args)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} rows measured so far", flush=True)

    result = dict(
        device=args.device,
        device_name=torch.cuda.get_device_name() if cuda else cpu_name(),
        driver=torch.version.cuda if cuda else None,
        torch=torch.__version__,
        triton=_version("triton"),
        xlstm=None if args.no_official else _version("xlstm"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        preset=args.preset, model=model_shape, dtype=args.dtype, state_dtype=args.state_dtype, threads=args.threads, repeats=args.repeats,
        same_greedy_tokens=agree, logits_rel_diff=logits_diff, interrupted=interrupted, rows=rows,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"generate_{'cuda' if cuda else 'cpu'}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    plot(result, out.with_suffix(".png"))


def cpu_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} cores"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
