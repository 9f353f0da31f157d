"""Weight-only quantisation (xlstm7b/quantize.py): which layers, how close the logits stay, decoding
with it, and the errors where a method does not run or torchao is missing."""

import sys

import pytest
import torch
from conftest import prompt, random_model, rel_err

from xlstm7b import ModelConfig, generate
from xlstm7b.cli import generate_main
from xlstm7b.quantize import INT4_GROUP_SIZES, int4_group_size, quantize, quantized_layers

pytestmark = pytest.mark.usefixtures("one_thread")

DEBUG = ModelConfig.from_preset("debug")


def test_int8_on_cpu():
    """int8 replaces the projections' and the head's weights (not the gates' bias or the embedding), the
    logits stay within 5 % of the float32 model's, and generate decodes with it."""
    pytest.importorskip("torchao.quantization")
    model, reference = random_model(DEBUG, seed=2), random_model(DEBUG, seed=2)
    layers = quantized_layers(model)
    assert len(layers) == 4 * DEBUG.num_blocks + 1  # in_proj, out_proj, the feed-forward's two; the head
    assert quantize(model, "int8") is model
    assert all(type(layer.weight).__name__ == "Int8Tensor" for layer in layers)
    assert all(type(b.mlstm_layer.gate_bias) is torch.nn.Parameter for b in model.backbone.blocks)
    assert type(model.backbone.embeddings.weight) is torch.nn.Parameter
    ids = torch.tensor([prompt(40, 3), prompt(40, 4)])
    with torch.no_grad():
        assert rel_err(model(ids)[0], reference(ids)[0]) < 5e-2
    out = generate(model, ids, max_new_tokens=6)
    assert out.tokens.shape == (2, 6) and bool((out.tokens >= 0).all())
    with pytest.raises(ValueError, match="quantised already"):
        quantize(model, "int8")


def test_tied_head_stays_unquantised():
    model = random_model(DEBUG.replace(tie_word_embeddings=True))
    assert model.lm_head not in quantized_layers(model)


@pytest.mark.parametrize("method, change, match", [
    ("int4", None, "runs on CUDA only"),
    ("int2", None, "must be one of int8, int4"),
    ("int8", "not a model", "takes an xlstm7b.XLSTM"),
], ids=["int4-on-cpu", "unknown-method", "not-a-model"])
def test_errors(method, change, match):
    model = random_model(DEBUG) if change is None else change
    with pytest.raises((ValueError, TypeError), match=match):
        quantize(model, method)


def test_int4_group_sizes():
    assert int4_group_size(4096) == 128 and int4_group_size(10944) == 64 and int4_group_size(48) is None
    assert INT4_GROUP_SIZES[0] == 128


def test_without_torchao(monkeypatch):
    """Without torchao the error names the package and the extra that installs it."""
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ImportError, match=r"needs torchao .*pip install 'xlstm7b\[quantize\]'"):
        quantize(random_model(DEBUG), "int8")


def test_cli_quantize_error(checkpoint_dir, capsys):
    """`xlstm7b generate --quantize int4` on a CPU exits 2 with the reason."""
    args = ["--checkpoint", str(checkpoint_dir), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    assert generate_main(args + ["--quantize", "int4"]) == 2
    assert "runs on CUDA only" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("method, tol", [("int8", 5e-2), ("int4", 0.25)])
def test_quantized_decoding_on_cuda(method, tol):
    """On CUDA in bfloat16 the logits stay within tol of the unquantised model's, and the quantised
    step decodes the same tokens eagerly, in a CUDA graph and compiled in one."""
    pytest.importorskip("torchao.quantization")
    reference = random_model(DEBUG, seed=2).cuda().to(torch.bfloat16)
    model = quantize(random_model(DEBUG, seed=2).cuda().to(torch.bfloat16), method)
    ids = torch.tensor([prompt(40, 3), prompt(40, 4)], device="cuda")
    with torch.no_grad():
        assert rel_err(model(ids)[0], reference(ids)[0]) < tol
    kw = dict(max_new_tokens=12)
    eager = generate(model, ids, cuda_graph=False, **kw).tokens
    for compile in (False, True):
        assert torch.equal(generate(model, ids, cuda_graph=True, compile=compile, **kw).tokens, eager)
