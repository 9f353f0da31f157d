"""Forward kernels of the Triton chunkwise mLSTM, their launchers and the helpers the backward
shares (custom op and public function: chunkwise_triton.py; backward: chunkwise_triton_bwd.py;
PyTorch twin: chunkwise.py).

Two launches (spec §2, chunkwise form):
1. `_states_fwd_kernel`: one program per (DK tile, DV tile, batch*head) walks the chunks in order,
   storing the state each chunk starts from (C, n, m) and adding the chunk's own k v^T product.
   Sequential over chunks, parallel over heads and state tiles; nothing but the chunk-entry states
   goes to memory (C in bf16 for bf16 inputs: see state_dtype). Or, with launch_config's "states"
   segments > 1, the same states in three launches over segments of the sequence
   (chunkwise_triton_split.py), for few heads at long sequences.
2. `_output_fwd_kernel`: one program per (chunk and block of its rows, DV tile, batch*head)
   computes those outputs from the chunk's entry state and its own tokens (causal scores against
   the chunk's L tokens, loop over DK tiles); the grid's order (chunks or DV tiles fastest) is a
   launch setting (launch_settings.GRID_ORDERS, program_ids). With launch_config's "output" LB below
   the chunk, `_output_intra_kernel` in its place takes the chunk's columns in sub-blocks of LB
   (chunkwise_triton_intra.py).
Or one (launch_config's "fused" entry, off by default until a GPU has measured it):
`_fused_fwd_kernel`: one program per (DV tile, batch*head) walks the chunks in order with its
columns of the state on chip, computing each chunk's outputs and then its state update.

The kernels take the gate vectors of chunkwise_triton.chunk_gates:
  b [B*NH, S_pad]     in-chunk inclusive cumsum of lf (padding: lf = 0),
  ig [B*NH, S_pad]    input gate (padding: -inf, so padded positions write nothing),
  virt [B*NH, S_pad]  log weight of the zeroed state after an in-chunk reset (else -inf),
  cnt [B, S_pad]      number of resets so far in the chunk (token j reaches t only if equal).
Math, the carried state and the final state are float32 whatever the input dtype; h comes back in
v's dtype. A program's base offset into a per-head or per-chunk buffer is taken in int64 (the
offsets within its tiles stay int32): at the 7B head shape the chunk states of 16,384 heads x chunks
(batch 2 at S 65,536) pass 2**31 elements, and q, k, v of half a million tokens do.
"""

import torch
import triton
import triton.language as tl

from .chunkwise_triton_chunk import _gate_vectors, _masked_log_d, _state_step, _store_entry
from .chunkwise_triton_split import segment_plan, split_chunk_states
from .chunkwise_triton_intra import _output_intra_kernel, tiled_kernel
from .launch_settings import grid_meta, interpreting, launch_config, program_ids

CHUNK_SIZES = (16, 32, 64, 128)
"""Chunk lengths the kernels take: tl.dot needs >= 16, and above 128 the [L, L] score tiles of one
chunk no longer fit a GPU's registers and shared memory (256 needs ~270 KiB of shared memory)."""

FUSED_MAX_CHUNK = 16
"""The longest chunk the one-pass forward (_fused_fwd_kernel, for Hopper GPUs) is built for: up to it,
it compiles for sm_90 without spills at the 7B head shape (at 32 it spills on sm_90, at 64 about a
KiB, at 128 its [L, DK] tiles exceed shared memory; on sm_80 it spills at 16 already)."""


@triton.jit
def _row_log_d(B_, I_, VIRT, CNT, bt, it, cnt, rows, i_bh, i_b, i_c, S_pad, L: tl.constexpr, HAS_RESET: tl.constexpr):
    """For the rows `rows` (in-chunk positions t) of chunk i_c, given the chunk's column vectors
    from _gate_vectors: log D_tj = b_t - b_j + ig_j for j <= t in the same document (else -inf)
    [len(rows), L], and the rows' carry and virt (see _gate_vectors)."""
    offs_r = i_c * L + rows
    b_r = tl.load(B_ + i_bh * S_pad + offs_r)
    if HAS_RESET:
        cnt_r = tl.load(CNT + i_b * S_pad + offs_r)
        carry_r = tl.where(cnt_r == 0, b_r, float("-inf"))
        virt_r = tl.load(VIRT + i_bh * S_pad + offs_r)
    else:
        cnt_r = cnt  # unused without resets
        carry_r = b_r
        virt_r = tl.full(b_r.shape, float("-inf"), tl.float32)
    return _masked_log_d(b_r, cnt_r, rows, bt, it, cnt, tl.arange(0, L), HAS_RESET), carry_r, virt_r


@triton.jit
def _states_fwd_kernel(
    # pointers
    K, V, B_, I_, VIRT, CNT, C0, N0, M0, CS, NS, MS, CF, NF, MF,
    # dims
    S, S_pad, NC, DK, DV,
    # strides (q/k/v rows are contiguous in the head dim)
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, LOCAL_MAX: tl.constexpr,
):
    """The chunk-entry states, walking the chunks in order (_state_step; LOCAL_MAX: there)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // NH
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    mkv = mk[:, None] & mv[None, :]
    c_off = offs_k[:, None] * DV + offs_v[None, :]
    C = tl.load(C0 + i_bh.to(tl.int64) * DK * DV + c_off, mask=mkv, other=0.0)
    n = tl.load(N0 + i_bh * DK + offs_k, mask=mk, other=0.0)
    m = tl.load(M0 + i_bh)
    for i_c in range(NC):
        _store_entry(CS, NS, MS, C, n, m, i_bh, i_c, i_k, i_v, NC, offs_k, offs_v, DK, DV)
        C, n, m, _ = _state_step(K, V, B_, I_, VIRT, CNT, C, n, m, i_c, i_bh, i_b, offs_k, offs_v, S, S_pad, DK, DV,
                                 s_k_bh, s_k_t, s_v_bh, s_v_t, L, HAS_RESET, DT, PREC, LOCAL_MAX)
    tl.store(CF + i_bh.to(tl.int64) * DK * DV + c_off, C, mask=mkv)
    if i_v == 0:
        tl.store(NS + (i_bh * (NC + 1) + NC) * DK + offs_k, n, mask=mk)
        tl.store(NF + i_bh * DK + offs_k, n, mask=mk)
        if i_k == 0:
            tl.store(MS + i_bh * (NC + 1) + NC, m)
            tl.store(MF + i_bh, m)


@triton.jit
def _output_fwd_kernel(
    # pointers
    Q, K, V, B_, I_, VIRT, CNT, CS, NS, MS, H, MT, DEN,
    # dims
    S, S_pad, NC, DK, DV, scale, eps,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, TILES_FIRST: tl.constexpr,
):
    """Outputs of RB rows of chunk i_c for one DV tile (the program of the chunk's row block i_r:
    see program_ids)."""
    i_cr, i_v = program_ids(TILES_FIRST)
    i_c, i_r = i_cr // (L // RB), i_cr % (L // RB)
    i_bh = tl.program_id(2)
    i_b = i_bh // NH
    rows = i_r * RB + tl.arange(0, RB)
    offs_r = i_c * L + rows
    offs_t = i_c * L + tl.arange(0, L)
    offs_v = i_v * BV + tl.arange(0, BV)
    mr, mt, mv = offs_r < S, offs_t < S, offs_v < DV
    qk = tl.zeros([RB, L], dtype=tl.float32)
    q_c = tl.zeros([RB, BV], dtype=tl.float32)  # q C_entry
    q_n = tl.zeros([RB], dtype=tl.float32)  # q . n_entry
    for kb in range(tl.cdiv(DK, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        mk = offs_k < DK
        qr = tl.load(Q + i_bh * s_k_bh + offs_r[:, None] * s_k_t + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        C = tl.load(CS + (i_bh * NC + i_c).to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        n = tl.load(NS + (i_bh * (NC + 1) + i_c) * DK + offs_k, mask=mk, other=0.0)
        qk += tl.dot(qr.to(DT), tl.trans(kt.to(DT)), input_precision=PREC)
        q_c += tl.dot(qr.to(DT), C.to(DT), input_precision=PREC)
        q_n += tl.sum(qr.to(tl.float32) * n[None, :], 1)
    # the gates after the products: fewer registers live across the loop
    bt, it, cnt, _, _, _, _, _ = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    log_d, carry, virt = _row_log_d(B_, I_, VIRT, CNT, bt, it, cnt, rows, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
    m_prev = carry + tl.load(MS + i_bh * (NC + 1) + i_c)
    m_t = tl.maximum(tl.maximum(m_prev, virt), tl.max(log_d, 1))  # the recurrent stabilizer at t
    decay = tl.exp(m_prev - m_t)  # 0 after a reset
    vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
    A = qk * scale * tl.exp(log_d - m_t[:, None])
    num = tl.dot(A.to(DT), vt.to(DT), input_precision=PREC) + (decay * scale)[:, None] * q_c
    den = tl.sum(A, 1) + decay * scale * q_n
    h = num / (tl.maximum(tl.abs(den), tl.exp(-m_t)) + eps)[:, None]
    tl.store(H + i_bh * s_v_bh + offs_r[:, None] * s_v_t + offs_v[None, :], h.to(H.dtype.element_ty), mask=mr[:, None] & mv[None, :])
    # the backward needs m_t and den (a DV-tile-independent pair): one program column writes them
    if i_v == 0:
        tl.store(MT + i_bh * S_pad + offs_r, m_t)
        tl.store(DEN + i_bh * S_pad + offs_r, den)


@triton.jit
def _fused_fwd_kernel(
    # pointers
    Q, K, V, B_, I_, VIRT, CNT, C0, N0, M0, H, MT, DEN, MS, CF, NF, MF,
    # dims
    S, S_pad, NC, DK, DV, scale, eps,
    # strides
    s_k_bh, s_k_t, s_v_bh, s_v_t,
    # meta-parameters
    NH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """The states and output passes in one: a program per (DV tile, batch*head) walks the chunks in
    order with its BV columns of the state (all of DK: BK >= DK) on chip, computing each chunk's
    outputs from its entry state and then adding the chunk to the state. Nothing but h, the final
    state and the backward's m_t, den and chunk-entry m goes to memory; the [L, L] scores are
    computed by every DV tile's program.

    n rides along as two more columns of the state tile X [BK, 2 BV] = [C | n_hi | n_lo | 0]: the
    chunk's update is one product k^T [w v | w_hi | w_lo | 0] (w_hi + w_lo: the float32 weights w as
    two DT numbers, so n keeps float32 accuracy over any number of chunks; w scales v's rows, not
    k's: no [L, DK] float32 tile); q meets C and, split anew into two DT numbers, n. Built for chunks
    up to FUSED_MAX_CHUNK."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = i_bh // NH
    offs_k = tl.arange(0, BK)
    cols = tl.arange(0, 2 * BV)
    offs_v = i_v * BV + cols
    rows = tl.arange(0, L)
    mk, mv = offs_k < DK, (cols < BV) & (offs_v < DV)
    is_hi, is_lo = (cols == BV)[None, :], (cols == BV + 1)[None, :]
    n_col = tl.arange(0, 16)[None, :]  # the columns of the [BK, 16] tile that brings n to q
    X = tl.load(C0 + i_bh.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    X += tl.where(is_hi, tl.load(N0 + i_bh * DK + offs_k, mask=mk, other=0.0)[:, None], 0.0)
    m = tl.load(M0 + i_bh)
    for i_c in range(NC):
        if i_v == 0:
            tl.store(MS + i_bh * (NC + 1) + i_c, m)
        offs_t = i_c * L + rows
        mt = offs_t < S
        q = tl.load(Q + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0).to(DT)
        kt = tl.load(K + i_bh * s_k_bh + offs_t[:, None] * s_k_t + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0).to(DT)
        vt = tl.load(V + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        # the products with q and k first (then neither is live next to the [L, L] tiles): with the
        # entry state for the outputs, and the chunk's update of the state (as _states_fwd_kernel)
        bt, it, cnt, _, _, a, g, virt_last = _gate_vectors(B_, I_, VIRT, CNT, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
        qk = tl.dot(q, tl.trans(kt), input_precision=PREC)
        # q C_entry (C in DT, as the two-pass output kernel takes it; [L, 2 BV], the n columns unused),
        # and q n_entry with n split anew into two DT numbers (n_hi alone would lose n_lo, and q n
        # cancels in den), as the first two columns of a [BK, 16] tile
        q_c = tl.dot(q, X.to(DT), input_precision=PREC)
        n = tl.sum(tl.where(is_hi | is_lo, X, 0.0), 1)[:, None]
        n_hi = n.to(DT).to(tl.float32)
        n_cols = tl.where(n_col == 0, n_hi, tl.where(n_col == 1, n - n_hi, 0.0))
        q_n = tl.sum(tl.dot(q, n_cols.to(DT), input_precision=PREC), 1)
        m_new = tl.maximum(g + m, tl.maximum(tl.max(a, 0), virt_last))
        w = tl.exp(a - m_new)[:, None]  # [L, 1] weight of each token in the chunk-end state
        w_hi = w.to(DT).to(tl.float32)
        update = tl.where(is_hi, w_hi, tl.where(is_lo, w - w_hi, vt.to(tl.float32) * w))
        X = tl.exp(g + m - m_new) * X + tl.dot(tl.trans(kt), update.to(DT), input_precision=PREC)
        # the chunk's outputs, as _output_fwd_kernel computes them for all L rows (m: the entry m)
        log_d, carry, virt = _row_log_d(B_, I_, VIRT, CNT, bt, it, cnt, rows, i_bh, i_b, i_c, S_pad, L, HAS_RESET)
        m_prev = carry + m
        m_t = tl.maximum(tl.maximum(m_prev, virt), tl.max(log_d, 1))
        decay = tl.exp(m_prev - m_t)
        A = qk * scale * tl.exp(log_d - m_t[:, None])
        num = tl.dot(A.to(DT), vt.to(DT), input_precision=PREC) + (decay * scale)[:, None] * q_c
        den = tl.sum(A, 1) + decay * scale * q_n
        h = num / (tl.maximum(tl.abs(den), tl.exp(-m_t)) + eps)[:, None]
        tl.store(H + i_bh * s_v_bh + offs_t[:, None] * s_v_t + offs_v[None, :], h.to(H.dtype.element_ty), mask=mt[:, None] & mv[None, :])
        if i_v == 0:
            tl.store(MT + i_bh * S_pad + offs_t, m_t)
            tl.store(DEN + i_bh * S_pad + offs_t, den)
        m = m_new
    tl.store(CF + i_bh.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], X, mask=mk[:, None] & mv[None, :])
    if i_v == 0:
        tl.store(NF + i_bh * DK + offs_k, tl.sum(tl.where(is_hi | is_lo, X, 0.0), 1), mask=mk)
        tl.store(MS + i_bh * (NC + 1) + NC, m)
        tl.store(MF + i_bh, m)


def state_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype of the stored chunk-boundary states C and (in the backward) their gradients dC:
    bf16 for bf16 inputs (the products that read them take bf16 operands anyway, and they are most
    of the kernels' HBM traffic; see benchmarks/kernel_resources.py), float32 otherwise. The
    recurrences themselves, the final state and the initial state's gradient are float32 always."""
    return torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32


def chunk_states(k, v, b, ig, virt, cnt, C0, n0, m0, S, cfg, dtype: torch.dtype):
    """Entry states of every chunk, C [B*NH, NC, DK, DV] in `dtype`, n [B*NH, NC+1, DK] and m
    [B*NH, NC+1] (index NC: the final n, m; the per-chunk launches index both alike) in float32, and
    the final state: C [B, NH, DK, DV], n [B, NH, DK] and m [B, NH, 1] in float32. `cfg` is
    launch_config(...)["states"]: one sequential pass, or with segments > 1 the split pass
    (chunkwise_triton_split.segment_plan)."""
    B, NH, _, DK = k.shape
    DV = v.shape[-1]
    S_pad = b.shape[-1]
    NC = S_pad // cfg["L"]
    CS = k.new_empty(B * NH, NC, DK, DV, dtype=dtype)
    NS = k.new_empty(B * NH, NC + 1, DK, dtype=torch.float32)
    MS = k.new_empty(B * NH, NC + 1, dtype=torch.float32)
    CF, NF, MF = final_state(k, DV)
    meta = dict(cfg)
    local_max, segments = meta.pop("local_max"), meta.pop("segments")
    args = (k, v, b, ig, virt, cnt, C0, n0, m0, CS, NS, MS, CF, NF, MF, S, S_pad, NC, DK, DV,
            k.stride(1), k.stride(2), v.stride(1), v.stride(2))
    meta.update(HAS_RESET=cnt is not None, NH=NH, LOCAL_MAX=bool(local_max))
    P, NCP = segment_plan(NC, segments, B * NH)
    if P > 1:
        split_chunk_states(*args, P=P, NCP=NCP, meta=meta)
    else:
        _states_fwd_kernel[(triton.cdiv(DK, cfg["BK"]), triton.cdiv(DV, cfg["BV"]), B * NH)](*args, **meta)
    return CS, NS, MS, (CF, NF, MF)


def no_chunk_states(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward op's chunk-entry C, n where it computes none (the one-pass forward): empty."""
    return q.new_empty(0, dtype=state_dtype(q)), q.new_empty(0, dtype=torch.float32)


def final_state(k: torch.Tensor, DV: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty float32 C [B, NH, DK, DV], n [B, NH, DK], m [B, NH, 1] for a kernel to write."""
    B, NH, _, DK = k.shape
    f32 = dict(dtype=torch.float32)
    return k.new_empty(B, NH, DK, DV, **f32), k.new_empty(B, NH, DK, **f32), k.new_empty(B, NH, 1, **f32)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    b: torch.Tensor, ig: torch.Tensor, virt: torch.Tensor | None, cnt: torch.Tensor | None,
    C0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor, chunk: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """The forward op's body: h, the final (C, n, m), and for the backward m_t, den [B*NH, S_pad],
    the chunk-entry m [B*NH, NC+1] and the chunk-entry C, n of chunk_states (empty from the one-pass
    forward, which stores none; the op keeps them only where the backward follows at once: see
    chunkwise_triton.py)."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    cfg = launch_config(q, v, chunk)
    S_pad = b.shape[-1]
    NC = S_pad // chunk
    h = torch.empty_like(v)
    mt = q.new_empty(B * NH, S_pad, dtype=torch.float32)
    den = torch.empty_like(mt)
    strides = (k.stride(1), k.stride(2), v.stride(1), v.stride(2))
    meta = dict(HAS_RESET=cnt is not None, NH=NH)
    fused = dict(cfg["fused"])
    if fused.pop("enabled"):
        if chunk > FUSED_MAX_CHUNK or fused["DT"] == tl.float32 and not interpreting():
            raise ValueError(
                f"mlstm: the one-pass forward (launch_overrides fused enabled=1) is built for float16 or bfloat16 "
                f"inputs and chunks up to {FUSED_MAX_CHUNK}, got {q.dtype} and chunk {chunk}: pass chunk_size="
                f"{FUSED_MAX_CHUNK} with half-precision inputs, or leave it off"
            )
        if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (9, 0):
            raise ValueError("mlstm: the one-pass forward is built for Hopper GPUs (sm_90; on an A100 its registers "
                             "spill at the 7B head shape): leave it off on this GPU")
        MS = q.new_empty(B * NH, NC + 1, dtype=torch.float32)
        CF, NF, MF = final_state(k, DV)
        _fused_fwd_kernel[(triton.cdiv(DV, fused["BV"]), B * NH)](
            q, k, v, b, ig, virt, cnt, C0, n0, m0, h, mt, den, MS, CF, NF, MF,
            S, S_pad, NC, DK, DV, DK**-0.5, eps, *strides, **meta, **fused,
        )
        return h, CF, NF, MF, mt, den, MS, *no_chunk_states(q)
    CS, NS, MS, (C, n, m) = chunk_states(k, v, b, ig, virt, cnt, C0, n0, m0, S, cfg["states"], state_dtype(q))
    grid, out = grid_meta(cfg["output"], NC * (chunk // cfg["output"]["RB"]), triton.cdiv(DV, cfg["output"]["BV"]), B * NH)
    output_kernel, out = tiled_kernel(_output_fwd_kernel, _output_intra_kernel, out)
    output_kernel[grid](
        q, k, v, b, ig, virt, cnt, CS, NS, MS, h, mt, den,
        S, S_pad, NC, DK, DV, DK**-0.5, eps, *strides, **meta, **out,
    )
    return h, C, n, m, mt, den, MS, CS, NS
