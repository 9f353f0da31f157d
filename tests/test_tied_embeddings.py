"""Tied embeddings (`tie_word_embeddings = true`): the lm_head stays the embedding through
materialisation, device and dtype moves, training, export, save and load."""

import sysconfig
from pathlib import Path

import pytest
import torch

import xlstm7b
from conftest import perturb, rel_err
from xlstm7b import XLSTM, CheckpointError, ModelConfig, from_pretrained, save_pretrained
from xlstm7b.train import trainer
from xlstm7b.train.config import load_config

CONFIG = ModelConfig(embedding_dim=128, num_blocks=2, num_heads=2, vocab_size=300, chunk_size=16, tie_word_embeddings=True)


def is_tied(model: XLSTM) -> bool:
    return model.lm_head.weight is model.backbone.embeddings.weight


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb(XLSTM(CONFIG), 0.05).eval()


def test_materialising_and_moving_keep_the_tie():
    with torch.device("meta"):
        model = XLSTM(CONFIG)
    model.to_empty(device="cpu")
    assert is_tied(model)
    model.init_weights()
    assert is_tied(model.to(torch.bfloat16)) and model.lm_head.weight.dtype == torch.bfloat16


def test_save_load_round_trip(model, tmp_path):
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert is_tied(loaded) and loaded.num_params() == model.num_params()
    x = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(loaded(x)[0], model(x)[0]) == 0


def test_transformers_loads_a_tied_save(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("xlstm")
    save_pretrained(model, tmp_path)
    theirs = transformers.xLSTMForCausalLM.from_pretrained(tmp_path).eval()  # it never ties: reads lm_head.weight
    x = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(theirs(x).logits, model(x)[0]) < 1e-5


def test_untied_head_in_a_tied_checkpoint_is_an_error(model, tmp_path):
    from safetensors.torch import load_file, save_file

    save_pretrained(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from backbone.embeddings.weight .* set it to false"):
        from_pretrained(tmp_path)


def test_saving_an_untied_head_of_a_tied_config_is_an_error(tmp_path):
    model = XLSTM(CONFIG)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight + 1)
    with pytest.raises(ValueError, match=r"call model.tie_weights\(\)"):
        save_pretrained(model, tmp_path)


def test_training_keeps_the_tie_and_exports_the_trained_head(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:10]:
        (corpus / f.name).write_text(f.read_text(encoding="utf-8", errors="replace")[:10000])
    run = tmp_path / "run"
    job = load_config("debug", [
        f"--data.source={corpus}", f"--data.cache_dir={tmp_path / 'cache'}", f"--run.dir={run}", "--data.val_fraction=0.3",
        "--run.progress=false", "--run.export=true", "--run.sample_tokens=0", "--train.seq_len=32",
        "--train.global_batch_tokens=256", "--train.micro_batch=4", "--run.eval_tokens=256", "--run.eval_every=0",
        "--train.steps=3", "--model.tie_word_embeddings=true",
    ])
    built = []
    build = trainer.build_model
    monkeypatch.setattr(trainer, "build_model", lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    assert trainer.train(job) == 0

    trained = built[0][1].eval()
    assert is_tied(trained)
    exported = from_pretrained(run / "model")
    assert is_tied(exported)
    x = torch.tensor([[0, 5, 6, 7, 8]])
    with torch.no_grad():
        assert rel_err(exported(x)[0], trained(x)[0]) < 1e-6
    fresh = xlstm7b.XLSTM(exported.config)  # the same seed's initialisation, untrained
    assert not torch.equal(fresh.backbone.embeddings.weight, exported.backbone.embeddings.weight)
