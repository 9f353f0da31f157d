"""Backward kernels of the Triton chunkwise mLSTM and their launcher (forward: chunkwise_triton_fwd.py;
custom ops and public function: chunkwise_triton.py).

The forward keeps only h, the per-position stabilizer m_t and denominator den, and the chunk-entry
m; the chunk-entry states C, n are recomputed (the forward's states pass, again) instead of stored, unless
the forward ran in a checkpoint's recomputation, right before this backward (chunkwise_triton.py).
Then, six launches in all and no per-position PyTorch op:
1. `_scores_bwd_kernel` (per chunk and block of rows) computes the chunk's weighted scores A_tj and
   the gradient dS_tj of the raw products q_t . k_j once, stored as [L, L] tiles in the dot dtype
   (small next to q, k, v: L / (2 DK + 2 DV) of their bytes), plus the row and column sums of
   d log D for the gates. Computing them here rather than in every DK and DV tile program keeps
   those programs' registers to one [L, L] tile (they spilled at the 7B head shape otherwise) and
   does the L x L work once. It reads every column of dh for its rows, and h beside it, so it also
   takes the row sums h . dh and the per-position terms of the normalizer the other launches use.
2. `_states_bwd_kernel` walks the chunks backwards carrying dC, dn: the gradient of the state at
   every chunk boundary (dC stored like the chunk states: see state_dtype), and dC0, dn0 at the
   start. It also carries the scalar gradient of the chunk-boundary stabilizer m (see below). With
   launch_config's "states" segments > 1, three launches over segments of the sequence in its place
   (chunkwise_triton_split_bwd.py), as the states pass's (ten launches in all).
3. `_dqk_bwd_kernel` (per chunk and DK tile) and `_dv_bwd_kernel` (per chunk and DV tile) give
   dq, dk, dv from those tiles, the chunk's entry state and the gradient of its end state, plus the
   per-position pieces of the gate gradients.
4. `_gates_bwd_kernel` (chunkwise_triton_gates.py) sums those pieces into the gate vectors'
   gradients, and gives the initial m's.
With a launch setting LB below the chunk, the scores, dq/dk and dv launches run their forms tiled in
sub-blocks of LB of the chunk's columns (and rows) in place of 1 and 3 (chunkwise_triton_intra_bwd.py).

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

from .chunkwise_triton_chunk import _gate_vectors, _state_grad_step, _store_end_grad
from .chunkwise_triton_fwd import _row_log_d, chunk_states, final_state, state_dtype
from .chunkwise_triton_gates import _gates_bwd_kernel, _state_dot
from .chunkwise_triton_intra import _qk_block, tiled_kernel
from .chunkwise_triton_intra_bwd import (
    _dqk_intra_kernel, _dqk_state_terms, _dv_intra_kernel, _dv_state_term, _normalizer_grads, _scores_intra_kernel,
)
from .chunkwise_triton_split import segment_plan
from .chunkwise_triton_split_bwd import split_states_grad
from .launch_settings import grid_meta, launch_config, program_ids


@triton.jit
def _states_bwd_kernel(
    # pointers
    Q, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, MS, DMTC, C_END, N_END, DC_END, DN_END, DM_END,
    DCS, DC0, DNS, DN0, DMK,
    # dims
    S, S_pad, NC, DK, DV, scale,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """From the final state's gradient (float32): DCS[:, c] = gradient of C at the end of chunk c
    (in the chunk states' dtype) and DC0 = the initial state's (float32). Likewise, in float32,
    DNS[:, c] for the end of chunk c - 1 (the final one at index NC) and DN0, and the gradient of
    the chunk-boundary stabilizer DMK[:, c] (m at the end of chunk c - 1): the final m's own,
    less dC . C + dn . n (the final state is exp(-m) times its unstabilized value), carried back
    through each chunk where the carried state attained the chunk-end max, plus the gradient of
    the positions whose m_t the chunk-entry m attained (DMTC)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // NH
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    mkv = mk[:, None] & mv[None, :]
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    dC = tl.load(DC_END + i_bh.to(tl.int64) * DK * DV + c_off, mask=mkv, other=0.0)
    dn = tl.load(DN_END + i_bh * DK + offs_k, mask=mk, other=0.0)
    dmk = tl.load(DM_END + i_bh)
    if i_k == 0:
        if i_v == 0:  # the program that stores DMK
            dmk -= _state_dot(DC_END, C_END, DN_END, N_END, i_bh, DK, DV, BK, BV)
    for j in range(NC):
        i_c = NC - 1 - j
        _store_end_grad(DCS, DNS, DMK, dC, dn, dmk, i_bh, i_c, i_k, i_v, NC, offs_k, offs_v, DK, DV)
        dC, dn, dmk, _, _ = _state_grad_step(Q, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, MS, DMTC, dC, dn, dmk, i_c, i_bh, i_b,
                                             offs_k, offs_v, S, S_pad, NC, DK, DV, scale, s_k_bh, s_k_t, s_v_bh, s_v_t,
                                             L, HAS_RESET, DT, PREC)
    tl.store(DC0 + i_bh.to(tl.int64) * DK * DV + c_off, dC, mask=mkv)
    if i_v == 0:
        tl.store(DN0 + i_bh * DK + offs_k, dn, mask=mk)
        if i_k == 0:
            tl.store(DMK + i_bh * (NC + 1), dmk)


@triton.jit
def _scores_bwd_kernel(
    # pointers
    Q, K, V, H, DH, B_, I_, VIRT, CNT, MT, DEN, MS, AS, DSS, ROWS, COLS, RDEN, DDEN, DMTC, DMTV,
    # dims
    S, S_pad, NC, BH, DK, DV, scale, eps,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, TILES_FIRST: tl.constexpr,
):
    """Rows r of chunk i_c's A_tj (the weighted scores of the forward) and dS_tj = dA_tj E_tj /
    sqrt(DK), the row sums and (per row block) the column sums of d log D_tj = dA_tj A_tj.
    Two [RB, L] tiles live: dA, then the scores.

    On the way, the per-position terms of the normalizer: with Dn = max(|den|, exp(-m_t)) + eps and
    h = num / Dn, from h . dh (summed over the DV tiles this program reads anyway) the gradients of
    den (DDEN) and m_t, and 1 / Dn (RDEN), for the other launches. m_t's gradient goes where its max
    came from: the carried state (DMTC, summed per chunk by _states_bwd_kernel), the zeroed state
    after a reset (DMTV) or the row's largest log D_tj (here)."""
    i_c, i_r = program_ids(TILES_FIRST)
    i_bh = tl.program_id(2)
    i_b = i_bh // NH
    rows = i_r * RB + tl.arange(0, RB)
    cols = tl.arange(0, L)
    offs_r = i_c * L + rows
    offs_t = i_c * L + cols
    mr, mt = offs_r < S, offs_t < S
    m_r = tl.load(MT + i_bh * S_pad + offs_r)
    den = tl.load(DEN + i_bh * S_pad + offs_r)
    rden = 1.0 / (tl.maximum(tl.abs(den), tl.exp(-m_r)) + eps)
    dA = tl.zeros([RB, L], dtype=tl.float32)  # gradient of A_tj
    hdh = tl.zeros([RB], dtype=tl.float32)  # h_t . dh_t
    for vb in range(tl.cdiv(DV, BV)):
        offs_v = vb * BV + tl.arange(0, BV)
        mv = offs_v < DV
        vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0).to(DT)
        r_off = offs_r[:, None] * s_v_t + offs_v[None, :]
        dh = tl.load(DH + i_bh * s_v_bh + r_off, mask=mr[:, None] & mv[None, :], other=0.0).to(tl.float32)
        hdh += tl.sum(tl.load(H + i_bh * s_v_bh + r_off, mask=mr[:, None] & mv[None, :], other=0.0).to(tl.float32) * dh, 1)
        dA += tl.dot((dh * rden[:, None]).to(DT), tl.trans(vt), input_precision=PREC)
    dden, dmt = _normalizer_grads(den, m_r, hdh, rden, eps)
    dA += dden[:, None]
    qk = _qk_block(Q, K, offs_r, offs_t, mr, mt, i_bh, DK, s_k_bh, s_k_t, BK, DT, PREC)
    # log D of these rows, from the same float32 operands as the forward's (so the equality tests
    # below are exact)
    bt, it, cnt, _, _, _, _, _ = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    log_d, carry, virt = _row_log_d(B_, I_, VIRT, CNT, bt, it, cnt, rows, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    by_carry = carry + tl.load(MS + i_bh * (NC + 1) + i_c) == m_r
    by_virt = (virt == m_r) & ~by_carry
    E = tl.exp(log_d - m_r[:, None]) * scale
    A = qk * E
    tile = (i_bh * NC + i_c) * L * L + rows[:, None] * L + cols[None, :]
    tl.store(AS + tile, A.to(AS.dtype.element_ty))
    tl.store(DSS + tile, (dA * E).to(DSS.dtype.element_ty))
    d_log_d = dA * A
    # m_t's gradient where a token's log weight was the max: to the maximal entries of the row,
    # split evenly between ties
    top = log_d == m_r[:, None]
    ties = tl.maximum(tl.sum(top.to(tl.float32), 1), 1.0)
    dml = tl.where(by_carry | by_virt, 0.0, dmt)
    d_log_d += tl.where(top, (dml / ties)[:, None], 0.0)
    tl.store(ROWS + i_bh * S_pad + offs_r, tl.sum(d_log_d, 1))
    tl.store(COLS + (i_r * BH + i_bh) * S_pad + offs_t, tl.sum(d_log_d, 0))
    tl.store(RDEN + i_bh * S_pad + offs_r, rden)
    tl.store(DDEN + i_bh * S_pad + offs_r, dden)
    tl.store(DMTC + i_bh * S_pad + offs_r, tl.where(by_carry, dmt, 0.0))
    tl.store(DMTV + i_bh * S_pad + offs_r, tl.where(by_virt, dmt, 0.0))


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
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, TILES_FIRST: tl.constexpr,
):
    """dq, dk of one chunk and DK tile, and per DK tile the gate-gradient partial sums dcarry_t
    (through the entry state's weight), da_j (through the end state's weights) and dg (through the
    entry state's decay)."""
    i_c, i_k = program_ids(TILES_FIRST)
    i_bh = tl.program_id(2)
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
    # the gradients of q_t and k_j through the entry and end states
    dq_s, dk_s, dg_acc = _dqk_state_terms(V, DH, CS, NS, DCS, DNS, offs_t, mt, offs_k, mk, rden, dden, i_bh, i_c, NC, DK, DV,
                                          s_v_bh, s_v_t, BK, BV, DT, PREC)

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
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, TILES_FIRST: tl.constexpr,
):
    """dv of one chunk and DV tile: through the chunk's own outputs and through its end state."""
    i_c, i_v = program_ids(TILES_FIRST)
    i_bh = tl.program_id(2)
    i_b = i_bh // NH
    offs_t = i_c * L + tl.arange(0, L)
    offs_v = i_v * BV + tl.arange(0, BV)
    mt, mv = offs_t < S, offs_v < DV
    mtv = mt[:, None] & mv[None, :]
    tt = tl.arange(0, L)
    _, _, _, _, _, a, _, _ = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    st_end = i_bh * (NC + 1) + i_c + 1
    w = tl.exp(a - tl.load(MS + st_end))
    dv_s = _dv_state_term(K, DCS, offs_t, mt, offs_v, mv, i_bh, i_c, NC, DK, DV, s_k_bh, s_k_t, BK, DT, PREC)
    A = tl.load(AS + (i_bh * NC + i_c) * L * L + tt[:, None] * L + tt[None, :]).to(DT)
    rden = tl.load(RDEN + i_bh * S_pad + offs_t)
    dnum = tl.load(DH + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mtv, other=0.0).to(tl.float32) * rden[:, None]
    dv = tl.dot(tl.trans(A), dnum.to(DT), input_precision=PREC) + w[:, None] * dv_s
    tl.store(DV_ + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], dv.to(DV_.dtype.element_ty), mask=mtv)


def backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    b: torch.Tensor, ig: torch.Tensor, virt: torch.Tensor | None, cnt: torch.Tensor | None,
    C0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor,
    h: torch.Tensor, C: torch.Tensor, n: torch.Tensor, mt: torch.Tensor, den: torch.Tensor, MS: torch.Tensor,
    CS: torch.Tensor | None, NS: torch.Tensor | None, dh: torch.Tensor, dC: torch.Tensor, dn: torch.Tensor, dm: torch.Tensor, chunk: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv, the gradients of the gate vectors b, ig, virt (zeros without resets), and
    dC0, dn0, dm0. Six launches, nothing else: the chunk states, the scores (with the per-position
    normalizer terms), the states' gradients, dq and dk, dv, and the gate vectors' gradients. Given
    the forward's chunk-entry states CS, NS (chunk_states' with the same settings), five: the states
    pass is not run again. Both states passes split over segments take three launches each."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    BH, S_pad, L = B * NH, b.shape[-1], chunk
    NC = S_pad // L
    cfg = launch_config(q, v, L)
    if CS is None or NS is None:
        CS, NS, _, _ = chunk_states(k, v, b, ig, virt, cnt, C0, n0, m0, S, cfg["states"], state_dtype(q))
    strides = (k.stride(1), k.stride(2), v.stride(1), v.stride(2))
    meta = dict(HAS_RESET=cnt is not None, NH=NH)
    f32 = dict(dtype=torch.float32)

    # The chunks' [L, L] tiles, in the dtype the dots take them in, and the per-position terms
    A = q.new_empty(BH, NC, L, L, dtype=torch.float32 if cfg["scores"]["DT"] == tl.float32 else q.dtype)
    dS = torch.empty_like(A)
    rows, rden, dden, dmtc, dmtv = (q.new_empty(BH, S_pad, **f32) for _ in range(5))
    NRB = L // cfg["scores"]["RB"]
    cols = q.new_empty(NRB, BH, S_pad, **f32)  # partial sums per row block
    grid, sc = grid_meta(cfg["scores"], NC, NRB, BH)
    scores_kernel, sc = tiled_kernel(_scores_bwd_kernel, _scores_intra_kernel, sc)
    scores_kernel[grid](
        q, k, v, h, dh, b, ig, virt, cnt, mt, den, MS, A, dS, rows, cols, rden, dden, dmtc, dmtv,
        S, S_pad, NC, BH, DK, DV, DK**-0.5, eps, *strides, **meta, **sc,
    )

    DCS = torch.empty_like(CS)  # the gradient of the state at each chunk's end, stored like the states
    DNS = torch.empty_like(NS)
    DMK = torch.empty_like(MS)
    dC0, dn0, dm0 = final_state(q, DV)
    st = {name: value for name, value in cfg["states"].items() if name != "local_max"}  # local_max: the forward pass's alone
    P, NCP = segment_plan(NC, st.pop("segments"), BH)  # split over the forward's segments (chunkwise_triton_split_bwd.py)
    args = (q, dh, b, ig, virt, cnt, mt, rden, dden, MS, dmtc, C, n, dC, dn, dm, DCS, dC0, DNS, dn0, DMK,
            S, S_pad, NC, DK, DV, DK**-0.5, *strides)
    if P > 1:
        split_states_grad(*args, P=P, NCP=NCP, meta=dict(meta, **st))
    else:
        _states_bwd_kernel[(triton.cdiv(DK, st["BK"]), triton.cdiv(DV, st["BV"]), BH)](*args, **meta, **st)

    NKB = triton.cdiv(DK, cfg["dqk"]["BK"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dcarry = q.new_empty(NKB, BH, S_pad, **f32)
    da = torch.empty_like(dcarry)
    dg = q.new_empty(NKB, BH, NC, **f32)
    grid, dqk = grid_meta(cfg["dqk"], NC * (L // cfg["dqk"]["LB"]), NKB, BH)  # a program per sub-block of LB rows
    dqk_kernel, dqk = tiled_kernel(_dqk_bwd_kernel, _dqk_intra_kernel, dqk)
    dqk_kernel[grid](
        q, k, v, dh, b, ig, virt, cnt, mt, rden, dden, dS, CS, NS, DCS, DNS, MS,
        dq, dk, dcarry, da, dg,
        S, S_pad, NC, BH, DK, DV, DK**-0.5, *strides, **meta, **dqk,
    )
    grid, dvc = grid_meta(cfg["dv"], NC * (L // cfg["dv"]["LB"]), triton.cdiv(DV, cfg["dv"]["BV"]), BH)
    dv_kernel, dvc = tiled_kernel(_dv_bwd_kernel, _dv_intra_kernel, dvc)
    dv_kernel[grid](
        k, dh, b, ig, virt, cnt, rden, A, DCS, MS, dv,
        S, S_pad, NC, DK, DV, *strides, **meta, **dvc,
    )

    db, dig, dvirt = (torch.empty_like(b) for _ in range(3))
    _gates_bwd_kernel[(NC, BH)](
        b, ig, virt, cnt, MS, rows, cols, dcarry, da, dg, DMK, dmtc, dmtv, C0, n0, dC0, dn0, db, dig, dvirt, dm0,
        S_pad, NC, BH, NRB, NKB, DK, DV, NH=NH, L=L, BK=st["BK"], BV=st["BV"], HAS_RESET=cnt is not None,
    )
    return dq, dk, dv, db, dig, dvirt, dC0, dn0, dm0
