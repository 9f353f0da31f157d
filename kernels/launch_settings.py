"""The launch settings of the Triton chunkwise kernels (chunkwise_triton_fwd.py,
chunkwise_triton_bwd.py): tiles, warps, pipeline stages, grid order and the one-pass forward's
switch, per launch, and the decoding step's one-launch switch (step_triton.py); `launch_overrides`
replaces them within a block."""

import contextlib
import contextvars
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_config(q: torch.Tensor, v: torch.Tensor, L: int) -> dict[str, dict]:
    """Meta-parameters of every chunkwise kernel, by kernel: the dtype tl.dot sees (the input's
    half dtype, or fp32 as three tf32 products; fp32 IEEE in the interpreter, whose bf16 dot is
    broken; always accumulating in fp32), tile sizes and warps.

    Chosen by compiling for sm_90 and sm_80 (tests/test_kernels_compile.py,
    benchmarks/kernel_resources.py): no register spills at the 7B and 1.3B head shapes, shared
    memory within an A100's per-block limit, and 64-row state tiles so that the state products
    lower to Hopper's wgmma (its M is 64 per warpgroup). Inside a `launch_overrides` block its
    settings replace these.
    """
    cfg = default_config(q.dtype, q.shape[-1], v.shape[-1], L, interpreting())
    for kernel, params in _OVERRIDES.get().items():
        if kernel in cfg:  # the step's switch is read by step_one_launch
            cfg[kernel].update(params)
    # capped at the chunk, which short sequences shorten (chunkwise_triton.triton_chunk_size): a power
    # of two up to the chunk divides it
    for kernel in ("output", "scores"):
        cfg[kernel]["RB"] = min(cfg[kernel]["RB"], L)
    for kernel in INTRA_LAUNCHES:
        cfg[kernel]["LB"] = min(cfg[kernel]["LB"], L)
    return cfg


def default_config(dtype: torch.dtype, DK: int, DV: int, L: int, interpreter: bool = False) -> dict[str, dict]:
    """launch_config's settings outside any launch_overrides block, for inputs of `dtype` and these
    head dims and chunk, on a GPU or (`interpreter`) in Triton's interpreter."""
    if interpreter:
        dt, prec = tl.float32, "ieee"
    elif dtype == torch.float32:
        dt, prec = tl.float32, "tf32x3"  # tensor cores, three tf32 products: float32 accuracy
    else:
        dt, prec = (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"
    # Operand tiles 64 wide in half precision and 32 in fp32 (split in two for tf32x3, its operands
    # take four times the space), halved next to large [L, L] score tiles; 8 warps from L 64 (32 in
    # fp32), where an [L, L] fp32 tile is 16 registers a thread (L 128: 64).
    half = dt != tl.float32
    wide = 64 if half else 32
    t = wide // 2 if L >= 2 * wide else wide
    BK, BV = min(triton.next_power_of_2(DK), wide), min(triton.next_power_of_2(DV), wide)
    tk, tv = min(BK, t), min(BV, t)
    warps = 4 if L < (64 if half else 32) else 8
    common = dict(L=L, DT=dt, PREC=prec, num_warps=warps)
    return {
        # off until measured on a GPU (benchmarks/kernels.py --tune): one pass with the state on chip
        "fused": dict(common, enabled=0, BK=triton.next_power_of_2(DK), BV=16, num_warps=8, num_stages=1),
        # 64-row state tiles in half precision: the state products then lower to wgmma
        "states": dict(common, BK=BK if half else tk, BV=tv, local_max=0, segments=1),
        # LB = L: the chunk's columns in one block (chunkwise_triton_intra.py takes them in LB < L)
        "output": dict(common, RB=min(L, wide), LB=L, BK=tk, BV=tv, grid_order="chunks"),
        "scores": dict(common, RB=min(L, wide), LB=L, BK=tk, BV=tv, grid_order="chunks"),
        "dqk": dict(common, LB=L, BK=tk if L < 64 else min(tk, 32), BV=tv, grid_order="chunks"),
        "dv": dict(common, LB=L, BK=tk, BV=BV, grid_order="chunks"),
    }


TUNABLE = {
    "fused": ("enabled", "BV", "num_warps", "num_stages"),
    "states": ("BK", "BV", "num_warps", "num_stages", "local_max", "segments"),
    "output": ("RB", "LB", "BK", "BV", "num_warps", "num_stages", "grid_order"),
    "scores": ("RB", "LB", "BK", "BV", "num_warps", "num_stages", "grid_order"),
    "dqk": ("LB", "BK", "BV", "num_warps", "num_stages", "grid_order"),
    "dv": ("LB", "BK", "BV", "num_warps", "num_stages", "grid_order"),
    "step": ("one_launch",),
}
"""The meta-parameters of each launch_config entry that `launch_overrides` may set. "fused" is the
forward in one pass (_fused_fwd_kernel; `enabled=1` selects it over the states and output passes);
"states" the forward's states pass (which the backward reruns to recompute the chunk-entry states)
and the backward's own states pass; "output" the forward's output pass; "scores", "dqk" and "dv"
the backward's other passes. "grid_order" (see GRID_ORDERS) is the launch order of the programs
that share a chunk's operand tiles; "local_max" 1 has the chunk-entry states pass (forward, and its
rerun in the backward) take each chunk's product at the chunk's own stabilizer, off the carried
one's sequential chain (_states_fwd_kernel); "segments" P > 1 (a power of two up to
MAX_SEGMENTS, capped at the number of chunks) splits that pass, and the backward's states pass, over
P segments of the sequence (chunkwise_triton_split.py, chunkwise_triton_split_bwd.py: per-segment
states in parallel, a combine, a second walk of each segment), a chain of about 2 NC / P + P chunk
steps in place of NC, for few heads at long S.
"step" is the decoding step (step_triton.py):
`one_launch=1` has the last DV tile of each head write its n and m, counted on an atomic counter,
in place of a second launch."""

MAX_GRID_Y = 65535
"""The largest grid size CUDA takes on a launch's second and third axes."""

MAX_SEGMENTS = 64
"""The most segments the split states pass takes ("states" segments): its combine walks them in order."""

GRID_ORDERS = ("chunks", "tiles")
"""Launch orders of the per-chunk launches (output, scores, dqk, dv): "chunks" puts the chunk index on
the fastest grid axis, so the head-dim tiles (or row blocks) of one chunk, which read the same q, k, v
and dh rows, run a whole head's chunks apart; "tiles" puts the tile index fastest, so they run
together and the rows they share are read from HBM about once (benchmarks/kernel_resources.py models
both against the L2's size)."""

GRID_LAUNCHES = tuple(kernel for kernel, params in TUNABLE.items() if "grid_order" in params)
"""The launches whose programs share a chunk's operand tiles, which take a grid_order."""

INTRA_LAUNCHES = tuple(kernel for kernel, params in TUNABLE.items() if "LB" in params)
"""The launches that hold score tiles of the chunk's columns, which take an LB: the columns (and in
the backward's dq, dk and dv the rows) in sub-blocks of LB, a power of two >= 16 (capped at the
chunk, so it divides it); LB below the chunk runs the kernels of chunkwise_triton_intra.py and
chunkwise_triton_intra_bwd.py."""

_OVERRIDES: contextvars.ContextVar[dict[str, dict[str, int]]] = contextvars.ContextVar("launch_overrides", default={})


def _allowed(name: str, value) -> bool:
    if name == "grid_order":
        return value in GRID_ORDERS
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    if name == "num_warps":
        return value in (1, 2, 4, 8)
    if name == "num_stages":
        return 1 <= value <= 6
    if name in ("enabled", "local_max", "one_launch"):
        return value in (0, 1)
    if name == "segments":
        return 1 <= value <= MAX_SEGMENTS and value & (value - 1) == 0
    return value >= 16 and value & (value - 1) == 0  # a tile: tl.dot takes powers of two >= 16


def current_overrides() -> dict[str, dict[str, int]]:
    """The settings of the innermost `launch_overrides` block (empty outside any): for carrying them
    to where a block does not reach, as autograd's device threads, which run the backward."""
    return {kernel: dict(params) for kernel, params in _OVERRIDES.get().items()}


@contextlib.contextmanager
def launch_overrides(**kernels: dict[str, int]):
    """Within the block the chunkwise kernels (and the decoding step) launch with these settings in place of
    launch_config's, e.g. `with launch_overrides(states=dict(BV=32, num_warps=4)):`, to measure
    other tiles, warps and pipeline stages (benchmarks/kernels.py --tune). Tiles are powers of two
    >= 16 (the launches mask DK and DV tails; RB and LB are capped at the chunk), warps 1, 2, 4 or 8, stages
    1 to 6, enabled, local_max and one_launch 0 or 1, segments a power of two 1 to 64, grid_order one of GRID_ORDERS. Results change by summation order and rounding only. Nested blocks add to
    the outer one's settings. A backward runs with its forward's settings (see chunkwise_triton)."""
    for kernel, params in kernels.items():
        if kernel not in TUNABLE:
            raise ValueError(f"launch_overrides: unknown kernel {kernel!r}; choose from {', '.join(TUNABLE)}")
        for name, value in params.items():
            if name not in TUNABLE[kernel]:
                raise ValueError(f"launch_overrides: {kernel} takes {', '.join(TUNABLE[kernel])}, not {name!r}")
            if not _allowed(name, value):
                raise ValueError(f"launch_overrides: {kernel} {name}={value!r} is not allowed (tiles: powers of two "
                                 ">= 16; num_warps: 1, 2, 4 or 8; num_stages: 1 to 6; enabled, one_launch, local_max: 0 or 1; "
                                 f"segments: a power of two 1 to {MAX_SEGMENTS}; "
                                 f"grid_order: one of {', '.join(map(repr, GRID_ORDERS))})")
    merged = {k: dict(v) for k, v in _OVERRIDES.get().items()}
    for kernel, params in kernels.items():
        merged.setdefault(kernel, {}).update(params)
    token = _OVERRIDES.set(merged)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


@torch.compiler.assume_constant_result
def step_one_launch() -> bool:
    """Whether the decoding step runs as one launch (`launch_overrides(step=dict(one_launch=1))`);
    off by default. Under torch.compile it is a constant of the trace: a compiled step keeps the
    setting in force when it was compiled (torch._dynamo.reset() to compile it again)."""
    return bool(_OVERRIDES.get().get("step", {}).get("one_launch", 0))


@triton.jit
def program_ids(TILES_FIRST: tl.constexpr):
    """(outer index, tile index) of this program of a grid_meta grid: the grid is (outer, tiles,
    batch*head), the outer index (a chunk, or a chunk's row block) on the fastest axis (grid order
    "chunks"), or (tiles, outer, batch*head) with the head-dim tile's index fastest (order "tiles":
    the programs that read the same chunk's operands run next to each other, while those operands
    are still in L2)."""
    if TILES_FIRST:
        i_o, i_t = tl.program_id(1), tl.program_id(0)
    else:
        i_o, i_t = tl.program_id(0), tl.program_id(1)
    return i_o, i_t


def grid_meta(cfg: dict, outer: int, tiles: int, BH: int) -> tuple[tuple[int, int, int], dict]:
    """The grid of a per-chunk launch with `outer` chunks (or chunk row blocks) and `tiles`
    head-dim tiles per head, in cfg's grid_order (see program_ids), and the
    kernel's meta-parameters. The order "tiles" puts `outer` on the grid's second axis, which CUDA
    caps at 65,535."""
    meta = dict(cfg)
    if meta.pop("grid_order") == "chunks":
        return (outer, tiles, BH), dict(meta, TILES_FIRST=False)
    if outer > MAX_GRID_Y:
        raise ValueError(f"mlstm: grid_order 'tiles' takes at most {MAX_GRID_Y:,} chunks (or chunk row blocks) per "
                         f"sequence, got {outer:,}: use a longer chunk_size or grid_order 'chunks'")
    return (tiles, outer, BH), dict(meta, TILES_FIRST=True)
