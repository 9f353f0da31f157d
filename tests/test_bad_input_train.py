"""Bad input to the training commands (`train`, `plan`, `plot`, `tokenizer`) and their config: one
clear message naming the input and what is allowed, a non-zero exit, never a traceback. The commands
run in-process through `xlstm7b.cli.main`; every case here fails before any data or model is built."""

import io
import os
import pwd
import sys

import pytest

from xlstm7b.cli import main
from xlstm7b.config import ModelConfig
from xlstm7b.train import cli
from xlstm7b.train.config import RunConfig, TrainConfig


def run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.err + out.out


# --- config values: strict types and ranges in every section -----------------------------------------

CONFIG_CASES = [
    # [model]
    ("model-bool-as-string", "--model.use_bias=False", "model.use_bias must be true or false (TOML booleans are lowercase), got 'False'"),
    ("model-bool-as-int", "--model.tie_word_embeddings=0", "model.tie_word_embeddings must be true or false, got 0"),
    ("model-int-as-bool", "--model.num_blocks=true", "model.num_blocks must be a positive integer, got True"),
    ("model-int-as-float", "--model.embedding_dim=64.0", "model.embedding_dim must be a positive integer, got 64.0"),
    ("model-soft-cap-inf", "--model.gate_soft_cap=inf", "model.gate_soft_cap must be a positive number, got inf, which is not finite"),
    ("model-soft-cap-nan", "--model.output_logit_soft_cap=nan", "model.output_logit_soft_cap must be a positive number, got nan"),
    ("model-eps-zero", "--model.eps=0", "model.eps must be a positive number, got 0"),
    ("model-backend", "--model.mlstm_backend=cuda", "model.mlstm_backend must be one of ['auto', 'torch', 'triton'], got 'cuda'"),
    ("model-token-negative", "--model.pad_token_id=-1", "model.pad_token_id must be an integer >= 0, got -1"),
    ("model-token-past-vocab", "--model.eos_token_id=512", "model.eos_token_id=512 must lie in [0, vocab_size=512)"),
    ("model-heads-divide", "--model.num_heads=3", "model.num_heads=3 must divide qk_dim"),
    # [train]
    ("grad-clip-negative", "--train.grad_clip=-1", "train.grad_clip must be a number >= 0 (0 = off), got -1"),
    ("min-lr-ratio-negative", "--train.min_lr_ratio=-0.1", "train.min_lr_ratio must be a number in [0, 1], got -0.1"),
    ("min-lr-ratio-above-one", "--train.min_lr_ratio=2", "train.min_lr_ratio must be a number in [0, 1], got 2"),
    ("warmup-negative", "--train.warmup_steps=-5", "train.warmup_steps must be an integer >= 0, got -5"),
    ("cooldown-negative", "--train.cooldown_steps=-1", "train.cooldown_steps must be an integer >= 0, got -1"),
    ("weight-decay-negative", "--train.weight_decay=-0.1", "train.weight_decay must be a number >= 0, got -0.1"),
    ("eps-zero", "--train.eps=0", "train.eps must be a positive number, got 0"),
    ("lr-zero", "--train.lr=0", "train.lr must be a positive number, got 0"),
    ("lr-inf", "--train.lr=inf", "train.lr must be a positive number, got inf, which is not finite"),
    ("lr-string", "--train.lr=fast", "train.lr must be a positive number, got 'fast'"),
    ("beta1-one", "--train.beta1=1", "train.beta1 must be a number in [0, 1), got 1"),
    ("beta2-negative", "--train.beta2=-0.5", "train.beta2 must be a number in [0, 1), got -0.5"),
    ("threads-negative", "--train.threads=-1", "train.threads must be an integer >= 0 (0 = the idle cores), got -1"),
    ("steps-zero", "--train.steps=0", "train.steps must be a positive integer, got 0"),
    ("steps-float", "--train.steps=3.5", "train.steps must be a positive integer, got 3.5"),
    ("compile-as-string", "--train.compile=yes", "train.compile must be true or false, got 'yes'"),
    ("schedule-unknown", "--train.schedule=linear", "train.schedule must be one of ['exponential', 'cosine', 'wsd', 'constant'], got 'linear'"),
    ("dtype-unknown", "--train.dtype=fp8", "train.dtype must be one of ['auto', 'bfloat16', 'float32'], got 'fp8'"),
    ("batch-not-multiple", "--train.seq_len=100", "train.global_batch_tokens=512 must be a multiple of train.seq_len=100"),
    # [run]
    ("eval-every-negative", "--run.eval_every=-1", "run.eval_every must be an integer >= 0 (0 = at the end only), got -1"),
    ("ckpt-every-zero", "--run.ckpt_every=0", "run.ckpt_every must be a positive integer, got 0"),
    ("log-every-zero", "--run.log_every=0", "run.log_every must be a positive integer, got 0"),
    ("keep-zero", "--run.keep_checkpoints=0", "run.keep_checkpoints must be a positive integer, got 0"),
    ("seed-negative", "--run.seed=-1", "run.seed must be an integer in [0, 4.29497e+09), got -1"),
    ("dir-empty", "--run.dir=''", "run.dir must be a non-empty string, got ''"),
    ("gpu-memory-negative", "--run.gpu_memory_gb=-8", "run.gpu_memory_gb must be a number >= 0 (0 = ask the device), got -8"),
    ("export-as-string", "--run.export=False", "run.export must be true or false (TOML booleans are lowercase), got 'False'"),
    # [data]
    ("val-fraction-one", "--data.val_fraction=1", "data.val_fraction must be a number in [0, 1), got 1"),
    ("max-documents-negative", "--data.max_documents=-1", "data.max_documents must be an integer >= 0 (0 = all), got -1"),
    ("shard-tokens-zero", "--data.shard_tokens=0", "data.shard_tokens must be a positive integer, got 0"),
    ("cache-dir-empty", "--data.cache_dir=''", "data.cache_dir must be a non-empty string, got ''"),
    # keys
    ("unknown-key", "--train.stepz=3", "unknown key(s) ['train.stepz']; valid [train] keys"),
]
OVERRIDE_SYNTAX_CASES = [
    ("unknown-section", "--trian.steps=3", "override '--trian.steps=3': unknown section 'trian'; valid sections"),
    ("no-equals", "--train.steps", "override '--train.steps' must look like --section.key=value"),
    ("no-dashes", "train.steps=3", "override 'train.steps=3' must look like --section.key=value"),
    ("no-key", "--train=3", "override '--train=3' must look like --section.key=value"),
]


@pytest.mark.parametrize("command", ["train", "plan"])
@pytest.mark.parametrize("override, message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value(capsys, command, override, message):
    code, out = run(capsys, command, "debug", override)
    assert code == 2 and message in out and "debug.toml (with overrides)" in out, out


@pytest.mark.parametrize("command", ["train", "plan"])
@pytest.mark.parametrize("override, message", [c[1:] for c in OVERRIDE_SYNTAX_CASES], ids=[c[0] for c in OVERRIDE_SYNTAX_CASES])
def test_bad_override_syntax(capsys, command, override, message):
    code, out = run(capsys, command, "debug", override)
    assert code == 2 and message in out, out


def test_overrides_of_string_fields_keep_their_text():
    """A folder named like a number stays a folder name, not an int that fails the type check."""
    from xlstm7b.train.config import load_config

    assert load_config("debug", ["--run.dir=2024", "--data.hub_split=1"]).run.dir == "2024"


def test_sections_validate_when_built_in_python():
    with pytest.raises(ValueError, match=r"train.grad_clip must be a number >= 0 \(0 = off\), got -1.0"):
        TrainConfig(grad_clip=-1.0)
    with pytest.raises(ValueError, match="run.progress must be true or false, got 'no'"):
        RunConfig(progress="no")
    with pytest.raises(ValueError, match="model.use_bias must be true or false"):
        ModelConfig(use_bias="False")
    assert isinstance(TrainConfig(lr=1).lr, float)  # an int given for a float is stored as a float


# --- config files --------------------------------------------------------------------------------

FILE_CASES = [
    ("missing-file", None, "nope/missing.toml", "config file nope/missing.toml does not exist"),
    ("folder", None, "{tmp}", "is a folder, not a TOML file"),
    ("malformed-toml", "[train\nsteps = 3\n", "{tmp}/c.toml", "c.toml is not valid TOML"),
    ("section-not-table", "model = 3\n", "{tmp}/c.toml", "[model] must be a table of keys, got model = 3"),
    ("bad-value-in-file", "[train]\ngrad_clip = -2.0\n", "{tmp}/c.toml", "c.toml: train.grad_clip must be a number >= 0 (0 = off), got -2.0"),
    ("unknown-section", "[optim]\nlr = 1\n", "{tmp}/c.toml", "unknown section(s) ['optim']; valid sections"),
    ("unknown-preset", None, "huge", "unknown preset 'huge'"),
]


@pytest.mark.parametrize("text, path, message", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(capsys, tmp_path, text, path, message):
    path = path.format(tmp=tmp_path)
    if text is not None:
        (tmp_path / "c.toml").write_text(text)
    code, out = run(capsys, "train", path)
    assert code == 2 and message in out, out


# --- the run directory -----------------------------------------------------------------------------

RUN_DIR_CASES = [
    ("run-dir-is-a-file", "{tmp}/f", "run.dir {tmp}/f cannot be used: it is a file"),
    ("run-dir-under-a-file", "{tmp}/f/run", "run.dir {tmp}/f/run cannot be used: Not a directory"),
    ("run-dir-unwritable", "{tmp}/ro/run", "run.dir {tmp}/ro/run cannot be used: Permission denied"),
]


@pytest.mark.parametrize("run_dir, message", [c[1:] for c in RUN_DIR_CASES], ids=[c[0] for c in RUN_DIR_CASES])
def test_bad_run_dir(capsys, tmp_path, run_dir, message):
    if os.geteuid() == 0 and "/ro/" in run_dir:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "f").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o500)
    # A data source that fails at once, should the run directory be accepted.
    code, out = run(capsys, "train", "debug", f"--run.dir={run_dir.format(tmp=tmp_path)}", f"--data.source={tmp_path}/none.txt")
    assert code == 1 and message.format(tmp=tmp_path) in out and "pass a writable folder with --run.dir" in out, out


# --- data, cache and home -------------------------------------------------------------------------

DATA_CASES = [
    ("source-missing", ["--data.source={tmp}/none.txt"], "data.source='{tmp}/none.txt' does not exist"),
    ("source-without-text-files", ["--data.source={tmp}/empty"], "data.source='{tmp}/empty': no .txt/.md/.py/.json/.jsonl/.parquet files"),
    ("cache-dir-is-a-file", ["--data.cache_dir={tmp}/f"], "data.cache_dir {tmp}/f cannot be used: it is a file; pass a writable folder"),
    ("cache-dir-under-a-file", ["--data.cache_dir={tmp}/f/cache"], "data.cache_dir {tmp}/f/cache cannot be used: Not a directory"),
    ("tokenizer-file-missing", ["--data.tokenizer={tmp}/tok.json", "--data.source={tmp}/corpus"], "tokenizer {tmp}/tok.json not found"),
    ("vocab-too-small-for-bpe", ["--model.vocab_size=200", "--model.pad_token_id=1"], "model.vocab_size=200 is too small for the byte-level BPE"),
]


@pytest.mark.parametrize("extra, message", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_input(capsys, tmp_path, extra, message):
    (tmp_path / "f").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text")
    extra = [e.format(tmp=tmp_path) for e in extra]
    code, out = run(capsys, "train", "debug", f"--run.dir={tmp_path}/run", f"--data.cache_dir={tmp_path}/cache", *extra)
    assert code in (1, 2) and message.format(tmp=tmp_path) in out, out


def test_no_home_folder(capsys, tmp_path, monkeypatch):
    """The default data.cache_dir is under ~: without HOME (and no passwd entry) the message says what to set."""
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    code, out = run(capsys, "train", "debug", f"--run.dir={tmp_path}/run")
    assert code == 1 and "data.cache_dir='~/.cache/xlstm7b' starts with ~, but there is no home folder (HOME is not set)" in out, out
    assert "set HOME or pass --data.cache_dir=/an/absolute/path" in out


# --- tokenizer, plan, plot ---------------------------------------------------------------------------

OTHER_COMMAND_CASES = [
    ("tokenizer-vocab-too-small", ["tokenizer", "train", "debug", "-o", "{tmp}/t.json", "--vocab-size", "100"], 2,
     "--vocab-size 100 is too small for a byte-level BPE: at least 258"),
    ("tokenizer-output-is-a-folder", ["tokenizer", "train", "debug", "-o", "{tmp}"], 2, "--output {tmp} is a folder"),
    ("tokenizer-output-under-a-file", ["tokenizer", "train", "debug", "-o", "{tmp}/f/t.json", "--data.source={tmp}/corpus"], 1,
     "cannot use {tmp}/f: File exists"),
    ("tokenizer-bad-config", ["tokenizer", "train", "debug", "-o", "{tmp}/t.json", "--data.val_fraction=2"], 2,
     "data.val_fraction must be a number in [0, 1), got 2"),
    ("tokenizer-source-missing", ["tokenizer", "train", "debug", "-o", "{tmp}/t.json", "--data.source={tmp}/none"], 1,
     "data.source='{tmp}/none' does not exist"),
    ("plan-zero-gpus", ["plan", "debug", "--gpus", "0"], 2, "argument --gpus: must be an integer >= 1, got '0'"),
    ("plan-negative-memory", ["plan", "debug", "--gpu-memory-gb", "-1"], 2, "argument --gpu-memory-gb: must be a finite number of GiB >= 0 (0: the device's), got '-1'"),
    ("plan-nan-memory", ["plan", "debug", "--gpu-memory-gb", "nan"], 2, "argument --gpu-memory-gb: must be a finite number"),
    ("plot-missing-run", ["plot", "{tmp}/nothing"], 1, "{tmp}/nothing/metrics.jsonl not found; pass a run directory"),
    ("plot-output-is-a-folder", ["plot", "{tmp}/run", "-o", "{tmp}"], 1, "--output {tmp} is a folder"),
]


@pytest.mark.parametrize("argv, code, message", [c[1:] for c in OTHER_COMMAND_CASES], ids=[c[0] for c in OTHER_COMMAND_CASES])
def test_bad_input_to_other_commands(capsys, tmp_path, argv, code, message):
    (tmp_path / "f").write_text("x")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    got, out = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert got == code and message.format(tmp=tmp_path) in out, out


def test_plot_skips_a_malformed_line(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n{"step": 3, "loss": 4.0}\n')
    code, out = run(capsys, "plot", str(tmp_path))
    assert code == 0 and f"{tmp_path}/metrics.jsonl line 2 is not a metrics record, skipped" in out, out
    assert (tmp_path / "metrics.png").is_file()


# --- interrupts and closed pipes ------------------------------------------------------------------------

def test_interrupt_is_one_line(capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_config", interrupted)
    code, out = run(capsys, "plan", "debug")
    assert code == 130 and out == "xlstm7b plan: interrupted\n"


def test_closed_output_pipe_exits_quietly(monkeypatch, capsys):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main(["plan", "debug"])
    monkeypatch.undo()
    assert code == 141 and capsys.readouterr().err == ""
