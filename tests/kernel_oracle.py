"""What the Triton chunkwise kernels' tests share (test_kernels_triton.py, test_kernels_variants.py,
test_launch_settings.py): inputs, the float64 oracle check, the cases and the kernels' variants."""

import torch

from conftest import rel_err

from xlstm7b.kernels import aot, mlstm_parallel
from xlstm7b.kernels.chunkwise_triton import mlstm_chunkwise_triton
from xlstm7b.kernels.launch_settings import INTRA_LAUNCHES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}  # values, grads


def make_inputs(B, NH, S, DK, DV, *, dtype=torch.float32, init=False, reset=False, gates="random", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    q, k, v = rand(B, NH, S, DK), rand(B, NH, S, DK), rand(B, NH, S, DV)
    if gates == "random":
        i, f = rand(B, NH, S, scale=3.0), rand(B, NH, S, scale=3.0) + 2.0
    else:  # soft-cap limits: i = +15 everywhere but a few; f = +-15
        i = torch.full((B, NH, S), 15.0, device=DEVICE)
        i[..., 1::4] = -15.0
        f = torch.where(torch.rand(B, NH, S, generator=g) < 0.7, 15.0, -15.0).to(DEVICE)
    xs = [q.to(dtype), k.to(dtype), v.to(dtype), i, f]
    if init:
        xs += [rand(B, NH, DK, DV), rand(B, NH, DK).abs(), rand(B, NH, 1)]
    rs = None
    if reset:
        rs = torch.rand(B, S, generator=g) < 0.1
        rs[:, min(S - 1, 5)] = True
        rs = rs.to(DEVICE)
    return xs, rs


def forward_backward(fn, xs, reset, seed=1, state_grads=True, **kw):
    """Runs fn on leaf copies of xs, backpropagates fixed random cotangents of (h, C, n, m)
    (of h alone without state_grads)."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    state = tuple(xs[5:]) if len(xs) > 5 else None
    h, (C, n, m) = fn(*xs[:5], state, reset=reset, **kw)
    outs = (h, C, n, m) if state_grads else (h,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]
    sum((o.double() * c).sum() for o, c in zip(outs, cot)).backward()
    return (h, C, n, m), [x.grad for x in xs]


# dn0 and dm0 can be cancelling sums far below the terms they are made of: dn0 only where |n . q|
# won the normalizer's max, in one column's units of C0's gradient; dm0 the eps-sized rest of terms
# that include dC0 . C0 and dn0 . n0. In bfloat16 or float16 such a near-zero sum is off by the
# rounding of its terms (dn0 2.4e-2 relative to a norm of 1e-4, next to 6.3 for dC0, at the 7B head
# shape in the interpreter; 6.3e-2 on an H200), so for those dtypes check_against_oracle measures
# their error against a hundredth of the scale of dC0 . C0 and dn0 . n0 where that exceeds their norm.
def check_against_oracle(xs, reset, chunk, dtype=torch.float32, state_grads=True, tol=None, grads=True):
    outs, grads_ = forward_backward(mlstm_chunkwise_triton, xs, reset, state_grads=state_grads, chunk_size=chunk)
    ref_outs, ref_grads = forward_backward(mlstm_parallel, [x.double() for x in xs], reset, state_grads=state_grads)
    tol_v, tol_g = tol or TOL[dtype]
    for name, a, b in zip(("h", "C", "n", "m"), outs, ref_outs):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= tol_v, f"{name}: rel err {rel_err(a, b):.2e}"
    if not grads:
        return
    floors = {}
    if len(xs) > 5 and dtype != torch.float32:  # the initial state's gradients
        dC0, dn0, C0, n0 = ref_grads[5], ref_grads[6], xs[5].double(), xs[6].double()
        floors["dn0"] = 1e-2 * dC0.norm() / dC0.shape[-1] ** 0.5
        floors["dm0"] = 1e-2 * ((dC0 * C0).abs().sum((-1, -2)) + (dn0 * n0).abs().sum(-1)).norm()
    for name, a, b in zip(("dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"), grads_, ref_grads):
        assert torch.isfinite(a).all(), name
        err = ((a.double() - b).norm() / torch.maximum(b.norm(), floors.get(name, b.norm())).clamp_min(1e-300)).item()
        assert err <= tol_g, f"{name}: rel err {err:.2e}"


# B, NH, S, DK, DV, chunk, initial state, reset mask, gates
CASES = [
    (1, 2, 1, 16, 16, 16, False, False, "random"),
    (2, 1, 17, 16, 32, 16, True, False, "random"),
    (1, 2, 45, 32, 16, 16, True, True, "random"),
    (2, 1, 70, 16, 16, 32, False, True, "random"),
    (1, 1, 70, 16, 16, 64, True, True, "random"),
    (1, 1, 33, 24, 40, 32, True, True, "random"),  # head dims that are not powers of two
    (1, 1, 48, 16, 16, 128, True, False, "random"),
    (1, 1, 150, 16, 16, 128, False, True, "random"),
    (2, 2, 64, 32, 32, 16, True, True, "random"),
    (1, 2, 40, 16, 16, 16, True, True, "limits"),
    (1, 1, 33, 16, 16, 16, False, False, "limits"),
]


def case_id(c):
    B, NH, S, DK, DV, L, init, reset, gates = c
    return f"B{B}-NH{NH}-S{S}-DK{DK}-DV{DV}-L{L}" + "-init" * init + "-reset" * reset + f"-{gates}"


VARIANTS = ({"two-pass": {}, "fused": dict(fused=dict(enabled=1))} | {k: v for k, v in aot.VARIANTS.items() if k != "default"}
            | {"split": dict(states=dict(segments=4))})
"""The selectable forms of the kernels, as launch_overrides: the default (states and output passes,
each per-chunk launch with the chunk index fastest), the one-pass forward (at the chunks it takes),
and the variants of aot.VARIANTS (the per-chunk launches with the tile index fastest, the states
pass at each chunk's own stabilizer, the states passes split over segments, here 4 so that these
tests' few chunks make segments of several, and chunk 128 tiled inside the chunk, at chunk 128)."""


def intra(LB: int) -> dict:
    """launch_overrides tiling every launch that takes an LB in sub-blocks of LB (chunkwise_triton_intra.py)."""
    return {launch: dict(LB=LB) for launch in INTRA_LAUNCHES}


def nan_for_uninitialised_memory():
    """As a pytest fixture (or a contextlib.contextmanager): torch.empty and its kin return memory
    filled with NaN (integers with their largest value) rather than whatever it held, so that an entry
    a launch reads but no launch wrote fails the oracle check rather than passing where the memory
    happened to hold zeros. Deterministic mode warns only; the previous settings come back after."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def sparse_resets(B: int, S: int, *at: int) -> torch.Tensor:
    rs = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    rs[:, list(at)] = True
    return rs
