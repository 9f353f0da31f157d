"""Chunkwise-parallel mLSTM in Triton: forward kernels, the autograd-aware custom op and the public
function. The backward kernels live in chunkwise_triton_bwd.py. PyTorch twin: chunkwise.py.

Forward, in two launches (spec §2, chunkwise form):
1. `_states_fwd_kernel`: one program per (DK tile, DV tile, batch*head) walks the chunks in order,
   storing the state each chunk starts from (C, n, m) and adding the chunk's own k v^T product.
   Sequential over chunks, parallel over heads and state tiles; nothing but the chunk-entry states
   goes to memory.
2. `_output_fwd_kernel`: one program per (chunk, DV tile, batch*head) computes the chunk's outputs
   from its entry state and its own tokens (causal L x L scores, loop over DK tiles).

Gate vectors (logsigmoid, in-chunk cumulative sums, reset bookkeeping) are cheap O(S) PyTorch ops
around the op, so autograd carries their gradients back to f; the kernels take
  b [B*NH, S_pad]     in-chunk inclusive cumsum of lf (padding: lf = 0),
  ig [B*NH, S_pad]    input gate (padding: -inf, so padded positions write nothing),
  virt [B*NH, S_pad]  log weight of the zeroed state after an in-chunk reset (else -inf),
  cnt [B, S_pad]      number of resets so far in the chunk (token j reaches t only if equal).
Math and states are float32 whatever the input dtype; h comes back in v's dtype.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .chunkwise import in_chunk_cumsum
from .common import EPS, MLSTMState, check_inputs, zero_state

NEG_INF = float("-inf")
CHUNK_SIZES = (16, 32, 64, 128, 256)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L: tl.constexpr, HAS_RESET: tl.constexpr):
    """Per-position gate quantities of chunk i_c.

    Returns b, ig, cnt, carry (log weight of the entry state at t, -inf after a reset), virt,
    a (log weight of token j in the chunk-end state), g (log decay of the entry state over the
    whole chunk) and virt_last (virt at the chunk's last position).
    """
    offs = i_c * L + tl.arange(0, L)
    last = i_c * L + L - 1
    bt = tl.load(B_ + i_bh * S_pad + offs)
    it = tl.load(I_ + i_bh * S_pad + offs)
    b_last = tl.load(B_ + i_bh * S_pad + last)
    if HAS_RESET:
        cnt = tl.load(CNT + i_b * S_pad + offs)
        cnt_last = tl.load(CNT + i_b * S_pad + last)
        virt = tl.load(VIRT + i_bh * S_pad + offs)
        virt_last = tl.load(VIRT + i_bh * S_pad + last)
        carry = tl.where(cnt == 0, bt, NEG_INF)
        a = tl.where(cnt == cnt_last, b_last - bt + it, NEG_INF)
        g = tl.where(cnt_last == 0, b_last, NEG_INF)
    else:
        cnt = tl.zeros([L], dtype=tl.int32)
        virt = tl.full([L], NEG_INF, tl.float32)
        virt_last = NEG_INF
        carry = bt
        a = b_last - bt + it
        g = b_last
    return bt, it, cnt, carry, virt, a, g, virt_last


@triton.jit
def _log_d(bt, it, cnt, L: tl.constexpr):
    """log D_tj = b_t - b_j + ig_j for j <= t in the same document, else -inf. [L, L]"""
    tt = tl.arange(0, L)
    reach = (tt[:, None] >= tt[None, :]) & (cnt[:, None] == cnt[None, :])
    return tl.where(reach, bt[:, None] - bt[None, :] + it[None, :], NEG_INF)


@triton.jit
def _states_fwd_kernel(
    # pointers
    K, V, B_, I_, VIRT, CNT, C0, N0, M0, CS, NS, MS,
    # dims
    S, S_pad, NC, DK, DV,
    # strides (q/k/v rows are contiguous in the head dim)
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // NH
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    mkv = mk[:, None] & mv[None, :]
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    C = tl.load(C0 + i_bh * DK * DV + c_off, mask=mkv, other=0.0)
    n = tl.load(N0 + i_bh * DK + offs_k, mask=mk, other=0.0)
    m = tl.load(M0 + i_bh)
    for i_c in range(NC):
        # the state chunk i_c starts from; n and m are written by one program column only
        tl.store(CS + (i_bh * (NC + 1) + i_c) * DK * DV + c_off, C, mask=mkv)
        if i_v == 0:
            tl.store(NS + (i_bh * (NC + 1) + i_c) * DK + offs_k, n, mask=mk)
            if i_k == 0:
                tl.store(MS + i_bh * (NC + 1) + i_c, m)
        _, _, _, _, _, a, g, virt_last = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
        m_new = tl.maximum(g + m, tl.maximum(tl.max(a, 0), virt_last))
        decay = tl.exp(g + m - m_new)
        w = tl.exp(a - m_new)  # [L] weight of each token in the chunk-end state
        offs_t = i_c * L + tl.arange(0, L)
        mt = offs_t < S
        kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)
        vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0).to(tl.float32)
        kw = kt * w[:, None]
        C = decay * C + tl.dot(tl.trans(kw).to(DT), vt.to(DT), input_precision=PREC)
        n = decay * n + tl.sum(kw, 0)
        m = m_new
    tl.store(CS + (i_bh * (NC + 1) + NC) * DK * DV + c_off, C, mask=mkv)
    if i_v == 0:
        tl.store(NS + (i_bh * (NC + 1) + NC) * DK + offs_k, n, mask=mk)
        if i_k == 0:
            tl.store(MS + i_bh * (NC + 1) + NC, m)


@triton.jit
def _output_fwd_kernel(
    # pointers
    Q, K, V, B_, I_, VIRT, CNT, CS, NS, MS, H, MT, DEN,
    # dims
    S, S_pad, NC, DK, DV, scale, eps,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_c, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // NH
    offs_t = i_c * L + tl.arange(0, L)
    offs_v = i_v * BV + tl.arange(0, BV)
    mt, mv = offs_t < S, offs_v < DV
    bt, it, cnt, carry, virt, _, _, _ = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    log_d = _log_d(bt, it, cnt, L)
    m_prev = carry + tl.load(MS + i_bh * (NC + 1) + i_c)
    m_t = tl.maximum(tl.maximum(m_prev, virt), tl.max(log_d, 1))  # the recurrent stabilizer at t
    decay = tl.exp(m_prev - m_t)  # 0 after a reset

    qk = tl.zeros([L, L], dtype=tl.float32)
    q_c = tl.zeros([L, BV], dtype=tl.float32)  # q C_entry
    q_n = tl.zeros([L], dtype=tl.float32)  # q . n_entry
    state = i_bh * (NC + 1) + i_c
    for kb in range(tl.cdiv(DK, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        mk = offs_k < DK
        mtk = mt[:, None] & mk[None, :]
        qt = tl.load(Q + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mtk, other=0.0).to(tl.float32)
        kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mtk, other=0.0).to(tl.float32)
        C = tl.load(CS + state * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        n = tl.load(NS + state * DK + offs_k, mask=mk, other=0.0)
        qk += tl.dot(qt.to(DT), tl.trans(kt).to(DT), input_precision=PREC)
        q_c += tl.dot(qt.to(DT), C.to(DT), input_precision=PREC)
        q_n += tl.sum(qt * n[None, :], 1)
    vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0).to(tl.float32)
    A = qk * scale * tl.exp(log_d - m_t[:, None])
    num = tl.dot(A.to(DT), vt.to(DT), input_precision=PREC) + (decay * scale)[:, None] * q_c
    den = tl.sum(A, 1) + decay * scale * q_n
    h = num / (tl.maximum(tl.abs(den), tl.exp(-m_t)) + eps)[:, None]
    tl.store(H + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], h.to(H.dtype.element_ty), mask=mt[:, None] & mv[None, :])
    # the backward needs m_t and den (a DV-tile-independent pair): one program column writes them
    if i_v == 0:
        tl.store(MT + i_bh * S_pad + offs_t, m_t)
        tl.store(DEN + i_bh * S_pad + offs_t, den)


def launch_config(q: torch.Tensor, v: torch.Tensor, L: int) -> dict:
    """Tile sizes and the dtype tl.dot sees: fp32 (IEEE) for fp32 inputs and in the interpreter,
    whose bf16 dot is broken; the input's half dtype otherwise (fp32 accumulation either way)."""
    DK, DV = q.shape[-1], v.shape[-1]
    if interpreting() or q.dtype == torch.float32:
        dt, prec = tl.float32, "ieee"
    else:
        dt, prec = (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16), "tf32"
    big = L >= 128  # keep the [L, L] score tile and the operand tiles within shared memory
    BK = min(triton.next_power_of_2(DK), 32 if big else 64)
    BV = min(triton.next_power_of_2(DV), 32 if big else 64)
    return dict(L=L, BK=BK, BV=BV, DT=dt, PREC=prec, num_warps=8 if big else 4)


def chunk_states(k, v, b, ig, virt, cnt, C0, n0, m0, S, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry states of every chunk plus the final one at index NC: C [B*NH, NC+1, DK, DV] etc."""
    B, NH, _, DK = k.shape
    DV = v.shape[-1]
    S_pad = b.shape[-1]
    NC = S_pad // cfg["L"]
    CS = k.new_empty(B * NH, NC + 1, DK, DV, dtype=torch.float32)
    NS = k.new_empty(B * NH, NC + 1, DK, dtype=torch.float32)
    MS = k.new_empty(B * NH, NC + 1, dtype=torch.float32)
    grid = (triton.cdiv(DK, cfg["BK"]), triton.cdiv(DV, cfg["BV"]), B * NH)
    _states_fwd_kernel[grid](
        k, v, b, ig, virt, cnt, C0, n0, m0, CS, NS, MS,
        S, S_pad, NC, DK, DV,
        k.stride(1), k.stride(2), v.stride(1), v.stride(2),
        HAS_RESET=cnt is not None, NH=NH, **cfg,
    )
    return CS, NS, MS


# ---------------------------------------------------------------------------------------------
# The custom op: opaque to torch.compile, with a fake implementation and a registered backward.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("xlstm7b::mlstm_chunkwise_fwd", mutates_args=())
def mlstm_chunkwise_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    b: torch.Tensor, ig: torch.Tensor, virt: torch.Tensor | None, cnt: torch.Tensor | None,
    C0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor, chunk: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns h, the final (C, n, m), and for the backward: m_t, den [B*NH, S_pad] and the chunk-entry m."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    cfg = launch_config(q, v, chunk)
    CS, NS, MS = chunk_states(k, v, b, ig, virt, cnt, C0, n0, m0, S, cfg)
    S_pad = b.shape[-1]
    NC = S_pad // chunk
    h = torch.empty_like(v)
    mt = q.new_empty(B * NH, S_pad, dtype=torch.float32)
    den = torch.empty_like(mt)
    grid = (NC, triton.cdiv(DV, cfg["BV"]), B * NH)
    _output_fwd_kernel[grid](
        q, k, v, b, ig, virt, cnt, CS, NS, MS, h, mt, den,
        S, S_pad, NC, DK, DV, DK**-0.5, eps,
        k.stride(1), k.stride(2), v.stride(1), v.stride(2),
        HAS_RESET=cnt is not None, NH=NH, **cfg,
    )
    C = CS[:, NC].reshape(B, NH, DK, DV)
    n = NS[:, NC].reshape(B, NH, DK)
    m = MS[:, NC].reshape(B, NH, 1)
    return h, C.clone(), n.clone(), m.clone(), mt, den, MS


@mlstm_chunkwise_fwd.register_fake
def _(q, k, v, b, ig, virt, cnt, C0, n0, m0, chunk, eps):
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    S_pad = b.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    return (
        torch.empty_like(v), q.new_empty(B, NH, DK, DV, **f32), q.new_empty(B, NH, DK, **f32),
        q.new_empty(B, NH, 1, **f32), q.new_empty(B * NH, S_pad, **f32), q.new_empty(B * NH, S_pad, **f32),
        q.new_empty(B * NH, S_pad // chunk + 1, **f32),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, b, ig, virt, cnt, C0, n0, m0, chunk, eps = inputs
    h, C, n, m, mt, den, MS = output
    ctx.save_for_backward(q, k, v, b, ig, virt, cnt, C0, n0, m0, h, C, n, mt, den, MS)
    ctx.chunk, ctx.eps = chunk, eps


def _backward(ctx, dh, dC, dn, dm, *_):
    from .chunkwise_triton_bwd import mlstm_chunkwise_bwd  # noqa: F401  (registers the op)

    q, k, v, b, ig, virt, cnt, C0, n0, m0, h, C, n, mt, den, MS = ctx.saved_tensors
    dq, dk, dv, db, dig, dvirt, dC0, dn0, dm0 = torch.ops.xlstm7b.mlstm_chunkwise_bwd(
        q, k, v, b, ig, virt, cnt, C0, n0, m0, h, C, n, mt, den, MS,
        _or_zeros(dh, h), _or_zeros(dC, C), _or_zeros(dn, n), _or_zeros(dm, m0),
        ctx.chunk, ctx.eps,
    )
    return dq, dk, dv, db, dig, dvirt if virt is not None else None, None, dC0, dn0, dm0, None, None


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.contiguous()


mlstm_chunkwise_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def chunk_gates(i: torch.Tensor, f: torch.Tensor, reset: torch.Tensor | None, L: int):
    """The kernels' gate vectors (see module docstring), padded to a multiple of L. Differentiable."""
    B, NH, S = i.shape
    NC = -(-S // L)
    pad = NC * L - S
    lf = F.pad(F.logsigmoid(f.float()), (0, pad)).view(B, NH, NC, L)
    ig = F.pad(i.float(), (0, pad), value=NEG_INF).reshape(B * NH, NC * L)
    r = None if reset is None else F.pad(reset, (0, pad)).view(B, NC, L)
    b, count = in_chunk_cumsum(lf, r)
    if count is None:
        return b.reshape(B * NH, NC * L), ig, None, None
    virt = b.masked_fill(count == 0, NEG_INF)
    return b.reshape(B * NH, NC * L), ig, virt.reshape(B * NH, NC * L), count.to(torch.int32).view(B, NC * L)


def triton_chunk_size(chunk_size: int, S: int) -> int:
    """A power of two in 16..256 (tl.dot needs >= 16); short sequences use a smaller chunk."""
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"mlstm: the triton backend needs chunk_size in {CHUNK_SIZES}, got {chunk_size}")
    return min(chunk_size, max(16, triton.next_power_of_2(S)))


def mlstm_chunkwise_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    *,
    reset: torch.Tensor | None = None,
    chunk_size: int = 64,
    eps: float = EPS,
) -> tuple[torch.Tensor, MLSTMState]:
    """The mLSTM over a sequence with the Triton chunkwise kernels; same contract as mlstm_chunkwise."""
    check_inputs(q, k, v, i, f, state, reset)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"mlstm: the triton backend takes fp32, fp16 or bf16 inputs, got {q.dtype}")
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    if min(DK, DV) < 16:
        raise ValueError(f"mlstm: the triton backend needs head dims >= 16, got DK {DK}, DV {DV}")
    L = triton_chunk_size(chunk_size, S)
    b, ig, virt, cnt = chunk_gates(i, f, reset, L)
    if state is None:
        state = zero_state(B, NH, DK, DV, device=q.device)
    C0, n0, m0 = (t.float().contiguous() for t in state)
    k, v = k.to(q.dtype).contiguous(), v.contiguous()
    h, C, n, m, *_ = mlstm_chunkwise_fwd(q.contiguous(), k, v, b, ig, virt, cnt, C0, n0, m0, L, eps)
    return h, (C, n, m)

