"""The Triton kernels at sizes whose offsets pass 2**31 elements: the chunk states and the decoding
state are addressed in int64 (batch 2 at S 65,536 at the 7B head shape; a decoding batch of 2,049),
and q, k, v past what their int32 offsets reach are refused with the way out."""

import pytest
import torch

pytest.importorskip("triton")

from xlstm7b.kernels.chunkwise_triton import MAX_INT32, mlstm_chunkwise_triton  # noqa: E402
from xlstm7b.kernels.step_triton import mlstm_step_triton  # noqa: E402


def test_q_k_v_past_int32_offsets_are_refused():
    """On meta tensors (no memory): 8 heads of 524,288 tokens at DV 512 pass 2**31 elements of v."""
    B, NH, S, DK, DV = 1, 8, 2**19, 256, 512
    assert B * NH * S * DV > MAX_INT32
    meta = dict(device="meta")
    q, v, i = torch.empty(B, NH, S, DK, **meta), torch.empty(B, NH, S, DV, **meta), torch.empty(B, NH, S, **meta)
    with pytest.raises(ValueError, match="at most 2,147,483,647 elements per call.*split the batch"):
        mlstm_chunkwise_triton(q, q, v, i, i, chunk_size=64)


@pytest.mark.gpu
def test_chunk_states_past_2_31_elements_gpu():
    """Batch 2 at S 65,536, the 7B head shape, chunk 64: the chunk states hold 16 heads x 1,024 chunks
    x 256 x 512 = 2**31 elements. Two identical sequences give identical outputs, final states and
    gradients (an int32 offset would wrap into the first sequence's states for the second)."""
    B, NH, S, DK, DV = 2, 8, 65536, 256, 512
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale

    one = [rand(1, NH, S, DK).bfloat16(), rand(1, NH, S, DK).bfloat16(), rand(1, NH, S, DV).bfloat16(),
           rand(1, NH, S, scale=3.0), rand(1, NH, S, scale=3.0) + 2.0]
    xs = [x.expand(B, *x.shape[1:]).contiguous().requires_grad_() for x in one]
    h, (C, n, m) = mlstm_chunkwise_triton(*xs, chunk_size=64)
    (h.float().square().mean() + C.square().mean()).backward()
    for t in (h, C, n, m, *(x.grad for x in xs)):
        assert torch.isfinite(t).all() and torch.equal(t[0], t[1])


@pytest.mark.gpu
def test_step_state_past_2_31_elements_gpu():
    """A decoding batch of 2,049 x 8 heads at the 7B head shape: the state C holds more than 2**31
    elements; the last row, a copy of the first, steps to the first row's h and state."""
    B, NH, DK, DV = 2049, 8, 256, 512
    q, k = (torch.randn(B, NH, DK, device="cuda") for _ in range(2))
    v, i, f = torch.randn(B, NH, DV, device="cuda"), torch.randn(B, NH, device="cuda"), torch.randn(B, NH, device="cuda") + 2
    C, n, m = torch.randn(B, NH, DK, DV, device="cuda"), torch.rand(B, NH, DK, device="cuda"), torch.randn(B, NH, 1, device="cuda")
    for t in (q, k, v, i, f, C, n, m):
        t[-1] = t[0]
    h, (C, n, m) = mlstm_step_triton(q, k, v, i, f, (C, n, m))
    for t in (h, C, n, m):
        assert torch.equal(t[-1], t[0])
