"""The chunk-entry states pass of the Triton chunkwise mLSTM split over segments of the sequence
(launch_overrides(states=dict(segments=P)); chunk_states in chunkwise_triton_fwd.py calls it; the
backward's states pass splits alike: chunkwise_triton_split_bwd.py).

The single states pass (_states_fwd_kernel) is one program per (DK tile, DV tile, batch*head), each
walking all NC chunks in a dependent chain: at batch 1 and long S far fewer programs than a GPU has
SMs, each a long chain. Split into P segments of NCP = ceil(NC / P) chunks, three launches:
1. `_states_local_kernel`, grid (DK tiles, DV tiles, batch*head*P): segment p walks its chunks
   from the empty state (m = -inf; _state_step keeps it NaN-free until a token reaches the state),
   storing its end state (C, n, m_p: float32) and its total log decay G_p (the sum of its chunks' g,
   -inf through a reset).
2. `_states_combine_kernel`, grid (DK tiles, DV tiles, batch*head): P steps from the initial state
   (C, n, M): M' = max(G_p + M, m_p), C' = exp(G_p + M - M') C + exp(m_p - M') C_p (n alike), storing
   each segment's entry state (in place of its local end state; its m in MS at the segment's first
   chunk) and the final state (CF, NF, MF, and NS, MS at index NC).
3. `_states_rewalk_kernel`, grid (DK tiles, DV tiles, batch*head*P): segment p walks its chunks from
   its entry state as the single pass does (the same _state_step), storing the entry state of each.
A chain of about NC/P + P + NC/P steps in place of NC, P times the programs; k and v are read twice.

Values differ from the single pass by rounding only. The m at a segment boundary is the combine's
max of sums that round otherwise than the sequential chain's, so the backward's routing of the
stabilizer's gradient decides which term attained the chunk-end max from the terms themselves
(chunkwise_triton_chunk._chunk_end_max_source), not from the stored m; it may differ from the single
pass's only where two terms of that max tie within one rounding at a segment boundary.
"""

import torch
import triton
import triton.language as tl

from .chunkwise_triton_chunk import _state_step, _store_entry
from .launch_settings import MAX_GRID_Y


@triton.jit
def _states_local_kernel(
    # pointers
    K, V, B_, I_, VIRT, CNT, CSEG, NSEG, MSEG, GSEG,
    # dims
    S, S_pad, NC, NCP, P, DK, DV,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, LOCAL_MAX: tl.constexpr,
):
    """Segment p's end state from the empty state, and its log decay G_p, into CSEG [BH*P, DK, DV],
    NSEG [BH*P, DK], MSEG and GSEG [BH*P] (float32)."""
    i_k, i_v, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh, p = i_s // P, i_s % P
    i_b = i_bh // NH
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    C = tl.zeros([BK, BV], dtype=tl.float32)
    n = tl.zeros([BK], dtype=tl.float32)
    m = tl.full([], float("-inf"), tl.float32)
    G = tl.zeros([], dtype=tl.float32)
    for i_c in range(p * NCP, tl.minimum(p * NCP + NCP, NC)):
        C, n, m, g = _state_step(K, V, B_, I_, VIRT, CNT, C, n, m, i_c, i_bh, i_b, offs_k, offs_v, S, S_pad, DK, DV,
                                 s_k_bh, s_k_t, s_v_bh, s_v_t, L, HAS_RESET, DT, PREC, LOCAL_MAX)
        G += g
    tl.store(CSEG + i_s.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], C, mask=mk[:, None] & mv[None, :])
    if i_v == 0:
        tl.store(NSEG + i_s * DK + offs_k, n, mask=mk)
        if i_k == 0:
            tl.store(MSEG + i_s, m)
            tl.store(GSEG + i_s, G)


@triton.jit
def _states_combine_kernel(
    # pointers
    CSEG, NSEG, MSEG, GSEG, C0, N0, M0, NS, MS, CF, NF, MF,
    # dims
    NC, NCP, P, DK, DV,
    # meta-parameters
    BK: tl.constexpr, BV: tl.constexpr,
):
    """The segments' entry states in order from the initial state (in place of their local end
    states in CSEG, NSEG; m in MS at each segment's first chunk) and the final state. n is carried
    by the first DV tile's programs alone: they own NSEG's rows, which they overwrite."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    mkv = mk[:, None] & mv[None, :]
    mn = mk & (i_v == 0)
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    C = tl.load(C0 + i_bh.to(tl.int64) * DK * DV + c_off, mask=mkv, other=0.0)
    n = tl.load(N0 + i_bh * DK + offs_k, mask=mn, other=0.0)
    m = tl.load(M0 + i_bh)
    for p in range(P):
        seg = i_bh * P + p
        C_p = tl.load(CSEG + seg.to(tl.int64) * DK * DV + c_off, mask=mkv, other=0.0)
        n_p = tl.load(NSEG + seg * DK + offs_k, mask=mn, other=0.0)
        m_p, G_p = tl.load(MSEG + seg), tl.load(GSEG + seg)
        tl.store(CSEG + seg.to(tl.int64) * DK * DV + c_off, C, mask=mkv)
        tl.store(NSEG + seg * DK + offs_k, n, mask=mn)
        if i_v == 0:
            if i_k == 0:
                tl.store(MS + i_bh * (NC + 1) + p * NCP, m)
        m_out = tl.maximum(G_p + m, m_p)
        m_sub = tl.where(m_out == float("-inf"), 0.0, m_out)  # no token yet: C, n are zero
        to_out, from_p = tl.exp(G_p + m - m_sub), tl.exp(m_p - m_sub)
        C = to_out * C + from_p * C_p
        n = to_out * n + from_p * n_p
        m = m_out
    tl.store(CF + i_bh.to(tl.int64) * DK * DV + c_off, C, mask=mkv)
    tl.store(NS + (i_bh * (NC + 1) + NC) * DK + offs_k, n, mask=mn)
    tl.store(NF + i_bh * DK + offs_k, n, mask=mn)
    if i_v == 0:
        if i_k == 0:
            tl.store(MS + i_bh * (NC + 1) + NC, m)
            tl.store(MF + i_bh, m)


@triton.jit
def _states_rewalk_kernel(
    # pointers
    K, V, B_, I_, VIRT, CNT, CSEG, NSEG, CS, NS, MS,
    # dims
    S, S_pad, NC, NCP, P, DK, DV,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, LOCAL_MAX: tl.constexpr,
):
    """The entry states of segment p's chunks, from the segment's entry state (the state after its
    last chunk is the next segment's entry, or the final state: the combine's)."""
    i_k, i_v, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh, p = i_s // P, i_s % P
    i_b = i_bh // NH
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    c_beg = p * NCP
    c_end = tl.minimum(c_beg + NCP, NC)
    C = tl.load(CSEG + i_s.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    n = tl.load(NSEG + i_s * DK + offs_k, mask=mk, other=0.0)
    m = tl.load(MS + i_bh * (NC + 1) + c_beg)  # the combine's; _store_entry writes it back unchanged
    for i_c in range(c_beg, c_end - 1):
        _store_entry(CS, NS, MS, C, n, m, i_bh, i_c, i_k, i_v, NC, offs_k, offs_v, DK, DV)
        C, n, m, _ = _state_step(K, V, B_, I_, VIRT, CNT, C, n, m, i_c, i_bh, i_b, offs_k, offs_v, S, S_pad, DK, DV,
                                 s_k_bh, s_k_t, s_v_bh, s_v_t, L, HAS_RESET, DT, PREC, LOCAL_MAX)
    _store_entry(CS, NS, MS, C, n, m, i_bh, c_end - 1, i_k, i_v, NC, offs_k, offs_v, DK, DV)


def segment_plan(NC: int, segments: int, BH: int) -> tuple[int, int]:
    """(P, NCP): the segments the split pass runs and the chunks each holds (the last may hold
    fewer), for `segments` asked. Capped at NC (a segment holds a chunk at least) and at CUDA's
    65,535 programs on the grid's third axis (batch*head*P); P 1 is the single pass."""
    P = max(1, min(segments, NC, MAX_GRID_Y // BH))
    NCP = triton.cdiv(NC, P)
    return triton.cdiv(NC, NCP), NCP


def split_chunk_states(
    k, v, b, ig, virt, cnt, C0, n0, m0, CS, NS, MS, CF, NF, MF, S, S_pad, NC, DK, DV, s_k_bh, s_k_t, s_v_bh, s_v_t,
    *, P: int, NCP: int, meta: dict,
) -> None:
    """Fills chunk_states' outputs (CS, NS, MS and the final CF, NF, MF) in three launches over P
    segments of NCP chunks (segment_plan); `meta` is the states pass's meta-parameters."""
    BH = k.shape[0] * k.shape[1]
    f32 = dict(dtype=torch.float32)
    CSEG = k.new_empty(BH * P, DK, DV, **f32)
    NSEG = k.new_empty(BH * P, DK, **f32)
    MSEG, GSEG = k.new_empty(BH * P, **f32), k.new_empty(BH * P, **f32)
    tiles = (triton.cdiv(DK, meta["BK"]), triton.cdiv(DV, meta["BV"]))
    dims, strides = (S, S_pad, NC, NCP, P, DK, DV), (s_k_bh, s_k_t, s_v_bh, s_v_t)
    _states_local_kernel[(*tiles, BH * P)](k, v, b, ig, virt, cnt, CSEG, NSEG, MSEG, GSEG, *dims, *strides, **meta)
    combine = {name: meta[name] for name in ("BK", "BV", "num_warps", "num_stages") if name in meta}
    _states_combine_kernel[(*tiles, BH)](CSEG, NSEG, MSEG, GSEG, C0, n0, m0, NS, MS, CF, NF, MF, NC, NCP, P, DK, DV, **combine)
    _states_rewalk_kernel[(*tiles, BH * P)](k, v, b, ig, virt, cnt, CSEG, NSEG, CS, NS, MS, *dims, *strides, **meta)
