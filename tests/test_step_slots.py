"""Slot-index stepping: the decoding step over B rows of a larger state, named by `slots` (as a
serving pool's decoding rows are). Equal to stepping those rows as a dense batch; the other rows
untouched, bit for bit; inactive rows may share one scratch row and leave it as it was. The Triton
step kernel in the interpreter (without CUDA) in both its forms, its PyTorch twin, `XLSTM.step` and the step runners."""

import pytest
import torch

from conftest import HAS_CUDA, rel_err, random_model
from xlstm7b import ModelConfig, State
from xlstm7b.decode import CompiledStep, step_runner
from xlstm7b.kernels import mlstm_step_, mlstm_step_torch
from xlstm7b.kernels.launch_settings import launch_overrides

DEVICE = "cuda" if HAS_CUDA else "cpu"


def inputs(B, NH, DK, DV, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, NH, DK, generator=g) for _ in range(2))
    v = torch.randn(B, NH, DV, generator=g)
    i, f = (torch.randn(B, NH, generator=g) * 5 for _ in range(2))
    return [t.to(DEVICE) for t in (q, k, v, i, f)]


def pool(P, NH, DK, DV, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    C, n, m = torch.randn(P, NH, DK, DV, generator=g), torch.randn(P, NH, DK, generator=g), torch.randn(P, NH, 1, generator=g)
    return C.to(DEVICE, dtype), n.to(DEVICE, dtype), m.to(DEVICE)


@pytest.fixture(params=["triton", "triton-one-launch", "torch"])
def backend(request):
    """The step's backend, the Triton step in both forms (two launches, the default, and one)."""
    with launch_overrides(step=dict(one_launch=int(request.param == "triton-one-launch"))):
        yield request.param.removesuffix("-one-launch")


# P pool rows, NH, DK, DV; the last spreads a head over three DV tiles (BV = 8192 // 128 = 64)
CASES = [(5, 2, 16, 32), (3, 1, 128, 160)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "P{}-NH{}-DK{}-DV{}".format(*c))
def test_slots_equal_stepping_the_rows_as_a_batch(case, dtype, backend):
    P, NH, DK, DV = case
    slots = torch.tensor([P - 1, 0], device=DEVICE)  # out of order, the last row first
    live = pool(P, NH, DK, DV, dtype, seed=0)
    dense = tuple(t.index_select(0, slots) for t in live)  # the same rows as a batch of their own
    before = tuple(t.clone() for t in live)
    for step in range(2):  # carried over steps
        q, k, v, i, f = inputs(2, NH, DK, DV, seed=step)
        h = mlstm_step_(q, k, v, i, f, live, backend=backend, slots=slots)
        h_dense = mlstm_step_(q, k, v, i, f, dense, backend=backend)
        assert torch.equal(h, h_dense)
        for t, d in zip(live, dense):
            assert torch.equal(t.index_select(0, slots), d)
    others = [r for r in range(P) if r not in slots.tolist()]
    for t, b in zip(live, before):
        assert torch.equal(t[others], b[others])  # untouched, bit for bit


def test_slots_against_the_reference_step(backend):
    P, NH, DK, DV = 4, 2, 16, 32
    slots = torch.tensor([2, 1], device=DEVICE)
    live = pool(P, NH, DK, DV, torch.float32, seed=1)
    ref = tuple(t.index_select(0, slots) for t in live)
    q, k, v, i, f = inputs(2, NH, DK, DV, seed=3)
    h = mlstm_step_(q, k, v, i, f, live, backend=backend, slots=slots)
    h_ref, ref = mlstm_step_torch(q, k, v, i, f, ref)
    assert rel_err(h, h_ref) < 1e-5
    for t, r in zip(live, ref):
        assert rel_err(t.index_select(0, slots), r) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inactive_rows_share_a_scratch_row_and_leave_it_as_it_was(dtype, backend):
    """A bucket's padding: inactive rows (i = -inf, f = +inf) all on one scratch row."""
    P, NH, DK, DV = 4, 2, 16, 32
    slots = torch.tensor([1, 3, 3, 3], device=DEVICE)
    live = pool(P, NH, DK, DV, dtype, seed=2)
    before = tuple(t.clone() for t in live)
    q, k, v, i, f = inputs(4, NH, DK, DV, seed=4)
    i[1:], f[1:] = float("-inf"), float("inf")
    expected = mlstm_step_(*(t[:1] for t in (q, k, v, i, f)), tuple(t[1:2].clone() for t in live), backend=backend)
    h = mlstm_step_(q, k, v, i, f, live, backend=backend, slots=slots)
    assert torch.equal(h[:1], expected)
    for t, b in zip(live, before):
        assert torch.equal(t[[0, 2, 3]], b[[0, 2, 3]])
        assert not torch.equal(t[1], b[1])


def test_the_triton_step_refuses_bad_slots():
    from xlstm7b.kernels.step_triton import mlstm_step_triton

    q, k, v, i, f = inputs(2, 1, 16, 16, seed=0)
    state = pool(3, 1, 16, 16, torch.float32, seed=0)
    for bad in (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1, 2]), torch.tensor([[0, 1]])):
        with pytest.raises(ValueError, match="slots"):
            mlstm_step_triton(q, k, v, i, f, state, slots=bad.to(DEVICE))


def same(a: State, b: State) -> bool:
    """Bit for bit."""
    return all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def model():
    return random_model(ModelConfig.from_preset("debug")).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_step_with_slots_equals_the_dense_step(model, dtype):
    """XLSTM.step over 3 rows of a pool of 6 (with one inactive row) == the step over those rows as a
    batch; the other rows of the pool bit-identical."""
    P, slots = 6, torch.tensor([5, 2, 0], device=DEVICE)
    live = State.zeros(model.config, P, device=DEVICE).stored_as(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in (t for layer in live for t in layer):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    dense = live.select(slots)
    before = live.clone()
    active = torch.tensor([True, False, True], device=DEVICE)
    with torch.no_grad():
        for token in ([5, 6, 7], [8, 9, 10]):
            token = torch.tensor(token, device=DEVICE)
            logits = model.step(token, live, active, slots=slots)
            assert torch.equal(logits, model.step(token, dense, active))
    assert same(live.select(slots), dense)
    assert same(live.select([1, 2, 3, 4]), before.select([1, 2, 3, 4]))  # row 2 inactive, the others free
    assert not same(live.select([0]), before.select([0]))


def test_eager_runner_passes_the_slots(model):
    live = State.zeros(model.config, 4, device=DEVICE)
    step = step_runner(model, live, cuda_graph=False, compile=False, batch=2)
    token, slots = torch.tensor([5, 6], device=DEVICE), torch.tensor([3, 1], device=DEVICE)
    with torch.no_grad():
        logits = step(token, None, slots)
    assert logits.shape == (2, model.config.vocab_size)
    assert [bool(t.any()) for t in live[0][0]] == [False, True, False, True]


@pytest.mark.skipif(HAS_CUDA, reason="the CPU compilation (on CUDA the compiled step is captured, below)")
def test_compiled_runner_with_slots_equals_eager(model):
    """The CPU compiled step (serve --compile) by slot index, with other slots and an inactive row per
    call: eager's logits and rows; the rows no call names keep their bits. A bucket above the GEMM
    templates' batch (they change the matrix products, not the slots' gather and scatter), which
    compiles in seconds."""
    B = CompiledStep.GEMM_TEMPLATE_MAX_BATCH + 1
    compiled_pool, eager_pool = (State.zeros(model.config, 2 * B) for _ in range(2))
    compiled = step_runner(model, compiled_pool, cuda_graph=False, compile=True, batch=B)
    eager = step_runner(model, eager_pool, cuda_graph=False, compile=False, batch=B)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for active in (torch.ones(B, dtype=torch.bool), torch.arange(B) != 1, torch.ones(B, dtype=torch.bool)):
            slots = torch.randperm(2 * B - 1, generator=g)[:B]  # never the last row
            token = torch.randint(0, model.config.vocab_size, (B,), generator=g)
            assert rel_err(compiled(token, active, slots), eager(token, active, slots)) < 1e-4
    assert compiled.compilation.error is None
    for a, b in zip((t for layer in compiled_pool for t in layer), (t for layer in eager_pool for t in layer)):
        assert rel_err(a, b) < 1e-4 and not a[-1].any()


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled-graph"])
def test_cuda_graph_with_slots_equals_eager(model, compile):
    """One graph per bucket replayed with different slots each step == the eager step with them."""
    P, B = 8, 4
    graphed, eager = (State.zeros(model.config, P, device="cuda").stored_as(torch.bfloat16) for _ in range(2))
    step = step_runner(model, graphed, cuda_graph=True, compile=compile, batch=B)
    assert all(not t.any() for layer in graphed for t in layer)  # capture left the pool as it was
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            slots = torch.randperm(P, generator=g)[:B].cuda()
            token = torch.randint(0, model.config.vocab_size, (B,), generator=g).cuda()
            active = torch.tensor([True, True, True, False], device="cuda")
            got = step(token, active, slots).clone()
            want = model.step(token, eager, active, slots=slots)
            assert rel_err(got, want) < 1e-3
    for a, b in zip((t for layer in graphed for t in layer), (t for layer in eager for t in layer)):
        assert rel_err(a.float(), b.float()) < 1e-3
