"""Serving throughput and latency of the continuous-batching engine (xlstm7b.serve) against the same
requests run one by one through `generate`, and the effect of a bfloat16 state on bits-per-byte.

    python benchmarks/serve.py --checkpoint runs/toy/model          # CPU: concurrency 1, 8, 64, 256
    python benchmarks/serve.py --checkpoint runs/toy/model --mix decode   # short prompts, long outputs
    python benchmarks/serve.py --device cuda --preset 7b --concurrency 64 256 512
    python benchmarks/serve.py --state-bpb --checkpoint runs/toy/model   # float32 vs bfloat16 state

Throughput: a closed loop of C clients (C = the concurrency), each sending its next request when the
previous one finished, over a fixed mix of prompt and output lengths (every request runs to its
max_tokens: EOS ignored); the engine has C state slots. Output tok/s = generated tokens / wall time;
time to first token (TTFT) is from submission, queueing included, p50, p90 and p99 over the requests;
inter-token latency (ITL), the time between consecutive tokens of a request, p50, p90 and p99 over
every such gap. Two mixes (--mix): "prefill" (prompts of 32-1,024 tokens, 32-128 output tokens: 5.7
prompt tokens per output token) and "decode" (prompts of 16-64 tokens, 256-512 output tokens: where
the decode step's batching and its stalls behind prefill passes show).
The baseline runs the first `--baseline-requests` requests of the same mix one after another through
`generate` (TTFT: the time to its first token). The engine is measured in-process (no HTTP), so the
figures are the scheduler's and the model's. Writes benchmarks/results/serve_<device>.json + PNG.

--state-bpb: teacher-forced decoding of validation text through `model.step` (the serving decode
path), with the state in float32, in bfloat16, and with C and n in bfloat16 but m in float32; reports
bits-per-byte of each (and of one chunkwise forward pass, the reference). Writes serve_state_bpb.json.
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xlstm7b import XLSTM, ModelConfig, State, from_pretrained, generate, preset_path  # noqa: E402
from xlstm7b.serve import Engine, EngineConfig, SamplingParams  # noqa: E402
from xlstm7b.serve.config import STATE_DTYPES  # noqa: E402
from xlstm7b.train.config import load_config  # noqa: E402
from xlstm7b.train.evaluate import source_documents, tokenized_documents  # noqa: E402
from xlstm7b.train.tokenizer import token_bytes_tensor  # noqa: E402
from plotting import pyplot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIXES = {"prefill": ((32, 128, 512, 1024), (32, 64, 128)), "decode": ((16, 32, 64), (256, 512))}
"""name -> (prompt lengths, output lengths): a request mix is every pair of them."""


def workload(n: int, vocab_size: int, mix: str = "prefill", seed: int = 0) -> list[tuple[list[int], int]]:
    """n (prompt ids, max_tokens) pairs cycling through every (prompt length, output length) pair of the mix."""
    g = torch.Generator().manual_seed(seed)
    prompts, outputs = MIXES[mix]
    pairs = [(p, o) for p in prompts for o in outputs]
    return [(torch.randint(2, vocab_size, (pairs[k % len(pairs)][0],), generator=g).tolist(), pairs[k % len(pairs)][1])
            for k in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


def bench_engine(model: XLSTM, requests, concurrency: int, args) -> dict:
    engine = Engine(model, EngineConfig(max_batch=concurrency, max_queue=len(requests), prefix_cache_bytes=0,
                                        state_dtype=STATE_DTYPES[args.state_dtype], compile=args.compile)).start()
    engine.generate(requests[0][0][:8], SamplingParams(max_tokens=2))  # first-call allocations out of the timing
    todo, done, lock = iter(requests), [], threading.Lock()

    def client():
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            ids, n = item
            done.append(engine.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True)))

    t0 = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t0
    engine.stop()
    failed = [r.error for r in done if r.finish_reason == "error"]
    if failed:  # e.g. a prefill pass out of memory: the engine fails the requests, not the run
        return dict(impl="engine", concurrency=concurrency, error=f"{len(failed)} requests failed: {failed[0]}")
    ttfts = [r.ttft for r in done]
    gaps = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:])]
    tokens = sum(len(r.output_ids) for r in done)
    return dict(impl="engine", concurrency=concurrency, requests=len(done), output_tokens=tokens, wall_s=wall,
                tok_per_s=tokens / wall, **latencies("ttft", ttfts), **latencies("itl", gaps))


def latencies(name: str, values: list[float]) -> dict:
    """{name_p50_s, name_p90_s, name_p99_s} of `values` (seconds)."""
    return {f"{name}_p{q}_s": percentile(values, q / 100) for q in (50, 90, 99)} if values else {}


def bench_one_by_one(model: XLSTM, requests, args) -> dict:
    ttfts, gaps, tokens = [], [], 0
    generate(model, [requests[0][0][:8]], max_new_tokens=2, compile=args.compile)  # warm-up (and compilation)
    t0 = time.perf_counter()
    for ids, n in requests:
        start, times = time.perf_counter(), []
        out = generate(model, [ids], max_new_tokens=n, compile=args.compile, streamer=lambda t: times.append(time.perf_counter()))
        ttfts.append(times[0] - start)
        gaps += [b - a for a, b in zip(times, times[1:])]
        tokens += int(out.lengths[0])
    wall = time.perf_counter() - t0
    return dict(impl="generate, one by one", concurrency=1, requests=len(requests), output_tokens=tokens, wall_s=wall,
                tok_per_s=tokens / wall, **latencies("ttft", ttfts), **latencies("itl", gaps))


def state_bpb(model: XLSTM, args) -> dict:
    """Bits-per-byte of validation text decoded token by token with each state layout."""
    c = model.config
    tok = Tokenizer.from_file(str(Path(args.checkpoint) / "tokenizer.json"))
    data = load_config(preset_path(args.data_preset)).data
    docs = tokenized_documents(source_documents(data, "val"), tok, c.bos_token_id)
    B, S = args.bpb_lanes, args.bpb_tokens
    parts, have = [], 0
    for d in docs:
        parts.append(torch.from_numpy(d))
        have += d.size
        if have >= B * (S + 1):
            break
    stream = torch.cat(parts)
    if stream.numel() < B * (S + 1):
        raise SystemExit(f"the validation split has {stream.numel()} tokens; lower --bpb-lanes or --bpb-tokens")
    ids = stream[: B * (S + 1)].view(B, S + 1)  # B contiguous stretches of the validation stream
    nbytes = token_bytes_tensor(tok, c.vocab_size, "cpu")[ids[:, 1:]]
    text = nbytes > 0  # special tokens carry no bytes and are left out, as in the trainer's validation

    def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> float:
        nats = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        return nats[keep].sum().item() / math.log(2)

    rows = []
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
        bits = bits_per_byte(logits.flatten(0, 1), ids[:, 1:].flatten(), text.flatten())
        rows.append(dict(state="chunkwise forward, float32 (reference)", bits_per_byte=bits / nbytes.sum().item()))
        layouts = {"float32": (torch.float32, torch.float32), "bfloat16": (torch.bfloat16, torch.bfloat16),
                   "bfloat16 C and n, float32 m": (torch.bfloat16, torch.float32)}
        for name, (cn, m) in layouts.items():
            state = State([(C.to(cn), n.to(cn), mm.to(m)) for C, n, mm in State.zeros(c, B)])
            bits = sum(bits_per_byte(model.step(ids[:, t], state), ids[:, t + 1], text[:, t]) for t in range(S))
            rows.append(dict(state=f"step decoding, {name}", bits_per_byte=bits / nbytes.sum().item(),
                             state_bytes_per_sequence=state.nbytes // B))
            print(f"{rows[-1]['state']:<44} {rows[-1]['bits_per_byte']:.5f} bits/byte", flush=True)
    return dict(tokens=B * S, bytes=int(nbytes.sum()), lanes=B, tokens_per_lane=S, rows=rows)


def plot(result: dict, path: Path) -> None:
    if (plt := pyplot()) is None:
        return
    engine = sorted((r for r in result["rows"] if r["impl"] == "engine" and "error" not in r), key=lambda r: r["concurrency"])
    base = next(r for r in result["rows"] if r["impl"] != "engine")
    xs = [r["concurrency"] for r in engine]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    a.plot(xs, [r["tok_per_s"] for r in engine], marker="o", label="xlstm7b serve engine")
    a.axhline(base["tok_per_s"], color="C1", linestyle="--", label="generate, one by one")
    a.set(xlabel="concurrent requests", ylabel="output tok/s", xscale="log")
    b.plot(xs, [r["ttft_p50_s"] for r in engine], marker="o", label="engine p50")
    b.plot(xs, [r["ttft_p99_s"] for r in engine], marker="o", label="engine p99")
    b.axhline(base["ttft_p50_s"], color="C2", linestyle="--", label="generate alone, p50")
    b.set(xlabel="concurrent requests", ylabel="time to first token (s)", xscale="log", yscale="log")
    c.plot(xs, [r["itl_p50_s"] * 1000 for r in engine], marker="o", label="engine p50")
    c.plot(xs, [r["itl_p99_s"] * 1000 for r in engine], marker="o", label="engine p99")
    c.axhline(base["itl_p50_s"] * 1000, color="C2", linestyle="--", label="generate alone, p50")
    c.set(xlabel="concurrent requests", ylabel="inter-token latency (ms)", xscale="log", yscale="log")
    for ax in (a, b, c):
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.legend()
    fig.suptitle(f"serving ({result.get('mix', 'prefill')} mix), {result['model_name']}, {result['state_dtype']} state, "
                 f"{result['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint folder (default: a random model of --preset)")
    p.add_argument("--preset", default="toy", help="model shape without --checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--requests", type=int, default=0,
                   help="requests per concurrency level (default: 2 C, at least 12, rounded up to whole mixes of 12)")
    p.add_argument("--baseline-requests", type=int, default=12)
    p.add_argument("--mix", choices=list(MIXES), default="prefill", help="the request mix (the docstring gives both)")
    p.add_argument("--state-dtype", choices=list(STATE_DTYPES), default="float32")
    p.add_argument("--compile", action="store_true", help="CPU: the compiled decode step, in both the engine and generate")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--load", default="", help="what else ran on the machine meanwhile (recorded in the JSON)")
    p.add_argument("--state-bpb", action="store_true", help="measure bits-per-byte with a float32 vs a bfloat16 state")
    p.add_argument("--bpb-lanes", type=int, default=32, help="validation stretches decoded side by side")
    p.add_argument("--bpb-tokens", type=int, default=512, help="tokens decoded per stretch")
    p.add_argument("--data-preset", default="toy", help="the preset whose data config gives the validation split")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.checkpoint:
        model = from_pretrained(args.checkpoint, device=args.device, dtype=dtype).eval()
        name = Path(args.checkpoint).resolve().name
    else:
        torch.manual_seed(0)
        with torch.device(args.device):  # initialised where it runs: a 7B model is never built on the host
            model = XLSTM(ModelConfig.from_preset(args.preset))
        model = model.to(dtype).eval()
        name = f"random {args.preset}"
    result = dict(
        device=args.device, device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        torch=torch.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model_name=name, params=model.num_params(), threads=args.threads, load=args.load, loadavg=os.getloadavg(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.state_bpb:
        if not args.checkpoint:
            p.error("--state-bpb needs --checkpoint (a trained model, its tokenizer and its data config)")
        out = args.out / "serve_state_bpb.json"
        out.write_text(json.dumps(result | state_bpb(model, args), indent=1) + "\n")
        print(f"wrote {out}")
        return
    rows = []
    prompts, outputs = MIXES[args.mix]
    result |= dict(state_dtype=args.state_dtype, compile=args.compile, mix=args.mix, prompt_lengths=prompts,
                   output_lengths=outputs, rows=rows)
    mix = "" if args.mix == "prefill" else f"_{args.mix}"
    out = args.out / f"serve{mix}_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    baseline = workload(args.baseline_requests, model.config.vocab_size, args.mix)
    rows.append(bench_one_by_one(model, baseline, args))
    print(f"generate one by one: {rows[-1]['tok_per_s']:.1f} tok/s, TTFT p50 {rows[-1]['ttft_p50_s'] * 1000:.0f} ms, "
          f"ITL p50 {rows[-1]['itl_p50_s'] * 1000:.1f} ms", flush=True)
    for c in args.concurrency:
        out.write_text(json.dumps(result | dict(loadavg_after=os.getloadavg()), indent=1) + "\n")  # what a cut run keeps
        mixes = len(prompts) * len(outputs)
        n = args.requests or -(-max(2 * c, mixes) // mixes) * mixes
        try:
            rows.append(bench_engine(model, workload(n, model.config.vocab_size, args.mix), c, args))
        except torch.OutOfMemoryError:  # the state pool of this many slots does not fit next to the weights
            rows.append(dict(impl="engine", concurrency=c, error="out of memory"))
            print(f"engine, {c:>4} concurrent: out of memory", flush=True)
            torch.cuda.empty_cache()
            continue
        r = rows[-1]
        if "error" in r:
            print(f"engine, {c:>4} concurrent: {r['error']}", flush=True)
            continue
        print(f"engine, {c:>4} concurrent: {r['tok_per_s']:.1f} tok/s ({r['tok_per_s'] / rows[0]['tok_per_s']:.1f}x), "
              f"TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms, p99 {r['ttft_p99_s'] * 1000:.0f} ms; "
              f"ITL p50 {r['itl_p50_s'] * 1000:.1f} ms, p99 {r['itl_p99_s'] * 1000:.1f} ms", flush=True)
    out.write_text(json.dumps(result | dict(loadavg_after=os.getloadavg()), indent=1) + "\n")
    print(f"wrote {out}")
    plot(result, out.with_suffix(".png"))


def cpu_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
