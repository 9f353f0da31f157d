"""The decoding benchmark's instruments (benchmarks/decoding.py, benchmarks/generate.py): the kernels a
step runs, the weight-read floor, rows written as they come, and the plan of what is measured."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script, random_model

from xlstm7b import XLSTM, ModelConfig
from xlstm7b.decode import cuda_compiled_step, decoding_state, step_runner

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(embedding_dim=32, num_heads=2, num_blocks=1, vocab_size=64)


@pytest.fixture
def decoding(monkeypatch):
    return load_script("decoding", monkeypatch)


def test_count_kernels_counts_operators_that_compute(decoding):
    """Each computing operator counts once, its innermost form (linear as its matrix product); views,
    allocations and conversions that do nothing do not count."""
    x, w = torch.randn(4, 8), torch.randn(16, 8)

    def count(fn):
        return decoding.count_kernels(fn, "cpu")["kernels"]

    assert count(lambda: x + 1) == 1
    assert count(lambda: (x + 1) * 2) == 2
    assert count(lambda: x.view(8, 4).t().unsqueeze(0).to(torch.float32) + 1) == 1
    assert count(lambda: F.linear(x, w)) == 1
    assert count(lambda: torch.empty(3)) == 0


def test_kernels_per_token_of_a_step(decoding):
    """The count of a decode step sees one more operator when one more runs; the compiled step (its
    kernels recorded by inductor_kernel_profile) runs fewer than the eager one, and some of them are
    inductor's fused kernels."""
    torch.manual_seed(0)
    model = XLSTM(TINY).eval()
    B = 17  # above CompiledStep.GEMM_TEMPLATE_MAX_BATCH: no GEMM autotuning, a compilation of seconds
    token = torch.ones(B, dtype=torch.long)
    with torch.no_grad():
        state = decoding_state(None, TINY, B, "cpu")
        eager = step_runner(model, state, cuda_graph=False, compile=False)
        n = decoding.count_kernels(lambda: eager(token), "cpu")["kernels"]
        assert n > 4 * TINY.num_blocks
        assert decoding.count_kernels(lambda: eager(token).exp(), "cpu")["kernels"] == n + 1
        with decoding.inductor_kernel_profile():
            compiled = step_runner(model, state, cuda_graph=False, compile=True)
            got = decoding.count_kernels(lambda: compiled(token), "cpu")
    assert 0 < got["kernels"] < n
    assert any(k["name"].startswith("graph_") for k in got["top"])


def test_weight_floor(decoding):
    model = XLSTM(TINY)
    embedding = model.backbone.embeddings.weight
    read = 4 * (model.num_params() - embedding.numel())  # float32; the table is read one row per sequence
    assert decoding.weight_floor_ms(model, "NVIDIA H200") == pytest.approx(1e3 * read / 4.8e12)
    assert decoding.weight_floor_ms(model, "NVIDIA H100 80GB HBM3") == pytest.approx(1e3 * read / 3.35e12)
    assert decoding.weight_floor_ms(model, "NVIDIA H100 PCIe") == pytest.approx(1e3 * read / 2.0e12)
    assert decoding.weight_floor_ms(model, "Some Other Card") is None


def test_live_rows_are_written_as_they_come(decoding, tmp_path):
    path = tmp_path / "sub" / "rows.json"
    rows = decoding.LiveRows(path, {"device": "cpu"})
    rows.append({"a": 1})
    assert json.loads(path.read_text()) == {"device": "cpu", "rows": [{"a": 1}]}
    rows += [{"b": 2}]
    rows.write(interrupted=True)
    assert json.loads(path.read_text()) == {"device": "cpu", "interrupted": True, "rows": [{"a": 1}, {"b": 2}]}


def test_decode_plan(monkeypatch):
    """Modes named batch-1-only are measured at batch 1 alone, and the second state dtype at batches
    above 1 alone; the modes there are depend on the device."""
    bench = load_script("generate", monkeypatch)
    args = bench.parse_args(["--device", "cuda", "--batches", "1", "256", "--state-dtypes", "float32", "bfloat16",
                             "--batch1-only", "eager", "official-compiled"])
    assert args.impls == ["ours", "eager", "compiled", "official", "official-compiled"]
    plan = bench.decode_plan(args)
    assert [(B, sd) for B, sd, _ in plan].count((1, "float32")) == 5
    assert [impl for B, sd, impl in plan if B == 256 and sd == "bfloat16"] == ["ours", "compiled", "official"]
    assert (1, "bfloat16", "ours") not in plan
    cpu = bench.parse_args(["--no-compiled", "--memory-tokens"])
    assert cpu.impls == ["ours", "official"] and cpu.memory_tokens == []


@pytest.mark.gpu
def test_kernels_per_token_on_cuda(decoding):
    """On CUDA the profiler's kernels of a step: the compiled step runs fewer than the eager one."""
    model = random_model(ModelConfig.from_preset("debug")).cuda()
    token = torch.ones(1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        state = decoding_state(None, model.config, 1, "cuda")
        eager = step_runner(model, state, cuda_graph=False, compile=False)
        n = decoding.count_kernels(lambda: eager(token), "cuda")["kernels"]
        compiled = cuda_compiled_step(model, state)
        got = decoding.count_kernels(lambda: compiled(model, token, state), "cuda")["kernels"]
    assert 0 < got < n


@pytest.mark.gpu
def test_official_compiled_graphed_equals_its_eager_generate(monkeypatch):
    """The official model in its fastest mode (compiled, captured) gives its eager generate's tokens."""
    pytest.importorskip("xlstm.xlstm_large.model")
    bench = load_script("generate", monkeypatch)
    ours, theirs = bench.build("debug", "cuda", torch.float32, official=True)
    ids = bench.prompt(2, 24, ours.config, "cuda")
    with torch.no_grad():
        eager = theirs.generate(ids, max_length=12)[0]
    assert torch.equal(bench.official_graphed_generate(theirs, ids, 12), eager)


def test_bfloat16_state_drift_stays_bounded(monkeypatch):
    """With C and n in bfloat16 the logits stay near the float32 state's over 300 decoded tokens and
    the difference does not accumulate (the state's gates forget the rounding); a float32 'rounded'
    state is exact. The 7B head shape over 1,000 tokens: benchmarks/state_dtype.py."""
    bench = load_script("state_dtype", monkeypatch)
    torch.manual_seed(0)
    model = XLSTM(ModelConfig.from_preset("debug"))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=2 / model.config.embedding_dim ** 0.5)
    model.eval()
    prompt = torch.randint(2, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    errors, agree = bench.drift(model, prompt, 300, torch.bfloat16)
    assert 1e-4 < max(errors) < 0.3 and sum(errors) / len(errors) < 0.08 and sum(agree) / len(agree) > 0.9
    assert sum(errors[-100:]) < 2 * sum(errors[1:101])
    assert max(bench.drift(model, prompt, 20, torch.float32)[0]) == 0
