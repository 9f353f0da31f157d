"""The recurrent mLSTM: one step, and a loop of steps over a sequence (spec §2, term by term).

The step is the decoding path on CPU and the twin of the fused Triton step kernel.
"""

import torch
import torch.nn.functional as F

from .common import EPS, MLSTMState, check_inputs, compute_dtype, zero_state


def step_gates(i: torch.Tensor, f: torch.Tensor, m: torch.Tensor):
    """i, f [B, NH] and m [B, NH, 1] -> the new stabilizer m and the decay of the old state and the
    write weight of the new token, both [B, NH, 1] (spec §2)."""
    i, lf = i.to(m.dtype)[..., None], F.logsigmoid(f.to(m.dtype))[..., None]
    m_new = torch.maximum(lf + m, i)
    return m_new, torch.exp(lf + m - m_new), torch.exp(i - m_new)


def step_readout(q: torch.Tensor, C: torch.Tensor, n: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    """h = C^T q̂ / (max(|n^T q̂|, exp(-m)) + eps) for the updated state: [B, NH, DV]."""
    qs = q.to(C.dtype) * q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():  # a reduction inductor fuses with the update of C: one pass over C
        num = (qs[..., :, None] * C).sum(dim=-2)
    else:
        num = (qs[..., None, :] @ C).squeeze(-2)  # [B, NH, DV]
    den = (qs * n).sum(dim=-1, keepdim=True)  # [B, NH, 1]
    return num / (torch.maximum(den.abs(), torch.exp(-m)) + eps)


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
    C, n, m = state
    k, v = k.to(C.dtype), v.to(C.dtype)
    m, decay, write = step_gates(i, f, m)
    C = decay[..., None] * C + write[..., None] * (k[..., :, None] * v[..., None, :])
    n = decay * n + write * k
    return step_readout(q, C, n, m, eps), (C, n, m)


@torch.no_grad()
def mlstm_step_torch_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    *,
    eps: float = EPS,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mlstm_step_torch` writing the new state into `state`: one pass over C and no temporary of
    its size, which is what decoding at large batch spends its time on. Returns h.
    slots (int64 [B], optional): token b steps state row slots[b] of a larger state (the rows are
    gathered, stepped and scattered back; the other rows are not touched)."""
    if slots is not None:
        rows = tuple(t.index_select(0, slots) for t in state)
        h = mlstm_step_torch_(q, k, v, i, f, rows, eps=eps)
        for t, new in zip(state, rows):
            t.index_copy_(0, slots, new)
        return h
    if torch.compiler.is_compiling():
        # Inductor fuses the pointwise form (no temporary there) and writes the copies in place.
        h, new = mlstm_step_torch(q, k, v, i, f, state, eps=eps)
        for old, t in zip(state, new):
            old.copy_(t)
        return h
    C, n, m = state
    B, NH, DK, DV = C.shape
    m_new, decay, write = step_gates(i, f, m)
    Cf = C.view(B * NH, DK, DV)
    Cf.mul_(decay.view(B * NH, 1, 1)).baddbmm_(k.to(C.dtype).reshape(B * NH, DK, 1), (write * v).to(C.dtype).reshape(B * NH, 1, DV))
    n.mul_(decay).add_(write * k.to(n.dtype))
    m.copy_(m_new)
    return step_readout(q, C, n, m, eps)


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
