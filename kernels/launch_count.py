"""The kernels one mLSTM layer launches through the Triton chunkwise path, counted on meta tensors
(no GPU): Triton launches recorded for sm_90 by aot.record_launches, and the aten operators around
them that launch a kernel. `count_launches` counts a layer's forward and backward, `count_step_launches`
the Triton launches of a training step, with and without activation checkpointing.

`python -m xlstm7b.kernels.launch_count` reads a JSON list of aot.Case fields on stdin and writes
both counts of each case on stdout; it needs the real compiler's launchers (TRITON_INTERPRET=0).
"""

import argparse
import contextlib
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from triton.backends.compiler import GPUTarget

from .aot import DTYPES, VARIANTS, Case, record_launches
from .chunkwise_triton import chunk_gates, mlstm_chunkwise_triton, triton_chunk_size
from .chunkwise_triton_bwd import backward
from .chunkwise_triton_fwd import forward
from .launch_settings import launch_overrides


_NO_KERNEL = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted", "detach"}


class _CountOps(TorchDispatchMode):
    """Counts the aten operators that launch a GPU kernel (all but views and allocations)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_launches(case: Case, B: int = 1, NH: int = 8, S: int = 4096) -> dict[str, dict]:
    """The kernels one mLSTM layer launches on a GPU through the Triton chunkwise path, forward
    (the gate vectors, then the forward op) and backward (the backward op, then autograd through the
    gate vectors to i and f), counted on meta tensors: Triton launches (recorded, not run, for sm_90)
    and aten operators that launch a kernel. Returns {phase: {"triton": n, "torch": n, "ops": {name: n}}}."""
    meta = dict(device="meta")
    dt = DTYPES[case.dtype]
    q, k = (torch.empty(B, NH, S, case.DK, dtype=dt, **meta) for _ in range(2))
    v = torch.empty(B, NH, S, case.DV, dtype=dt, **meta)
    i, f = (torch.empty(B, NH, S, requires_grad=True, **meta) for _ in range(2))
    reset = torch.empty(B, S, dtype=torch.bool, **meta) if case.reset else None
    state = [torch.empty(B, NH, case.DK, case.DV, **meta), torch.empty(B, NH, case.DK, **meta), torch.empty(B, NH, 1, **meta)]
    L = triton_chunk_size(case.L, S, dt)
    out = {}
    with record_launches(GPUTarget("cuda", 90, 32)) as fwd_launches, _CountOps() as fwd_ops:
        b, ig, virt, cnt = chunk_gates(i, f, reset, L)
        h, C, n, m, mt, den, MS, *_ = forward(q, k, v, b.detach(), ig.detach(), virt if virt is None else virt.detach(), cnt,
                                              *state, L, 1e-6)
    out["forward"] = dict(triton=len(fwd_launches), torch=sum(fwd_ops.ops.values()), ops=fwd_ops.ops)
    grads = [torch.empty_like(x) for x in (h, C, n, m)]
    with record_launches(GPUTarget("cuda", 90, 32)) as bwd_launches, _CountOps() as bwd_ops:
        _, _, _, db, dig, dvirt, *_ = backward(q, k, v, b, ig, virt, cnt, *state, h, C, n, mt, den, MS, None, None, *grads, L, 1e-6)
        gates = [x for x in (b, ig, virt) if x is not None]
        torch.autograd.grad(gates, (i, f), [db, dig, dvirt][:len(gates)])
    out["backward"] = dict(triton=len(bwd_launches), torch=sum(bwd_ops.ops.values()), ops=bwd_ops.ops)
    return out


class _RunOpBodies(TorchDispatchMode):
    """Runs the chunkwise custom ops' bodies on meta tensors, where dispatch would take their fakes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = {torch.ops.xlstm7b.mlstm_chunkwise_fwd.default: forward, torch.ops.xlstm7b.mlstm_chunkwise_bwd.default: backward}
        return body.get(func, func)(*args, **(kwargs or {}))


def count_step_launches(case: Case, recompute: bool, B: int = 1, NH: int = 8, S: int = 4096) -> dict[str, int]:
    """The Triton launches, by kernel, of one training step (forward and backward) through one
    layer's mLSTM (mlstm_chunkwise_triton, from q, k, v, i, f and an initial state), on meta tensors;
    with `recompute`, under activation checkpointing (torch.utils.checkpoint without reentrancy, as
    train.parallel's per-block recomputation): the forward runs again in the backward pass."""
    meta = dict(device="meta", requires_grad=True)
    dt = DTYPES[case.dtype]
    q, k = (torch.empty(B, NH, S, case.DK, dtype=dt, **meta) for _ in range(2))
    v = torch.empty(B, NH, S, case.DV, dtype=dt, **meta)
    i, f = (torch.empty(B, NH, S, **meta) for _ in range(2))
    state = (torch.empty(B, NH, case.DK, case.DV, **meta), torch.empty(B, NH, case.DK, **meta), torch.empty(B, NH, 1, **meta))
    reset = torch.empty(B, S, dtype=torch.bool, device="meta") if case.reset else None

    def layer(*xs):
        h, (C, n, m) = mlstm_chunkwise_triton(*xs[:5], xs[5:], reset=reset, chunk_size=case.L)
        return h.float().sum() + C.sum() + n.sum() + m.sum()

    with record_launches(GPUTarget("cuda", 90, 32)) as launches, launch_overrides(**VARIANTS[case.variant]), _RunOpBodies():
        loss = checkpoint(layer, q, k, v, i, f, *state, use_reentrant=False) if recompute else layer(q, k, v, i, f, *state)
        loss.backward()
    counts: dict[str, int] = {}
    for launch in launches:
        counts[launch.name] = counts.get(launch.name, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> None:
    """Reads a JSON list of cases (aot.Case fields) on stdin; writes, for each, count_launches with
    the Triton launches of a training step without and with recomputation under "step"."""
    argparse.ArgumentParser(prog="python -m xlstm7b.kernels.launch_count", description=main.__doc__).parse_args(argv)
    spec = json.load(sys.stdin)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        out = [dict(count_launches(c), step={name: count_step_launches(c, recompute) for name, recompute in
                                             (("plain", False), ("recompute", True))})
               for c in (Case(**c) for c in spec)]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
