"""Backward kernels of the Triton chunkwise mLSTM and their launcher (forward: chunkwise_triton_fwd.py;
custom ops and public function: chunkwise_triton.py).

The forward keeps only h, the per-position stabilizer m_t and denominator den, and the chunk-entry
m; the chunk-entry states C, n are recomputed (one cheap sequential pass) instead of stored.
Then:
1. `_states_bwd_kernel` walks the chunks backwards carrying dC, dn: the gradient of the state at
   every chunk boundary (dC stored like the chunk states: see state_dtype), and dC0, dn0 at the
   start. It also carries the scalar gradient of the chunk-boundary stabilizer m (see below).
2. `_scores_bwd_kernel` (per chunk and block of rows) computes the chunk's weighted scores A_tj and
   the gradient dS_tj of the raw products q_t . k_j once, stored as [L, L] tiles in the dot dtype
   (small next to q, k, v: L / (2 DK + 2 DV) of their bytes), plus the row and column sums of
   d log D for the gates.
   Computing them here rather than in every DK and DV tile program keeps those programs' registers
   to one [L, L] tile (they spilled at the 7B head shape otherwise) and does the L x L work once.
3. `_dqk_bwd_kernel` (per chunk and DK tile) and `_dv_bwd_kernel` (per chunk and DV tile) give
   dq, dk, dv from those tiles, the chunk's entry state and the gradient of its end state, plus the
   per-position pieces of the gate gradients.

Exact gradients, eps included. Writing every stabilized quantity as exp(-m) times its unstabilized
value, the result depends on a stabilizer m only through eps: with Dn = max(|den|, exp(-m)) + eps,
dh_t/dm_t = -h_t eps / Dn_t, and a chunk-boundary m_k moves the final state (C, n) by -(C, n).
These gradients flow to whichever term attained the max (the carried state, the zeroed state after
a reset, or a token's log weight), as autograd through the reference does; all other paths treat
every m as a constant. The gate gradients come out as gradients of the kernels' gate vectors
(b, ig, virt), and autograd carries them through the cumsum and logsigmoid to f.
"""

import torch
import triton
import triton.language as tl

from .chunkwise import NEG_INF
from .chunkwise_triton_fwd import _gate_vectors, _row_log_d, chunk_states, launch_config, state_dtype


@triton.jit
def _states_bwd_kernel(
    # pointers
    Q, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, MS, R, BETA, DC_END, DCS, DC0, DNS, DMK,
    # dims
    S, S_pad, NC, DK, DV, scale,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """From the final state's gradient DC_END (float32): DCS[:, c] = gradient of C at the end of
    chunk c (in the chunk states' dtype) and DC0 = the initial state's (float32). Likewise, in
    float32 and with the final one at index NC, DNS[:, c] for the end of chunk c - 1 and the
    stabilizer's DMK."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // NH
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    mkv = mk[:, None] & mv[None, :]
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    dC = tl.load(DC_END + i_bh * DK * DV + c_off, mask=mkv, other=0.0)
    dn = tl.load(DNS + (i_bh * (NC + 1) + NC) * DK + offs_k, mask=mk, other=0.0)
    dmk = tl.load(DMK + i_bh * (NC + 1) + NC)
    for j in range(NC):
        i_c = NC - 1 - j
        tl.store(DCS + (i_bh * NC + i_c) * DK * DV + c_off, dC.to(DCS.dtype.element_ty), mask=mkv)
        if i_v == 0:
            tl.store(DNS + (i_bh * (NC + 1) + i_c + 1) * DK + offs_k, dn, mask=mk)
            if i_k == 0:
                tl.store(DMK + i_bh * (NC + 1) + i_c + 1, dmk)
        _, _, _, carry, _, _, g, _ = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
        offs_t = i_c * L + tl.arange(0, L)
        mt = offs_t < S
        m_beg = tl.load(MS + i_bh * (NC + 1) + i_c)
        m_end = tl.load(MS + i_bh * (NC + 1) + i_c + 1)
        m_t = tl.load(MT + i_bh * S_pad + offs_t)
        rden = tl.load(RDEN + i_bh * S_pad + offs_t)
        dden = tl.load(DDEN + i_bh * S_pad + offs_t)
        qd = tl.exp(carry + m_beg - m_t) * scale  # weight of the entry state in h_t, times 1/sqrt(DK)
        qt = tl.load(Q + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)
        dnum = tl.load(DH + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0).to(tl.float32) * rden[:, None]
        decay = tl.exp(g + m_beg - m_end)
        dC = decay * dC + tl.dot(tl.trans(qt * qd[:, None]).to(DT), dnum.to(DT), input_precision=PREC)
        dn = decay * dn + tl.sum(qt * (qd * dden)[:, None], 0)
        dmk = tl.load(R + i_bh * NC + i_c) + tl.load(BETA + i_bh * NC + i_c) * dmk
    tl.store(DC0 + i_bh * DK * DV + c_off, dC, mask=mkv)
    if i_v == 0:
        tl.store(DNS + i_bh * (NC + 1) * DK + offs_k, dn, mask=mk)
        if i_k == 0:
            tl.store(DMK + i_bh * (NC + 1), dmk)


@triton.jit
def _scores_bwd_kernel(
    # pointers
    Q, K, V, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, DML, AS, DSS, ROWS, COLS,
    # dims
    S, S_pad, NC, BH, DK, DV, scale,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Rows r of chunk i_c's A_tj (the weighted scores of the forward) and dS_tj = dA_tj E_tj /
    sqrt(DK), the row sums and (per row block) the column sums of d log D_tj = dA_tj A_tj.
    Two [RB, L] tiles live: dA, then the scores."""
    i_c, i_r, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // NH
    rows = i_r * RB + tl.arange(0, RB)
    cols = tl.arange(0, L)
    offs_r = i_c * L + rows
    offs_t = i_c * L + cols
    mr, mt = offs_r < S, offs_t < S
    m_r = tl.load(MT + i_bh * S_pad + offs_r)
    rden = tl.load(RDEN + i_bh * S_pad + offs_r)
    dA = tl.zeros([RB, L], dtype=tl.float32)  # gradient of A_tj
    for vb in range(tl.cdiv(DV, BV)):
        offs_v = vb * BV + tl.arange(0, BV)
        mv = offs_v < DV
        vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0).to(DT)
        dnum = tl.load(DH + i_bh * s_v_bh + offs_r[:, None] * s_v_t + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0).to(tl.float32) * rden[:, None]
        dA += tl.dot(dnum.to(DT), tl.trans(vt), input_precision=PREC)
    dA += tl.load(DDEN + i_bh * S_pad + offs_r)[:, None]
    qk = tl.zeros([RB, L], dtype=tl.float32)
    for kb in range(tl.cdiv(DK, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        mk = offs_k < DK
        qr = tl.load(Q + i_bh * s_k_bh + offs_r[:, None] * s_k_t + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0).to(DT)
        kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0).to(DT)
        qk += tl.dot(qr, tl.trans(kt), input_precision=PREC)
    # log D of these rows, from the same float32 operands as the forward's (so `top` below is exact)
    bt, it, cnt, _, _, _, _, _ = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    log_d, _, _ = _row_log_d(B_, I_, VIRT, CNT, bt, it, cnt, rows, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    E = tl.exp(log_d - m_r[:, None]) * scale
    A = qk * E
    tile = (i_bh * NC + i_c) * L * L + rows[:, None] * L + cols[None, :]
    tl.store(AS + tile, A.to(AS.dtype.element_ty))
    tl.store(DSS + tile, (dA * E).to(DSS.dtype.element_ty))
    d_log_d = dA * A
    # the stabilizer's own gradient (DML: the part whose max was a token's log weight) goes to
    # the maximal entries of the row, split evenly between ties
    top = log_d == m_r[:, None]
    ties = tl.maximum(tl.sum(top.to(tl.float32), 1), 1.0)
    d_log_d += tl.where(top, (tl.load(DML + i_bh * S_pad + offs_r) / ties)[:, None], 0.0)
    tl.store(ROWS + i_bh * S_pad + offs_r, tl.sum(d_log_d, 1))
    tl.store(COLS + (i_r * BH + i_bh) * S_pad + offs_t, tl.sum(d_log_d, 0))


@triton.jit
def _dqk_bwd_kernel(
    # pointers
    Q, K, V, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, DSS, CS, NS, DCS, DNS, MS,
    DQ, DK_, DCARRY, DA, DG,
    # dims
    S, S_pad, NC, BH, DK, DV, scale,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """dq, dk of one chunk and DK tile, and per DK tile the gate-gradient partial sums dcarry_t
    (through the entry state's weight), da_j (through the end state's weights) and dg (through the
    entry state's decay)."""
    i_c, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // NH
    offs_t = i_c * L + tl.arange(0, L)
    mt = offs_t < S
    tt = tl.arange(0, L)
    _, _, _, carry, _, a, g, _ = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    st_in = i_bh * (NC + 1) + i_c
    m_beg, m_end = tl.load(MS + st_in), tl.load(MS + st_in + 1)
    m_t = tl.load(MT + i_bh * S_pad + offs_t)
    rden = tl.load(RDEN + i_bh * S_pad + offs_t)
    dden = tl.load(DDEN + i_bh * S_pad + offs_t)
    qd = tl.exp(carry + m_beg - m_t)  # weight of the entry state in h_t (the 1/sqrt(DK) is in dS)
    w = tl.exp(a - m_end)
    decay = tl.exp(g + m_beg - m_end)

    offs_k = i_k * BK + tl.arange(0, BK)
    mk = offs_k < DK
    mtk = mt[:, None] & mk[None, :]
    dq_s = tl.zeros([L, BK], dtype=tl.float32)  # gradient of q_t through the entry state
    dk_s = tl.zeros([L, BK], dtype=tl.float32)  # gradient of k_j through the end state
    dg_acc = tl.zeros([BK], dtype=tl.float32)
    for vb in range(tl.cdiv(DV, BV)):
        offs_v = vb * BV + tl.arange(0, BV)
        mv = offs_v < DV
        mtv = mt[:, None] & mv[None, :]
        mkv = mk[:, None] & mv[None, :]
        vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mtv, other=0.0).to(DT)
        dnum = tl.load(DH + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mtv, other=0.0).to(tl.float32) * rden[:, None]
        C = tl.load(CS + (i_bh * NC + i_c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mkv, other=0.0).to(tl.float32)
        dCe = tl.load(DCS + (i_bh * NC + i_c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mkv, other=0.0).to(tl.float32)
        dq_s += tl.dot(dnum.to(DT), tl.trans(C).to(DT), input_precision=PREC)
        dk_s += tl.dot(vt, tl.trans(dCe).to(DT), input_precision=PREC)
        dg_acc += tl.sum(dCe * C, 1)
    n = tl.load(NS + st_in * DK + offs_k, mask=mk, other=0.0)
    dne = tl.load(DNS + (st_in + 1) * DK + offs_k, mask=mk, other=0.0)
    dq_s += dden[:, None] * n[None, :]
    dk_s += dne[None, :]
    dg_acc += dne * n

    dS = tl.load(DSS + (i_bh * NC + i_c) * L * L + tt[:, None] * L + tt[None, :]).to(DT)
    qt = tl.load(Q + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mtk, other=0.0)
    kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mtk, other=0.0)
    dq = tl.dot(dS, kt.to(DT), input_precision=PREC) + (qd * scale)[:, None] * dq_s
    dk = tl.dot(tl.trans(dS), qt.to(DT), input_precision=PREC) + w[:, None] * dk_s
    tl.store(DQ + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], dq.to(DQ.dtype.element_ty), mask=mtk)
    tl.store(DK_ + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], dk.to(DK_.dtype.element_ty), mask=mtk)
    part = (i_k * BH + i_bh) * S_pad + offs_t
    tl.store(DCARRY + part, qd * scale * tl.sum(qt.to(tl.float32) * dq_s, 1))
    tl.store(DA + part, w * tl.sum(kt.to(tl.float32) * dk_s, 1))
    tl.store(DG + (i_k * BH + i_bh) * NC + i_c, decay * tl.sum(dg_acc, 0))


@triton.jit
def _dv_bwd_kernel(
    # pointers
    K, DH, B_, I_, VIRT, CNT, RDEN, AS, DCS, MS, DV_,
    # dims
    S, S_pad, NC, DK, DV,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """dv of one chunk and DV tile: through the chunk's own outputs and through its end state."""
    i_c, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // NH
    offs_t = i_c * L + tl.arange(0, L)
    offs_v = i_v * BV + tl.arange(0, BV)
    mt, mv = offs_t < S, offs_v < DV
    mtv = mt[:, None] & mv[None, :]
    tt = tl.arange(0, L)
    _, _, _, _, _, a, _, _ = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    st_end = i_bh * (NC + 1) + i_c + 1
    w = tl.exp(a - tl.load(MS + st_end))
    dv_s = tl.zeros([L, BV], dtype=tl.float32)
    for kb in range(tl.cdiv(DK, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        mk = offs_k < DK
        kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        dCe = tl.load(DCS + (i_bh * NC + i_c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        dv_s += tl.dot(kt.to(DT), dCe.to(DT), input_precision=PREC)
    A = tl.load(AS + (i_bh * NC + i_c) * L * L + tt[:, None] * L + tt[None, :]).to(DT)
    rden = tl.load(RDEN + i_bh * S_pad + offs_t)
    dnum = tl.load(DH + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mtv, other=0.0).to(tl.float32) * rden[:, None]
    dv = tl.dot(tl.trans(A), dnum.to(DT), input_precision=PREC) + w[:, None] * dv_s
    tl.store(DV_ + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], dv.to(DV_.dtype.element_ty), mask=mtv)


def _per_position(x: torch.Tensor, S_pad: int) -> torch.Tensor:
    """[B, NH, S] -> [B*NH, S_pad], zero padded."""
    return torch.nn.functional.pad(x.flatten(0, 1), (0, S_pad - x.shape[-1]))


def backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    b: torch.Tensor, ig: torch.Tensor, virt: torch.Tensor | None, cnt: torch.Tensor | None,
    C0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor,
    h: torch.Tensor, C: torch.Tensor, n: torch.Tensor, mt: torch.Tensor, den: torch.Tensor, MS: torch.Tensor,
    dh: torch.Tensor, dC: torch.Tensor, dn: torch.Tensor, dm: torch.Tensor, chunk: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv, the gradients of the gate vectors b, ig, virt, and dC0, dn0, dm0."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    BH, S_pad, L = B * NH, b.shape[-1], chunk
    NC = S_pad // L
    cfg = launch_config(q, v, L)
    CS, NS, _, _ = chunk_states(k, v, b, ig, virt, cnt, C0, n0, m0, S, cfg["states"], state_dtype(q))
    strides = (k.stride(1), k.stride(2), v.stride(1), v.stride(2))
    meta = dict(HAS_RESET=cnt is not None, NH=NH)

    # Per position: h = num / Dn with Dn = max(|den|, exp(-m_t)) + eps.
    hdh = _per_position((h.float() * dh.float()).sum(-1), S_pad)  # [BH, S_pad]
    rden = 1.0 / (torch.maximum(den.abs(), torch.exp(-mt)) + eps)
    dden = -hdh * rden * torch.where(den.abs() > torch.exp(-mt), den.sign(), 0.0)
    dmt = -eps * hdh * rden  # total derivative of h_t . dh_t in m_t

    # Which term attained the stabilizer's max, per position and per chunk boundary (the forward
    # computed both maxima from the same float32 operands, so equality tests are exact).
    carry = b if cnt is None else b.masked_fill(cnt.repeat_interleave(NH, 0) > 0, NEG_INF)
    m_beg, m_end = MS[:, :NC], MS[:, 1:]
    by_carry = carry + m_beg.repeat_interleave(L, 1) == mt
    by_virt = torch.zeros_like(by_carry) if virt is None else (virt == mt) & ~by_carry
    dml = dmt.masked_fill(by_carry | by_virt, 0.0)  # routed to the maximal log D_tj in the kernel
    r = (dmt * by_carry).view(BH, NC, L).sum(-1)  # to the chunk-entry m
    g = carry.view(BH, NC, L)[..., -1]
    beta = (g + m_beg == m_end).float()  # the chunk-end m came from the carried state

    DCS = torch.empty_like(CS)  # the gradient of the state at each chunk's end, stored like the states
    dC0 = torch.empty_like(C0)
    DNS = torch.empty_like(NS)
    DMK = torch.empty_like(MS)
    DNS[:, NC] = dn.flatten(0, 1)
    DMK[:, NC] = (dm.flatten() - (dC * C).sum((-1, -2)).flatten() - (dn * n).sum(-1).flatten())
    st = cfg["states"]
    _states_bwd_kernel[(triton.cdiv(DK, st["BK"]), triton.cdiv(DV, st["BV"]), BH)](
        q, dh, b, ig, virt, cnt, mt, rden, dden, MS, r, beta, dC, DCS, dC0, DNS, DMK,
        S, S_pad, NC, DK, DV, DK**-0.5, *strides, **meta, **st,
    )

    # The chunks' [L, L] tiles, in the dtype the dots take them in
    A = q.new_empty(BH, NC, L, L, dtype=torch.float32 if cfg["scores"]["DT"] == tl.float32 else q.dtype)
    dS = torch.empty_like(A)
    sc = cfg["scores"]
    rows = q.new_empty(BH, S_pad, dtype=torch.float32)
    cols = q.new_empty(L // sc["RB"], BH, S_pad, dtype=torch.float32)  # partial sums per row block
    _scores_bwd_kernel[(NC, L // sc["RB"], BH)](
        q, k, v, dh, b, ig, virt, cnt, mt, rden, dden, dml, A, dS, rows, cols,
        S, S_pad, NC, BH, DK, DV, DK**-0.5, *strides, **meta, **sc,
    )
    cols = cols.sum(0)
    NKB = triton.cdiv(DK, cfg["dqk"]["BK"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dcarry = q.new_empty(NKB, BH, S_pad, dtype=torch.float32)
    da = torch.empty_like(dcarry)
    dg = q.new_empty(NKB, BH, NC, dtype=torch.float32)
    _dqk_bwd_kernel[(NC, NKB, BH)](
        q, k, v, dh, b, ig, virt, cnt, mt, rden, dden, dS, CS, NS, DCS, DNS, MS,
        dq, dk, dcarry, da, dg,
        S, S_pad, NC, BH, DK, DV, DK**-0.5, *strides, **meta, **cfg["dqk"],
    )
    _dv_bwd_kernel[(NC, triton.cdiv(DV, cfg["dv"]["BV"]), BH)](
        k, dh, b, ig, virt, cnt, rden, A, DCS, MS, dv,
        S, S_pad, NC, DK, DV, *strides, **meta, **cfg["dv"],
    )

    # Gate vectors. log D_tj = b_t - b_j + ig_j; the end-state weights a_j = b_last - b_j + ig_j;
    # the entry state's weight at t is carry_t = b_t and its decay over the chunk g = b_last.
    dmk_end = DMK[:, 1:]  # [BH, NC]
    a = (b.view(BH, NC, L)[..., -1:] - b.view(BH, NC, L) + ig.view(BH, NC, L))
    if cnt is not None:
        c = cnt.repeat_interleave(NH, 0).view(BH, NC, L)
        a = a.masked_fill(c != c[..., -1:], NEG_INF)
    top_a = (a == m_end[..., None]) & (beta == 0)[..., None]
    n_top = top_a.sum(-1, keepdim=True)
    da = da.sum(0).view(BH, NC, L) + top_a * (dmk_end[..., None] / n_top.clamp(min=1))
    dgate = dg.sum(0) + dmk_end * beta
    db = (rows - cols + dcarry.sum(0) + dmt * by_carry).view(BH, NC, L) - da
    db[..., -1] += da.sum(-1) + dgate
    dig = cols + da.flatten(1)
    dvirt = None
    if virt is not None:
        dvirt = (dmt * by_virt).view(BH, NC, L)
        dvirt[..., -1] += dmk_end * (1 - beta) * (n_top[..., 0] == 0)  # the zeroed state won the max
        dvirt = dvirt.flatten(1)
    dn0 = DNS[:, 0].view_as(n0)
    dm0 = (DMK[:, 0] + (dC0 * C0).reshape(BH, -1).sum(-1) + (dn0 * n0).reshape(BH, -1).sum(-1)).view_as(m0)
    return dq, dk, dv, db.flatten(1), dig, dvirt if dvirt is not None else torch.zeros_like(b), dC0, dn0.clone(), dm0


