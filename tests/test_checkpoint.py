"""Checkpoint I/O: both released layouts in, the Hugging Face layout out, and clear errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import perturb, rel_err
from xlstm7b import XLSTM, CheckpointError, ModelConfig, from_pretrained, save_pretrained
from xlstm7b.layouts import fuse, package_fused, unfuse

SAVED = [".xlstm7b-written.json", "config.json", "generation_config.json", "model.safetensors"]
"""What save_pretrained writes: its record of the files it wrote (`xlstm7b.written`) and the checkpoint."""
CONFIG = dict(embedding_dim=128, num_blocks=2, num_heads=2, vocab_size=300, chunk_size=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb(XLSTM(ModelConfig(**CONFIG)), 0.05).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))


def same_logits(a, b, x):
    with torch.no_grad():
        return rel_err(a(x)[0], b(x)[0]) < 1e-6


def test_round_trip_single_file(model, x, tmp_path):
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == SAVED
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "xlstm" and cfg["hidden_size"] == 128 and cfg["num_hidden_layers"] == 2
    loaded = from_pretrained(tmp_path)
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_round_trip_sharded_with_index(model, x, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert same_logits(model, from_pretrained(tmp_path), x)
    save_pretrained(model, tmp_path)  # a later unsharded save into the same folder replaces the shards
    assert sorted(p.name for p in tmp_path.iterdir()) == SAVED


def test_saves_the_released_single_layout(model, tmp_path):
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["weight_mode"] == "single"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    per_block = {n.split(".", 3)[3] for n in names if n.startswith("backbone.blocks.0.")}
    projections = ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact")
    assert per_block == {
        "norm_mlstm.weight", "norm_ffn.weight", "mlstm_layer.multihead_norm.weight", "mlstm_layer.out_proj.weight",
        "ffn.proj_down.weight", "ffn.proj_up_gate.weight", "ffn.proj_up.weight",
        *(f"mlstm_layer.{p}.weight" for p in projections), "mlstm_layer.igate_preact.bias", "mlstm_layer.fgate_preact.bias",
    }


@pytest.mark.parametrize("use_bias", [False, True])
def test_fuse_and_unfuse_are_inverse(model, use_bias):
    """The model's layout -> the released single one and the xlstm package's fused one -> back, with
    and without a bias on every projection (then the gates' bias is in_proj's)."""
    if use_bias:
        torch.manual_seed(4)
        model = perturb(XLSTM(ModelConfig(**CONFIG, use_bias=True)), 0.05)
    fused = model.state_dict()
    single = unfuse(fused, model.config)
    assert "backbone.blocks.1.mlstm_layer.q.weight" in single and not any("in_proj" in k or "gate_bias" in k for k in single)
    rows = {"q": 64, "k": 64, "v": 128, "ogate_preact": 128, "igate_preact": 2, "fgate_preact": 2}
    assert {p: single[f"backbone.blocks.1.mlstm_layer.{p}.weight"].shape[0] for p in rows} == rows
    assert ("backbone.blocks.0.mlstm_layer.q.bias" in single) == use_bias
    assert torch.equal(single["backbone.blocks.0.mlstm_layer.igate_preact.bias"], model.backbone.blocks[0].mlstm_layer.gate_biases()[:2])
    package = package_fused(fused, model.config)
    assert package["backbone.blocks.0.mlstm_layer.qkv_opreact.weight"].shape == (384, 128)
    assert package["backbone.blocks.0.mlstm_layer.ifgate_preact.bias"].shape == (4,)
    for other in (single, package):
        back = fuse(dict(other), model.config)
        assert set(back) == set(fused) and all(torch.equal(back[k], fused[k]) for k in fused)


def test_dtype_and_device_arguments(model, x, tmp_path):
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert from_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16
    loaded = from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert loaded.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        assert rel_err(loaded(x)[0], model(x)[0]) < 2e-2  # bf16 weights


def test_released_hf_folder_with_aliases_and_extra_keys(model, x, tmp_path):
    """A folder as released: query/key/value spelling, legacy config keys, a list of EOS ids."""
    sd = {k.replace(".mlstm_layer.q.", ".mlstm_layer.query.").replace(".mlstm_layer.k.", ".mlstm_layer.key.")
          .replace(".mlstm_layer.v.", ".mlstm_layer.value."): v.contiguous() for k, v in unfuse(model.state_dict(), model.config).items()}
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in names[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + (n >= half)}-of-00002.safetensors" for n, k in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "xlstm", "hidden_size": 128, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 300,
        "embedding_dim": None, "num_blocks": None, "chunkwise_kernel": "chunkwise--triton_xl_chunk",
        "mode": "inference", "max_inference_chunksize": 16384, "eos_token_id": [0, 2], "some_future_key": 1,
    }))
    loaded = from_pretrained(tmp_path)
    assert loaded.config.eos_token_id == 0 and same_logits(loaded, model, x)


@pytest.mark.parametrize("weight_mode", ["single", "fused"])
@pytest.mark.parametrize("files", [["model.safetensors"], ["model_0.safetensors", "model_1.safetensors"]])
def test_xlstm_package_layout(model, x, tmp_path, files, weight_mode):
    """config.yaml + model.safetensors or model_0, model_1, ... with `embedding.weight`, in either of
    the package's weight layouts."""
    import yaml

    sd = (package_fused if weight_mode == "fused" else unfuse)(model.state_dict(), model.config)
    sd = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v.contiguous() for k, v in sd.items()}
    names = sorted(sd)
    parts = [names] if len(files) == 1 else [names[::2], names[1::2]]
    for file, part in zip(files, parts):
        save_file({k: sd[k] for k in part}, tmp_path / file)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "embedding_dim": 128, "num_heads": 2, "num_blocks": 2, "vocab_size": 300, "chunk_size": 16,
        "chunkwise_kernel": "chunkwise--triton_limit_chunk", "weight_mode": weight_mode, "return_last_states": False,
    }))
    assert same_logits(from_pretrained(tmp_path), model, x)


def test_transformers_loads_what_we_save(model, x, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("xlstm")
    save_pretrained(model, tmp_path)
    theirs = transformers.xLSTMForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(theirs(x).logits, model(x)[0]) < 1e-5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_load_holds_one_copy_of_the_weights(tmp_path):
    """Peak resident memory of a load stays well under two copies of the weights."""
    torch.manual_seed(0)
    big = XLSTM(ModelConfig(embedding_dim=512, num_blocks=8, num_heads=4, vocab_size=50304))
    save_pretrained(big, tmp_path, max_shard_size=40 * 2**20)
    weight_bytes = sum(p.numel() * 4 for p in big.parameters())
    del big
    # VmHWM, not ru_maxrss (which a child inherits from its parent).
    script = textwrap.dedent(f"""
        import torch, xlstm7b
        def hwm():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
        with torch.device("meta"):  # the first use of the meta device imports ~150 MB of torch code
            xlstm7b.XLSTM(xlstm7b.ModelConfig(embedding_dim=64, num_blocks=1, num_heads=2, vocab_size=8))
        base = hwm()
        model = xlstm7b.from_pretrained({str(tmp_path)!r})
        print(hwm() - base)
    """)
    peak = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert 0.8 * weight_bytes < peak < 1.4 * weight_bytes, (peak, weight_bytes)


def test_errors_name_the_file_and_key(model, tmp_path):
    save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    sd = dict(model.state_dict())

    sd.pop("backbone.blocks.1.ffn.proj_down.weight")
    save_file({k: v.contiguous() for k, v in sd.items()}, weights)
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['backbone.blocks.1.ffn.proj_down.weight'\]"):
        from_pretrained(tmp_path)

    sd = dict(model.state_dict())
    sd["backbone.blocks.0.extra.weight"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in sd.items()}, weights)
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected key\(s\) \['backbone.blocks.0.extra.weight'\]"):
        from_pretrained(tmp_path)

    sd = dict(model.state_dict())
    sd["lm_head.weight"] = torch.zeros(301, 128)
    save_file({k: v.contiguous() for k, v in sd.items()}, weights)
    with pytest.raises(CheckpointError, match=r"model.safetensors: key lm_head.weight has shape \[301, 128\], the config expects \[300, 128\]"):
        from_pretrained(tmp_path)

    save_pretrained(model, tmp_path, overwrite=True)  # over the files written above with save_file
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated: key"):
        from_pretrained(tmp_path)


def test_errors_for_missing_files(model, tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path)
    save_pretrained(model, tmp_path, max_shard_size=200_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="listed in model.safetensors.index.json but missing"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 128}))
    with pytest.raises(CheckpointError, match=r"missing config key\(s\) \['num_blocks', 'num_heads', 'vocab_size'\]"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        from_pretrained(tmp_path)
