"""The timing and the providers of benchmarks/kernels.py: `measure` (median time and peak memory of a
call), the chunkwise inputs of one shape, and one provider per implementation measured (ours and the
peers), each returning a closure that runs the forward on the inputs it is given.
"""

import time

import torch
import torch.nn.functional as F

from xlstm7b.kernels import mlstm


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def measure(fn, device: str, reps: int) -> tuple[float, float | None]:
    """(median ms, peak MiB allocated during one call; None on CPU) of fn()."""
    if device == "cuda":
        import triton.testing

        fn()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return triton.testing.do_bench(fn, warmup=max(1, reps // 4), rep=reps), peak
    fn()
    times = []
    for _ in range(max(1, reps // 25)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2], None


# ---------------------------------------------------------------------------------------------
# Providers: each returns a closure running the forward on fresh-gradient inputs, or raises
# ImportError / RuntimeError with the reason it cannot run.
# ---------------------------------------------------------------------------------------------


def mlstm_inputs(B, NH, S, DK, DV, dtype, device, grad):
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, device=device) * scale + shift).requires_grad_(grad)

    q, k = rand(B, NH, S, DK).to(dtype), rand(B, NH, S, DK).to(dtype)
    v = rand(B, NH, S, DV).to(dtype)
    i, f = rand(B, NH, S, scale=2.0, shift=-5.0), rand(B, NH, S, shift=4.0)  # gates stay fp32
    return [t.detach().requires_grad_(grad) for t in (q, k, v, i, f)]


def provider_ours(backend: str, chunk: int, grid_order: str = "chunks", variant: str = "default"):
    """Our kernels; the Triton ones with the launch settings of `variant` (a key of kernels.aot.VARIANTS)
    and their per-chunk launches in `grid_order` (launch_settings.GRID_ORDERS; the backward takes the
    forward's settings)."""
    if grid_order == "chunks" and variant == "default":
        return lambda x: lambda: mlstm(*x, backend=backend, chunk_size=chunk)[0]
    from xlstm7b.kernels.aot import VARIANTS  # Triton: only for these rows
    from xlstm7b.kernels.launch_settings import GRID_LAUNCHES, launch_overrides

    overrides = {launch: dict(params) for launch, params in VARIANTS[variant].items()}
    if grid_order != "chunks":
        for launch in GRID_LAUNCHES:
            overrides.setdefault(launch, {})["grid_order"] = grid_order

    def make(x):
        def run():
            with launch_overrides(**overrides):
                return mlstm(*x, backend=backend, chunk_size=chunk)[0]

        return run

    return make


def provider_tfla(chunk: int):
    from mlstm_kernels.torch import get_mlstm_kernel  # noqa: F401  (import error -> skipped)

    kernel = get_mlstm_kernel("chunkwise--triton_xl_chunk")

    def make(x):
        q, k, v, i, f = x
        return lambda: kernel(q=q, k=k, v=v, i=i, f=f, return_last_states=False, chunk_size=chunk)

    return make


def provider_fla():
    from fla.ops.simple_gla import chunk_simple_gla

    def make(x):
        q, k, v, _, f = x
        # fla's layout is [B, S, H, D]; its gate is the log forget gate, without input gate/normalizer
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        g = F.logsigmoid(f).transpose(1, 2)
        return lambda: chunk_simple_gla(q, k, v, g, scale=q.shape[-1] ** -0.5)[0]

    return make


def provider_sdpa(device: str):
    if device != "cuda":
        raise RuntimeError("flash attention needs CUDA")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(x):
        q = x[0]
        B, _, S, _ = q.shape
        g = torch.Generator(device=device).manual_seed(0)
        qa, ka, va = (torch.randn(B, 32, S, 128, generator=g, device=device, dtype=q.dtype).requires_grad_(q.requires_grad) for _ in range(3))

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qa, ka, va, is_causal=True)

        return run

    return make
