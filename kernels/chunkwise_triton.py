"""The Triton chunkwise mLSTM as an autograd-aware custom op, and the public function.
Kernels: chunkwise_triton_fwd.py (forward) and chunkwise_triton_bwd.py (backward). PyTorch twin:
chunkwise.py.

Gate vectors (logsigmoid, in-chunk cumulative sums, reset bookkeeping) are cheap O(S) PyTorch ops
around the op, so autograd carries their gradients back to f; the kernels take them as described
in chunkwise_triton_fwd.py. The two ops are opaque to torch.compile, each with a fake
implementation; the forward's registered backward is the backward op.
"""

import torch
import torch.nn.functional as F
import triton

from . import chunkwise_triton_bwd, chunkwise_triton_fwd
from .chunkwise import NEG_INF, in_chunk_cumsum
from .chunkwise_triton_fwd import CHUNK_SIZES, no_chunk_states, state_dtype
from .launch_settings import MAX_GRID_Y, current_overrides, interpreting, launch_config, launch_overrides
from .common import EPS, TRITON_DTYPES, TRITON_MIN_HEAD_DIM, MLSTMState, check_inputs, zero_state

mlstm_chunkwise_fwd = torch.library.custom_op("xlstm7b::mlstm_chunkwise_fwd", mutates_args=())(chunkwise_triton_fwd.forward)
mlstm_chunkwise_bwd = torch.library.custom_op("xlstm7b::mlstm_chunkwise_bwd", mutates_args=())(chunkwise_triton_bwd.backward)


@mlstm_chunkwise_fwd.register_fake
def _(q, k, v, b, ig, virt, cnt, C0, n0, m0, chunk, eps):
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    S_pad = b.shape[-1]
    NC = S_pad // chunk
    f32 = dict(dtype=torch.float32, device=q.device)
    if launch_config(q, v, chunk)["fused"]["enabled"]:
        states = no_chunk_states(q)
    else:
        states = q.new_empty(B * NH, NC, DK, DV, dtype=state_dtype(q)), q.new_empty(B * NH, NC + 1, DK, **f32)
    return (
        torch.empty_like(v), q.new_empty(B, NH, DK, DV, **f32), q.new_empty(B, NH, DK, **f32),
        q.new_empty(B, NH, 1, **f32), q.new_empty(B * NH, S_pad, **f32), q.new_empty(B * NH, S_pad, **f32),
        q.new_empty(B * NH, NC + 1, **f32), *states,
    )


@mlstm_chunkwise_bwd.register_fake
def _(q, k, v, b, ig, virt, cnt, C0, n0, m0, h, C, n, mt, den, MS, CS, NS, dh, dC, dn, dm, chunk, eps):
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(b), torch.empty_like(ig),
        torch.empty_like(b), torch.empty_like(C0), torch.empty_like(n0), torch.empty_like(m0),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, b, ig, virt, cnt, C0, n0, m0, chunk, eps = inputs
    h, C, n, m, mt, den, MS, CS, NS = output
    # The chunk-entry states outweigh q, k and v at the 7B head shape: the backward recomputes them
    # rather than hold every layer's from its forward to its backward, except under activation
    # checkpointing, where they are recomputed with the forward right before the backward anyway
    keep = CS.numel() > 0 and _checkpointed()
    ctx.keep_states = keep
    ctx.save_for_backward(q, k, v, b, ig, virt, cnt, C0, n0, m0, h, C, n, mt, den, MS, *((CS, NS) if keep else ()))
    ctx.chunk, ctx.eps = chunk, eps
    # the forward's launch settings for the backward: on CUDA autograd runs it on a device thread,
    # which a launch_overrides block around the forward does not reach
    ctx.overrides = current_overrides()


_CHECKPOINT_HOOKS = ("_checkpoint_hook", "_recomputation_hook")  # torch.utils.checkpoint's saved-tensor hooks


def _checkpointed() -> bool:
    """True in a forward whose backward follows a recomputation of it: inside a backward pass (the
    recomputation of a reentrant checkpoint) or under a non-reentrant checkpoint's saved-tensor hooks
    (torch.utils.checkpoint and torch.distributed's composable checkpoint), which drop what the first
    forward saves and keep what the recomputation saves, and need the two to save as many tensors
    (so under hooks, the hooks alone decide)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if hooks is not None:
        return hooks[0].__qualname__.split(".")[0] in _CHECKPOINT_HOOKS
    return torch._C._current_graph_task_id() != -1


def _backward(ctx, dh, dC, dn, dm, *_):
    q, k, v, b, ig, virt, cnt, C0, n0, m0, h, C, n, mt, den, MS, *states = ctx.saved_tensors
    CS, NS = states if ctx.keep_states else (None, None)
    with launch_overrides(**ctx.overrides):
        dq, dk, dv, db, dig, dvirt, dC0, dn0, dm0 = torch.ops.xlstm7b.mlstm_chunkwise_bwd(
            q, k, v, b, ig, virt, cnt, C0, n0, m0, h, C, n, mt, den, MS, CS, NS,
            _or_zeros(dh, h), _or_zeros(dC, C), _or_zeros(dn, n), _or_zeros(dm, m0),
            ctx.chunk, ctx.eps,
        )
    return dq, dk, dv, db, dig, dvirt if virt is not None else None, None, dC0, dn0, dm0, None, None


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.contiguous()


mlstm_chunkwise_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


MAX_INT32 = 2**31 - 1
"""The largest offset the kernels take within q, k, v and h (their chunk states are addressed in
int64: see chunkwise_triton_fwd.py)."""


def chunk_gates(i: torch.Tensor, f: torch.Tensor, reset: torch.Tensor | None, L: int):
    """The kernels' gate vectors (see module docstring), padded to a multiple of L. Differentiable.
    The kernels index them as contiguous rows: i and f are often views of a [B, S, NH] projection, and
    with nothing to pad (S a multiple of L) the pad and reshape below would hand such a view on."""
    B, NH, S = i.shape
    NC = -(-S // L)
    pad = NC * L - S
    i, f = i.float().contiguous(), f.float().contiguous()
    lf = F.pad(F.logsigmoid(f), (0, pad)).view(B, NH, NC, L)
    ig = F.pad(i, (0, pad), value=NEG_INF).reshape(B * NH, NC * L)
    r = None if reset is None else F.pad(reset, (0, pad)).view(B, NC, L)
    b, count = in_chunk_cumsum(lf, r)
    if count is None:
        return b.reshape(B * NH, NC * L), ig, None, None
    virt = b.masked_fill(count == 0, NEG_INF)
    return b.reshape(B * NH, NC * L), ig, virt.reshape(B * NH, NC * L), count.to(torch.int32).view(B, NC * L)


def triton_chunk_size(chunk_size: int, S: int, dtype: torch.dtype) -> int:
    """A power of two in 16..128 (see CHUNK_SIZES); short sequences use a smaller chunk, and so do
    float32 inputs on a GPU (at most 32: larger [L, L] tiles, split in two for tf32x3, spill
    registers). The interpreter runs any chunk in float32, so CPU tests cover the code of chunk 128."""
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(
            f"mlstm: the triton backend needs chunk_size in {CHUNK_SIZES}, got {chunk_size} "
            "(choose one of those, or backend='torch' for any chunk size)"
        )
    if dtype == torch.float32 and not interpreting():
        chunk_size = min(chunk_size, 32)
    return min(chunk_size, max(16, triton.next_power_of_2(S)))


def mlstm_chunkwise_triton(
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
    """The mLSTM over a sequence with the Triton chunkwise kernels; same contract as mlstm_chunkwise."""
    check_inputs(q, k, v, i, f, state, reset)
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"mlstm: the triton backend takes fp32, fp16 or bf16 inputs, got {q.dtype}")
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    if min(DK, DV) < TRITON_MIN_HEAD_DIM:
        raise ValueError(f"mlstm: the triton backend needs head dims >= {TRITON_MIN_HEAD_DIM}, got DK {DK}, DV {DV}")
    if B * NH > MAX_GRID_Y:  # every launch puts batch x head on a grid axis CUDA caps
        raise ValueError(f"mlstm: the triton backend takes at most {MAX_GRID_Y:,} sequences x heads per call, got "
                         f"{B:,} x {NH} = {B * NH:,}: split the batch")
    if B * NH * S * max(DK, DV) > MAX_INT32:  # a head's offset into q, k, v, h is int32 in the kernels
        raise ValueError(f"mlstm: the triton backend takes q, k, v of at most {MAX_INT32:,} elements per call, got "
                         f"{B:,} x {NH} x {S:,} x {max(DK, DV)}: split the batch (or the sequence, carrying the state)")
    L = triton_chunk_size(chunk_size, S, q.dtype)
    b, ig, virt, cnt = chunk_gates(i, f, reset, L)
    if state is None:
        state = zero_state(B, NH, DK, DV, device=q.device)
    C0, n0, m0 = (t.float().contiguous() for t in state)
    k, v = k.to(q.dtype).contiguous(), v.contiguous()
    h, C, n, m, *_ = mlstm_chunkwise_fwd(q.contiguous(), k, v, b, ig, virt, cnt, C0, n0, m0, L, eps)
    return h, (C, n, m)

