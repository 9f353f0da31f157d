"""What benchmarks/generate.py needs besides its decode and prefill timings: the kernels a decode
step runs (`bench_kernels_per_token`), batch-1 decoding with weight-only quantisation
(`bench_quantized`), the official model in its fastest documented decoding mode, the weight-read
floor of a card, and rows that are written to their JSON file as soon as each is measured.

Kernels per token (`count_kernels`): on CUDA the kernels the profiler sees the device run in one step
(memory copies and sets included); on CPU the operators that compute (`NO_KERNEL` excludes views,
allocations and no-ops), and for a compiled step inductor's generated kernels, which the profiler
sees only when compiled under `inductor_kernel_profile()`, and the library calls between them.

The official model's fastest mode (`OfficialGraphed`) is how mlstm_kernels' model benchmarks run
xLSTMLarge (huggingface_model_benchmark.py, use_torch_compile_model with use_cuda_graphs_model):
its forward compiled (`torch.compile(dynamic=False, fullgraph=False, mode="default")`, their
setting for xLSTM), warmed up three times on a side stream, and the one-token forward on a fixed
state captured in a CUDA graph that every step replays (the forward copies the new state into the
state it was given, so the graph's buffers carry it).
"""

import contextlib
import copy
import json
import os
import platform
import sys
import time
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from xlstm7b import generate
from xlstm7b.decode import cuda_compiled_step, decoding_state, step_runner
from xlstm7b.layouts import package_fused
from xlstm7b.quantize import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its neighbours, when loaded on its own
from plotting import pyplot  # noqa: E402

NO_KERNEL = frozenset(f"aten::{op}" for op in (
    "view", "_unsafe_view", "as_strided", "reshape", "_reshape_alias", "alias", "detach", "t", "transpose",
    "permute", "expand", "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "unbind",
    "narrow", "unflatten", "flatten", "view_as", "empty", "empty_strided", "empty_like", "resolve_conj",
    "resolve_neg", "to", "lift_fresh", "contiguous", "chunk", "movedim", "expand_as", "result_type",
    "_has_compatible_shallow_copy_type",
))
"""CPU operators that, as a leaf of the profile, launch no computation: views, allocations, and
conversions or copies that found nothing to do."""


def inductor_kernel_profile():
    """Compilations on CPU inside this block record each generated kernel in torch.profiler."""
    return torch._inductor.config.patch({"cpp.enable_kernel_profile": True})


def count_kernels(run, device: str) -> dict:
    """One call of run() after a warm-up one, profiled: kernels (how many ran; on CPU the innermost
    operators that compute, so aten::linear counts as its aten::mm) and the ten most frequent names
    with their counts."""
    cuda = device.startswith("cuda")
    run()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        names = Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)
    else:
        names = Counter(e.name for e in prof.events() if is_kernel(e.name) and not any(map(computes, e.cpu_children)))
    return dict(kernels=sum(names.values()), top=[dict(name=n[:80], calls=c) for n, c in names.most_common(10)])


def computes(event) -> bool:
    """Whether a CPU profile's event or any event inside it is_kernel."""
    return is_kernel(event.name) or any(map(computes, event.cpu_children))


def is_kernel(name: str) -> bool:
    """A CPU profile's leaf event that computed: an operator (aten::, or a library's, such as the
    mkldnn:: GEMMs a frozen compilation calls) outside NO_KERNEL, or a kernel that inductor generated
    ("graph_<n>_cpp_fused_...", "graph_<n>_gemm_..._kernel"); not the wrappers of compiled code."""
    return name.startswith("graph_") or ("::" in name and name not in NO_KERNEL)


def best_time(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls of fn() (seconds; CUDA synchronized around each)."""
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


def prompt(batch: int, length: int, config, device) -> torch.Tensor:
    """Random ids [batch, length] after a BOS token, the same for the same length."""
    ids = torch.randint(2, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length)).to(device)
    ids[:, 0] = config.bos_token_id
    return ids


def bench_kernels_per_token(ours, args, device: str, rows: list[dict]) -> None:
    """Appends a row per decode mode with the kernels one step at batch 1 runs (count_kernels): eager
    and compiled, and on CUDA both replayed from their graphs (what the profiler sees of a graph)."""
    cuda = device.startswith("cuda")
    token = torch.ones(1, dtype=torch.long, device=device)
    modes = [("eager", False, False)] + ([] if args.no_compiled else [("compiled", False, True)])
    modes += [(f"{name}, CUDA graph", True, compiled) for name, _, compiled in modes] if cuda else []
    for name, graph, compiled in modes:
        state = decoding_state(None, ours.config, 1, device)
        row = dict(impl=name, metric="kernels_per_token", batch=1)
        try:
            with torch.no_grad(), inductor_kernel_profile() if compiled and not cuda else contextlib.nullcontext():
                row.update(count_kernels(step_call(ours, state, token, graph, compiled), device))
            print(f"kernels  {name:<20} batch 1: {row['kernels']} per token; most frequent: "
                  + ", ".join(f"{k['name'][:30]} x{k['calls']}" for k in row["top"][:3]), flush=True)
        except Exception as e:  # the other modes' counts stand
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"kernels  {name:<20} batch 1: {row['error']}", flush=True)
        rows.append(row)


def step_call(ours, state, token: torch.Tensor, graph: bool, compiled: bool):
    """One decode step as a call without arguments. Compiled outside a graph: on CPU a copy of the
    model compiles anew (inside inductor_kernel_profile, its kernels are recorded); on CUDA the
    compiled step itself, called outside a graph."""
    if compiled and not graph:
        if ours.lm_head.weight.is_cuda:
            fn = cuda_compiled_step(ours, state)
            return lambda: fn(ours, token, state)
        step = step_runner(copy.deepcopy(ours), state, cuda_graph=False, compile=True)
    else:
        step = step_runner(ours, state, cuda_graph=graph, compile=compiled)
    return lambda: step(token)


def bench_quantized(model, methods: list[str], n: int, repeats: int, rows: list[dict]) -> None:
    """Batch-1 decoding of `model` and of a quantised copy per method, each as generate runs it by
    default (on CUDA the compiled step in a CUDA graph): a row each with decode tok/s (over n tokens,
    as bench_decode measures), the last logits' relative error against the unquantised model's on a
    512-token prompt, and the share of n greedy tokens equal to the unquantised model's. A method
    that does not run here leaves a row with its error."""
    device = model.lm_head.weight.device
    ids, long_ids = prompt(1, 16, model.config, device), prompt(1, 512, model.config, device)

    graph = True if device.type == "cuda" else None  # both calls capture (and compile) alike: their difference is decoding

    def measure(m) -> tuple[float, torch.Tensor, torch.Tensor]:
        t1 = best_time(lambda: generate(m, ids, max_new_tokens=1, cuda_graph=graph), repeats)
        tn = best_time(lambda: generate(m, ids, max_new_tokens=n, cuda_graph=graph), repeats)
        with torch.no_grad():
            logits = m(long_ids, last_logits_only=True)[0][:, -1].double()
        return (n - 1) / (tn - t1), logits, generate(m, ids, max_new_tokens=n).tokens

    rate, logits, tokens = measure(model)
    rows.append(dict(impl=str(model.lm_head.weight.dtype).removeprefix("torch."), metric="quantized", batch=1, tok_per_s=rate))
    print(f"quantize {rows[-1]['impl']:<8} batch 1: {rate:9.1f} tok/s", flush=True)
    for method in methods:
        row = dict(impl=method, metric="quantized", batch=1)
        try:
            quantized = quantize(copy.deepcopy(model), method)
        except (ValueError, ImportError) as e:  # not on this device or dtype, or no torchao: the other rows stand
            rows.append(row | dict(error=f"{type(e).__name__}: {e}"[:300]))
            print(f"quantize {method:<8} batch 1: {rows[-1]['error']}", flush=True)
            continue
        q_rate, q_logits, q_tokens = measure(quantized)
        del quantized
        row.update(tok_per_s=q_rate, speedup=q_rate / rate, logits_rel_err=((q_logits - logits).norm() / logits.norm()).item(),
                   same_greedy_tokens=(q_tokens == tokens).double().mean().item())
        rows.append(row)
        print(f"quantize {method:<8} batch 1: {q_rate:9.1f} tok/s ({row['speedup']:.2f}x), logits {row['logits_rel_err']:.1e} "
              f"from the unquantised model's, {100 * row['same_greedy_tokens']:.0f} % of its greedy tokens", flush=True)


def official_model(ours, state_dtype: str):
    """The official xLSTMLarge on `ours`'s weights (the same tensors), its state in `state_dtype`."""
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    device, dtype = str(ours.lm_head.weight.device), ours.lm_head.weight.dtype
    on_gpu = device.startswith("cuda")
    kernels = (
        dict(chunkwise_kernel="chunkwise--triton_xl_chunk", sequence_kernel="native_sequence__triton", step_kernel="triton")
        if on_gpu
        else dict(chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native", step_kernel="native")
    )
    c = ours.config
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
    # Same tensors, no copy: their fused projections are views of ours, the embedding is renamed.
    sd = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v
          for k, v in package_fused(ours.state_dict(), c).items()}
    theirs.load_state_dict(sd, strict=True, assign=True)
    # On the GPU their gate pre-activations in float32, as ours are: in bfloat16 they reach the TFLA
    # prefill kernel as a bfloat16 vecI, whose compilation aborts in Triton 3.6.0's LLVM (an
    # SLPVectorizer assertion); their CPU forms take float32 gates only with float32 q and k.
    for name, module in theirs.named_modules() if on_gpu else ():
        if name.endswith("ifgate_preact"):
            module.register_forward_hook(lambda module, args, out: out.float())
    return theirs.eval()


def cached_official(cache: dict, ours, state_dtype: str):
    """official_model(ours, state_dtype), made once per state dtype and kept in `cache`."""
    if state_dtype not in cache:
        cache[state_dtype] = official_model(ours, state_dtype)
    return cache[state_dtype]


class OfficialGraphed:
    """The official xLSTMLarge's one-token forward on `state` (its state dict, updated in place),
    compiled and captured in a CUDA graph, as `step(token [B]) -> logits [B, V]`. The compiled
    forward is kept per model, so later captures only trace and replay what is compiled."""

    WARMUPS = 3  # their cuda_graphs_warmups
    _compiled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, model, state: dict, batch: int):
        if model not in self._compiled:
            self._compiled[model] = torch.compile(model.forward, dynamic=False, fullgraph=False, mode="default")
        forward = self._compiled[model]
        device = model.lm_head.weight.device
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        saved = {k: tuple(t.clone() for t in v) for k, v in state.items()}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUPS):
                forward(self.token, state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = forward(self.token, state)[0]
        for k, v in state.items():  # the warm-ups and the capture stepped the state
            for t, s in zip(v, saved[k]):
                t.copy_(s)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token[:, None])
        self.graph.replay()
        return self.logits[:, -1]


def official_graphed_generate(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy tokens [B, n] of the official model after prompts ids [B, S]: its prefill (eager, as
    their generate runs it), then `OfficialGraphed` steps (captured for every n >= 1, as generate's
    graph is: a difference of two calls is decoding alone); their generate's tokens."""
    with torch.no_grad():
        logits, state = model(ids)
        token = logits[:, -1].argmax(dim=-1)
        tokens = torch.empty(ids.shape[0], n, dtype=torch.long, device=ids.device)
        if n == 0:
            return tokens
        tokens[:, 0] = token
        step = OfficialGraphed(model, state, ids.shape[0])  # for one token too, as ours captures then
        for t in range(1, n):
            token = step(token).argmax(dim=-1)
            tokens[:, t] = token
    return tokens


CARD_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}
"""Peak memory bandwidth (bytes/s) by a part of the card's name; the first that matches counts."""


def weight_floor_ms(model: torch.nn.Module, device_name: str) -> float | None:
    """The time to read a decode step's weights once at the card's peak bandwidth: every parameter
    but the embedding table, of which a step reads one row per sequence. None for an unknown card."""
    bandwidth = next((bw for part, bw in CARD_BANDWIDTH.items() if part in device_name), None)
    if bandwidth is None:
        return None
    embedding = model.backbone.embeddings.weight
    tied = embedding is model.lm_head.weight
    read = sum(p.numel() * p.element_size() for p in model.parameters()) - (0 if tied else embedding.numel() * embedding.element_size())
    return 1e3 * read / bandwidth


class LiveRows(list):
    """A benchmark's rows, written to `path` with `header` each time one is added: a run cut short
    (a stage's time budget) keeps every row it measured."""

    def __init__(self, path: Path, header: dict):
        super().__init__()
        self.path, self.header = path, header

    def append(self, row: dict) -> None:
        super().append(row)
        self.write()

    def extend(self, rows) -> None:
        super().extend(rows)
        self.write()

    def __iadd__(self, rows):
        self.extend(rows)
        return self

    def write(self, **extra) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.header, **extra, "rows": list(self)}, indent=1) + "\n")



def plot(result: dict, path: Path) -> None:
    if (plt := pyplot()) is None:
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
        if ax.lines:
            ax.legend()
    fig.suptitle(f"generate, {result['preset']} preset, {result['dtype']}, {result['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def cpu_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} cores"


def version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
