"""The per-chunk launches tiled inside the chunk (launch setting LB < L; launch_settings.py), with
the helpers of a block of a chunk's scores they share.

At chunk 128 a launch that holds the chunk's [RB, L] or [L, L] score tiles next to its operand
tiles must halve the operand tiles (launch_settings.default_config), so q, k and v are read twice as
often. These kernels take the chunk's L positions in sub-blocks of LB (a power of two dividing L):
their score tiles are [RB, LB] or [LB, LB], their head-dim tiles stay as wide as at chunk 64, and
the causal mask skips the sub-blocks above the diagonal (a quarter of the chunk's score work at two
sub-blocks). They compute what the kernels they stand in for compute (chunkwise_triton_fwd.py,
chunkwise_triton_bwd.py), in another summation order:
- `_output_intra_kernel` (for _output_fwd_kernel): a program of RB rows and one DV tile takes the
  row's stabilizer m_t from the gate vectors alone (it depends on no product, so no running rescale
  is needed, unlike flash attention's), then q C_entry, then the column blocks up to its last row;
- `_scores_intra_kernel` (for _scores_bwd_kernel): the same rows, the column blocks in turn; it
  stores zeros for the blocks above the diagonal, so every reader may read them whatever its LB;
- `_dqk_intra_kernel` and `_dv_intra_kernel` (for _dqk_bwd_kernel and _dv_bwd_kernel): a program
  per sub-block of LB rows and head-dim tile: dq of a row block from dS[r, c <= r] k_c, dk of a
  column block from dS[r >= c, c]^T q_r, dv of a column block from A[r >= c, c]^T dnum_r.
Every log D_tj is computed by the same float32 expression as in the untiled kernels, so the
backward's tests of which term attained a max stay exact whatever LB each launch runs with.
"""

import triton
import triton.language as tl

from .chunkwise_triton_chunk import _gate_rows, _masked_log_d
from .launch_settings import program_ids


@triton.jit
def _log_d_block(B_, I_, VIRT, CNT, b_r, cnt_r, rows, cols, i_bh, i_b, i_c, S_pad, L: tl.constexpr, HAS_RESET: tl.constexpr):
    """log D_tj = b_t - b_j + ig_j for the rows t (b_r, cnt_r: their b and cnt) and the columns j
    `cols` of chunk i_c, where j <= t in the same document (else -inf)."""
    bt, it, cnt, _, _, _, _ = _gate_rows(B_, I_, VIRT, CNT, cols, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    return _masked_log_d(b_r, cnt_r, rows, bt, it, cnt, cols, HAS_RESET)


@triton.jit
def _qk_block(Q, K, offs_r, offs_t, mr, mt, i_bh, DK, s_k_bh, s_k_t, BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """The raw products q_t . k_j [len(offs_r), len(offs_t)] over all DK tiles."""
    qk = tl.zeros([offs_r.shape[0], offs_t.shape[0]], dtype=tl.float32)
    for kb in range(tl.cdiv(DK, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        mk = offs_k < DK
        qr = tl.load(Q + i_bh * s_k_bh + offs_r[:, None] * s_k_t + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        qk += tl.dot(qr.to(DT), tl.trans(kt.to(DT)), input_precision=PREC)
    return qk


@triton.jit
def _output_intra_kernel(
    # pointers
    Q, K, V, B_, I_, VIRT, CNT, CS, NS, MS, H, MT, DEN,
    # dims
    S, S_pad, NC, DK, DV, scale, eps,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, RB: tl.constexpr, LB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, TILES_FIRST: tl.constexpr,
):
    """_output_fwd_kernel's outputs (RB rows of chunk i_c, one DV tile) over the chunk's columns in
    blocks of LB, those past the row block's last row skipped."""
    i_cr, i_v = program_ids(TILES_FIRST)
    i_c, i_r = i_cr // (L // RB), i_cr % (L // RB)
    i_bh = tl.program_id(2)
    i_b = i_bh // NH
    rows = i_r * RB + tl.arange(0, RB)
    offs_r = i_c * L + rows
    offs_v = i_v * BV + tl.arange(0, BV)
    mr, mv = offs_r < S, offs_v < DV
    n_blocks = ((i_r + 1) * RB - 1) // LB + 1  # the column blocks these rows reach
    # the stabilizer first, from the gates alone: the max over the carried state, the zeroed state
    # and every log D_tj of the row (a max is exact, so m_t is the untiled kernel's to the bit)
    b_r, _, cnt_r, carry, virt, _, _ = _gate_rows(B_, I_, VIRT, CNT, rows, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    m_prev = carry + tl.load(MS + i_bh * (NC + 1) + i_c)
    m_t = tl.maximum(m_prev, virt)
    for c in range(n_blocks):
        cols = c * LB + tl.arange(0, LB)
        m_t = tl.maximum(m_t, tl.max(_log_d_block(B_, I_, VIRT, CNT, b_r, cnt_r, rows, cols, i_bh, i_b, i_c, S_pad, L, HAS_RESET), 1))
    decay = tl.exp(m_prev - m_t) * scale  # 0 after a reset
    num = tl.zeros([RB, BV], dtype=tl.float32)  # q C_entry, then the chunk's own tokens
    q_n = tl.zeros([RB], dtype=tl.float32)  # q . n_entry
    for kb in range(tl.cdiv(DK, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        mk = offs_k < DK
        qr = tl.load(Q + i_bh * s_k_bh + offs_r[:, None] * s_k_t + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        C = tl.load(CS + (i_bh * NC + i_c).to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        num += tl.dot(qr.to(DT), C.to(DT), input_precision=PREC)
        q_n += tl.sum(qr.to(tl.float32) * tl.load(NS + (i_bh * (NC + 1) + i_c) * DK + offs_k, mask=mk, other=0.0)[None, :], 1)
    num *= decay[:, None]
    den = decay * q_n
    for c in range(n_blocks):
        cols = c * LB + tl.arange(0, LB)
        offs_t = i_c * L + cols
        mt = offs_t < S
        qk = _qk_block(Q, K, offs_r, offs_t, mr, mt, i_bh, DK, s_k_bh, s_k_t, BK, DT, PREC)
        log_d = _log_d_block(B_, I_, VIRT, CNT, b_r, cnt_r, rows, cols, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
        A = qk * scale * tl.exp(log_d - m_t[:, None])
        vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        num += tl.dot(A.to(DT), vt.to(DT), input_precision=PREC)
        den += tl.sum(A, 1)
    h = num / (tl.maximum(tl.abs(den), tl.exp(-m_t)) + eps)[:, None]
    tl.store(H + i_bh * s_v_bh + offs_r[:, None] * s_v_t + offs_v[None, :], h.to(H.dtype.element_ty), mask=mr[:, None] & mv[None, :])
    if i_v == 0:
        tl.store(MT + i_bh * S_pad + offs_r, m_t)
        tl.store(DEN + i_bh * S_pad + offs_r, den)


def tiled_kernel(untiled, intra, meta: dict) -> tuple:
    """The kernel a per-chunk launch runs with `meta` (its launch_config entry, through grid_meta) and
    the meta-parameters it takes: `intra`, tiled inside the chunk, where LB is below the chunk L,
    else `untiled` (which takes no LB)."""
    if meta["LB"] < meta["L"]:
        return intra, meta
    return untiled, {name: value for name, value in meta.items() if name != "LB"}
