"""The recurrent mLSTM: one step, and a loop of steps over a sequence (spec §2, term by term).

The step is the decoding path on CPU and the twin of the fused Triton step kernel.
"""

import torch
import torch.nn.functional as F

from .common import EPS, MLSTMState, check_inputs, compute_dtype, zero_state


def mlstm_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    *,
    eps: float = EPS,
) -> tuple[torch.Tensor, MLSTMState]:
    """One token: q, k [B, NH, DK], v [B, NH, DV], i, f [B, NH]; returns h [B, NH, DV] and the new state."""
    dt = state[0].dtype
    C, n, m = state
    q, k, v = (t.to(dt) for t in (q, k, v))
    i, lf = i.to(dt)[..., None], F.logsigmoid(f.to(dt))[..., None]  # [B, NH, 1]
    m_new = torch.maximum(lf + m, i)
    decay = torch.exp(lf + m - m_new)
    write = torch.exp(i - m_new)
    C = decay[..., None] * C + write[..., None] * (k[..., :, None] * v[..., None, :])
    n = decay * n + write * k
    qs = q * q.shape[-1] ** -0.5
    num = (qs[..., None, :] @ C).squeeze(-2)  # [B, NH, DV]
    den = (qs * n).sum(dim=-1, keepdim=True)  # [B, NH, 1]
    h = num / (torch.maximum(den.abs(), torch.exp(-m_new)) + eps)
    return h, (C, n, m_new)


def mlstm_recurrent(
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
    """The step applied position by position; a reset zeroes (C, n, m) right before its position."""
    check_inputs(q, k, v, i, f, state, reset)
    B, NH, S, DK = q.shape
    dt = compute_dtype(q)
    empty = zero_state(B, NH, DK, v.shape[-1], device=q.device, dtype=dt)
    state = tuple(t.to(dt) for t in state) if state is not None else empty
    hs = []
    for t in range(S):
        if reset is not None:
            r = reset[:, t, None, None]  # [B, 1, 1]
            state = (
                torch.where(r[..., None], 0.0, state[0]),
                torch.where(r, 0.0, state[1]),
                torch.where(r, 0.0, state[2]),
            )
        h, state = mlstm_step_torch(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state, eps=eps)
        hs.append(h)
    return torch.stack(hs, dim=2).to(v.dtype), state
