"""Every public inference entry point in float32, bfloat16 and float16 on CPU: the model runs in
the parameters' dtype (the mLSTM cell computes in float32 inside and returns h in v's dtype; the
state stays float32), with results close to the float32 model's. Greedy tokens of a model cast to
a low precision need not equal float32's, so the tests check what is true: it runs, the values are
finite and close."""

import contextlib
import re
from pathlib import Path

import pytest
import torch

import xlstm7b
from conftest import prompt, random_model, rel_err
from xlstm7b import ModelConfig, from_pretrained, generate
from xlstm7b.cli import main
from xlstm7b.kernels import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_step
from xlstm7b.train.trainer import sequence_loss

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["float32", "bfloat16", "float16"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Relative error of the logits of a model cast to the dtype against the float32 model's."""


@pytest.fixture(scope="module")
def model32():
    return random_model(ModelConfig.from_preset("debug"))


def cast(model, dtype):
    return random_model(model.config).to(dtype)  # random_model is seeded: the same weights


def assert_close(actual, expected, dtype, what):
    assert actual.dtype == dtype and torch.isfinite(actual).all(), what
    err = rel_err(actual, expected)
    assert err < TOL[dtype], f"{what}: rel err {err:.2e} against float32"


@pytest.mark.parametrize("form", [mlstm_chunkwise, mlstm_parallel, mlstm_recurrent], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_cell_returns_h_in_the_dtype_of_v_and_a_float32_state(form, dtype):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 20, 32, generator=g)
    i, f = torch.randn(1, 2, 20, generator=g), torch.randn(1, 2, 20, generator=g) + 3
    h32, _ = form(q, k, v, i, f)
    h, state = form(*(t.to(dtype) for t in (q, k, v)), i, f)
    assert_close(h, h32, dtype, "h")
    assert all(t.dtype == torch.float32 for t in state)
    h1, state1 = mlstm_step(q[:, :, 0].to(dtype), k[:, :, 0].to(dtype), v[:, :, 0].to(dtype), i[:, :, 0], f[:, :, 0])
    assert h1.dtype == dtype and all(t.dtype == torch.float32 for t in state1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_forward_and_step(model32, dtype):
    model = cast(model32, dtype)
    ids = torch.tensor([prompt(37, 0), prompt(37, 1)])
    with torch.no_grad():
        expected, state32 = model32(ids)
        logits, state = model(ids)
        assert_close(logits, expected, dtype, "forward logits")
        assert all(t.dtype == torch.float32 for layer in state for t in layer)
        token = torch.tensor([5, 9])
        assert_close(model.step(token, state), model32.step(token, state32), dtype, "step logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("prompts", [[prompt(9, 0)], [prompt(3, 1), prompt(20, 2), []]], ids=["one", "ragged"])
def test_generate(model32, dtype, prompts):
    model = cast(model32, dtype)
    out = generate(model, prompts, max_new_tokens=6, temperature=0.8, seed=0)
    assert out.tokens.shape == (len(prompts), 6) and bool(((0 <= out.tokens) & (out.tokens < 512)).all())
    # The final state is that of the float32 model over the same text.
    for b, p in enumerate(prompts):
        text = torch.tensor([(p or [model.config.bos_token_id]) + out.tokens[b].tolist()])
        with torch.no_grad():
            _, want = model32(text)
        for got, ref in zip(out.state.select([b]), want):
            assert rel_err(got[0], ref[0]) < 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_speculative_generate(model32, dtype):
    model, draft = cast(model32, dtype), random_model(model32.config, seed=5).to(dtype)
    for temperature in (0.0, 1.0):
        out = generate(model, [prompt(4, 0), prompt(11, 1)], max_new_tokens=7, temperature=temperature, seed=0,
                       draft=draft, speculate_k=3)
        assert out.tokens.shape == (2, 7) and (out.lengths == 7).all()
        assert all(torch.isfinite(t).all() for layer in out.state for t in layer)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_from_pretrained_and_the_cli(model32, checkpoint_dir, dtype, capsys):
    model = from_pretrained(checkpoint_dir, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    ids = torch.tensor([prompt(10, 3)]) % model.config.vocab_size
    with torch.no_grad():
        assert_close(model(ids)[0], from_pretrained(checkpoint_dir)(ids)[0], dtype, "logits")
    name = str(dtype).removeprefix("torch.")
    assert main(["generate", "--checkpoint", str(checkpoint_dir), "--prompt", "hello", "--max-new-tokens", "6",
                 "--ignore-eos", "--dtype", name, "--temperature", "0.7", "--seed", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "+ 6 generated tokens" in out.err


def test_readme_quickstart(tmp_path, monkeypatch):
    """The README's Python quickstart as written (the debug preset for speed), and its bfloat16 model runs."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Python quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('from_preset("toy")', 'from_preset("debug")')
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    bf16 = scope["model"]
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    ids = scope["ids"]
    with torch.no_grad():
        logits, _ = bf16(ids)
        tokens, _ = xlstm7b.generate(bf16, ids, max_new_tokens=3)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all() and tokens.shape == (2, 3)


class LinearInputs(torch.overrides.TorchFunctionMode):
    """Records the dtype of every activation given to F.linear (before autocast casts it)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss_chunk", [0, 16], ids=["whole-loss", "loss-in-pieces"])
def test_matrix_products_get_bf16_activations_under_bf16_autocast(model32, loss_chunk):
    """Training's mixed precision (float32 weights, bf16 autocast, here CPU autocast): every weight
    product of the model, lm_head included, receives a bf16 activation: none promoted to float32
    by a float32 norm weight or the float32 residual stream (each would cost a float32 write and a
    cast per product)."""
    model = random_model(model32.config)
    ids = torch.tensor([prompt(33, 0), prompt(33, 1)])
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with LinearInputs() as seen:
        nats = sequence_loss(model, model.logits, inputs, targets, inputs == 0,
                             torch.autocast("cpu", dtype=torch.bfloat16), loss_chunk)
    per_block = 4  # [q|k|v|o|i|f], out_proj, [gate|z], down
    assert len(seen.dtypes) == model.config.num_blocks * per_block + (1 if not loss_chunk else 64 // loss_chunk)
    assert set(seen.dtypes) == {torch.bfloat16}, seen.dtypes
    nats.mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        want = sequence_loss(model, model.logits, inputs, targets, inputs == 0, contextlib.nullcontext())
    assert rel_err(nats.detach(), want) < 2e-2
