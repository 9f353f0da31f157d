"""Speculative decoding: acceptance rate and speedup over plain decoding for K = 2..8.

    python benchmarks/speculative.py --target runs/toy/model --draft runs/toy-draft/model   # CPU, trained pair
    python benchmarks/speculative.py                                # CPU, random toy-shape pair (cost model only)
    python benchmarks/speculative.py --device cuda                  # GPU: 7B-shape target + small draft, random bf16

Two kinds of rows:
- "measured": wall time of `generate` with and without the draft on the same prompts (batch 1, best
  of --repeats), the acceptance rate (accepted / drafted tokens) and the per-token acceptance alpha
  (accepted / (accepted + rejections)), tokens committed per block,
  and whether greedy speculative tokens equal plain greedy tokens. Meaningful acceptance needs a
  trained pair (random weights accept ~nothing, so their speedup is < 1 by construction).
- "cost_model": the parts of a block timed alone, each run as generate runs it (a target step and a
  draft step, on CUDA compiled and replayed from a CUDA graph; the target's chunkwise pass over K+1
  positions, on CUDA replayed from its own graph, `VerifyGraph`; the cells-only re-advance of its
  state, eager) and the speedup they predict
  at per-token acceptance a = 0.5..0.9: tokens per block E = (1 - a^(K+1)) / (1 - a) over block time
  K * draft_step + verify(K+1) + P(some rejection) * readvance(K+1) + 2 state copies, against E
  target steps. This is what random weights can tell (e.g. for the 7B shape on a GPU).
Writes benchmarks/results/speculative_<device>.json (--out: another folder), a row at a time.
"""

import argparse
import datetime
import sys
import sysconfig
import time
from pathlib import Path

import torch

from xlstm7b import XLSTM, ModelConfig, State, from_pretrained, generate
from xlstm7b.decode import step_runner
from xlstm7b.speculative import VerifyGraph, readvance

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoding import LiveRows, cpu_name, version  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def random_model(config: ModelConfig, device, dtype, seed: int) -> XLSTM:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = XLSTM(config)
    model = model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype).eval()


def code_prompts(tokenizer, n: int, length: int, bos: int) -> list[list[int]]:
    """`n` prompts of `length` tokens from the middle of stdlib modules (the toy models' corpus),
    each after the `bos` id."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    step = max(1, len(files) // n)
    prompts = []
    for f in files[::step]:
        ids = tokenizer.encode(f.read_text(errors="replace")).ids
        if len(ids) >= 3 * length:
            mid = len(ids) // 2
            prompts.append([bos] + ids[mid : mid + length - 1])
        if len(prompts) == n:
            break
    return prompts


def measured_rows(target, draft, prompts, ks, args, device, rows: list[dict]) -> None:
    """Appends the plain and speculative generate timings per temperature and K."""
    for temperature in args.temperatures:
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=0)

        def run(**extra):
            outs = [generate(target, [p], **kw, **extra) for p in prompts]
            return outs

        t_plain, plain = timed(run, device, args.repeats)
        n_tokens = sum(int(o.lengths.sum()) for o in plain)
        rows.append(dict(kind="measured", temperature=temperature, K=0, seconds=t_plain, tok_per_s=n_tokens / t_plain))
        print(f"T={temperature} plain: {n_tokens / t_plain:.1f} tok/s", flush=True)
        for k in ks:
            t, outs = timed(lambda: run(draft=draft, speculate_k=k), device, args.repeats)
            drafted = sum(o.stats["drafted"] for o in outs)
            accepted = sum(o.stats["accepted"] for o in outs)
            blocks = sum(o.stats["blocks"] for o in outs)
            rejected = sum(o.stats["rejected"] for o in outs)
            same = all(torch.equal(a.tokens, b.tokens) for a, b in zip(outs, plain)) if temperature == 0 else None
            rows.append(dict(
                kind="measured", temperature=temperature, K=k, seconds=t, tok_per_s=n_tokens / t,
                speedup=t_plain / t, acceptance=accepted / drafted, token_acceptance=accepted / max(accepted + rejected, 1),
                tokens_per_block=n_tokens / blocks,
                same_tokens_as_plain=same,
            ))
            print(f"T={temperature} K={k}: acceptance {accepted / drafted:.3f} (per token {accepted / max(accepted + rejected, 1):.3f}), "
                  f"{n_tokens / blocks:.2f} tok/block, "
                  f"{n_tokens / t:.1f} tok/s, speedup {t_plain / t:.2f}x" + ("" if same is None else f", same tokens: {same}"),
                  flush=True)


def cost_model_rows(target, draft, ks, args, device, rows: list[dict]) -> None:
    """Times the parts of one block at batch 1 and predicts the speedup at several acceptance rates;
    appends a row per K."""
    reps = 20 if device.type == "cuda" else 10

    def per_call(fn) -> float:
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / reps

    tok = torch.tensor([5], device=device)
    st, sd = State.zeros(target.config, 1, device=device), State.zeros(draft.config, 1, device=device)
    spare, draft_spare = st.clone(), sd.clone()
    with torch.no_grad():
        graph = device.type == "cuda"
        target_step = step_runner(target, st, cuda_graph=graph)  # compiled where captured, as generate's default
        draft_step = step_runner(draft, sd, cuda_graph=graph)
        t_step = per_call(lambda: target_step(tok))
        d_step = per_call(lambda: draft_step(tok))
        t_copy = per_call(lambda: spare.copy_(st)) + per_call(lambda: draft_spare.copy_(sd))
        for k in ks:
            x = torch.full((1, k + 1), 5, device=device)
            cells = target.cell_inputs_buffer(1, k + 1)
            if graph:
                verify_graph, mask = VerifyGraph(target, st, cells), torch.ones(1, k + 1, dtype=torch.bool, device=device)
                verify = per_call(lambda: verify_graph(x, mask))
            else:
                verify = per_call(lambda: target(x, st, cell_inputs=cells, check_ids=False))
            keep = torch.tensor([(k + 1) // 2], device=device)
            t_readvance = per_call(lambda: readvance(target.config, cells, spare, keep, out=st))  # cells only
            row = dict(kind="cost_model", K=k, graphs=graph, target_step_ms=1e3 * t_step, draft_step_ms=1e3 * d_step,
                       verify_ms=1e3 * verify, readvance_ms=1e3 * t_readvance, state_copies_ms=1e3 * t_copy,
                       draft_over_target_step=d_step / t_step, predicted_speedup={})
            for a in (0.5, 0.6, 0.7, 0.8, 0.9):
                tokens = (1 - a ** (k + 1)) / (1 - a)
                block = k * d_step + verify + (1 - a**k) * t_readvance + t_copy
                row["predicted_speedup"][str(a)] = tokens * t_step / block
            rows.append(row)
            print(f"K={k}: target step {1e3 * t_step:.2f} ms, draft step {1e3 * d_step:.2f} ms, verify {1e3 * verify:.2f} ms, "
                  f"re-advance {1e3 * t_readvance:.2f} ms; predicted speedup at acceptance 0.7: "
                  f"{row['predicted_speedup']['0.7']:.2f}x, 0.9: {row['predicted_speedup']['0.9']:.2f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--target", help="trained target checkpoint folder (with tokenizer.json)")
    p.add_argument("--draft", help="trained draft checkpoint folder (same tokenizer)")
    p.add_argument("--target-preset", default=None, help="random-weight target shape (default: toy on CPU, 7b on CUDA)")
    p.add_argument("--draft-preset", default=None, help="random-weight draft shape (default: toy-draft on CPU, 125m on CUDA)")
    p.add_argument("--ks", type=int, nargs="+", default=list(range(2, 9)))
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    p.add_argument("--cost-model-only", action="store_true", help="skip the generate() runs (e.g. for random weights)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cuda else torch.float32

    trained = args.target is not None and args.draft is not None
    if trained:
        from tokenizers import Tokenizer

        target = from_pretrained(args.target, device=device, dtype=dtype)
        draft = from_pretrained(args.draft, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_file(str(Path(args.target) / "tokenizer.json"))
        prompts = code_prompts(tokenizer, args.prompts, args.prompt_len, target.config.bos_token_id)
        pair = dict(weights="trained", target=args.target, draft=args.draft)
    else:
        tp = args.target_preset or ("7b" if cuda else "toy")
        dp = args.draft_preset or ("125m" if cuda else "toy-draft")
        tcfg = ModelConfig.from_preset(tp)
        target = random_model(tcfg, device, dtype, seed=0)
        draft = random_model(ModelConfig.from_preset(dp).replace(vocab_size=tcfg.vocab_size), device, dtype, seed=1)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, tcfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
        pair = dict(weights="random (cost model only: random weights accept ~nothing)", target=tp, draft=dp)
    pair.update(target_params=target.num_params(), draft_params=draft.num_params())
    print(f"target {pair['target']} ({target.num_params():,} params), draft {pair['draft']} "
          f"({draft.num_params():,} params), {pair['weights']} weights, {dtype} on {device}", flush=True)

    header = dict(
        device=args.device, device_name=torch.cuda.get_device_name() if cuda else cpu_name(),
        driver=torch.version.cuda if cuda else None, torch=torch.__version__, triton=version("triton"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        dtype=str(dtype).removeprefix("torch."), threads=None if cuda else args.threads, repeats=args.repeats,
        batch=1, prompts=len(prompts), prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens, **pair,
    )
    out = args.out / f"speculative_{'cuda' if cuda else 'cpu'}{'' if trained else '_random_' + pair['target']}.json"
    rows = LiveRows(out, header)
    cost_model_rows(target, draft, args.ks, args, device, rows)
    if not args.cost_model_only:
        measured_rows(target, draft, prompts, args.ks, args, device, rows)
    best = max((r for r in rows if r["kind"] == "measured" and r["K"]), key=lambda r: r["speedup"], default=None)
    rows.write(best=best and {key: best[key] for key in ("K", "temperature", "speedup", "acceptance", "token_acceptance")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
