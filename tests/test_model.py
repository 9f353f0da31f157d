"""The model: shapes, init, presets, layouts, state handling, invariants, errors, the official peer."""

import math
import tomllib

import pytest
import torch

from conftest import perturb, rel_err
from xlstm7b import XLSTM, ModelConfig, State, preset_names, preset_path
from xlstm7b.layouts import unfuse
from xlstm7b.kernels import mlstm_advance
from xlstm7b.model import MultiHeadLayerNorm, RMSNorm, split_cell_inputs

SMALL = dict(embedding_dim=64, num_blocks=2, num_heads=2, vocab_size=97, chunk_size=8)


def small_model(**overrides) -> XLSTM:
    torch.manual_seed(0)
    return perturb(XLSTM(ModelConfig(**{**SMALL, **overrides})), 0.1, seed=0)


def ids(B=2, S=29, V=97, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_state_size():
    model = small_model()
    for S in (1, 7, 8, 29):
        logits, state = model(ids(S=S))
        assert logits.shape == (2, S, 97)
        assert len(state) == 2 and state.batch_size == 2
        C, n, m = state[0]
        assert C.shape == (2, 2, 16, 32) and n.shape == (2, 2, 16) and m.shape == (2, 2, 1)
        assert C.dtype == torch.float32
    assert logits.abs().max() <= 30.0  # logit soft-cap


def test_7b_preset_parameter_count_and_state_size_on_meta():
    config = ModelConfig.from_preset("7b")
    with torch.device("meta"):
        model = XLSTM(config)
    assert model.num_params() == 6_865_424_896
    assert (config.qk_head_dim, config.v_head_dim, config.ffn_dim) == (256, 512, 10944)
    assert State.zeros(config, 1, device="meta").nbytes / 2**20 == pytest.approx(128.25, abs=0.01)


@pytest.mark.parametrize(
    "name, params",
    [("debug", 173_000), ("toy", 6_925_080), ("125m", 123_963_640), ("350m", 331_046_176),
     ("1.3b", 1_319_967_072), ("7b", 6_865_424_896)],
)
def test_preset_parameter_counts(name, params):
    """The counts the README's preset table states."""
    with torch.device("meta"):
        model = XLSTM(ModelConfig.from_preset(name))
    assert model.num_params() == params
    assert name in preset_names()


def test_init_statistics():
    config = ModelConfig(embedding_dim=256, num_blocks=4, num_heads=4, vocab_size=1000)
    torch.manual_seed(0)
    model = XLSTM(config)
    small, wang = math.sqrt(2 / (5 * 256)), 2 / (4 * math.sqrt(256))
    layer, ffn = model.backbone.blocks[0].mlstm_layer, model.backbone.blocks[0].ffn
    q, k, v, o, gates = layer.in_proj.weight.split([128, 128, 256, 256, 8])
    gate, z = ffn.proj_up_gate_z.weight.chunk(2)
    for w in (q, k, v, z, gate, model.lm_head.weight):
        assert w.std().item() == pytest.approx(small, rel=0.05) and abs(w.mean().item()) < 0.1 * small
    assert model.backbone.embeddings.weight.std().item() == pytest.approx(small, rel=0.05)
    for w in (layer.out_proj.weight, ffn.proj_down.weight):
        assert w.std().item() == pytest.approx(wang, rel=0.05)
    for w in (o, gates):
        assert torch.count_nonzero(w) == 0
    assert layer.in_proj.bias is None and layer.gate_biases() is layer.gate_bias
    assert torch.equal(layer.gate_bias[:4], torch.full((4,), -10.0))
    assert torch.allclose(layer.gate_bias[4:], torch.linspace(3, 6, 4))
    assert torch.equal(layer.multihead_norm.weight, torch.ones(256))
    assert torch.equal(model.backbone.blocks[1].norm_ffn.weight, torch.ones(256))
    # With a bias on every projection the gates' is in_proj's last rows: the same values, the rest 0.
    layer = XLSTM(config.replace(use_bias=True)).backbone.blocks[0].mlstm_layer
    assert layer.gate_bias is None and torch.equal(layer.gate_biases(), torch.cat([torch.full((4,), -10.0), torch.linspace(3, 6, 4)]))
    assert torch.count_nonzero(layer.in_proj.bias[:-8]) == 0


def test_one_product_for_all_input_projections_and_gates_in_float32():
    """project: q, k, v, o and the gates from one product with in_proj (no second weight read); the
    gates' pre-activations in float32 with their bias added in float32 after the product, also under
    bf16 autocast, where a bias rounded to bf16 would be off by up to 2^-6 near 4."""
    model = small_model()
    layer, c = model.backbone.blocks[0].mlstm_layer, model.config
    with torch.no_grad():
        layer.gate_bias.copy_(torch.tensor([-9.9, -10.1, 3.3, 5.7]))
        layer.in_proj.weight.normal_(std=0.05)
    x = torch.randn(2, 5, c.embedding_dim)
    for context, dtype in ((torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16), (torch.no_grad(), torch.float32)):
        with context, torch.no_grad(), torch.profiler.profile() as prof:
            q, k, v, o, i, f = layer.project(x)
        products = [e.name for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::bmm")]
        assert products == ["aten::mm"], products
        assert q.dtype == v.dtype == dtype and i.dtype == f.dtype == torch.float32
        product = (x.to(dtype) @ layer.in_proj.weight.to(dtype).T).float()
        want = c.gate_soft_cap * torch.tanh((product[..., -4:] + layer.gate_bias) / c.gate_soft_cap)
        torch.testing.assert_close(torch.cat([i, f], -1), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(o, product[..., 2 * c.qk_dim + c.v_dim : -4].to(dtype))


def test_meta_build_then_init_matches_direct_build():
    config = ModelConfig(**SMALL)
    direct = XLSTM(config)
    torch.manual_seed(3)
    direct.init_weights()  # init_weights alone decides the values: same seed, same weights
    with torch.device("meta"):
        model = XLSTM(config)
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def spec_rms_norm(x, weight, eps):
    """Spec §1: x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then scaled."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def spec_head_norm(h, weight, eps):
    """Spec §1: a mean-centred LayerNorm over each head's features in float32, then the weight."""
    hf = h.float()
    hf = hf - hf.mean(-1, keepdim=True)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return hf.to(h.dtype).flatten(-2) * weight


# (rtol, atol, gradients' relative error). float32 results differ by summation order only (absolute
# 1e-7 for the mean-centred values near 0); half-precision ones at most by one rounding step of the
# cast (a float32 value next to a rounding boundary), never by a second rounding.
NORM_TOL = {torch.float32: (1e-5, 1e-6, 1e-5), torch.bfloat16: (2**-7, 0, 1e-2), torch.float16: (2**-10, 0, 1e-2)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_norms_compute_the_spec_formulas(device, dtype):
    """The norm modules (F.rms_norm, F.layer_norm: one kernel each on CUDA) give the spec's formulas,
    with their float32 computation and the rounding before the weight, in values and gradients."""
    g = torch.Generator().manual_seed(0)
    rms, head = RMSNorm(96, 1e-6), MultiHeadLayerNorm(3, 32, 1e-6)
    for norm, spec, shape in ((rms, spec_rms_norm, (2, 5, 96)), (head, spec_head_norm, (2, 5, 3, 32))):
        with torch.no_grad():
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=g))
        norm.to(device, dtype)
        x = (torch.randn(shape, generator=g) * 3 + 1).to(device, dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = norm(x1), spec(x2, norm.weight, norm.eps)
        rtol, atol, grad_tol = NORM_TOL[dtype]
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        if dtype != torch.float32:  # a single rounding (x * r * w at once) differs in about a quarter of them
            assert (got != want).float().mean() <= 0.01, type(norm).__name__
        cot = torch.randn(got.shape, generator=g).to(device, dtype)
        (got * cot).sum().backward()
        (want * cot).sum().backward()
        assert rel_err(x1.grad, x2.grad) <= grad_tol, type(norm).__name__
        if device == "cuda" and dtype == torch.bfloat16:  # autocast runs the norms in float32, returns float32
            with torch.autocast("cuda", dtype=torch.bfloat16):
                torch.testing.assert_close(norm(x), want, rtol=rtol, atol=atol)


def test_teacher_forced_steps_equal_full_forward():
    model = small_model().eval()
    x = ids(S=21)
    with torch.no_grad():
        full, full_state = model(x)
        state = State.zeros(model.config, 2)
        steps = [model.step(x[:, t], state) for t in range(21)]
    assert rel_err(torch.stack(steps, dim=1), full) < 1e-5
    for a, b in zip(state, full_state):
        for u, w in zip(a, b):
            assert rel_err(u, w) < 1e-5


def test_pieces_with_carried_state_equal_one_run():
    model = small_model()
    x = ids(S=40)
    full, full_state = model(x)
    a, st = model(x[:, :13])
    b, st = model(x[:, 13:], st)
    assert rel_err(torch.cat([a, b], dim=1), full) < 1e-5
    assert rel_err(st[1][0], full_state[1][0]) < 1e-5


def test_forward_leaves_the_state_passed_in_alone_and_step_updates_it():
    model = small_model()
    _, state = model(ids(S=9))
    state = state.detach()
    before = state.clone()
    x = ids(S=1, seed=2)
    logits, new = model(x, state)
    assert all(torch.equal(u, w) for a, b in zip(state, before) for u, w in zip(a, b))
    ptr = state[0][0].data_ptr()
    with torch.no_grad():
        step_logits = model.step(x[:, 0], state)
    assert state[0][0].data_ptr() == ptr and not torch.equal(state[0][0], before[0][0])
    assert rel_err(step_logits, logits[:, 0]) < 1e-5
    assert all(rel_err(u, w) < 1e-5 for a, b in zip(state, new) for u, w in zip(a, b))


def test_step_leaves_inactive_rows_alone():
    model = small_model().eval()
    state = State.zeros(model.config, 2)
    with torch.no_grad():
        model.step(ids(S=3)[:, 0], state)
        before = state.clone()
        model.step(ids(S=3)[:, 1], state, active=torch.tensor([True, False]))
    assert all(torch.equal(u[1], w[1]) for a, b in zip(state, before) for u, w in zip(a, b))
    assert not torch.equal(state[0][0][0], before[0][0][0])


def test_cell_inputs_are_what_the_cell_saw_in_forward_and_step():
    model = small_model().eval()
    x = ids(S=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    seen = model.cell_inputs_buffer(2, 6)
    with torch.no_grad():
        model(x, mask=mask, cell_inputs=seen)
        state = State.zeros(model.config, 2)
        stepped = [model.cell_inputs_buffer(2) for _ in range(6)]
        for t in range(6):
            model.step(x[:, t], state, mask[:, t], cell_inputs=stepped[t])
    assert rel_err(torch.cat(stepped, dim=2).nan_to_num(0, 0, 0), seen.nan_to_num(0, 0, 0)) < 1e-5
    k, v, i, f = split_cell_inputs(seen, model.config)
    assert (i[:, 1, :2] == float("-inf")).all() and (f[:, 1, :2] == float("inf")).all()
    assert torch.isfinite(i[:, 0]).all()
    # Row 0's k, v, i, f of the last layer re-advance the empty state to the forward pass's final state.
    with torch.no_grad():
        _, full = model(x[:1])
    k, v, i, f = (t[1, :1] for t in (k, v, i, f))  # [1, S, NH*DH]

    def heads(t):  # [1, S, NH*DH] -> [1, NH, S, DH]
        return t.unflatten(-1, (2, -1)).transpose(1, 2)

    C, n, m = mlstm_advance(heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2), State.zeros(model.config, 1)[1])
    assert rel_err(C, full[1][0]) < 1e-5 and rel_err(n, full[1][1]) < 1e-5 and rel_err(m, full[1][2]) < 1e-5


def test_gradients_flow_through_a_state_passed_in():
    """Truncated BPTT: the loss of the second segment reaches the first segment's parameters
    only through the carried state; detach() cuts it."""
    model = small_model()
    x = ids(S=30)
    _, state = model(x[:, :15])
    logits, _ = model(x[:, 15:], state)
    grad = torch.autograd.grad(logits.sum(), state[0][0])[0]
    assert grad.abs().sum() > 0
    _, state = model(x[:, :15])
    detached = state.detach()
    assert not any(t.requires_grad for layer in detached for t in layer)
    logits, _ = model(x[:, 15:], detached)
    # The loss does not reach into the first segment's graph: the state it produced gets no gradient.
    assert torch.autograd.grad(logits.sum(), state[0][0], allow_unused=True)[0] is None


def test_reset_starts_a_fresh_document():
    model = small_model()
    x = ids(B=1, S=30)
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, 11] = True
    logits, state = model(x, reset=reset)
    alone, alone_state = model(x[:, 11:])
    assert rel_err(logits[:, 11:], alone) < 1e-5
    assert rel_err(state[0][0], alone_state[0][0]) < 1e-5


def test_padding_mask_leaves_state_untouched():
    """Left padding with mask=False gives the same last logits and state as the unpadded row."""
    model = small_model()
    x = ids(B=1, S=17)
    padded = torch.cat([torch.full((1, 6), 1), x], dim=1)
    mask = torch.ones(1, 23, dtype=torch.bool)
    mask[:, :6] = False
    logits, state = model(padded, mask=mask)
    ref, ref_state = model(x)
    assert rel_err(logits[:, 6:], ref) < 1e-5
    for a, b in zip(state, ref_state):
        assert rel_err(a[0], b[0]) < 1e-5 and rel_err(a[2], b[2]) < 1e-5


def test_last_logits_only():
    model = small_model()
    x = ids(S=12)
    full, _ = model(x)
    last, _ = model(x, last_logits_only=True)
    assert last.shape == (2, 1, 97) and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_return_hidden_then_logits():
    model = small_model()
    x = ids(S=12)
    logits, state = model(x)
    hidden, hidden_state = model(x, return_hidden=True)
    assert hidden.shape == (2, 12, model.config.embedding_dim)
    assert torch.equal(model.logits(hidden), logits)
    assert all(torch.equal(a, b) for la, lb in zip(state, hidden_state) for a, b in zip(la, lb))


def test_tied_embeddings_share_one_tensor():
    model = XLSTM(ModelConfig(**SMALL, tie_word_embeddings=True))
    assert model.lm_head.weight is model.backbone.embeddings.weight
    untied = XLSTM(ModelConfig(**SMALL))
    assert untied.num_params() - model.num_params() == 97 * 64


def test_state_helpers():
    config = ModelConfig(**SMALL)
    state = State.zeros(config, 4)
    for n, layer in enumerate(state):
        for t in layer:
            t.copy_(torch.arange(4, dtype=t.dtype).view(4, *[1] * (t.ndim - 1)) + 10 * n)
    picked = state.select([3, 0, 0])
    assert picked.batch_size == 3 and torch.equal(picked[1][0][:, 0, 0, 0], torch.tensor([13.0, 10.0, 10.0]))
    assert state.select(torch.tensor([True, False, True, False])).batch_size == 2
    assert state.select(slice(1, 3))[0][2][:, 0, 0].tolist() == [1.0, 2.0]
    assert state.to(dtype=torch.float64).dtype == torch.float64
    assert state.nbytes == 2 * 4 * 2 * (16 * 32 + 16 + 1) * 4
    with pytest.raises(ValueError, match="rows must be"):
        state.select([4])
    half = state.stored_as(torch.bfloat16)
    assert [tuple(t.dtype for t in layer) for layer in half] == [(torch.bfloat16, torch.bfloat16, torch.float32)] * 2
    assert torch.equal(half[1][0].float(), state[1][0]) and half[1][2] is state[1][2]  # m as it was, not copied
    assert state.stored_as(torch.float32)[0][0] is state[0][0] and state.stored_as(torch.float32, copy=True)[0][0] is not state[0][0]
    with pytest.raises(ValueError, match="state_dtype must be"):
        state.stored_as(torch.float16)


@pytest.mark.parametrize(
    "bad,err,match",
    [
        (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
        (torch.tensor([1, 2, 3]), ValueError, r"shape \[B, S\]"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, "S >= 1"),
        (torch.tensor([[5, 97]]), ValueError, "token id 97 outside"),
        (torch.tensor([[-1, 3]]), ValueError, "token id -1 outside"),
        ([[1, 2]], TypeError, "LongTensor"),
    ],
    ids=["float", "1d", "empty", "too-large", "negative", "list"],
)
def test_bad_input_ids(bad, err, match):
    with pytest.raises(err, match=match):
        small_model()(bad)


def test_bad_state_reset_and_mask():
    model = small_model()
    with pytest.raises(ValueError, match="batch size 2"):
        model(ids(), State.zeros(model.config, 3))
    with pytest.raises(ValueError, match="reset must be a bool tensor"):
        model(ids(), reset=torch.zeros(2, 29))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model(ids(), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cell_inputs must be a cell_inputs_buffer\(2, 29\)"):
        model(ids(), cell_inputs=model.cell_inputs_buffer(2, 28))


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(num_heads=3), "num_heads=3 must divide qk_dim"),
        (dict(embedding_dim=0), "embedding_dim must be a positive integer"),
        (dict(num_blocks=-1), "num_blocks must be a positive integer"),
        (dict(qk_dim_factor=0.0), "qk_dim_factor must be a positive number"),
        (dict(eos_token_id=97), r"eos_token_id=97 must lie in \[0, vocab_size=97\)"),
    ],
    ids=["heads", "dim", "blocks", "factor", "eos"],
)
def test_invalid_config_names_field_and_fix(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**SMALL, **fields})


def test_toml_unknown_key_and_unknown_preset(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nembedding_dim = 64\nnum_head = 2\n")
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['num_head'\]"):
        ModelConfig.from_toml(bad)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_path("huge")
    with open(preset_path("7b"), "rb") as fh:
        assert tomllib.load(fh)["model"]["embedding_dim"] == 4096


def test_logits_match_official_xlstm_large():
    """Our logits and final states == the xlstm package's xLSTMLarge (native PyTorch kernels) on
    the same random weights."""
    xl = pytest.importorskip("xlstm.xlstm_large.model")
    model = small_model(embedding_dim=128, chunk_size=16)
    c = model.config
    for mode in ("train", "inference"):
        theirs = xl.xLSTMLarge(xl.xLSTMLargeConfig(
            embedding_dim=c.embedding_dim, num_heads=c.num_heads, num_blocks=c.num_blocks, vocab_size=c.vocab_size,
            chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
            step_kernel="native", mode=mode, return_last_states=True, chunk_size=16,
        ))
        released = unfuse(model.state_dict(), c)  # their default single layout
        sd = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in released.items()}
        theirs.load_state_dict(sd, strict=True)
        x = ids(S=48)
        with torch.no_grad():
            their_logits, their_state = theirs(x)
            logits, state = model(x)
        assert rel_err(logits, their_logits) < 1e-5, mode
        for n in range(c.num_blocks):
            for ours, other in zip(state[n], their_state[n]):
                assert rel_err(ours, other) < 1e-5, mode
