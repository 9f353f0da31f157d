"""The chunkwise-parallel mLSTM in PyTorch: the CPU path for training and prefill, and the twin of
the Triton chunkwise kernels.

Two phases (spec §2, chunkwise form):
1. inter-chunk: a short sequential scan over chunks carries (C, n, m) from chunk to chunk;
2. intra-chunk: every chunk at once, causal L x L attention-like products plus the carried state.
Any S: the tail is padded with positions that leave the state untouched (i = -inf, lf = 0).

Resets: with the in-chunk reset count c_t, position t keeps the carried state only when c_t = 0;
otherwise the state was zeroed (m = 0) right before its last reset r, which leaves a virtual term of
log weight sum_{s=r..t} lf_s in the stabilizer max. Token j reaches t only when c_j = c_t.
"""

import torch
import torch.nn.functional as F

from .common import EPS, MLSTMState, check_inputs, compute_dtype, zero_state

NEG_INF = float("-inf")


def in_chunk_cumsum(lf: torch.Tensor, reset: torch.Tensor | None):
    """lf [B, NH, NC, L], reset [B, NC, L] or None -> b, the inclusive cumulative lf inside each chunk,
    restarted at every reset, and count [B, 1, NC, L], the resets so far in the chunk (None without).

    With resets, b is a masked sum rather than differences of one cumsum: no value or gradient of a
    gate before a reset enters anything after it, not even as rounding. Shared with the Triton path.
    """
    if reset is None:
        return lf.cumsum(dim=-1), None
    L = lf.shape[-1]
    count = reset.cumsum(dim=-1)[:, None]
    causal = torch.ones(L, L, dtype=torch.bool, device=lf.device).tril()
    same_doc = causal & (count[..., :, None] == count[..., None, :])
    return (lf[..., None, :] * same_doc).sum(dim=-1), count


def chunk_gates(i: torch.Tensor, lf: torch.Tensor, reset: torch.Tensor | None, L: int):
    """Per-chunk log weights shared by both phases (inputs already padded to NC * L).

    i, lf [B, NH, NC, L]; reset [B, NC, L] or None. Returns
      log_d  [B, NH, NC, L, L]  log D_tj inside the chunk (-inf where j cannot reach t),
      carry  [B, NH, NC, L]     log weight of the carried state at t (-inf after a reset),
      virt   [B, NH, NC, L]     log weight of the zeroed state (m = 0) after a reset, else -inf.
    """
    b, count = in_chunk_cumsum(lf, reset)
    log_d = b[..., :, None] - b[..., None, :] + i[..., None, :]
    reach = torch.ones(L, L, dtype=torch.bool, device=i.device).tril()
    if count is None:
        return log_d.masked_fill(~reach, NEG_INF), b, torch.full_like(b, NEG_INF)
    reach = reach & (count[..., :, None] == count[..., None, :])  # j <= t, same document
    fresh = count > 0
    return log_d.masked_fill(~reach, NEG_INF), b.masked_fill(fresh, NEG_INF), b.masked_fill(~fresh, NEG_INF)


def mlstm_advance(
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    *,
    out: MLSTMState | None = None,
) -> MLSTMState:
    """The state after k [B, NH, S, DK], v [B, NH, S, DV], gates i, f [B, NH, S] from `state`,
    without the outputs h (which is where the chunkwise forms spend most of their work): the
    chunk-state update of spec §2 over one chunk of S positions, e.g. to re-advance a saved state
    over a few accepted tokens. Padding (i = -inf, f = +inf) is skipped as usual. Written into `out`
    (float32 tensors, may be `state` itself) when given. No gradient."""
    with torch.no_grad():
        C, n, m = state
        dt = C.dtype
        k, v = k.to(dt), v.to(dt)
        lf = F.logsigmoid(f.to(dt))
        b = lf.cumsum(dim=-1)
        g = b[..., -1:]  # [B, NH, 1] total log forget over the S positions
        a = g - b + i.to(dt)  # [B, NH, S] log weight of each position in the final state
        m_new = torch.maximum(g + m, a.amax(dim=-1, keepdim=True))
        decay = torch.exp(g + m - m_new)
        w = torch.exp(a - m_new)[..., None] * k  # [B, NH, S, DK]
        new = (torch.baddbmm((decay[..., None] * C).flatten(0, 1), w.transpose(-1, -2).flatten(0, 1), v.flatten(0, 1)).view_as(C),
               decay * n + w.sum(dim=-2), m_new)
        if out is None:
            return new
        for t, value in zip(out, new):
            t.copy_(value)
        return out


def mlstm_chunkwise(
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
    check_inputs(q, k, v, i, f, state, reset)
    if chunk_size < 1:
        raise ValueError(f"mlstm: chunk_size must be a positive integer, got {chunk_size}")
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    dt, out_dtype = compute_dtype(q), v.dtype
    L = min(chunk_size, S)
    NC = -(-S // L)
    pad = NC * L - S
    q, k, v = (F.pad(t.to(dt), (0, 0, 0, pad)).view(B, NH, NC, L, -1) for t in (q, k, v))
    i = F.pad(i.to(dt), (0, pad), value=NEG_INF).view(B, NH, NC, L)
    lf = F.pad(F.logsigmoid(f.to(dt)), (0, pad)).view(B, NH, NC, L)
    if reset is not None:
        reset = F.pad(reset, (0, pad)).view(B, NC, L)
    C, n, m = (t.to(dt) for t in state) if state is not None else zero_state(B, NH, DK, DV, device=q.device, dtype=dt)

    log_d, carry, virt = chunk_gates(i, lf, reset, L)

    # Phase 1: each chunk's own contribution to the state, all chunks at once, then the scan.
    a = log_d[..., -1, :]  # [B, NH, NC, L] weight of token j in the state at the chunk's end
    m_own = torch.maximum(a.amax(dim=-1), virt[..., -1])  # [B, NH, NC]
    m_scale = m_own.masked_fill(m_own == NEG_INF, 0.0)  # a chunk of pure padding writes nothing
    w = torch.exp(a - m_scale[..., None])[..., None] * k  # [B, NH, NC, L, DK]
    C_own = w.transpose(-1, -2) @ v  # [B, NH, NC, DK, DV]
    n_own = w.sum(dim=-2)  # [B, NH, NC, DK]
    C_in, n_in, m_in = [], [], []
    for c in range(NC):
        C_in.append(C), n_in.append(n), m_in.append(m)
        g = carry[:, :, c, -1, None]  # [B, NH, 1]
        m_new = torch.maximum(g + m, m_own[:, :, c, None])
        decay, own = torch.exp(g + m - m_new), torch.exp(m_scale[:, :, c, None] - m_new)
        C = decay[..., None] * C + own[..., None] * C_own[:, :, c]
        n = decay * n + own * n_own[:, :, c]
        m = m_new
    C_in, n_in, m_in = torch.stack(C_in, 2), torch.stack(n_in, 2), torch.stack(m_in, 2)  # chunk-entry states

    # Phase 2: outputs of every chunk from its entry state and its own tokens.
    m_prev = carry + m_in  # [B, NH, NC, L]
    m_t = torch.maximum(torch.maximum(m_prev, virt), log_d.amax(dim=-1))
    qs = q * DK**-0.5
    scores = (qs @ k.transpose(-1, -2)) * torch.exp(log_d - m_t[..., None])  # [B, NH, NC, L, L]
    decay = torch.exp(m_prev - m_t)  # 0 after a reset
    num = scores @ v + decay[..., None] * (qs @ C_in)
    den = scores.sum(dim=-1) + decay * (qs @ n_in[..., None]).squeeze(-1)
    h = num / (torch.maximum(den.abs(), torch.exp(-m_t))[..., None] + eps)
    h = h.reshape(B, NH, NC * L, DV)[:, :, :S]
    return h.to(out_dtype), (C, n, m)
