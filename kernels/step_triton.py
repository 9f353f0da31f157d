"""One decoding step of the mLSTM as a single Triton launch, updating the state in place.
PyTorch twin: mlstm_step_torch in recurrent.py.

Gate activations (logsigmoid of f, exponential input gate with the max stabilizer), the C/n/m
update, the readout and the normalization are fused: one program per (batch, head) reads its
C [DK, DV] once, writes it back once and emits h. A head's n and m are read by the program that
overwrites them, so the in-place update is race-free. No host synchronisation and no allocation
besides h (or none with `h_out`): the step can be captured in a CUDA graph. Forward only.
"""

import torch
import triton
import triton.language as tl

from .common import EPS, MLSTMState


@triton.jit
def _step_kernel(
    # pointers
    Q, K, V, I_, F_, C, N, M, H,
    # dims
    DK, DV, scale, eps,
    # strides (per batch*head row; the head dims are contiguous)
    s_q, s_k, s_v, s_h,
    # meta-parameters
    BK: tl.constexpr, BV: tl.constexpr,
):
    i_bh = tl.program_id(0)
    offs_k = tl.arange(0, BK)
    mk = offs_k < DK
    q = tl.load(Q + i_bh * s_q + offs_k, mask=mk, other=0.0).to(tl.float32) * scale
    k = tl.load(K + i_bh * s_k + offs_k, mask=mk, other=0.0).to(tl.float32)
    ig = tl.load(I_ + i_bh).to(tl.float32)
    f = tl.load(F_ + i_bh).to(tl.float32)
    lf = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))  # logsigmoid without overflow
    m = tl.load(M + i_bh)
    m_new = tl.maximum(lf + m, ig)
    decay = tl.exp(lf + m - m_new)
    write = tl.exp(ig - m_new)
    n = decay * tl.load(N + i_bh * DK + offs_k, mask=mk, other=0.0) + write * k
    den = tl.sum(q * n, 0)
    rden = 1.0 / (tl.maximum(tl.abs(den), tl.exp(-m_new)) + eps)
    for vb in range(tl.cdiv(DV, BV)):
        offs_v = vb * BV + tl.arange(0, BV)
        mv = offs_v < DV
        c_ptr = C + i_bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        v = tl.load(V + i_bh * s_v + offs_v, mask=mv, other=0.0).to(tl.float32)
        c = decay * tl.load(c_ptr, mask=mk[:, None] & mv[None, :], other=0.0) + (write * k)[:, None] * v[None, :]
        tl.store(c_ptr, c, mask=mk[:, None] & mv[None, :])
        h = tl.sum(q[:, None] * c, 0) * rden
        tl.store(H + i_bh * s_h + offs_v, h.to(H.dtype.element_ty), mask=mv)
    tl.store(N + i_bh * DK + offs_k, n, mask=mk)
    tl.store(M + i_bh, m_new)


def _rows(x: torch.Tensor, BH: int) -> torch.Tensor:
    """[B, NH, D] -> [B*NH, D] with a unit stride in D (a view whenever possible)."""
    x = x.reshape(BH, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def mlstm_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    *,
    eps: float = EPS,
    h_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """One token: q, k [B, NH, DK], v [B, NH, DV], i, f [B, NH]. Updates `state` (contiguous float32
    C, n, m) in place and returns h [B, NH, DV] in v's dtype (written into `h_out` when given)."""
    C, n, m = state
    B, NH, DK = q.shape
    DV = v.shape[-1]
    for name, t in zip("Cnm", state):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"mlstm_step: the triton backend updates the state in place; {name} must be contiguous float32")
    h = torch.empty_like(v) if h_out is None else h_out
    if h.shape != v.shape or not h.is_contiguous():
        raise ValueError(f"mlstm_step: h_out must be a contiguous tensor of shape {tuple(v.shape)}")
    BH = B * NH
    q, k, v = _rows(q, BH), _rows(k, BH), _rows(v, BH)
    BK = triton.next_power_of_2(DK)
    BV = max(16, min(triton.next_power_of_2(DV), 8192 // BK))  # a [BK, BV] fp32 tile of C per step
    _step_kernel[(BH,)](
        q, k, v, i.reshape(BH).contiguous(), f.reshape(BH).contiguous(), C, n, m, h,
        DK, DV, DK**-0.5, eps,
        q.stride(0), k.stride(0), v.stride(0), DV,
        BK=BK, BV=BV, num_warps=4 if BK * BV <= 4096 else 8,
    )
    return h, state
