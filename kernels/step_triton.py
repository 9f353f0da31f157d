"""One decoding step of the mLSTM in Triton, updating the state in place.
PyTorch twin: mlstm_step_torch in recurrent.py.

Gate activations (logsigmoid of f, exponential input gate with the max stabilizer), the C/n/m
update, the readout and the normalization are fused. Decoding is bound by reading and writing C,
so the work is split over (batch*head, DV tile) programs, enough to keep the SMs streaming even at
batch 1 (the 7B has 8 heads). Each program recomputes its head's small n and m update from the old
values and owns one [DK, BV] tile of C. The new n and m may only be written once every tile of the
head has read the old ones. By default a second, tiny launch writes them. The one-launch variant
(`launch_overrides(step=dict(one_launch=1))`, off until a GPU measures it) has each program, done,
count itself on its state row's arrival counter (an atomic add, acquire-release); the last to
arrive writes them and takes the count back to zero. Its counters are one int32 per state row and
device, allocated once (`arrivals`) and zero between launches; two of its steps on the same device
must not run concurrently on different streams (they would count on the same counters). No host
synchronisation and no allocation besides h (or none with `h_out`): the step can be captured in a
CUDA graph (the one-launch variant after one call outside it). Forward only.
With `slots` the B tokens step B rows of a larger state (a serving pool): each program offsets its
state pointers by its token's slot index, so only those rows are read and written, with no copy.
C and n may be stored in bfloat16 (half the state traffic, which dominates decoding at large batch);
the update and readout run in float32 either way, and m, an exponent, stays float32.
"""

import torch
import triton
import triton.language as tl

from .common import EPS, MLSTMState
from .launch_settings import step_one_launch


@triton.jit
def _state_row(SLOTS, i_bh, NH, HAS_SLOTS: tl.constexpr):
    """The state's batch*head row that the token row i_bh updates: its own, or its slot's head."""
    s_bh = i_bh.to(tl.int64)  # int64: the offsets of a large batch's (or pool's) state do not wrap
    if HAS_SLOTS:  # resolved at compile time
        s_bh = tl.load(SLOTS + i_bh // NH) * NH + i_bh % NH
    return s_bh


@triton.jit
def _head_update(K, I_, F_, N, M, i_bh, s_bh, offs_k, mk, s_k, DK):
    """The head's new stabilizer m, the decay of its old state, the write weight of the token and
    the new normalizer n, all from the old n and m (token row i_bh, state row s_bh)."""
    k = tl.load(K + i_bh * s_k + offs_k, mask=mk, other=0.0).to(tl.float32)
    ig = tl.load(I_ + i_bh).to(tl.float32)
    f = tl.load(F_ + i_bh).to(tl.float32)
    lf = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))  # logsigmoid without overflow
    m = tl.load(M + s_bh)
    m_new = tl.maximum(lf + m, ig)
    decay = tl.exp(lf + m - m_new)
    write = tl.exp(ig - m_new)
    n = decay * tl.load(N + s_bh * DK + offs_k, mask=mk, other=0.0).to(tl.float32) + write * k
    return k, m_new, decay, write, n


@triton.jit
def _step_kernel(
    # pointers
    Q, K, V, I_, F_, C, N, M, H, SLOTS, ARRIVED,
    # dims
    NH, DK, DV, scale, eps,
    # strides (per batch*head row; the head dims are contiguous)
    s_q, s_k, s_v, s_h,
    # meta-parameters
    BK: tl.constexpr, BV: tl.constexpr, HAS_SLOTS: tl.constexpr, ONE_LAUNCH: tl.constexpr,
):
    """C tile [DK, BV] of head i_bh: update in place, emit h for those BV columns; with ONE_LAUNCH
    the head's last tile to finish writes its new n and m (else _step_nm_kernel does, after)."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    s_bh = _state_row(SLOTS, i_bh, NH, HAS_SLOTS)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    k, m_new, decay, write, n = _head_update(K, I_, F_, N, M, i_bh, s_bh, offs_k, mk, s_k, DK)
    q = tl.load(Q + i_bh * s_q + offs_k, mask=mk, other=0.0).to(tl.float32) * scale
    rden = 1.0 / (tl.maximum(tl.abs(tl.sum(q * n, 0)), tl.exp(-m_new)) + eps)
    c_ptr = C + s_bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    v = tl.load(V + i_bh * s_v + offs_v, mask=mv, other=0.0).to(tl.float32)
    c = decay * tl.load(c_ptr, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32) + (write * k)[:, None] * v[None, :]
    tl.store(c_ptr, c.to(C.dtype.element_ty), mask=mk[:, None] & mv[None, :])
    h = tl.sum(q[:, None] * c, 0) * rden
    tl.store(H + i_bh * s_h + offs_v, h.to(H.dtype.element_ty), mask=mv)
    if ONE_LAUNCH:
        # Every thread of the program has read the old n and m before the release below publishes it.
        tl.debug_barrier()
        tiles = tl.num_programs(1)
        # Counted modulo the tiles, so inactive rows sharing a scratch row (the same n and m
        # written twice) still leave the counter at zero.
        arrived = tl.atomic_add(ARRIVED + s_bh, 1, sem="acq_rel")
        if arrived % tiles == tiles - 1:
            tl.store(N + s_bh * DK + offs_k, n.to(N.dtype.element_ty), mask=mk)
            tl.store(M + s_bh, m_new)
            tl.atomic_add(ARRIVED + s_bh, -tiles, sem="relaxed")


@triton.jit
def _step_nm_kernel(K, I_, F_, N, M, SLOTS, NH, DK, s_k, BK: tl.constexpr, HAS_SLOTS: tl.constexpr):
    """Writes the new n and m of head i_bh, after every C tile has read the old ones."""
    i_bh = tl.program_id(0)
    s_bh = _state_row(SLOTS, i_bh, NH, HAS_SLOTS)
    offs_k = tl.arange(0, BK)
    mk = offs_k < DK
    _, m_new, _, _, n = _head_update(K, I_, F_, N, M, i_bh, s_bh, offs_k, mk, s_k, DK)
    tl.store(N + s_bh * DK + offs_k, n.to(N.dtype.element_ty), mask=mk)
    tl.store(M + s_bh, m_new)


_ARRIVALS: dict[torch.device, list[torch.Tensor]] = {}


def arrivals(device: torch.device, rows: int) -> torch.Tensor:
    """The step's arrival counters on `device`, at least `rows` of them (zero between launches):
    allocated on the first step of a state that size, so before a CUDA graph captures one. A larger
    state gets larger counters beside the old ones, which are kept: a graph captured with them
    replays their address, which must never be freed and reused."""
    have = _ARRIVALS.setdefault(device, [])
    if not have or have[-1].numel() < rows:
        have.append(torch.zeros(rows, dtype=torch.int32, device=device))
    return have[-1]


def _rows(x: torch.Tensor, BH: int) -> torch.Tensor:
    """[B, NH, D] -> [B*NH, D] with a unit stride in D (a view whenever possible)."""
    x = x.reshape(BH, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def mlstm_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    *,
    eps: float = EPS,
    h_out: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """One token: q, k [B, NH, DK], v [B, NH, DV], i, f [B, NH]. Updates `state` (contiguous C, n, m;
    C and n both float32 or both bfloat16, m float32) in place and returns h [B, NH, DV] in v's dtype
    (written into `h_out` when given). slots (int64 [B], optional): token b steps state row
    slots[b] of a state with any number of rows; the others are not touched. Rows that share a
    slot race, so only rows that leave the state as it is (inactive: i = -inf, f = +inf) may."""
    C, n, m = state
    B, NH, DK = q.shape
    DV = v.shape[-1]
    if slots is not None and (slots.dtype != torch.int64 or slots.shape != (B,) or not slots.is_contiguous()):
        raise ValueError(f"mlstm_step: slots must be a contiguous int64 tensor of shape [{B}], got {slots.dtype} {tuple(slots.shape)}")
    if not all(t.is_contiguous() for t in state):
        raise ValueError("mlstm_step: the triton backend updates the state in place; C, n and m must be contiguous")
    if C.dtype not in (torch.float32, torch.bfloat16) or n.dtype != C.dtype or m.dtype != torch.float32:
        raise ValueError(f"mlstm_step: the triton backend takes C and n both float32 or both bfloat16 and m float32, "
                         f"not {C.dtype}, {n.dtype}, {m.dtype}")
    h = torch.empty_like(v) if h_out is None else h_out
    if h.shape != v.shape or not h.is_contiguous():
        raise ValueError(f"mlstm_step: h_out must be a contiguous tensor of shape {tuple(v.shape)}")
    BH = B * NH
    q, k, v = _rows(q, BH), _rows(k, BH), _rows(v, BH)
    i, f = i.reshape(BH).contiguous(), f.reshape(BH).contiguous()
    BK = triton.next_power_of_2(DK)
    BV = max(16, min(triton.next_power_of_2(DV), 8192 // BK))  # a [BK, BV] fp32 tile of C per program
    has_slots = slots is not None
    slots = slots if has_slots else i  # not read without HAS_SLOTS
    one_launch = step_one_launch()
    _step_kernel[(BH, triton.cdiv(DV, BV))](
        q, k, v, i, f, C, n, m, h, slots, arrivals(C.device, C.shape[0] * NH) if one_launch else i,
        NH, DK, DV, DK**-0.5, eps,
        q.stride(0), k.stride(0), v.stride(0), DV,
        BK=BK, BV=BV, HAS_SLOTS=has_slots, ONE_LAUNCH=one_launch, num_warps=4,
    )
    if not one_launch:
        _step_nm_kernel[(BH,)](k, i, f, n, m, slots, NH, DK, k.stride(0), BK=BK, HAS_SLOTS=has_slots, num_warps=1)
    return h, state
