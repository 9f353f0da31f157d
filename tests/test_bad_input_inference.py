"""Bad input to the inference half: the `generate` and `info` commands, from_pretrained,
save_pretrained, generate, speculative generate and XLSTM.forward. Every case gets one clear message
naming the input and the fix, and a non-zero exit (the commands) or an exception (the functions),
never a traceback; non-finite logits are an error, never tokens."""

import json
import os
import shutil
import struct
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import HAS_CUDA, random_model
from xlstm7b import CheckpointError, ModelConfig, from_pretrained, generate, save_pretrained
from xlstm7b.cli import main
from xlstm7b.sampling import sample, sampling_probs

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *args) -> tuple[int, str]:
    """`xlstm7b ARGS` in-process: (exit code, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def copy(checkpoint_dir, tmp_path):
    return shutil.copytree(checkpoint_dir, tmp_path / "ckpt")


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def safetensors_bytes(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 16


# --- the generate command: checkpoint folders, files and devices ----------------------------------

# id -> (a function (checkpoint copy, tmp_path) -> extra arguments, words of the message)
GENERATE_FILES = {
    "missing-folder": (lambda c, t: ["--checkpoint", str(t / "nope")], "--checkpoint", "no such folder"),
    "folder-is-a-file": (lambda c, t: ["--checkpoint", str(c / "config.json")], "is a file", "pass the checkpoint folder"),
    "training-run-folder": (
        lambda c, t: (write(c / "config.json", json.dumps({"model": {"embedding_dim": 64}, "train": {}})) and []),
        "training run's config", "/model"),
    "training-checkpoint-folder": (
        lambda c, t: ((c / "config.json").unlink(), write(c / "trainer.json", "{}")) and [],
        "no config.json", "RUN_DIR/model"),
    "config-not-json": (lambda c, t: write(c / "config.json", "{oops") and [], "config.json: not valid JSON"),
    "config-not-a-mapping": (lambda c, t: write(c / "config.json", "[1, 2]") and [], "expected a mapping"),
    "config-wrong-type": (
        lambda c, t: write(c / "config.json", json.dumps({**json.loads((c / "config.json").read_text()), "num_heads": "two"})) and [],
        "config.json: invalid model config", "num_heads"),
    "weights-not-safetensors": (lambda c, t: write(c / "model.safetensors", b"garbage") and [], "model.safetensors: not a safetensors file"),
    "safetensors-header-list": (lambda c, t: write(c / "model.safetensors", safetensors_bytes([1, 2])) and [], "not a JSON object"),
    "safetensors-entry-without-offsets": (
        lambda c, t: write(c / "model.safetensors", safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}})) and [],
        "corrupt header: key w"),
    "safetensors-size-mismatch": (
        lambda c, t: write(c / "model.safetensors", safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})) and [],
        "needs 12 bytes"),
    "safetensors-truncated": (
        lambda c, t: write(c / "model.safetensors", (c / "model.safetensors").read_bytes()[:5000]) and [], "truncated: key"),
    "index-malformed": (
        lambda c, t: write(c / "model.safetensors.index.json", json.dumps({"weight_map": [1]})) and [],
        "not a valid safetensors index", "weight_map"),
    "no-weights": (lambda c, t: (c / "model.safetensors").unlink() or [], "no weights"),
    "tokenizer-missing": (lambda c, t: (c / "tokenizer.json").unlink() or [], "not found in the checkpoint folder", "--tokenizer"),
    "tokenizer-is-a-folder": (lambda c, t: ["--tokenizer", str(t)], "is not a file"),
    "tokenizer-malformed": (lambda c, t: write(c / "tokenizer.json", "{not json") and [], "cannot be read as a tokenizer.json"),
    "tokenizer-larger-than-vocab": (
        lambda c, t: write(c / "config.json", json.dumps({**json.loads((c / "config.json").read_text()), "vocab_size": 300})) and [],
        "more than the model's vocab_size=300"),
    "draft-missing": (lambda c, t: ["--draft", str(t / "nope")], "--draft", "no such folder"),
    "draft-other-vocab": (
        lambda c, t: (shutil.copytree(c, t / "draft"), write(t / "draft" / "config.json", json.dumps(
            {**json.loads((c / "config.json").read_text()), "vocab_size": 400}))) and ["--draft", str(t / "draft")],
        "vocab_size=400", "share the model's tokenizer"),
    "max-new-tokens-beyond-memory": (lambda c, t: ["--max-new-tokens", str(10**15)], "does not fit in memory", "fewer tokens"),
    "device-foo": (lambda c, t: ["--device", "foo"], "device 'foo' is not a device name", "'cpu'"),
    "device-meta": (lambda c, t: ["--device", "meta"], "not supported"),
}
if not HAS_CUDA:
    GENERATE_FILES["device-cuda-on-a-cpu-machine"] = (lambda c, t: ["--device", "cuda"], "no CUDA device", "use 'cpu'")
    GENERATE_FILES["device-cuda-index"] = (lambda c, t: ["--device", "cuda:3"], "no CUDA device")


@pytest.mark.parametrize("case", GENERATE_FILES, ids=list(GENERATE_FILES))
def test_generate_checkpoint_and_device_errors(case, checkpoint_dir, tmp_path, capsys):
    make, *words = GENERATE_FILES[case]
    ckpt = copy(checkpoint_dir, tmp_path)
    extra = make(ckpt, tmp_path)
    code, err = run(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", *extra)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("xlstm7b generate: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_a_wrong_checkpoint_fails_before_its_weights_are_read(checkpoint_dir, tmp_path, monkeypatch):
    import xlstm7b.pretrained

    ckpt = copy(checkpoint_dir, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    write(ckpt / "config.json", json.dumps({**config, "num_blocks": 3, "num_hidden_layers": 3}))
    monkeypatch.setattr(xlstm7b.pretrained, "read_safetensors", lambda file: pytest.fail("read the weights"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['backbone.blocks.2."):
        from_pretrained(ckpt)


# --- the generate command: numbers and options (argparse and the cheap checks) --------------------

GENERATE_ARGS = {
    "max-new-tokens-negative": (["--max-new-tokens", "-3"], "--max-new-tokens: must be an integer >= 0"),
    "max-new-tokens-not-a-number": (["--max-new-tokens", "ten"], "--max-new-tokens: must be an integer >= 0, got 'ten'"),
    "temperature-negative": (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    "temperature-nan": (["--temperature", "nan"], "--temperature: must be a finite number >= 0"),
    "temperature-inf": (["--temperature", "inf"], "--temperature: must be a finite number >= 0"),
    "top-p-above-1": (["--temperature", "1", "--top-p", "1.5"], "--top-p: must be a number in (0, 1]"),
    "top-p-zero": (["--temperature", "1", "--top-p", "0"], "--top-p: must be a number in (0, 1]"),
    "top-k-below-minus-1": (["--temperature", "1", "--top-k", "-2"], "--top-k: must be an integer >= 1, or 0 or -1"),
    "repetition-penalty-zero": (["--repetition-penalty", "0"], "--repetition-penalty: must be a finite number > 0"),
    "seed-negative": (["--seed", "-1"], "--seed: must be an integer in [0, 2**64)"),
    "speculate-k-zero": (["--speculate-k", "0"], "--speculate-k: must be an integer >= 1"),
    "dtype-unknown": (["--dtype", "float8"], "--dtype: invalid choice: 'float8'"),
    "no-prompt": (["--prompt"], "--prompt: expected one argument"),
}


@pytest.mark.parametrize("case", GENERATE_ARGS, ids=list(GENERATE_ARGS))
def test_generate_argument_errors(case, checkpoint_dir, capsys):
    extra, words = GENERATE_ARGS[case]
    code, err = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--prompt", "hi", *extra)
    assert code == 2 and "Traceback" not in err and words in err, err


def test_generate_help_exits_0(capsys):
    assert main(["generate", "--help"]) == 0 and "--checkpoint" in capsys.readouterr().out


# --- the info command ---------------------------------------------------------------------------

INFO = {
    "unknown-preset": (lambda t: ["nope"], "unknown preset 'nope'"),
    "missing-toml": (lambda t: [str(t / "x.toml")], "does not exist"),
    "toml-is-a-folder": (lambda t: [str(t) + "/"], "is a folder"),
    "toml-malformed": (lambda t: [str(write(t / "bad.toml", "[model\nx = 1"))], "bad.toml: not valid TOML"),
    "toml-model-not-a-table": (lambda t: [str(write(t / "flat.toml", "model = 3\n"))], "flat.toml: no [model] section"),
    "toml-without-model": (lambda t: [str(write(t / "nomodel.toml", "[train]\nsteps = 1\n"))], "no [model] section"),
    "toml-bad-value": (lambda t: [str(write(t / "neg.toml", "[model]\nnum_blocks = -2\n"))], "num_blocks"),
    "seq-len-negative": (lambda t: ["debug", "--seq-len", "-1"], "--seq-len: must be an integer in [0, 65536]"),
    "seq-len-huge": (lambda t: ["debug", "--seq-len", "100000000"], "--seq-len: must be an integer in [0, 65536]"),
    "seed-negative": (lambda t: ["debug", "--seed", "-5"], "--seed: must be an integer >= 0"),
}


@pytest.mark.parametrize("case", INFO, ids=list(INFO))
def test_info_errors(case, tmp_path, capsys):
    make, words = INFO[case]
    code, err = run(capsys, "info", *make(tmp_path))
    assert code == 2 and "Traceback" not in err and words in err, err


# --- non-finite logits, tiny temperatures, broken pipes ------------------------------------------

@pytest.fixture
def nan_checkpoint(checkpoint_dir, tmp_path):
    model = from_pretrained(checkpoint_dir)
    with torch.no_grad():
        model.backbone.blocks[1].ffn.proj_down.weight[3, 4] = float("nan")
    path = tmp_path / "nan"
    save_pretrained(model, path)
    shutil.copy(checkpoint_dir / "tokenizer.json", path)
    return path


def test_nan_weights_are_an_error_naming_the_weight(nan_checkpoint, capsys):
    code, err = run(capsys, "generate", "--checkpoint", str(nan_checkpoint), "--prompt", "hi", "--max-new-tokens", "5")
    assert code == 1 and "non-finite logits" in err and "backbone.blocks.1.ffn.proj_down.weight" in err, err
    model = from_pretrained(nan_checkpoint)
    with pytest.raises(FloatingPointError, match="weights hold NaN or inf values"):
        generate(model, [[3, 4]], max_new_tokens=3)
    draft = random_model(model.config)
    with pytest.raises(FloatingPointError, match="the draft model produced non-finite logits"):
        generate(draft, [[3, 4]], max_new_tokens=3, draft=model)


def test_non_finite_state_is_an_error():
    model = random_model(ModelConfig.from_preset("debug"))
    _, state = model(torch.tensor([[3, 4]]))
    state[0][0].fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="after the prompt: its weights are finite, so the state passed in"):
        generate(model, [[5]], max_new_tokens=2, state=state)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324], ids=["1e-40", "1e-300", "denormal"])
def test_tiny_temperature_is_greedy(temperature, checkpoint_dir, capsys):
    logits = torch.randn(4, 512) * 10
    assert torch.equal(sample(logits, temperature=temperature), logits.argmax(-1))
    assert torch.isfinite(sampling_probs(logits, temperature=temperature, top_p=0.5)).all()
    args = ["generate", "--checkpoint", str(checkpoint_dir), "--prompt", "hello", "--max-new-tokens", "8", "--ignore-eos"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", str(temperature), "--seed", "0"]) == 0
    assert capsys.readouterr().out == greedy and greedy.strip()


class ClosedPipe:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_in_process(checkpoint_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code, err = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--prompt", "hi", "--max-new-tokens", "50",
                    "--ignore-eos")
    assert code == 141 and "broken pipe" in err and "Traceback" not in err


def test_broken_pipe_of_a_real_pipe(checkpoint_dir, capsys, monkeypatch):
    """`xlstm7b generate ... | head -c 10`: stdout is a pipe whose reader is gone. The command stops
    with one message, and stdout is pointed at /dev/null, so the interpreter's last flush at exit
    does not fail again ("Exception ignored ... BrokenPipeError")."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", pipe)
    code, err = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--prompt", "hi", "--max-new-tokens", "50",
                    "--ignore-eos", "--temperature", "1", "--seed", "0")
    assert code == 141 and "broken pipe" in err and "Traceback" not in err
    pipe.write("more text")
    pipe.flush()  # /dev/null now
    pipe.close()


def test_ctrl_c_exits_130_without_a_traceback(checkpoint_dir, capsys, monkeypatch):
    import xlstm7b.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xlstm7b.cli, "generate", interrupted)
    code, err = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--prompt", "hi")
    assert code == 130 and err == "xlstm7b generate: interrupted\n"


# --- the public functions --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return random_model(ModelConfig.from_preset("debug"))


@pytest.fixture
def env(tmp_path, model, checkpoint_dir):
    """What the calls of API need: models, a checkpoint, a file, a folder."""
    other = random_model(ModelConfig.from_preset("debug").replace(vocab_size=300))
    return SimpleNamespace(model=model, other=other, ckpt=checkpoint_dir, tmp=tmp_path, file=write(tmp_path / "afile", "x"))


ONE = dict(max_new_tokens=2)
# id -> (call(env), exception type, words of the message)
API = {
    "from_pretrained-path-None": (lambda e: from_pretrained(None), TypeError, "path must be a folder path"),
    "from_pretrained-device-foo": (lambda e: from_pretrained(e.ckpt, device="foo"), ValueError, "not a device name"),
    "from_pretrained-dtype-str": (lambda e: from_pretrained(e.ckpt, dtype="bfloat16"), TypeError, "torch.bfloat16"),
    "from_pretrained-dtype-int": (lambda e: from_pretrained(e.ckpt, dtype=torch.int64), TypeError, "floating point"),
    "from_pretrained-file": (lambda e: from_pretrained(e.file), CheckpointError, "not a directory"),
    "save_pretrained-not-a-model": (lambda e: save_pretrained("model", e.tmp / "o"), TypeError, "xlstm7b.XLSTM"),
    "save_pretrained-path-is-a-file": (lambda e: save_pretrained(e.model, e.file), ValueError, "is a file"),
    "save_pretrained-path-under-a-file": (lambda e: save_pretrained(e.model, e.file / "sub"), ValueError, "is a file"),
    "save_pretrained-shard-size-0": (lambda e: save_pretrained(e.model, e.tmp / "o", max_shard_size=0), ValueError, "max_shard_size"),
    "generate-not-a-model": (lambda e: generate("model", [[1]], **ONE), TypeError, "model must be an xlstm7b.XLSTM"),
    "generate-temperature-str": (lambda e: generate(e.model, [[3]], temperature="0.5", **ONE), ValueError, "temperature"),
    "generate-temperature-inf": (lambda e: generate(e.model, [[3]], temperature=float("inf"), **ONE), ValueError, "finite"),
    "generate-max-new-tokens-float": (lambda e: generate(e.model, [[3]], max_new_tokens=2.5), ValueError, "max_new_tokens"),
    "generate-top-p-bool": (lambda e: generate(e.model, [[3]], temperature=1.0, top_p=True, **ONE), ValueError, "top_p"),
    "generate-seed-negative": (lambda e: generate(e.model, [[3]], seed=-1, **ONE), ValueError, "seed"),
    "generate-seed-str": (lambda e: generate(e.model, [[3]], seed="x", **ONE), ValueError, "seed"),
    "generate-eos-out-of-range": (lambda e: generate(e.model, [[3]], eos_token_id=10**6, **ONE), ValueError, "eos_token_id"),
    "generate-output-beyond-memory": (lambda e: generate(e.model, [[3]], max_new_tokens=10**15), ValueError, "does not fit in memory"),
    "speculative-output-beyond-memory": (lambda e: generate(e.model, [[3]], max_new_tokens=10**15, draft=e.model), ValueError,
                                         "does not fit in memory"),
    "generate-streamer-str": (lambda e: generate(e.model, [[3]], streamer="x", **ONE), TypeError, "streamer"),
    "generate-ids-out-of-range": (lambda e: generate(e.model, [[3, 9999]], **ONE), ValueError, "token id 9999"),
    "generate-ids-float": (lambda e: generate(e.model, torch.ones(1, 3), **ONE), TypeError, "integer token ids"),
    "generate-empty-list": (lambda e: generate(e.model, [], **ONE), ValueError, "empty list"),
    "speculative-k-0": (lambda e: generate(e.model, [[3]], draft=e.model, speculate_k=0, **ONE), ValueError, "speculate_k"),
    "speculative-draft-str": (lambda e: generate(e.model, [[3]], draft="small", **ONE), TypeError, "draft must be an XLSTM"),
    "speculative-other-vocab": (lambda e: generate(e.model, [[3]], draft=e.other, **ONE), ValueError, "share one tokenizer"),
    "from_preset-unknown": (lambda e: ModelConfig.from_preset("nope"), ValueError, "unknown preset 'nope'"),
    "from_toml-malformed": (lambda e: ModelConfig.from_toml(write(e.tmp / "b.toml", "[model")), ValueError, "b.toml: not valid TOML"),
    "from_toml-missing": (lambda e: ModelConfig.from_toml(e.tmp / "none.toml"), FileNotFoundError, "none.toml"),
    "forward-list": (lambda e: e.model([[1, 2]]), TypeError, "input_ids must be a torch.LongTensor"),
    "forward-3d": (lambda e: e.model(torch.ones(1, 2, 3, dtype=torch.long)), ValueError, "shape [B, S]"),
    "forward-mask-shape": (lambda e: e.model(torch.ones(1, 3, dtype=torch.long), mask=torch.ones(1, 2, dtype=torch.bool)),
                           ValueError, "mask must be a bool tensor"),
}
if not HAS_CUDA:
    API["from_pretrained-cuda-on-a-cpu-machine"] = (lambda e: from_pretrained(e.ckpt, device="cuda"), ValueError, "no CUDA device")


@pytest.mark.parametrize("case", API, ids=list(API))
def test_public_functions(case, env):
    call, kind, words = API[case]
    with pytest.raises(kind) as raised:
        call(env)
    assert words in str(raised.value)
