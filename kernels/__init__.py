"""mLSTM cell kernels: PyTorch reference forms and fused Triton kernels behind one dispatch function.

    h, state = mlstm(q, k, v, i, f, state=None, backend="auto", chunk_size=64, reset=None)
    h, state = mlstm_step(q, k, v, i, f, state)
    h = mlstm_step_(q, k, v, i, f, state)        # the same step, writing the new state into `state`

This package depends on torch (and triton for the GPU kernels) only; it knows nothing of the model.
Triton is imported lazily, on the first call that needs it, so the package imports without it.
"""

import importlib.util
import os

import torch

from .chunkwise import mlstm_advance, mlstm_chunkwise
from .common import EPS, TRITON_DTYPES, TRITON_MIN_HEAD_DIM, MLSTMState, check_inputs, zero_state
from .parallel import mlstm_parallel
from .recurrent import mlstm_recurrent, mlstm_step_torch, mlstm_step_torch_

BACKENDS = ("auto", "torch", "triton")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device, q: torch.Tensor | None = None, v: torch.Tensor | None = None) -> str:
    """'auto' -> the fastest backend available for `device` (and, given, for inputs like q and v):
    triton on CUDA where its kernels take them (float32, float16 or bfloat16, head dims >= 16), torch
    elsewhere; a tiny model on a GPU runs, on the PyTorch forms."""
    if backend not in BACKENDS:
        raise ValueError(f"mlstm: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        v = q if v is None else v
        takes = q is None or (q.dtype in TRITON_DTYPES and min(q.shape[-1], v.shape[-1]) >= TRITON_MIN_HEAD_DIM)
        return "triton" if device.type == "cuda" and HAS_TRITON and takes else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("mlstm: backend='triton' needs the triton package; use backend='torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"mlstm: backend='triton' needs CUDA tensors (got {device.type}); use backend='torch', "
                "move the tensors to CUDA, or set TRITON_INTERPRET=1 before importing to run Triton's CPU interpreter"
            )
    return backend


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    *,
    backend: str = "auto",
    chunk_size: int = 64,
    reset: torch.Tensor | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, MLSTMState]:
    """The mLSTM cell over a sequence, from `state` (None = empty), returning h and the final state.

    q, k [B, NH, S, DK]; v [B, NH, S, DV]; i, f [B, NH, S] soft-capped gate pre-activations;
    state (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH, 1]); reset: bool [B, S], True where a new
    document starts (the state is zeroed right before that position). Any S >= 1, any chunk_size.
    Padding that must not touch the state: i = -inf and f = +inf at those positions.
    The triton backend takes chunk_size in 16, 32, 64, 128, 256 and head dims >= 16.
    """
    if resolve_backend(backend, q.device, q, v) == "triton":
        from .chunkwise_triton import mlstm_chunkwise_triton

        return mlstm_chunkwise_triton(q, k, v, i, f, state, reset=reset, chunk_size=chunk_size, eps=eps)
    return mlstm_chunkwise(q, k, v, i, f, state, reset=reset, chunk_size=chunk_size, eps=eps)


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    *,
    backend: str = "auto",
    eps: float = EPS,
) -> tuple[torch.Tensor, MLSTMState]:
    """One token: q, k [B, NH, DK], v [B, NH, DV], i, f [B, NH]; returns h [B, NH, DV] and the new
    state. `state` is left untouched (see `mlstm_step_` for the in-place form decoding uses)."""
    if q.ndim != 3:
        raise ValueError(f"mlstm_step: q must be [B, NH, DK] (one token), got shape {tuple(q.shape)}")
    B, NH, DK = q.shape
    if state is None:
        state = zero_state(B, NH, DK, v.shape[-1], device=q.device)
    check_inputs(q[:, :, None], k[:, :, None], v[:, :, None], i[..., None], f[..., None], state)
    if resolve_backend(backend, q.device, q, v) == "triton":
        fresh = tuple(t.to(torch.float32, copy=True, memory_format=torch.contiguous_format) for t in state)
        return mlstm_step_(q, k, v, i, f, fresh, backend="triton", eps=eps), fresh
    h, new = mlstm_step_torch(q, k, v, i, f, state, eps=eps)
    return h.to(v.dtype), new


def mlstm_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    *,
    backend: str = "auto",
    eps: float = EPS,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mlstm_step` writing the new state into `state` (contiguous float32 C, n, m); returns h.
    No allocation besides h, no host synchronization and no gradient through the state, so a
    decoding step can be captured in a CUDA graph or compiled. Shapes are the caller's promise: it
    runs once per token and layer, so it validates nothing. slots (int64 [B], optional): token b
    steps row slots[b] of a state with any number of rows (a serving pool); no other row is touched.
    The Triton step is two launches, or one inside `launch_overrides(step=dict(one_launch=1))`
    (launch_settings.py; opt-in until a GPU measures it, see step_triton.py)."""
    if resolve_backend(backend, q.device, q, v) == "triton":
        from .step_triton import mlstm_step_triton

        return mlstm_step_triton(q, k, v, i, f, state, eps=eps, slots=slots)[0]
    return mlstm_step_torch_(q, k, v, i, f, state, eps=eps, slots=slots).to(v.dtype)


__all__ = [
    "EPS",
    "MLSTMState",
    "mlstm",
    "mlstm_advance",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_recurrent",
    "mlstm_step",
    "mlstm_step_",
    "mlstm_step_torch",
    "zero_state",
]
