"""Shared conventions of every mLSTM form: shapes, dtypes and the empty state.

Shapes: q, k [B, NH, S, DK]; v [B, NH, S, DV]; i, f [B, NH, S] (soft-capped gate pre-activations);
state (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH, 1]); reset [B, S] bool.
Math runs in float32 (float64 when the inputs are float64); h comes back in the dtype of v.
"""

import torch

EPS = 1e-6
"""Added to the normalizer's denominator in stabilized units (spec §2)."""

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the Triton kernels take."""
TRITON_MIN_HEAD_DIM = 16
"""The smallest head dim the Triton kernels take (tl.dot's smallest tile)."""

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def zero_state(B: int, NH: int, DK: int, DV: int, *, device=None, dtype=torch.float32) -> MLSTMState:
    """The empty state: C = 0, n = 0 and m = 0 (not -inf; m only moves where eps acts)."""
    return (
        torch.zeros(B, NH, DK, DV, device=device, dtype=dtype),
        torch.zeros(B, NH, DK, device=device, dtype=dtype),
        torch.zeros(B, NH, 1, device=device, dtype=dtype),
    )


def check_inputs(q, k, v, i, f, state=None, reset=None) -> None:
    """Raises a ValueError naming the offending argument when shapes or dtypes disagree."""
    for name, t in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mlstm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"mlstm: {name} must be a floating point tensor, got {t.dtype}")
    if q.ndim != 4:
        raise ValueError(f"mlstm: q must be [B, NH, S, DK], got shape {tuple(q.shape)}")
    B, NH, S, DK = q.shape
    if k.shape != q.shape:
        raise ValueError(f"mlstm: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.ndim != 4 or v.shape[:3] != (B, NH, S):
        raise ValueError(f"mlstm: v must be [B, NH, S, DV] = [{B}, {NH}, {S}, DV], got {tuple(v.shape)}")
    for name, g in (("i", i), ("f", f)):
        if g.shape != (B, NH, S):
            raise ValueError(f"mlstm: gate {name} must be [B, NH, S] = [{B}, {NH}, {S}], got {tuple(g.shape)}")
    if S == 0:
        raise ValueError("mlstm: the sequence is empty (S = 0); pass at least one position")
    DV = v.shape[-1]
    if state is not None:
        if not (isinstance(state, (tuple, list)) and len(state) == 3):
            raise ValueError("mlstm: state must be a tuple (C, n, m) or None")
        want = ((B, NH, DK, DV), (B, NH, DK), (B, NH, 1))
        for name, t, shape in zip("Cnm", state, want):
            if tuple(t.shape) != shape:
                raise ValueError(f"mlstm: state {name} must have shape {list(shape)}, got {list(t.shape)}")
    if reset is not None:
        if reset.shape != (B, S) or reset.dtype != torch.bool:
            raise ValueError(f"mlstm: reset must be a bool tensor [B, S] = [{B}, {S}], got {reset.dtype} {tuple(reset.shape)}")
