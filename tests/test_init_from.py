"""`[model] init_from`: a run starts from a saved model in any layout, takes its architecture and
tokenizer, loads the same weights in 1 and 2 (FSDP2) processes, and a resumed run ignores it."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import xlstm7b
from conftest import random_model
from xlstm7b.pretrained import unfuse
from xlstm7b.train import trainer
from xlstm7b.train.config import load_config
from xlstm7b.train.data import TokenData, prepare_data
from xlstm7b.train.tokenizer import token_bytes_tensor
from xlstm7b.train.tokenizer import train_bpe
from xlstm7b.train.parallel import Dist, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> Path:
    """An exported model (not the debug preset's shape) with its tokenizer."""
    config = xlstm7b.ModelConfig(embedding_dim=48, num_blocks=2, num_heads=2, vocab_size=320, chunk_size=16)
    path = tmp_path_factory.mktemp("saved")
    xlstm7b.save_pretrained(random_model(config, seed=3), path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A fine-tuning config: [model] holds init_from alone (given on the command line)."""
    path = tmp_path_factory.mktemp("config") / "finetune.toml"
    path.write_text("[model]\n\n[train]\nlr = 1e-3\nwarmup_steps = 1\nschedule = \"constant\"\n")
    return path


def args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"--data.source={corpus}", f"--data.cache_dir={corpus.parent / 'cache'}", f"--run.dir={run_dir}",
            "--data.val_fraction=0.2", "--run.progress=false", "--run.export=false", "--train.seq_len=32",
            "--train.global_batch_tokens=256", "--train.micro_batch=4", "--run.eval_tokens=512", "--run.eval_every=0",
            "--run.log_every=1", "--train.threads=1", *extra]


def first_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def xlstm_package_layout(model: xlstm7b.XLSTM, path: Path) -> Path:
    """config.yaml + model.safetensors with `embedding.weight`, as the xlstm package writes them."""
    path.mkdir()
    sd = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v.contiguous()
          for k, v in unfuse(model.state_dict(), model.config).items()}
    save_file(sd, path / "model.safetensors")
    c = model.config
    (path / "config.yaml").write_text(yaml.safe_dump({"embedding_dim": c.embedding_dim, "num_heads": c.num_heads, "num_blocks": c.num_blocks,
                                                      "vocab_size": c.vocab_size, "chunk_size": c.chunk_size, "weight_mode": "single"}))
    return path


def test_architecture_and_tokenizer_come_from_the_folder(saved, config, corpus, tmp_path):
    job = load_config(config, args(corpus, tmp_path, f"--model.init_from={saved}", "--model.chunk_size=32"))
    assert (job.model.embedding_dim, job.model.vocab_size, job.model.init_from) == (48, 320, str(saved))
    assert job.model.chunk_size == 32  # how the model runs is the run's choice
    assert job.data.tokenizer == str(saved / "tokenizer.json")
    # A [model] key that contradicts the folder, named with both values.
    with pytest.raises(ValueError, match=r"model.embedding_dim = 64 contradicts 48 in model.init_from="):
        load_config("debug", args(corpus, tmp_path, f"--model.init_from={saved}"))
    with pytest.raises(ValueError, match="is not a saved model folder"):
        load_config(config, args(corpus, tmp_path, f"--model.init_from={tmp_path / 'nothing'}"))
    bare = tmp_path / "bare"
    xlstm7b.save_pretrained(xlstm7b.from_pretrained(saved), bare)
    with pytest.raises(ValueError, match="has no tokenizer.json, and a tokenizer trained anew would not match"):
        load_config(config, args(corpus, tmp_path, f"--model.init_from={bare}"))
    # A tokenizer with more tokens than the model's vocabulary.
    big = tmp_path / "big.json"
    train_bpe([f.read_text() for f in corpus.iterdir()], 400).save(str(big))
    job = load_config(config, args(corpus, tmp_path / "r", f"--model.init_from={bare}", f"--data.tokenizer={big}"))
    with pytest.raises(ValueError, match="but model.vocab_size=320"):
        prepare_data(job.data, job.model)


@pytest.mark.parametrize("layout", ["ours", "hf-sharded", "xlstm-package"])
def test_step_zero_is_the_saved_model(saved, config, corpus, tmp_path, layout):
    """The run's first loss (computed before the first update) and its validation loss at step 0
    equal the saved model's, from every layout from_pretrained reads."""
    model = xlstm7b.from_pretrained(saved)
    folder = saved
    if layout == "hf-sharded":
        folder = tmp_path / "hf"
        xlstm7b.save_pretrained(model, folder, max_shard_size=20_000)
        assert (folder / "model.safetensors.index.json").is_file()
    elif layout == "xlstm-package":
        folder = xlstm_package_layout(model, tmp_path / "pkg")
    tok = [f"--data.tokenizer={saved / 'tokenizer.json'}"] if layout != "ours" else []
    job = load_config(config, args(corpus, tmp_path / "run", f"--model.init_from={folder}", "--train.steps=1", *tok))
    data_dir, _, tok_obj = prepare_data(job.data, job.model)

    # Step 0 validation: the run's model as built for training == the saved model.
    built, plain, _ = build_model(job.model, job.train, Dist(), seed=5, init_from=job.model.init_from)
    val = TokenData(data_dir, "val", job.train.seq_len, 0, job.model.vocab_size)
    tb = token_bytes_tensor(tok_obj, job.model.vocab_size, "cpu")
    ours = trainer.evaluate(built, plain.logits, val, tb, job, Dist(), contextlib.nullcontext())
    ref = trainer.evaluate(model, model.logits, val, tb, job, Dist(), contextlib.nullcontext())
    assert ours["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)

    if layout == "ours":  # the whole run: its first logged loss is the saved model's on the first batch
        assert trainer.train(job) == 0
        assert first_losses(tmp_path / "run")[1] == pytest.approx(first_batch_loss(model, job, data_dir), rel=1e-5)


def first_batch_loss(model: xlstm7b.XLSTM, job, data_dir: Path) -> float:
    """The model's loss on the run's first batch (what the run logs at step 1, before its update)."""
    train_data = TokenData(data_dir, "train", job.train.seq_len, 0, job.model.vocab_size)
    grad_accum = job.grad_accum(1)
    with torch.no_grad():
        return sum(trainer.sequence_loss(model, model.logits, *train_data.train_batch(0, m, grad_accum, 4, 0, 1),
                                         contextlib.nullcontext()).mean().item() for m in range(grad_accum)) / grad_accum


@pytest.mark.gpu
def test_cpu_offload_starts_from_the_saved_model(saved, config, corpus, tmp_path):
    """One GPU, FSDP2 with the parameters offloaded to the host: the weights are read into the
    offloaded shards and the first loss is the saved model's (bf16 autocast on the GPU: 1e-2)."""
    model = xlstm7b.from_pretrained(saved)
    job = load_config(config, args(corpus, tmp_path / "run", f"--model.init_from={saved}", "--train.steps=1",
                                   "--train.cpu_offload=true"))
    data_dir, _, _ = prepare_data(job.data, job.model)
    assert trainer.train(job) == 0
    assert first_losses(tmp_path / "run")[1] == pytest.approx(first_batch_loss(model, job, data_dir), rel=1e-2)


def test_fsdp_loads_the_same_weights_and_resume_ignores_init_from(saved, config, corpus, tmp_path):
    """Two processes (gloo, FSDP2: each reads the file into its shards) train from the folder to the
    same losses as one process; resumed after the folder lost its weights, the run goes on from its
    own checkpoint to the loss of an uninterrupted run."""
    src = tmp_path / "src"
    src.mkdir()
    for f in saved.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    extra = [f"--model.init_from={src}", "--train.loss_chunk_tokens=48", "--run.ckpt_every=1"]  # the head in pieces, as FSDP runs it
    assert trainer.train(load_config(config, args(corpus, tmp_path / "one", *extra, "--train.steps=3"))) == 0
    one = first_losses(tmp_path / "one")

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "xlstm7b", "train", str(config)]
    out = subprocess.run([*launcher, *args(corpus, tmp_path / "two", *extra, "--train.steps=2", "--train.parallel=fsdp")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    two = first_losses(tmp_path / "two")
    assert list(two) == [1, 2]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5)

    (src / "model.safetensors").unlink()  # a resume that read the weights again would fail
    resumed = load_config(config, args(corpus, tmp_path / "two", *extra, "--train.steps=3", "--train.parallel=none"))
    assert trainer.train(resumed) == 0
    assert first_losses(tmp_path / "two")[3] == pytest.approx(one[3], rel=1e-5)


def test_finetune_preset_loads(saved, corpus):
    """configs/finetune/toy-draft-code.toml: [model] is init_from alone; the recipe's LR and warmup."""
    path = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "toy-draft-code.toml"
    job = load_config(path, [f"--model.init_from={saved}", f"--data.source={corpus}"])
    assert job.model.embedding_dim == 48 and job.data.tokenizer == str(saved / "tokenizer.json")
    assert (job.train.lr, job.train.warmup_steps, job.train.schedule) == (1e-3, 10, "wsd")
