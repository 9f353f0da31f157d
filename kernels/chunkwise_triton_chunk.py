"""The @triton.jit helpers every chunkwise kernel shares for one chunk: its gate vectors
(chunkwise_triton_fwd.py describes the vectors the kernels take), and for the states passes (the
single one in chunkwise_triton_fwd.py, the sequence-split one in chunkwise_triton_split.py) one step
of the state recurrence over the chunk and the store of a chunk's entry state, and their backward
twins (the gradient of the state taken back over one chunk, the store of a chunk's end-state gradient)."""

import triton
import triton.language as tl


@triton.jit
def _gate_rows(B_, I_, VIRT, CNT, rows, i_bh, i_b, i_c, S_pad, L: tl.constexpr, HAS_RESET: tl.constexpr):
    """At the in-chunk positions `rows` of chunk i_c: b, ig, cnt (zeros without resets), carry (log
    weight of the entry state at t, -inf after a reset), virt (see chunkwise_triton_fwd), a (log
    weight of token j in the chunk-end state) and g (log decay of the entry state over the chunk)."""
    offs = i_c * L + rows
    last = i_c * L + L - 1
    bt = tl.load(B_ + i_bh * S_pad + offs)
    it = tl.load(I_ + i_bh * S_pad + offs)
    b_last = tl.load(B_ + i_bh * S_pad + last)
    if HAS_RESET:
        cnt = tl.load(CNT + i_b * S_pad + offs)
        cnt_last = tl.load(CNT + i_b * S_pad + last)
        virt = tl.load(VIRT + i_bh * S_pad + offs)
        carry = tl.where(cnt == 0, bt, float("-inf"))
        a = tl.where(cnt == cnt_last, b_last - bt + it, float("-inf"))
        g = tl.where(cnt_last == 0, b_last, float("-inf"))
    else:
        cnt = tl.zeros_like(rows)
        virt = tl.full(bt.shape, float("-inf"), tl.float32)
        carry = bt
        a = b_last - bt + it
        g = b_last
    return bt, it, cnt, carry, virt, a, g


@triton.jit
def _masked_log_d(b_r, cnt_r, rows, bt, it, cnt, cols, HAS_RESET: tl.constexpr):
    """log D_tj = b_t - b_j + ig_j [len(rows), len(cols)] for the in-chunk rows t (b_r, cnt_r: their
    b and cnt) and columns j (bt, it, cnt: theirs) of one chunk, where j <= t in the same document
    (else -inf)."""
    reach = rows[:, None] >= cols[None, :]
    if HAS_RESET:
        reach = reach & (cnt_r[:, None] == cnt[None, :])
    return tl.where(reach, b_r[:, None] - bt[None, :] + it[None, :], float("-inf"))


@triton.jit
def _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L: tl.constexpr, HAS_RESET: tl.constexpr):
    """Per-position gate quantities of chunk i_c: _gate_rows' at all L positions (b, ig, cnt, carry,
    virt, a, g), and virt_last (virt at the chunk's last position)."""
    bt, it, cnt, carry, virt, a, g = _gate_rows(B_, I_, VIRT, CNT, tl.arange(0, L), i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    if HAS_RESET:
        virt_last = tl.load(VIRT + i_bh * S_pad + i_c * L + L - 1)
    else:
        virt_last = float("-inf")
    return bt, it, cnt, carry, virt, a, g, virt_last


@triton.jit
def _state_step(
    K, V, B_, I_, VIRT, CNT, C, n, m, i_c, i_bh, i_b, offs_k, offs_v, S, S_pad, DK, DV,
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    L: tl.constexpr, HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, LOCAL_MAX: tl.constexpr,
):
    """Chunk i_c added to the state tile C [BK, BV], n [BK] (float32, at stabilizer m): the
    chunk-end C, n, m, and the chunk's log decay g (-inf through a reset).

    With LOCAL_MAX the chunk's own product k^T (w v) is taken at the chunk's own max log weight and
    scaled to the running stabilizer after it, so the product does not wait on the carried m: the
    chain from one chunk to the next is a scale and an add. m may be -inf (a segment's local pass
    starts from the empty state): the chunk-end m stays -inf until a token reaches the state, and
    the exponents then subtract 0 in its place (-inf - -inf would be NaN); a finite m is used as is."""
    _, _, _, _, _, a, g, virt_last = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    m_new = tl.maximum(g + m, tl.maximum(tl.max(a, 0), virt_last))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    decay = tl.exp(g + m - m_sub)
    a_max = tl.max(a, 0)
    m_loc = tl.where(a_max == float("-inf"), 0.0, a_max)  # -inf: no token reaches the chunk's end
    w = tl.exp(a - m_loc) if LOCAL_MAX else tl.exp(a - m_sub)  # [L] weight of each token
    offs_t = i_c * L + tl.arange(0, L)
    mt, mk, mv = offs_t < S, offs_k < DK, offs_v < DV
    kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)
    vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0).to(tl.float32)
    kw = kt * w[:, None]
    if LOCAL_MAX:  # the chunk's product, then to the running stabilizer
        # zero where no token reaches the chunk's end: its product is zero, and exp(0 - m_sub) may overflow
        to_new = tl.where(a_max == float("-inf"), 0.0, tl.exp(m_loc - m_sub))
        C = decay * C + to_new * tl.dot(tl.trans(kw).to(DT), vt.to(DT), input_precision=PREC)
        n = decay * n + to_new * tl.sum(kw, 0)
    else:
        C = decay * C + tl.dot(tl.trans(kw).to(DT), vt.to(DT), input_precision=PREC)
        n = decay * n + tl.sum(kw, 0)
    return C, n, m_new, g


@triton.jit
def _store_entry(CS, NS, MS, C, n, m, i_bh, i_c, i_k, i_v, NC, offs_k, offs_v, DK, DV):
    """The state chunk i_c starts from, into CS [BH, NC, DK, DV] (in its dtype), NS [BH, NC+1, DK]
    and MS [BH, NC+1]; n and m by one program column only."""
    mk, mv = offs_k < DK, offs_v < DV
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    tl.store(CS + (i_bh * NC + i_c).to(tl.int64) * DK * DV + c_off, C.to(CS.dtype.element_ty), mask=mk[:, None] & mv[None, :])
    if i_v == 0:
        tl.store(NS + (i_bh * (NC + 1) + i_c) * DK + offs_k, n, mask=mk)
        if i_k == 0:
            tl.store(MS + i_bh * (NC + 1) + i_c, m)


@triton.jit
def _chunk_end_max_source(a, g, m_beg, virt_last):
    """Which term attained a chunk's end stabilizer max(g + m_beg, max_j a_j, virt_last), the one its
    gradient goes to: beta, 1.0 for the carried state (ties go to it), and top_a [L], 1.0 for the
    tokens whose a_j is the maximum otherwise (split between ties; none: the zeroed state after a
    reset, through virt_last). Decided from the terms themselves, not by comparing them with the
    stored chunk-end m: for the single states pass, whose m is exactly that max, the same bit for bit;
    the split pass's combine rounds the m at a segment boundary otherwise."""
    a_max = tl.max(a, 0)
    beta = tl.where(g + m_beg >= tl.maximum(a_max, virt_last), 1.0, 0.0)
    top_a = tl.where(a == a_max, 1.0, 0.0) * tl.where(a_max >= virt_last, 1.0 - beta, 0.0)
    return beta, top_a


@triton.jit
def _state_grad_step(
    Q, DH, B_, I_, VIRT, CNT, MT, RDEN, DDEN, MS, DMTC, dC, dn, dmk, i_c, i_bh, i_b, offs_k, offs_v,
    S, S_pad, NC, DK, DV, scale, s_k_bh, s_k_t, s_v_bh, s_v_t,
    L: tl.constexpr, HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Chunk i_c taken back from the gradient of its end state (dC [BK, BV], dn [BK] and the
    stabilizer's dmk, float32) to the gradient of its entry state: returns those, the chunk's decay
    of the entry state (the factor dC, dn carry back with) and beta (1 where the carried state
    attained the chunk-end max: the factor dmk carries back with)."""
    _, _, _, carry, _, _, g, _ = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    offs_t = i_c * L + tl.arange(0, L)
    mt, mk, mv = offs_t < S, offs_k < DK, offs_v < DV
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
    # a and virt_last read again here, not held in registers across the products
    _, _, _, _, _, a, _, virt_last = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    beta, _ = _chunk_end_max_source(a, g, m_beg, virt_last)
    dmk = tl.sum(tl.load(DMTC + i_bh * S_pad + offs_t), 0) + beta * dmk
    return dC, dn, dmk, decay, beta


@triton.jit
def _store_end_grad(DCS, DNS, DMK, dC, dn, dmk, i_bh, i_c, i_k, i_v, NC, offs_k, offs_v, DK, DV):
    """The gradient of the state chunk i_c ends with, into DCS [BH, NC, DK, DV] (in its dtype), DNS
    [BH, NC+1, DK] and DMK [BH, NC+1] (at index i_c + 1); dn and dmk by one program column only."""
    mk, mv = offs_k < DK, offs_v < DV
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    tl.store(DCS + (i_bh * NC + i_c).to(tl.int64) * DK * DV + c_off, dC.to(DCS.dtype.element_ty), mask=mk[:, None] & mv[None, :])
    if i_v == 0:
        tl.store(DNS + (i_bh * (NC + 1) + i_c + 1) * DK + offs_k, dn, mask=mk)
        if i_k == 0:
            tl.store(DMK + i_bh * (NC + 1) + i_c + 1, dmk)
