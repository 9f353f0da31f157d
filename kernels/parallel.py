"""The fully parallel (quadratic) mLSTM: the test oracle, run in float64.

Builds log D_tj = sum_{r=j+1..t} lf_r + i_j from a masked cumulative sum of lf (segment sums), which
is more precise than differences of one long cumsum. The carried state enters as a virtual column
"position -1" with log weight sum_{r<=t} lf_r + m0; a reset at position s zeroes the state (m = 0)
right before s, so rows t >= s see neither earlier tokens nor the initial state.
Memory is O(S^2): meant for tests and short sequences.
"""

import torch
import torch.nn.functional as F

from .common import EPS, MLSTMState, check_inputs, compute_dtype, zero_state


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """x [..., T] -> [..., T, T] with out[t, j] = sum_{r=j+1..t} x_r for j <= t and -inf above."""
    T = x.shape[-1]
    xx = x[..., :, None].expand(*x.shape, T)  # [..., T(r), T(j)]
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    ss = xx.masked_fill(~strict, 0).cumsum(dim=-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return ss.masked_fill(~causal, float("-inf"))


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    *,
    reset: torch.Tensor | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, MLSTMState]:
    check_inputs(q, k, v, i, f, state, reset)
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    dt, out_dtype = compute_dtype(q), v.dtype
    q, k, v, i = (t.to(dt) for t in (q, k, v, i))
    lf = F.logsigmoid(f.to(dt))
    C0, n0, m0 = (t.to(dt) for t in state) if state is not None else zero_state(B, NH, DK, DV, device=q.device, dtype=dt)

    pos = torch.arange(S, device=q.device)
    if reset is None:
        reset = torch.zeros(B, S, dtype=torch.bool, device=q.device)
    start = torch.where(reset, pos, 0).cummax(dim=-1).values  # [B, S] first position of t's document
    fresh = reset.cumsum(dim=-1) > 0  # [B, S] a reset at or before t: the initial state is gone

    # Extended coordinates: column 0 is "position -1" (the carried state), column j+1 is token j.
    lfe = F.pad(lf, (1, 0))  # [B, NH, S+1]
    ss = segment_sums(lfe)[..., 1:, :]  # [B, NH, S(t), S+1(j')]
    log_d = ss[..., 1:] + i[..., None, :]  # [B, NH, S, S]
    same_doc = pos[None, None, :] >= start[:, :, None]  # [B, S(t), S(j)] j not before t's document
    log_d = log_d.masked_fill(~same_doc[:, None], float("-inf"))
    prev_w = ss.gather(-1, start[:, None, :, None].expand(B, NH, S, 1)).squeeze(-1)  # [B, NH, S]
    prev_w = prev_w + torch.where(fresh[:, None, :], 0.0, m0)  # m = 0 after a reset, m0 before

    m = torch.maximum(prev_w, log_d.amax(dim=-1))  # [B, NH, S]
    d = torch.exp(log_d - m[..., None])
    scores = (q @ k.transpose(-1, -2)) * DK**-0.5 * d  # [B, NH, S, S]
    carry = torch.exp(prev_w - m).masked_fill(fresh[:, None, :], 0.0)  # [B, NH, S]
    qs = q * DK**-0.5
    num = scores @ v + carry[..., None] * (qs @ C0)
    den = scores.sum(dim=-1) + carry * (qs @ n0[..., None]).squeeze(-1)
    h = num / (torch.maximum(den.abs(), torch.exp(-m))[..., None] + eps)

    # Final state: the last row's weights applied to k v^T (and to k for n).
    w_last = d[..., -1, :]  # [B, NH, S]
    C = (k * w_last[..., None]).transpose(-1, -2) @ v + carry[..., -1, None, None] * C0
    n = (k * w_last[..., None]).sum(dim=-2) + carry[..., -1, None] * n0
    return h.to(out_dtype), (C, n, m[..., -1:])
