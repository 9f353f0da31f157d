"""The chunkwise kernels' variants against the float64 oracle, beyond the cases every variant runs in
test_kernels_triton.py: the launches tiled inside the chunk (launch setting LB,
chunkwise_triton_intra*.py), the states passes split over segments of the sequence (states
segments, chunkwise_triton_split*.py), the states pass at each chunk's own stabilizer (local_max),
and the chunk-end max taken from a reset's zeroed state in every form. Memory the launchers allocate
holds NaN until a launch writes it (nan_for_uninitialised_memory): an entry read but never written
fails the check.

Without CUDA the kernels run in Triton's CPU interpreter (fp32, tiny shapes); tests marked gpu add
half precision at the 7B head shape.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import rel_err  # noqa: E402
from kernel_oracle import (DEVICE, TOL, VARIANTS, case_id, check_against_oracle, forward_backward, intra,  # noqa: E402
                           make_inputs, nan_for_uninitialised_memory, sparse_resets)

from xlstm7b.kernels import aot, chunkwise_triton_bwd, chunkwise_triton_fwd  # noqa: E402
from xlstm7b.kernels.chunkwise_triton import mlstm_chunkwise_triton  # noqa: E402
from xlstm7b.kernels.chunkwise_triton_split import segment_plan  # noqa: E402
from xlstm7b.kernels.launch_settings import launch_overrides  # noqa: E402

nan_in_empty_memory = pytest.fixture(autouse=True)(nan_for_uninitialised_memory)


@pytest.mark.parametrize("variant, chunk, at", [("two-pass", 16, 36), ("tiles", 16, 36), ("local-max", 16, 36), ("intra", 32, 20), ("split", 16, 36)])
def test_chunk_end_max_from_the_zeroed_state(variant, chunk, at):
    """A reset followed by input gates at -15 to the end of the chunk: the zeroed state (m = 0)
    outweighs every token, so the chunk-end m took its max from the zeroed state and its gradient
    flows through that path only (to virt, then to f). Tiled in sub-blocks of 16 ("intra"), the
    reset is in the chunk's second one."""
    xs, _ = make_inputs(1, 2, 40, 16, 16, init=True)
    xs[3][..., at:] = -15.0
    rs = torch.zeros(1, 40, dtype=torch.bool, device=DEVICE)
    rs[:, at] = True
    with launch_overrides(**(intra(chunk // 2) if variant == "intra" else VARIANTS[variant])):
        check_against_oracle(xs, rs, chunk)


# B, NH, S, DK, DV, chunk, initial state, reset mask, gates: the kernels tiled in two sub-blocks
INTRA_CASES = [
    (2, 2, 45, 16, 16, 32, True, True, "random"),
    (1, 2, 40, 16, 16, 32, True, True, "limits"),
    (1, 1, 70, 24, 40, 64, True, True, "random"),  # a ragged S, head dims that are not powers of two
]


@pytest.mark.parametrize("case", INTRA_CASES, ids=case_id)
def test_intra_chunk_tiling_matches_oracle(case):
    """The launches tiled in sub-blocks of half the chunk (the code chunk128-intra runs at chunk 128,
    at chunks the interpreter runs in seconds): values, final states and every gradient, the initial
    state's included, with resets in either sub-block of a chunk."""
    B, NH, S, DK, DV, L, init, reset, gates = case
    xs, rs = make_inputs(B, NH, S, DK, DV, init=init, reset=reset, gates=gates)
    rs[0, L // 2 + 3] = True  # in the first chunk's second sub-block
    with launch_overrides(**intra(L // 2)):
        check_against_oracle(xs, rs, L, state_grads=gates != "limits")


def test_intra_chunk_tiling_in_four_sub_blocks():
    """Chunk 64 in sub-blocks of 16: the dq loop of a middle sub-block and its dk, dv loops each run
    several blocks. Forget gates near 1 and a first chunk without resets let the terms between
    distant sub-blocks weigh in (at random gates with a reset every ten tokens they fall below the
    tolerance); the second chunk has a reset in each of its middle sub-blocks."""
    xs, _ = make_inputs(1, 1, 128, 16, 16, init=True)
    xs[4] = xs[4] + 6.0
    with launch_overrides(**intra(16)):
        check_against_oracle(xs, sparse_resets(1, 128, 64 + 21, 64 + 40), 64)


def test_intra_chunk_tiling_mixed_with_untiled_launches():
    """Each launch takes its own LB: the untiled dq, dk read the scores' tiled [L, L] tiles (their
    blocks above the diagonal stored as zeros), an untiled forward meets a tiled backward."""
    xs, rs = make_inputs(1, 2, 45, 16, 16, init=True, reset=True)
    with launch_overrides(scores=dict(LB=16), dv=dict(LB=16)):
        check_against_oracle(xs, rs, 32)


def test_local_max_with_a_chunk_no_token_reaches():
    """Input gates of -inf over a whole chunk (as padding has): the chunk's own max is -inf, its
    product zero; the states pass at the chunk's own stabilizer gives what the default gives."""
    xs, _ = make_inputs(1, 2, 48, 16, 16, init=True)
    xs[3][..., 16:32] = float("-inf")
    default = mlstm_chunkwise_triton(*xs[:5], tuple(xs[5:]), chunk_size=16)
    with launch_overrides(**VARIANTS["local-max"]):
        local = mlstm_chunkwise_triton(*xs[:5], tuple(xs[5:]), chunk_size=16)
    for a, b in zip((default[0], *default[1]), (local[0], *local[1])):
        assert torch.isfinite(b).all() and rel_err(b, a) < 1e-6


# (B, NH, S, DK, DV, chunk, initial state, reset positions, gates), the launch_overrides (states segments at least)
SPLIT_CASES = [
    ((1, 2, 150, 16, 16, 16, True, (37, 100), "random"), dict(states=dict(segments=4))),  # 10 chunks: segments of 3, 3, 3 and 1
    ((2, 1, 150, 16, 32, 16, True, (), "random"), dict(states=dict(segments=8, local_max=1))),  # 5 segments of 2 chunks, each chunk at its own max
    ((1, 1, 70, 24, 40, 32, False, (50,), "random"), dict(states=dict(segments=64))),  # more segments than chunks: 3 of one
    ((1, 2, 64, 16, 16, 16, True, (9,), "limits"), dict(states=dict(segments=2))),  # 2 segments of 2 chunks
    # 3 DK tiles (the last masked) by 3 DV tiles: the first DV tile's programs own n, the (0, 0) ones m
    ((1, 1, 100, 40, 48, 16, True, (40,), "random"), dict(states=dict(segments=4, BK=16, BV=16))),
    ((1, 1, 150, 16, 16, 16, True, (48, 95), "random"), dict(states=dict(segments=4))),  # resets at segment 1's first and last tokens
    # the one-pass forward stores no states: its backward recomputes them split, at the one-pass forward's m
    ((1, 2, 100, 16, 16, 16, True, (30,), "random"), dict(states=dict(segments=4), fused=dict(enabled=1))),
]


def split_id(case: tuple, overrides: dict) -> str:
    settings = "-".join(f"{k}{v}" for launch in overrides.values() for k, v in launch.items())
    return f"{case_id((*case[:7], bool(case[7]), case[8]))}-{settings}".replace("enabled1", "fused")


@pytest.mark.parametrize("case, overrides", SPLIT_CASES, ids=[split_id(*c) for c in SPLIT_CASES])
def test_split_states_pass_matches_oracle(case, overrides, monkeypatch):
    """The states pass split over segments (chunkwise_triton_split.py), with forget gates near 1 so
    that every segment's state reaches the next: values, final states and every gradient, the final
    m's and the initial state's included, against the float64 oracle; the split launches ran for the
    forward's states (but for the one-pass forward, which computes none), their rerun in the backward
    and the backward's states pass."""
    B, NH, S, DK, DV, L, init, resets, gates = case
    xs, _ = make_inputs(B, NH, S, DK, DV, init=init, gates=gates)
    if gates == "random":
        xs[4] = xs[4] + 6.0
    runs = []
    original = chunkwise_triton_fwd.split_chunk_states
    monkeypatch.setattr(chunkwise_triton_fwd, "split_chunk_states", lambda *a, **kw: runs.append(kw["P"]) or original(*a, **kw))
    grads = chunkwise_triton_bwd.split_states_grad
    monkeypatch.setattr(chunkwise_triton_bwd, "split_states_grad", lambda *a, **kw: runs.append(-kw["P"]) or grads(*a, **kw))
    with launch_overrides(**overrides):
        check_against_oracle(xs, sparse_resets(B, S, *resets), L, state_grads=gates != "limits")
    P = segment_plan(-(-S // L), overrides["states"]["segments"], B * NH)[0]
    assert sorted(runs) == [-P] + [P] * (1 if "fused" in overrides else 2)


def test_split_with_segments_no_token_reaches():
    """Input gates of -inf over a whole segment (the first and the last of three): its local state
    stays empty (m = -inf) without a NaN, and the split pass gives what the single pass gives, in
    values and gradients."""
    xs, _ = make_inputs(1, 2, 96, 16, 16, init=True)
    xs[4] = xs[4] + 6.0
    xs[3][..., :32] = float("-inf")
    xs[3][..., 64:] = float("-inf")
    single, single_grads = forward_backward(mlstm_chunkwise_triton, xs, None, chunk_size=16)
    with launch_overrides(states=dict(segments=4)):
        split, split_grads = forward_backward(mlstm_chunkwise_triton, xs, None, chunk_size=16)
    for a, b in zip((*single, *single_grads), (*split, *split_grads)):
        assert torch.isfinite(b).all() and rel_err(b, a) < 1e-5


def test_split_routes_the_carried_max_at_segment_boundaries():
    """Input gates of -12 after the first chunk and forget gates near 1: the carried state attains
    every chunk-end max, and the final m's gradient flows back through every chunk to dm0 and f. At
    a segment boundary the combine's m rounds otherwise than g + m_beg: the backward must still see
    the carried state there (g + m_beg >= the chunk's own max, not g + m_beg == m_end)."""
    xs, _ = make_inputs(1, 2, 256, 16, 16, init=True)
    xs[4] = xs[4] + 6.0
    xs[3][..., 16:] = -12.0
    with launch_overrides(states=dict(segments=4)):
        check_against_oracle(xs, None, 16)


def test_segment_plan():
    """Segments asked, capped at the chunks and at CUDA's grid axis, and the chunks each holds."""
    assert segment_plan(10, 4, 2) == (4, 3)
    assert segment_plan(5, 4, 2) == (3, 2)  # segments of 2, 2 and 1
    assert segment_plan(3, 64, 2) == (3, 1)
    assert segment_plan(1, 16, 2) == (1, 1)  # one chunk: the single pass
    assert segment_plan(1024, 16, 8) == (16, 64)
    assert segment_plan(1024, 16, 65535) == (1, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(1, 1, 777, 256, 512, 128, True, True, "random"), (1, 2, 512, 64, 64, 128, False, True, "limits")],
                         ids=case_id)
def test_intra_chunk_tiling_gpu(case, dtype):
    """chunk128-intra (chunk 128 tiled in sub-blocks of 64, 64-wide tiles) in half precision at the 7B
    head shape and at the gate limits: values, final states and gradients."""
    B, NH, S, DK, DV, L, init, reset, gates = case
    xs, rs = make_inputs(B, NH, S, DK, DV, dtype=dtype, init=init, reset=reset, gates=gates)
    with launch_overrides(**aot.VARIANTS["chunk128-intra"]):
        check_against_oracle(xs, rs, L, dtype, state_grads=gates != "limits",
                             grads=not (dtype == torch.float16 and gates == "limits"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_states_pass_gpu(dtype):
    """The states passes split over segments at the 7B head shape on the GPU (bfloat16 chunk states,
    tensor-core products; the interpreter runs float32 only): values, final states and gradients."""
    xs, _ = make_inputs(1, 2, 1000, 256, 512, dtype=dtype, init=True)
    xs[4] = xs[4] + 6.0
    tol = (3e-4, TOL[dtype][1]) if dtype == torch.float32 else None
    # float32 on a GPU runs chunks of 32 (triton_chunk_size): 32 chunks, 4 segments of 8; bfloat16
    # 16 chunks of 64, 4 segments of 4
    with launch_overrides(states=dict(segments=4)):
        check_against_oracle(xs, sparse_resets(1, 1000, 300), 64, dtype, tol=tol)
