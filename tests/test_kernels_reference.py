"""The PyTorch mLSTM forms against each other and against the float64 parallel oracle."""

import pytest
import torch

from conftest import rel_err
from xlstm7b.kernels import mlstm, mlstm_advance, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_step, mlstm_step_, zero_state


def make_inputs(B=2, NH=2, S=37, DK=8, DV=12, *, dtype=torch.float64, state=False, reset=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, NH, S, DK, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, NH, S, DV, generator=g, dtype=dtype)
    i = 3 * torch.randn(B, NH, S, generator=g, dtype=dtype)
    f = 3 * torch.randn(B, NH, S, generator=g, dtype=dtype) + 2
    st = None
    if state:
        st = (
            torch.randn(B, NH, DK, DV, generator=g, dtype=dtype),
            torch.randn(B, NH, DK, generator=g, dtype=dtype),
            torch.randn(B, NH, 1, generator=g, dtype=dtype),
        )
    rs = None
    if reset:
        rs = torch.rand(B, S, generator=g) < 0.1
        rs[0, 0] = True  # a reset at the very start discards the initial state
        rs[-1, S // 2] = True
    return (q, k, v, i, f), st, rs


CASES = [
    pytest.param(dict(S=1), id="S1"),
    pytest.param(dict(S=37), id="S37"),
    pytest.param(dict(S=37, state=True), id="S37-state"),
    pytest.param(dict(S=45, reset=True), id="S45-reset"),
    pytest.param(dict(S=70, state=True, reset=True), id="S70-state-reset"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_forms_agree_float64(case, chunk_size):
    x, st, rs = make_inputs(**case)
    h_ref, s_ref = mlstm_parallel(*x, st, reset=rs)
    h_rec, s_rec = mlstm_recurrent(*x, st, reset=rs)
    h_chk, s_chk = mlstm_chunkwise(*x, st, reset=rs, chunk_size=chunk_size)
    assert rel_err(h_rec, h_ref) < 1e-10 and rel_err(h_chk, h_ref) < 1e-10
    for a, b, c in zip(s_rec, s_chk, s_ref):
        assert rel_err(a, c) < 1e-10 and rel_err(b, c) < 1e-10


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
@pytest.mark.parametrize("case", CASES[1:])
def test_gradients_match_parallel(form, case):
    """Gradients of every input and of the initial state, through h and the final state."""
    x, st, rs = make_inputs(**case, seed=1)
    leaves = [t.clone().requires_grad_() for t in x]
    state = (st[0].clone().requires_grad_(), st[1].clone().requires_grad_(), st[2]) if st else None
    params = leaves + (list(state[:2]) if st else [])

    def loss(fn):
        h, (C, n, _) = fn(*leaves, state, reset=rs)
        weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(7 + j), dtype=t.dtype) for j, t in enumerate((h, C, n))]
        return sum((t * w).sum() for t, w in zip((h, C, n), weights))

    def chunkwise(*args, **kw):
        return mlstm_chunkwise(*args, **kw, chunk_size=8)

    ref = torch.autograd.grad(loss(mlstm_parallel), params)
    got = torch.autograd.grad(loss(mlstm_recurrent if form == "recurrent" else chunkwise), params)
    for name, a, b in zip(["q", "k", "v", "i", "f", "C0", "n0"], got, ref):
        assert rel_err(a, b) < 1e-10, name


def test_fp32_chunkwise_close_to_float64_oracle():
    x, st, rs = make_inputs(S=70, state=True, reset=True, dtype=torch.float64)
    h_ref, s_ref = mlstm_parallel(*x, st, reset=rs)
    h, s = mlstm_chunkwise(*(t.float() for t in x), tuple(t.float() for t in st), reset=rs, chunk_size=16)
    assert h.dtype == torch.float32 and s[0].dtype == torch.float32
    assert rel_err(h, h_ref) < 1e-5
    for a, b in zip(s, s_ref):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("i_val,f_val", [(15.0, 15.0), (15.0, -15.0), (-15.0, -15.0)], ids=["i+15-f+15", "i+15-f-15", "i-15-f-15"])
def test_gates_at_soft_cap_limits(i_val, f_val):
    (q, k, v, i, f), st, _ = make_inputs(S=40, state=True)
    i, f = torch.full_like(i, i_val), torch.full_like(f, f_val)
    h_ref, s_ref = mlstm_parallel(q, k, v, i, f, st)
    h, s = mlstm_chunkwise(q, k, v, i, f, st, chunk_size=16)
    assert torch.isfinite(h).all() and rel_err(h, h_ref) < 1e-10
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(s, s_ref))


def test_pieces_with_carried_state_equal_one_run():
    x, st, rs = make_inputs(S=61, state=True, reset=True)
    h_all, s_all = mlstm_chunkwise(*x, st, reset=rs, chunk_size=16)
    cuts = [0, 5, 6, 33, 61]
    hs, state = [], st
    for a, b in zip(cuts, cuts[1:]):
        h, state = mlstm_chunkwise(*(t[:, :, a:b] for t in x), state, reset=rs[:, a:b], chunk_size=16)
        hs.append(h)
    assert rel_err(torch.cat(hs, dim=2), h_all) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(state, s_all))


def test_reset_equals_starting_fresh():
    """After a reset at position r, outputs are those of the suffix run from the empty state."""
    x, st, _ = make_inputs(B=1, S=50, state=True)
    r = 21
    reset = torch.zeros(1, 50, dtype=torch.bool)
    reset[0, r] = True
    h, s = mlstm_chunkwise(*x, st, reset=reset, chunk_size=16)
    h_suffix, s_suffix = mlstm_parallel(*(t[:, :, r:] for t in x))
    assert rel_err(h[:, :, r:], h_suffix) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(s, s_suffix))


@pytest.mark.parametrize("form", ["parallel", "recurrent", "chunkwise", "triton"])
def test_no_gradient_crosses_a_reset(form):
    """Not even rounding: gates before a reset get exactly zero gradient from outputs after it."""
    x, _, _ = make_inputs(B=1, S=30, DK=16, DV=16, dtype=torch.float32 if form == "triton" else torch.float64)
    # The Triton kernels run on the GPU where there is one, else in Triton's interpreter on the CPU.
    device = "cuda" if form == "triton" and torch.cuda.is_available() else "cpu"
    leaves = [t.to(device).requires_grad_() for t in x]
    reset = torch.zeros(1, 30, dtype=torch.bool, device=device)
    reset[0, 12] = True
    fn = {
        "parallel": mlstm_parallel,
        "recurrent": mlstm_recurrent,
        "chunkwise": mlstm_chunkwise,
        "triton": lambda *a, **kw: mlstm(*a, **kw, backend="triton", chunk_size=16),
    }[form]
    h, _ = fn(*leaves, reset=reset)
    h[:, :, 12:].sum().backward()
    for t in leaves:
        assert t.grad[:, :, :12].abs().max() == 0


def test_padding_leaves_state_untouched():
    """i = -inf and f = +inf at a position: the state passes through unchanged."""
    x, st, _ = make_inputs(B=1, S=20, state=True)
    q, k, v, i, f = x
    pad = torch.zeros(20, dtype=torch.bool)
    pad[[0, 3, 4, 5, 19]] = True
    i_p, f_p = i.masked_fill(pad, float("-inf")), f.masked_fill(pad, float("inf"))
    h, s = mlstm_chunkwise(q, k, v, i_p, f_p, st, chunk_size=4)
    keep = ~pad
    h_ref, s_ref = mlstm_parallel(*(t[:, :, keep] for t in x), st)
    assert rel_err(h[:, :, keep], h_ref) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(s, s_ref))
    _, s_only_pad = mlstm_chunkwise(q[:, :, :3], k[:, :, :3], v[:, :, :3], i[:, :, :3] * 0 - float("inf"), f[:, :, :3] * 0 + float("inf"), st)
    assert all(torch.equal(a, b) for a, b in zip(s_only_pad, st))


def test_step_matches_recurrent_and_dispatch_default():
    x, st, _ = make_inputs(S=5, state=True)
    h_seq, s_seq = mlstm_recurrent(*x, st)
    state = st
    for t in range(5):
        h, state = mlstm_step(*(a[:, :, t] for a in x), state)
        assert rel_err(h, h_seq[:, :, t]) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(state, s_seq))
    h_d, _ = mlstm(*x, st)
    assert rel_err(h_d, mlstm_parallel(*x, st)[0]) < 1e-10


def test_inplace_step_writes_the_same_state_into_the_given_tensors():
    x, st, _ = make_inputs(S=6, state=True)
    state = tuple(t.clone() for t in st)
    ptrs = [t.data_ptr() for t in state]
    ref = st
    for t in range(6):
        token = [a[:, :, t] for a in x]
        h_ref, ref = mlstm_step(*token, ref)
        h = mlstm_step_(*token, state)
        assert [u.data_ptr() for u in state] == ptrs
        assert rel_err(h, h_ref) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(state, ref))


def test_compiled_inplace_step_equals_eager():
    """Under torch.compile the in-place step takes its pointwise form (fused by inductor): same h and
    state, written into the same tensors."""
    x, st, _ = make_inputs(S=6, state=True)
    eager, compiled = (tuple(t.clone() for t in st) for _ in range(2))
    ptrs = [t.data_ptr() for t in compiled]
    step = torch.compile(mlstm_step_, dynamic=False)
    for t in range(6):
        token = [a[:, :, t] for a in x]
        h_ref = mlstm_step_(*token, eager)
        h = step(*token, compiled)
        assert rel_err(h, h_ref) < 1e-12
    assert [t.data_ptr() for t in compiled] == ptrs
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(compiled, eager))


def test_empty_state_convention_is_m_zero():
    C, n, m = zero_state(1, 2, 4, 6)
    assert C.abs().sum() == n.abs().sum() == m.abs().sum() == 0
    x, _, _ = make_inputs(B=1, NH=2, S=9, DK=4, DV=6)
    h0, _ = mlstm_parallel(*x)
    h1, _ = mlstm_parallel(*x, (C.double(), n.double(), m.double()))
    assert torch.equal(h0, h1)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(k=a["k"][..., :3]), "k must have the shape of q"),
        (lambda a: a.update(v=a["v"][:, :, :5]), "v must be"),
        (lambda a: a.update(i=a["i"][..., None]), "gate i must be"),
        (lambda a: a.update(f=a["f"].long()), "f must be a floating point"),
        (lambda a: a.update(q=a["q"][0]), "q must be"),
        (lambda a: a.update(state=(torch.zeros(1), torch.zeros(1), torch.zeros(1))), "state C must have shape"),
        (lambda a: a.update(reset=torch.zeros(2, 3, dtype=torch.bool)), "reset must be a bool tensor"),
        (lambda a: a.update(backend="cuda-magic"), "unknown backend"),
        (lambda a: a.update(chunk_size=0), "chunk_size must be a positive integer"),
    ],
    ids=["k-shape", "v-shape", "i-shape", "f-dtype", "q-ndim", "state-shape", "reset-shape", "backend", "chunk-size"],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    (q, k, v, i, f), _, _ = make_inputs(S=7, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, i=i, f=f, state=None)
    mutate(args)
    kwargs = {key: args.pop(key) for key in ("backend", "chunk_size", "reset") if key in args}
    with pytest.raises((ValueError, TypeError), match=match):
        mlstm(args["q"], args["k"], args["v"], args["i"], args["f"], args["state"], **kwargs)


def test_advance_gives_the_final_state_without_outputs():
    """mlstm_advance == the oracle's final state, also with padded (skipped) positions and written
    in place into the state it starts from."""
    (q, k, v, i, f), st, _ = make_inputs(S=9, state=True)
    _, ref = mlstm_parallel(q, k, v, i, f, st)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(mlstm_advance(k, v, i, f, st), ref))
    skip = torch.zeros(9, dtype=torch.bool)
    skip[5:] = True  # e.g. rejected draft tokens: masked as padding
    _, ref = mlstm_parallel(q[:, :, :5], k[:, :, :5], v[:, :, :5], i[:, :, :5], f[:, :, :5], st)
    live = tuple(t.clone() for t in st)
    out = mlstm_advance(k, v, i.masked_fill(skip, float("-inf")), f.masked_fill(skip, float("inf")), live, out=live)
    assert out is live and all(rel_err(a, b) < 1e-12 for a, b in zip(live, ref))
