"""The last launch of the Triton chunkwise backward (chunkwise_triton_bwd.py): the gradients of the
gate vectors and of the initial stabilizer, from the partial sums the other launches leave, and the
per-head sum both ends of the state need (dC . C + dn . n)."""

import triton
import triton.language as tl

from .chunkwise_triton_chunk import _chunk_end_max_source, _gate_vectors


@triton.jit
def _state_dot(X, Y, N, Z, i_bh, DK, DV, BK: tl.constexpr, BV: tl.constexpr):
    """sum(X * Y) + sum(N * Z) over one head's state: X, Y [DK, DV] and N, Z [DK] float32 rows."""
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    nz = tl.zeros([BK], dtype=tl.float32)
    for kb in range(tl.cdiv(DK, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        mk = offs_k < DK
        nz += tl.load(N + i_bh * DK + offs_k, mask=mk, other=0.0) * tl.load(Z + i_bh * DK + offs_k, mask=mk, other=0.0)
        for vb in range(tl.cdiv(DV, BV)):
            offs_v = vb * BV + tl.arange(0, BV)
            head, off = i_bh.to(tl.int64) * DK * DV, offs_k[:, None] * DV + offs_v[None, :]
            mkv = mk[:, None] & (offs_v < DV)[None, :]
            acc += tl.load(X + head + off, mask=mkv, other=0.0) * tl.load(Y + head + off, mask=mkv, other=0.0)
    return tl.sum(tl.sum(acc, 1), 0) + tl.sum(nz, 0)


@triton.jit
def _gates_bwd_kernel(
    # pointers
    B_, I_, VIRT, CNT, MS, ROWS, COLS, DCARRY, DA, DG, DMK, DMTC, DMTV, C0, N0, DC0, DN0, DB, DIG, DVIRT, DM0,
    # dims
    S_pad, NC, BH, NRB, NKB, DK, DV,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_RESET: tl.constexpr,
):
    """The gradients of chunk i_c's gate vectors from the other launches' partial sums (over row
    blocks and DK tiles), and (chunk 0) the initial m's. log D_tj = b_t - b_j + ig_j; the end-state
    weights a_j = b_last - b_j + ig_j; the entry state's weight at t is carry_t = b_t and its decay
    over the chunk g = b_last. The chunk-end m's gradient goes to the term that attained its max:
    the carried state (through g), the maximal a_j (split between ties) or the zeroed state after a
    reset (through virt at the chunk's last position)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = i_bh // NH
    tt = tl.arange(0, L)
    offs_t = i_bh * S_pad + i_c * L + tt
    _, _, _, _, _, a, g, virt_last = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    m_beg = tl.load(MS + i_bh * (NC + 1) + i_c)
    dmk_end = tl.load(DMK + i_bh * (NC + 1) + i_c + 1)
    beta, top_a = _chunk_end_max_source(a, g, m_beg, virt_last)
    n_top = tl.sum(top_a, 0)
    cols = tl.zeros([L], dtype=tl.float32)
    for rb in range(NRB):
        cols += tl.load(COLS + rb * BH * S_pad + offs_t)
    dcarry = tl.zeros([L], dtype=tl.float32)
    da = top_a * (dmk_end / tl.maximum(n_top, 1.0))
    dgate = dmk_end * beta
    for kb in range(NKB):
        dcarry += tl.load(DCARRY + kb * BH * S_pad + offs_t)
        da += tl.load(DA + kb * BH * S_pad + offs_t)
        dgate += tl.load(DG + (kb * BH + i_bh) * NC + i_c)
    last = tt == L - 1
    db = tl.load(ROWS + offs_t) - cols + dcarry + tl.load(DMTC + offs_t) - da
    tl.store(DB + offs_t, tl.where(last, db + tl.sum(da, 0) + dgate, db))
    tl.store(DIG + offs_t, cols + da)
    if HAS_RESET:  # the zeroed state won the chunk-end max
        zeroed = tl.where(n_top == 0, dmk_end * (1.0 - beta), 0.0)
        dvirt = tl.load(DMTV + offs_t) + tl.where(last, zeroed, 0.0)
    else:
        dvirt = tl.zeros([L], dtype=tl.float32)
    tl.store(DVIRT + offs_t, dvirt)
    if i_c == 0:  # the initial state is exp(-m0) times its unstabilized value
        tl.store(DM0 + i_bh, tl.load(DMK + i_bh * (NC + 1)) + _state_dot(DC0, C0, DN0, N0, i_bh, DK, DV, BK, BV))
