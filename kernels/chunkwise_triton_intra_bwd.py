"""The backward's per-chunk launches tiled inside the chunk (launch setting LB < L; see
chunkwise_triton_intra.py), and the math they share with the untiled kernels of
chunkwise_triton_bwd.py: the normalizer's per-position terms and the products with the chunk's
entry and end states."""

import triton
import triton.language as tl

from .chunkwise_triton_chunk import _gate_rows
from .chunkwise_triton_intra import _log_d_block, _qk_block
from .launch_settings import program_ids


@triton.jit
def _normalizer_grads(den, m_r, hdh, rden, eps):
    """With Dn = max(|den|, exp(-m_t)) + eps (rden = 1 / Dn) and h = num / Dn: the gradients of den
    and (the total derivative of h_t . dh_t) of m_t, given hdh = h_t . dh_t."""
    dden = tl.where(tl.abs(den) > tl.exp(-m_r), -hdh * rden * tl.where(den > 0, 1.0, -1.0), 0.0)
    return dden, -eps * hdh * rden


@triton.jit
def _dqk_state_terms(
    V, DH, CS, NS, DCS, DNS, offs_t, mt, offs_k, mk, rden, dden, i_bh, i_c, NC, DK, DV, s_v_bh, s_v_t,
    BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """For the positions offs_t of chunk i_c and one DK tile: the gradient of q_t through the entry
    state (before its weight), of k_j through the end state (before its weight) [len(offs_t), BK],
    and the DK tile's dC_end . C_entry + dn_end . n_entry [BK]."""
    dq_s = tl.zeros([offs_t.shape[0], BK], dtype=tl.float32)
    dk_s = tl.zeros([offs_t.shape[0], BK], dtype=tl.float32)
    dg_acc = tl.zeros([BK], dtype=tl.float32)
    for vb in range(tl.cdiv(DV, BV)):
        offs_v = vb * BV + tl.arange(0, BV)
        mv = offs_v < DV
        mtv = mt[:, None] & mv[None, :]
        mkv = mk[:, None] & mv[None, :]
        vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mtv, other=0.0).to(DT)
        dnum = tl.load(DH + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mtv, other=0.0).to(tl.float32) * rden[:, None]
        C = tl.load(CS + (i_bh * NC + i_c).to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mkv, other=0.0).to(tl.float32)
        dCe = tl.load(DCS + (i_bh * NC + i_c).to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mkv, other=0.0).to(tl.float32)
        dq_s += tl.dot(dnum.to(DT), tl.trans(C).to(DT), input_precision=PREC)
        dk_s += tl.dot(vt, tl.trans(dCe).to(DT), input_precision=PREC)
        dg_acc += tl.sum(dCe * C, 1)
    st_in = i_bh * (NC + 1) + i_c
    n = tl.load(NS + st_in * DK + offs_k, mask=mk, other=0.0)
    dne = tl.load(DNS + (st_in + 1) * DK + offs_k, mask=mk, other=0.0)
    return dq_s + dden[:, None] * n[None, :], dk_s + dne[None, :], dg_acc + dne * n


@triton.jit
def _dv_state_term(K, DCS, offs_t, mt, offs_v, mv, i_bh, i_c, NC, DK, DV, s_k_bh, s_k_t,
                   BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """The gradient of v_j through chunk i_c's end state, before its weight: k_j dC_end
    [len(offs_t), BV], for the positions offs_t and one DV tile."""
    dv_s = tl.zeros([offs_t.shape[0], offs_v.shape[0]], dtype=tl.float32)
    for kb in range(tl.cdiv(DK, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        mk = offs_k < DK
        kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        dCe = tl.load(DCS + (i_bh * NC + i_c).to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        dv_s += tl.dot(kt.to(DT), dCe.to(DT), input_precision=PREC)
    return dv_s


@triton.jit
def _scores_intra_kernel(
    # pointers
    Q, K, V, H, DH, B_, I_, VIRT, CNT, MT, DEN, MS, AS, DSS, ROWS, COLS, RDEN, DDEN, DMTC, DMTV,
    # dims
    S, S_pad, NC, BH, DK, DV, scale, eps,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, RB: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, TILES_FIRST: tl.constexpr,
):
    """_scores_bwd_kernel's results for RB rows of chunk i_c, over the chunk's columns in blocks of
    LB: [RB, LB] tiles of A and dS, zeros for the blocks above the diagonal (stored, not computed)."""
    i_c, i_r = program_ids(TILES_FIRST)
    i_bh = tl.program_id(2)
    i_b = i_bh // NH
    rows = i_r * RB + tl.arange(0, RB)
    offs_r = i_c * L + rows
    mr = offs_r < S
    m_r = tl.load(MT + i_bh * S_pad + offs_r)
    den = tl.load(DEN + i_bh * S_pad + offs_r)
    rden = 1.0 / (tl.maximum(tl.abs(den), tl.exp(-m_r)) + eps)
    hdh = tl.zeros([RB], dtype=tl.float32)  # h_t . dh_t
    for vb in range(tl.cdiv(DV, BV)):
        offs_v = vb * BV + tl.arange(0, BV)
        r_off = offs_r[:, None] * s_v_t + offs_v[None, :]
        mrv = mr[:, None] & (offs_v < DV)[None, :]
        hdh += tl.sum(tl.load(H + i_bh * s_v_bh + r_off, mask=mrv, other=0.0).to(tl.float32) * tl.load(DH + i_bh * s_v_bh + r_off, mask=mrv, other=0.0).to(tl.float32), 1)
    dden, dmt = _normalizer_grads(den, m_r, hdh, rden, eps)
    b_r, _, cnt_r, carry, virt, _, _ = _gate_rows(B_, I_, VIRT, CNT, rows, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    by_carry = carry + tl.load(MS + i_bh * (NC + 1) + i_c) == m_r
    by_virt = (virt == m_r) & ~by_carry
    n_blocks = ((i_r + 1) * RB - 1) // LB + 1  # the column blocks these rows reach
    # m_t's gradient where a token's log weight was the max, split evenly between the row's ties
    ties = tl.zeros([RB], dtype=tl.float32)
    for c in range(n_blocks):
        log_d = _log_d_block(B_, I_, VIRT, CNT, b_r, cnt_r, rows, c * LB + tl.arange(0, LB), i_bh, i_b, i_c, S_pad, L, HAS_RESET)
        ties += tl.sum((log_d == m_r[:, None]).to(tl.float32), 1)
    dml = tl.where(by_carry | by_virt, 0.0, dmt) / tl.maximum(ties, 1.0)
    row_sum = tl.zeros([RB], dtype=tl.float32)
    for c in range(n_blocks):
        cols = c * LB + tl.arange(0, LB)
        offs_t = i_c * L + cols
        mt = offs_t < S
        dA = tl.zeros([RB, LB], dtype=tl.float32)  # gradient of A_tj
        for vb in range(tl.cdiv(DV, BV)):
            offs_v = vb * BV + tl.arange(0, BV)
            mv = offs_v < DV
            vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0).to(DT)
            dh = tl.load(DH + i_bh * s_v_bh + offs_r[:, None] * s_v_t + offs_v[None, :], mask=mr[:, None] & mv[None, :], other=0.0).to(tl.float32)
            dA += tl.dot((dh * rden[:, None]).to(DT), tl.trans(vt), input_precision=PREC)
        dA += dden[:, None]
        qk = _qk_block(Q, K, offs_r, offs_t, mr, mt, i_bh, DK, s_k_bh, s_k_t, BK, DT, PREC)
        log_d = _log_d_block(B_, I_, VIRT, CNT, b_r, cnt_r, rows, cols, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
        E = tl.exp(log_d - m_r[:, None]) * scale
        A = qk * E
        tile = (i_bh * NC + i_c) * L * L + rows[:, None] * L + cols[None, :]
        tl.store(AS + tile, A.to(AS.dtype.element_ty))
        tl.store(DSS + tile, (dA * E).to(DSS.dtype.element_ty))
        d_log_d = dA * A + tl.where(log_d == m_r[:, None], dml[:, None], 0.0)
        row_sum += tl.sum(d_log_d, 1)
        tl.store(COLS + (i_r * BH + i_bh) * S_pad + offs_t, tl.sum(d_log_d, 0))
    for c in range(n_blocks, L // LB):  # above the diagonal: A = dS = 0, and no column sums
        cols = c * LB + tl.arange(0, LB)
        tile = (i_bh * NC + i_c) * L * L + rows[:, None] * L + cols[None, :]
        tl.store(AS + tile, tl.zeros([RB, LB], dtype=AS.dtype.element_ty))
        tl.store(DSS + tile, tl.zeros([RB, LB], dtype=DSS.dtype.element_ty))
        tl.store(COLS + (i_r * BH + i_bh) * S_pad + i_c * L + cols, tl.zeros([LB], dtype=tl.float32))
    tl.store(ROWS + i_bh * S_pad + offs_r, row_sum)
    tl.store(RDEN + i_bh * S_pad + offs_r, rden)
    tl.store(DDEN + i_bh * S_pad + offs_r, dden)
    tl.store(DMTC + i_bh * S_pad + offs_r, tl.where(by_carry, dmt, 0.0))
    tl.store(DMTV + i_bh * S_pad + offs_r, tl.where(by_virt, dmt, 0.0))


@triton.jit
def _dqk_intra_kernel(
    # pointers
    Q, K, V, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, DSS, CS, NS, DCS, DNS, MS,
    DQ, DK_, DCARRY, DA, DG,
    # dims
    S, S_pad, NC, BH, DK, DV, scale,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, TILES_FIRST: tl.constexpr,
):
    """_dqk_bwd_kernel's results for the sub-block i_s of LB positions of chunk i_c and one DK tile:
    dq from dS[i_s, c <= i_s] k_c, dk from dS[r >= i_s, i_s]^T q_r; the partial sum dg (one per
    chunk) from sub-block 0."""
    i_cs, i_k = program_ids(TILES_FIRST)
    i_c, i_s = i_cs // (L // LB), i_cs % (L // LB)
    i_bh = tl.program_id(2)
    i_b = i_bh // NH
    rows = i_s * LB + tl.arange(0, LB)
    offs_t = i_c * L + rows
    mt = offs_t < S
    _, _, _, carry, _, a, g = _gate_rows(B_, I_, VIRT, CNT, rows, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    st_in = i_bh * (NC + 1) + i_c
    m_beg, m_end = tl.load(MS + st_in), tl.load(MS + st_in + 1)
    qd = tl.exp(carry + m_beg - tl.load(MT + i_bh * S_pad + offs_t)) * scale  # entry state's weight in h_t
    w = tl.exp(a - m_end)
    offs_k = i_k * BK + tl.arange(0, BK)
    mk = offs_k < DK
    mtk = mt[:, None] & mk[None, :]
    rden = tl.load(RDEN + i_bh * S_pad + offs_t)
    dden = tl.load(DDEN + i_bh * S_pad + offs_t)
    dq_s, dk_s, dg_acc = _dqk_state_terms(V, DH, CS, NS, DCS, DNS, offs_t, mt, offs_k, mk, rden, dden, i_bh, i_c, NC, DK, DV,
                                          s_v_bh, s_v_t, BK, BV, DT, PREC)
    head = i_bh * s_k_bh
    dq = qd[:, None] * dq_s
    for c in range(i_s + 1):  # the column blocks these rows reach
        cols = c * LB + tl.arange(0, LB)
        kc = tl.load(K + head + (i_c * L + cols)[:, None] * s_k_t + offs_k[None, :], mask=(i_c * L + cols < S)[:, None] & mk[None, :], other=0.0)
        dS = tl.load(DSS + (i_bh * NC + i_c) * L * L + rows[:, None] * L + cols[None, :])
        dq += tl.dot(dS.to(DT), kc.to(DT), input_precision=PREC)
    dk = w[:, None] * dk_s
    for r in range(i_s, L // LB):  # the row blocks that reach these columns
        rr = r * LB + tl.arange(0, LB)
        qr = tl.load(Q + head + (i_c * L + rr)[:, None] * s_k_t + offs_k[None, :], mask=(i_c * L + rr < S)[:, None] & mk[None, :], other=0.0)
        dS = tl.load(DSS + (i_bh * NC + i_c) * L * L + rr[:, None] * L + rows[None, :])
        dk += tl.dot(tl.trans(dS.to(DT)), qr.to(DT), input_precision=PREC)
    t_off = offs_t[:, None] * s_k_t + offs_k[None, :]
    tl.store(DQ + head + t_off, dq.to(DQ.dtype.element_ty), mask=mtk)
    tl.store(DK_ + head + t_off, dk.to(DK_.dtype.element_ty), mask=mtk)
    part = (i_k * BH + i_bh) * S_pad + offs_t
    tl.store(DCARRY + part, qd * tl.sum(tl.load(Q + head + t_off, mask=mtk, other=0.0).to(tl.float32) * dq_s, 1))
    tl.store(DA + part, w * tl.sum(tl.load(K + head + t_off, mask=mtk, other=0.0).to(tl.float32) * dk_s, 1))
    if i_s == 0:
        tl.store(DG + (i_k * BH + i_bh) * NC + i_c, tl.exp(g + m_beg - m_end) * tl.sum(dg_acc, 0))


@triton.jit
def _dv_intra_kernel(
    # pointers
    K, DH, B_, I_, VIRT, CNT, RDEN, AS, DCS, MS, DV_,
    # dims
    S, S_pad, NC, DK, DV,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, TILES_FIRST: tl.constexpr,
):
    """_dv_bwd_kernel's dv for the sub-block i_s of LB positions of chunk i_c and one DV tile:
    through the end state, and through the outputs of the rows that reach it, A[r >= i_s, i_s]^T dnum_r."""
    i_cs, i_v = program_ids(TILES_FIRST)
    i_c, i_s = i_cs // (L // LB), i_cs % (L // LB)
    i_bh = tl.program_id(2)
    i_b = i_bh // NH
    rows = i_s * LB + tl.arange(0, LB)
    offs_t = i_c * L + rows
    offs_v = i_v * BV + tl.arange(0, BV)
    mt, mv = offs_t < S, offs_v < DV
    _, _, _, _, _, a, _ = _gate_rows(B_, I_, VIRT, CNT, rows, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    w = tl.exp(a - tl.load(MS + i_bh * (NC + 1) + i_c + 1))
    dv = w[:, None] * _dv_state_term(K, DCS, offs_t, mt, offs_v, mv, i_bh, i_c, NC, DK, DV, s_k_bh, s_k_t, BK, DT, PREC)
    for r in range(i_s, L // LB):  # the row blocks that reach these columns
        rr = r * LB + tl.arange(0, LB)
        offs_rr = i_c * L + rr
        A = tl.load(AS + (i_bh * NC + i_c) * L * L + rr[:, None] * L + rows[None, :])
        rden = tl.load(RDEN + i_bh * S_pad + offs_rr)
        dh = tl.load(DH + i_bh * s_v_bh + offs_rr[:, None] * s_v_t + offs_v[None, :], mask=(offs_rr < S)[:, None] & mv[None, :], other=0.0)
        dv += tl.dot(tl.trans(A.to(DT)), (dh.to(tl.float32) * rden[:, None]).to(DT), input_precision=PREC)
    tl.store(DV_ + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], dv.to(DV_.dtype.element_ty), mask=mt[:, None] & mv[None, :])
