"""The backward's states pass (_states_bwd_kernel: the gradient of the state at every chunk boundary,
carried from the final state's back to the initial state's) split over segments of the sequence,
as chunkwise_triton_split.py splits the forward's, with the same launch setting (states segments)
and the same segments (segment_plan). The chain is linear with factors the forward fixed (each
chunk's decay of its entry state for dC and dn, and for the stabilizer's gradient 1 where the
carried state attained the chunk-end max, else 0), so three launches:
1. `_states_grad_local_kernel`, grid (DK tiles, DV tiles, batch*head*P): segment p walks its
   chunks back from a zero gradient at its end, storing the gradient at its start (dC, dn, dm:
   float32) and the products of its chunks' factors (D_p for dC and dn, B_p for dm).
2. `_states_grad_combine_kernel`, grid (DK tiles, DV tiles, batch*head): P steps from the final
   state's gradient, last segment first: dC' = D_p dC + dC_p (dn alike), dm' = B_p dm + dm_p,
   storing each segment's end-state gradient (dC, dn in place of its local ones; dm in DMK at the
   segment's end) and the initial state's (DC0, DN0, DMK at index 0).
3. `_states_grad_rewalk_kernel`, grid (DK tiles, DV tiles, batch*head*P): segment p walks its
   chunks back from its end-state gradient as the single pass does (the same _state_grad_step),
   storing the gradient at the end of each.
Values differ from the single pass's by rounding only (the factors' products are taken in another
order); no decision depends on them.
"""

import torch
import triton
import triton.language as tl

from .chunkwise_triton_chunk import _state_grad_step, _store_end_grad
from .chunkwise_triton_gates import _state_dot


@triton.jit
def _states_grad_local_kernel(
    # pointers
    Q, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, MS, DMTC, DCSEG, DNSEG, DMSEG, DSEG, BSEG,
    # dims
    S, S_pad, NC, NCP, P, DK, DV, scale,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Segment p's gradient at its start from a zero gradient at its end, and the products of its
    factors, into DCSEG [BH*P, DK, DV], DNSEG [BH*P, DK], DMSEG, DSEG and BSEG [BH*P] (float32)."""
    i_k, i_v, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh, p = i_s // P, i_s % P
    i_b = i_bh // NH
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    dC = tl.zeros([BK, BV], dtype=tl.float32)
    dn = tl.zeros([BK], dtype=tl.float32)
    dmk = tl.zeros([], dtype=tl.float32)
    D = tl.full([], 1.0, tl.float32)
    Bt = tl.full([], 1.0, tl.float32)
    c_end = tl.minimum(p * NCP + NCP, NC)
    for j in range(c_end - p * NCP):
        dC, dn, dmk, decay, beta = _state_grad_step(Q, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, MS, DMTC, dC, dn, dmk, c_end - 1 - j,
                                                    i_bh, i_b, offs_k, offs_v, S, S_pad, NC, DK, DV, scale,
                                                    s_k_bh, s_k_t, s_v_bh, s_v_t, L, HAS_RESET, DT, PREC)
        D *= decay
        Bt *= beta
    tl.store(DCSEG + i_s.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], dC, mask=mk[:, None] & mv[None, :])
    if i_v == 0:
        tl.store(DNSEG + i_s * DK + offs_k, dn, mask=mk)
        if i_k == 0:
            tl.store(DMSEG + i_s, dmk)
            tl.store(DSEG + i_s, D)
            tl.store(BSEG + i_s, Bt)


@triton.jit
def _states_grad_combine_kernel(
    # pointers
    DCSEG, DNSEG, DMSEG, DSEG, BSEG, C_END, N_END, DC_END, DN_END, DM_END, DC0, DN0, DMK,
    # dims
    NC, NCP, P, DK, DV,
    # meta-parameters
    BK: tl.constexpr, BV: tl.constexpr,
):
    """The segments' end-state gradients, last segment first, from the final state's (in place of
    their local start gradients in DCSEG, DNSEG; dm in DMK at each segment's end), and the initial
    state's. dn is carried by the first DV tile's programs alone: they own DNSEG's rows."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    mkv = mk[:, None] & mv[None, :]
    mn = mk & (i_v == 0)
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    dC = tl.load(DC_END + i_bh.to(tl.int64) * DK * DV + c_off, mask=mkv, other=0.0)
    dn = tl.load(DN_END + i_bh * DK + offs_k, mask=mn, other=0.0)
    dmk = tl.load(DM_END + i_bh)
    if i_k == 0:
        if i_v == 0:  # the program that stores DMK: the final state is exp(-m) times its unstabilized value
            dmk -= _state_dot(DC_END, C_END, DN_END, N_END, i_bh, DK, DV, BK, BV)
    for j in range(P):
        seg = i_bh * P + P - 1 - j
        dC_p = tl.load(DCSEG + seg.to(tl.int64) * DK * DV + c_off, mask=mkv, other=0.0)
        dn_p = tl.load(DNSEG + seg * DK + offs_k, mask=mn, other=0.0)
        dm_p, D_p, B_p = tl.load(DMSEG + seg), tl.load(DSEG + seg), tl.load(BSEG + seg)
        tl.store(DCSEG + seg.to(tl.int64) * DK * DV + c_off, dC, mask=mkv)
        tl.store(DNSEG + seg * DK + offs_k, dn, mask=mn)
        if i_v == 0:
            if i_k == 0:
                tl.store(DMK + i_bh * (NC + 1) + tl.minimum((P - j) * NCP, NC), dmk)
        dC = D_p * dC + dC_p
        dn = D_p * dn + dn_p
        dmk = B_p * dmk + dm_p
    tl.store(DC0 + i_bh.to(tl.int64) * DK * DV + c_off, dC, mask=mkv)
    tl.store(DN0 + i_bh * DK + offs_k, dn, mask=mn)
    if i_v == 0:
        if i_k == 0:
            tl.store(DMK + i_bh * (NC + 1), dmk)


@triton.jit
def _states_grad_rewalk_kernel(
    # pointers
    Q, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, MS, DMTC, DCSEG, DNSEG, DCS, DNS, DMK,
    # dims
    S, S_pad, NC, NCP, P, DK, DV, scale,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """The end-state gradients of segment p's chunks, from the segment's (the gradient at its start
    is the previous segment's end, or the initial state's: the combine's)."""
    i_k, i_v, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh, p = i_s // P, i_s % P
    i_b = i_bh // NH
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    c_beg = p * NCP
    c_end = tl.minimum(c_beg + NCP, NC)
    dC = tl.load(DCSEG + i_s.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    dn = tl.load(DNSEG + i_s * DK + offs_k, mask=mk, other=0.0)
    dmk = tl.load(DMK + i_bh * (NC + 1) + c_end)  # the combine's; _store_end_grad writes it back unchanged
    for j in range(c_end - 1 - c_beg):
        i_c = c_end - 1 - j
        _store_end_grad(DCS, DNS, DMK, dC, dn, dmk, i_bh, i_c, i_k, i_v, NC, offs_k, offs_v, DK, DV)
        dC, dn, dmk, _, _ = _state_grad_step(Q, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, MS, DMTC, dC, dn, dmk, i_c, i_bh, i_b,
                                             offs_k, offs_v, S, S_pad, NC, DK, DV, scale, s_k_bh, s_k_t, s_v_bh, s_v_t,
                                             L, HAS_RESET, DT, PREC)
    _store_end_grad(DCS, DNS, DMK, dC, dn, dmk, i_bh, c_beg, i_k, i_v, NC, offs_k, offs_v, DK, DV)


def split_states_grad(
    q, dh, b, ig, virt, cnt, mt, rden, dden, MS, dmtc, C, n, dC, dn, dm, DCS, dC0, DNS, dn0, DMK,
    S, S_pad, NC, DK, DV, scale, s_k_bh, s_k_t, s_v_bh, s_v_t, *, P: int, NCP: int, meta: dict,
) -> None:
    """Fills _states_bwd_kernel's outputs (DCS, DNS, DMK and the initial state's dC0, dn0, with
    DMK's index 0) in three launches over P segments of NCP chunks (chunkwise_triton_split.
    segment_plan); `meta` is the states pass's meta-parameters."""
    BH = q.shape[0] * q.shape[1]
    f32 = dict(dtype=torch.float32)
    DCSEG, DNSEG = q.new_empty(BH * P, DK, DV, **f32), q.new_empty(BH * P, DK, **f32)
    DMSEG, DSEG, BSEG = (q.new_empty(BH * P, **f32) for _ in range(3))
    tiles = (triton.cdiv(DK, meta["BK"]), triton.cdiv(DV, meta["BV"]))
    gates = (q, dh, b, ig, virt, cnt, mt, rden, dden, MS, dmtc)
    dims, strides = (S, S_pad, NC, NCP, P, DK, DV, scale), (s_k_bh, s_k_t, s_v_bh, s_v_t)
    _states_grad_local_kernel[(*tiles, BH * P)](*gates, DCSEG, DNSEG, DMSEG, DSEG, BSEG, *dims, *strides, **meta)
    combine = {name: meta[name] for name in ("BK", "BV", "num_warps", "num_stages") if name in meta}
    _states_grad_combine_kernel[(*tiles, BH)](DCSEG, DNSEG, DMSEG, DSEG, BSEG, C, n, dC, dn, dm, dC0, dn0, DMK,
                                              NC, NCP, P, DK, DV, **combine)
    _states_grad_rewalk_kernel[(*tiles, BH * P)](*gates, DCSEG, DNSEG, DCS, DNS, DMK, *dims, *strides, **meta)
