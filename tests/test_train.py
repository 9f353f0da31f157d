"""Pretraining system on CPU: config, data, schedule, exact resume, checkpoints, bad input, export."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import xlstm7b
from conftest import perturb
from xlstm7b import ModelConfig
from xlstm7b.train import checkpointing, trainer
from xlstm7b.train.cli import plan_main, plot_main
from xlstm7b.train.config import TrainConfig, load_config
from xlstm7b.train.data import Corpus, TokenData, prepare_data
from xlstm7b.train.optim import lr_at, param_groups
from xlstm7b.train.parallel import Dist, build_model
from xlstm7b.train.plan import estimate
from xlstm7b.train.tokenizer import train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")  # the runs below set torch's threads to 1; restored after the module


def overrides(corpus: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    """A tiny run on one thread (a second one only waits on a busy machine: 5x slower steps)."""
    return [f"--data.source={corpus}", f"--data.cache_dir={cache}", f"--run.dir={run_dir}", "--data.val_fraction=0.1",
            "--run.progress=false", "--run.export=false", "--train.seq_len=32", "--train.global_batch_tokens=256",
            "--train.micro_batch=4", "--run.eval_tokens=256", "--run.eval_every=0", "--run.log_every=1", "--train.threads=1", *extra]


def job(corpus, cache, run_dir, *extra):
    return load_config("debug", overrides(corpus, cache, run_dir, *extra))


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["debug", "toy", "125m", "350m", "1.3b", "7b"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.train.steps > 0 and cfg.run.dir
    if preset == "7b":
        assert cfg.model.architecture() == xlstm7b.ModelConfig.from_preset("7b")


def test_overrides_and_types():
    cfg = load_config("debug", ["--train.steps=7", "--train.lr=1", "--run.dir=x/y", "--train.schedule=wsd", "--run.export=false"])
    assert (cfg.train.steps, cfg.train.lr, cfg.run.dir, cfg.train.schedule, cfg.run.export) == (7, 1.0, "x/y", "wsd", False)
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("args, message", [
    (["--train.stepz=3"], "unknown key(s) ['train.stepz']; valid [train] keys"),
    (["--trian.steps=3"], "unknown section 'trian'"),
    (["--model.dim=3"], "unknown key(s) ['model.dim']; valid [model] keys"),
    (["--train.steps=abc"], "train.steps must be a positive integer, got 'abc'"),
    (["--train.schedule=linear"], "train.schedule must be one of"),
    (["train.steps=3"], "must look like --section.key=value"),
    (["--train.seq_len=100"], "multiple of train.seq_len"),
    (["--train.loss_chunk_tokens=-1"], "train.loss_chunk_tokens must be an integer >= 0 (0 = all at once), got -1"),
])
def test_config_errors(args, message):
    with pytest.raises(ValueError, match=None) as e:
        load_config("debug", args)
    assert message in str(e.value)


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nembedding_dim = 64\nnum_heads = 2\n[optim]\nlr = 1\n')
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['optim'\]; valid sections"):
        load_config(str(path))


# --- schedule and optimizer -----------------------------------------------------------------------

def test_schedules():
    cfg = load_config("debug", ["--train.steps=100", "--train.warmup_steps=10", "--train.lr=1", "--train.min_lr_ratio=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    cfg.schedule = "cosine"
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55, abs=0.02)
    cfg.schedule, cfg.cooldown_steps = "exponential", 10
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(90, cfg) == pytest.approx(0.1)
    assert lr_at(50, cfg) == pytest.approx(0.1**0.5)
    assert lr_at(95, cfg) == pytest.approx(0.05) and lr_at(99, cfg) == pytest.approx(0.01)
    cfg.schedule, cfg.cooldown_steps = "wsd", 0  # 20 % cool-down from the peak to 0
    assert lr_at(79, cfg) == 1.0 and lr_at(80, cfg) == pytest.approx(1.0) and lr_at(90, cfg) == pytest.approx(0.5)


def test_weight_decay_groups():
    model = xlstm7b.XLSTM(xlstm7b.ModelConfig.from_preset("debug"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "lm_head.weight" in decayed and "backbone.blocks.0.mlstm_layer.in_proj.weight" in decayed
    assert "backbone.embeddings.weight" not in decayed
    assert not any(n.endswith("bias") or "norm" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# --- loss -----------------------------------------------------------------------------------------

def test_loss_in_pieces_equals_loss_at_once():
    """loss_chunk_tokens changes memory, not the numbers: the same per-token losses and gradients, and
    no logits-sized tensor kept for the backward pass."""
    model = perturb(xlstm7b.XLSTM(xlstm7b.ModelConfig.from_preset("debug")), 0.1)
    V = model.config.vocab_size
    ids = torch.randint(1, V, (3, 41), generator=torch.Generator().manual_seed(0))
    ids[:, ::13] = 0
    inputs, targets = ids[:, :-1], ids[:, 1:]
    runs = {}
    for chunk in (0, 16, 7):
        saved = []
        def pack(t):
            saved.append(t.numel() if t.shape[-1:] == (V,) else 0)  # logits-shaped tensors only
            return t
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            nats = trainer.sequence_loss(model, model.logits, inputs, targets, inputs == 0, contextlib.nullcontext(), chunk)
        nats.mean().backward()
        runs[chunk] = nats.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, max(saved)
    full, grads, _ = runs[0]
    assert runs[0][2] >= inputs.numel() * V  # at once: whole logits are kept for the backward pass
    for chunk in (16, 7):
        nats, chunk_grads, biggest = runs[chunk]
        torch.testing.assert_close(nats, full, rtol=1e-6, atol=1e-6)
        for n, g in grads.items():  # summation order differs: compare each gradient as a whole
            err = ((chunk_grads[n] - g).norm() / g.norm()).item()
            assert err < 1e-5, f"{n}: relative error {err:.1e}"
        assert biggest == 0  # in pieces: no logits kept, each piece's are recomputed in the backward pass
    with torch.no_grad():
        evaluated = trainer.sequence_loss(model, model.logits, inputs, targets, inputs == 0, contextlib.nullcontext(), 16)
    torch.testing.assert_close(evaluated, full)


# --- data -----------------------------------------------------------------------------------------

def test_shards_manifest_reuse_and_batches(corpus, cache):
    cfg = job(corpus, cache, "unused")
    folder, tok_path, _ = prepare_data(cfg.data, cfg.model)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["splits"]["val"]["documents"] > 0
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert prepare_data(cfg.data, cfg.model)[:2] == (folder, tok_path)  # cached, not rebuilt
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp

    data = TokenData(folder, "train", 32, seed=0, vocab_size=cfg.model.vocab_size)
    inputs, targets, reset = data.train_batch(3, 1, 2, 4, 0, 1)
    assert inputs.shape == targets.shape == reset.shape == (4, 32)
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.equal(reset, inputs == 0)
    # The global batch of a step is the same whatever the split into processes and micro-batches.
    one = torch.cat([data.train_batch(3, m, 2, 4, 0, 1)[0] for m in range(2)])
    two = torch.cat([data.train_batch(3, 0, 1, 4, r, 2)[0] for r in range(2)])
    assert torch.equal(one, two)
    # Epochs are permutations of all windows.
    ks = [data.sample_window(k) for k in range(data.num_windows)]
    assert sorted(ks) == list(range(data.num_windows))
    # Documents are separated by the model's bos_token_id.
    other = job(corpus, cache, "unused", "--model.bos_token_id=2")
    folder2, _, _ = prepare_data(other.data, other.model)
    inputs, _, reset = TokenData(folder2, "train", 32, seed=0, vocab_size=other.model.vocab_size).batch([0])
    assert folder2 != folder and inputs[0, 0] == 2 and reset[0, 0] and torch.equal(reset, inputs == 2)


def test_reset_stops_flow_between_documents():
    """Tokens after a document start do not depend on the document before it."""
    model = xlstm7b.XLSTM(xlstm7b.ModelConfig.from_preset("debug")).eval()
    a = torch.tensor([[0, 5, 6, 7, 0, 9, 10, 11]])
    b = torch.tensor([[0, 8, 3, 2, 0, 9, 10, 11]])
    with torch.no_grad():
        la, _ = model(a, reset=a == 0)
        lb, _ = model(b, reset=b == 0)
    torch.testing.assert_close(la[:, 4:], lb[:, 4:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[:, 1:4], lb[:, 1:4])


def test_empty_data_and_oversized_tokenizer(tmp_path, corpus, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .* files there"):
        trainer.train(job(tmp_path / "empty", cache, tmp_path / "r"))
    with pytest.raises(ValueError, match="does not exist"):
        trainer.train(job(tmp_path / "missing.txt", cache, tmp_path / "r"))
    tok = train_bpe([(corpus / f).read_text() for f in sorted(os.listdir(corpus))[:5]], 600)
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"has \d+ tokens but model.vocab_size=512.*--model.vocab_size=640"):
        trainer.train(job(corpus, cache, tmp_path / "r", f"--data.tokenizer={tmp_path / 'tokenizer.json'}"))


def all_documents(cfg) -> dict[str, str]:
    corpus = Corpus(cfg.data)
    return {name: text for split in ("train", "val") for name, text in corpus.documents(split)}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_json_and_parquet_sources(tmp_path, corpus, cache, fmt):
    import datasets

    texts = [(corpus / f).read_text() for f in sorted(os.listdir(corpus))[:20]]
    path = tmp_path / f"docs.{fmt}"
    table = datasets.Dataset.from_dict({"content": texts, "id": list(range(len(texts)))})
    table.to_json(path) if fmt == "jsonl" else table.to_parquet(path)
    cfg = job(path, cache, tmp_path / "run", "--data.text_field=content", "--data.val_fraction=0.3", "--train.steps=2")
    assert sorted(all_documents(cfg).values()) == sorted(texts)  # one document per row, none lost
    assert trainer.train(cfg) == 0 and len(losses(tmp_path / "run")) == 2
    with pytest.raises(ValueError, match=r"no column 'text'.*data.text_field to one of \['content', 'id'\]"):
        all_documents(job(path, cache, "unused"))


def test_mixed_file_formats_are_rejected(tmp_path, cache):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.jsonl").write_text('{"text": "json"}\n')
    with pytest.raises(ValueError, match="mixes file formats"):
        Corpus(job(tmp_path, cache, "unused").data)


def test_hub_source_streams_and_stops_at_max_documents(cache, monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config=None, *, split, streaming=False):
        calls.append((name, config, split, streaming))
        return ({"text": f"document {n}"} for n in range(10**9))  # endless: must be streamed and cut

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = job("someone/code-corpus", cache, "unused", "--data.hub_config=python", "--data.hub_split=train[:1%]",
              "--data.max_documents=50")
    docs = all_documents(cfg)
    assert sorted(docs.values(), key=lambda t: int(t.split()[1])) == [f"document {n}" for n in range(50)]
    assert calls == [("someone/code-corpus", "python", "train[:1%]", True)] * 2  # one streamed pass per split
    assert Corpus(cfg.data).fingerprint() != Corpus(job("someone/code-corpus", cache, "unused").data).fingerprint()


# --- resume, checkpoints, failures ----------------------------------------------------------------

# The learning rate must not depend on train.steps, which the resumed half raises.
CONSTANT = ("--train.schedule=constant", "--train.warmup_steps=2", "--run.ckpt_every=100")


def test_exact_resume_bit_identical(tmp_path, corpus, cache):
    assert trainer.train(job(corpus, cache, tmp_path / "straight", "--train.steps=20", *CONSTANT)) == 0
    assert trainer.train(job(corpus, cache, tmp_path / "resumed", "--train.steps=10", *CONSTANT)) == 0
    # The second half is a new invocation: steps raised, everything else restored from the checkpoint.
    assert trainer.train(job(corpus, cache, tmp_path / "resumed", "--train.steps=20", *CONSTANT)) == 0
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert list(resumed) == list(range(1, 21)) and resumed == straight  # bit-identical


def test_incompatible_resume(tmp_path, corpus, cache):
    assert trainer.train(job(corpus, cache, tmp_path / "r", "--train.steps=2")) == 0
    with pytest.raises(ValueError, match=r"(?s)model.embedding_dim: 64 in the checkpoint, 32 now.*different --run.dir"):
        trainer.train(job(corpus, cache, tmp_path / "r", "--train.steps=4", "--model.embedding_dim=32"))


def test_crash_mid_save_keeps_last_checkpoint(tmp_path, corpus, cache, monkeypatch):
    run = tmp_path / "r"
    assert trainer.train(job(corpus, cache, run, "--train.steps=2", "--run.ckpt_every=2")) == 0

    def crash(*args, **kwargs):
        partial = Path(kwargs["checkpoint_id"])
        (partial / "__0_0.distcp").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.dcp, "save", crash)
    with pytest.raises(checkpointing.SaveError, match="disk full"):
        trainer.train(job(corpus, cache, run, "--train.steps=4", "--run.ckpt_every=2"))
    monkeypatch.undo()
    assert [p.name for p in checkpointing.checkpoints(run)] == ["step_00000002"]
    assert trainer.train(job(corpus, cache, run, "--train.steps=4", "--run.ckpt_every=2")) == 0
    assert [p.name for p in checkpointing.checkpoints(run)] == ["step_00000002", "step_00000004"]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, corpus, cache, monkeypatch):
    run = tmp_path / "r"
    calls = []
    real = trainer.sequence_loss

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) > 2 * 3 else loss  # 2 micro-batches per step: NaN at step 4

    monkeypatch.setattr(trainer, "sequence_loss", poisoned)
    with pytest.raises(trainer.TrainingError, match=r"non-finite loss .* at step 4.*step_00000002 is intact"):
        trainer.train(job(corpus, cache, run, "--train.steps=6", "--run.ckpt_every=2"))
    assert [p.name for p in checkpointing.checkpoints(run)] == ["step_00000002"]
    monkeypatch.undo()
    assert trainer.train(job(corpus, cache, run, "--train.steps=4", "--run.ckpt_every=2")) == 0


def run_cli(args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "xlstm7b", "train", "debug", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sigkill_restarts_from_last_checkpoint(tmp_path, corpus, cache):
    run = tmp_path / "r"
    args = overrides(corpus, cache, run, "--train.steps=1000", "--run.ckpt_every=3")
    proc = run_cli(args)
    deadline = time.time() + 120
    while not any(p.name >= "step_00000006" for p in checkpointing.checkpoints(run)) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = checkpointing.checkpoints(run)[-1]
    step = int(last.name.split("_")[1])
    assert step >= 6
    args[args.index("--train.steps=1000")] = f"--train.steps={step + 2}"
    out, _ = run_cli(args).communicate(timeout=120)
    assert f"resuming {run} at step {step}" in out, out
    assert sorted(losses(run)) == list(range(1, step + 3))


def test_sigterm_checkpoints_and_stops(tmp_path, corpus, cache):
    run = tmp_path / "r"
    proc = run_cli(overrides(corpus, cache, run, "--train.steps=1000", "--run.ckpt_every=1000"))
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, out
    assert len(checkpointing.checkpoints(run)) == 1


# --- export, plan, plot ---------------------------------------------------------------------------

def test_export_loads_with_from_pretrained(tmp_path, corpus, cache):
    run = tmp_path / "r"
    assert trainer.train(job(corpus, cache, run, "--train.steps=2", "--run.export=true", "--run.eval_every=1")) == 0
    model = xlstm7b.from_pretrained(run / "model")
    assert (run / "model" / "tokenizer.json").is_file() and model.config.vocab_size == 512
    assert (run / "sample.txt").is_file()
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        logits, _ = model(ids)
    assert torch.isfinite(logits).all()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gb"} <= set(records[0])
    evals = [r for r in records if "val_bpb" in r]
    assert len(evals) == 2 and all(math.isfinite(r["val_bpb"]) and r["val_bpb"] > 0 for r in evals)


def test_wandb_offline_logs_the_metrics(tmp_path, corpus, cache, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # the printed records must not stand in for logged ones
    run = tmp_path / "run"
    assert trainer.train(job(corpus, cache, run, "--train.steps=3", "--run.eval_every=3",
                             "--run.wandb_project=xlstm7b-test", "--run.wandb_mode=offline")) == 0
    logs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, "one offline wandb run in RUN_DIR/wandb"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # protobuf records: keys and JSON-encoded values appear verbatim
    expected = {"project": b"xlstm7b-test"}
    for key in ("loss", "val_bpb"):
        value = next(r[key] for r in reversed(records) if key in r)
        expected[f"{key} = {value}"] = json.dumps(value).encode()
    # wandb's service process may still be writing its transaction log when finish() has returned
    # (seen under load with wandb 0.31: the header alone); give it time before reading.
    deadline = time.monotonic() + 60
    while not all(b in (data := logs[0].read_bytes()) for b in expected.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for what, b in expected.items():
        assert b in data, f"{what} not logged to wandb"
    assert b"loss" in data and b"val_bpb" in data


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")

    records = [{"step": s, "loss": 5 - s / 10, "tokens_per_s": 1000.0} for s in range(1, 11)]
    records += [{"step": 5, "val_loss": 4.6, "val_bpb": 2.1}, {"step": 10, "val_loss": 4.2, "val_bpb": 1.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_7b(capsys):
    assert plan_main(["7b", "--gpus", "1", "--gpu-memory-gb", "80"]) == 1
    out = capsys.readouterr().out
    assert "6,865,424,896 parameters" in out and "fits         NO" in out and "--train.cpu_offload=true" in out
    assert plan_main(["7b", "--gpus", "1", "--gpu-memory-gb", "80", "--train.cpu_offload=true"]) == 0
    assert plan_main(["7b", "--gpus", "8", "--gpu-memory-gb", "80"]) == 0
    assert plan_main(["7b", "--parallel.cpu_offload=true"]) == 2
    assert "unknown section 'parallel'" in capsys.readouterr().err
    cfg = load_config("7b")
    assert estimate(cfg, 8, torch.device("cuda"), 80).parts_gb["optimizer"] == pytest.approx(8 * 6.865e9 / 8 / 2**30, rel=0.01)


def test_refuses_config_that_does_not_fit(tmp_path, corpus, cache):
    with pytest.raises(trainer.TrainingError, match="does not fit in memory"):
        trainer.train(job(corpus, cache, tmp_path / "r", "--run.gpu_memory_gb=0.5"))
    assert not (tmp_path / "r").exists()


def test_activation_checkpointing_gives_the_same_losses(tmp_path, corpus, cache):
    """Recomputing each block in the backward changes memory, not the numbers."""
    assert trainer.train(job(corpus, cache, tmp_path / "plain", "--train.steps=3")) == 0
    assert trainer.train(job(corpus, cache, tmp_path / "ac", "--train.steps=3", "--train.activation_checkpointing=true")) == 0
    plain, ac = losses(tmp_path / "plain"), losses(tmp_path / "ac")
    assert list(ac) == [1, 2, 3] and ac == pytest.approx(plain, rel=1e-6)


def test_fsdp_in_one_process_gives_the_same_losses(tmp_path, corpus, cache):
    """FSDP2 without torchrun (what cpu_offload on one GPU runs): a process group of one, the same
    losses as the plain model, and no group left behind."""
    assert trainer.train(job(corpus, cache, tmp_path / "plain", "--train.steps=2")) == 0
    assert trainer.train(job(corpus, cache, tmp_path / "fsdp", "--train.steps=2", "--train.parallel=fsdp")) == 0
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert not torch.distributed.is_initialized()


def test_activation_checkpointing_recomputes_every_block():
    config = ModelConfig.from_preset("debug")
    for recompute, forwards in ((False, 1), (True, 2)):
        model, plain, _ = build_model(config, TrainConfig(activation_checkpointing=recompute), Dist(), seed=0)
        calls = []
        for block in plain.backbone.blocks:
            block.mlstm_layer.register_forward_hook(lambda *_: calls.append(1))
        model(torch.tensor([[0, 5, 6, 7]]))[0].sum().backward()
        assert len(calls) == forwards * config.num_blocks


def test_compiled_blocks_give_the_same_losses(tmp_path, corpus, cache):
    """Per-block torch.compile (inductor, CPU code generation here) trains to the eager losses."""
    assert trainer.train(job(corpus, cache, tmp_path / "eager", "--train.steps=2")) == 0
    assert trainer.train(job(corpus, cache, tmp_path / "compiled", "--train.steps=2", "--train.compile=true")) == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert list(compiled) == [1, 2] and compiled == pytest.approx(eager, rel=1e-4)
