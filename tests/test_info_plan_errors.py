"""`xlstm7b info` and `xlstm7b plan` on bad input: each case is the command, the exit code, the words
its message must contain (the option or file and the value, and what to do) and no traceback; the
config files it read are unchanged afterwards (compared by hash). Absurd sizes are refused before
anything is allocated."""

import hashlib
from pathlib import Path

import pytest

from xlstm7b.cli import main

CONFIGS = {  # file name: its bytes
    "broken.toml": b"[model\nx = 1\n",
    "binary.toml": b"\xff\xfe\x00 not text",
    "negative.toml": b"[model]\nembedding_dim = -1\n",
    "string.toml": b'[model]\nnum_heads = "x"\n',
    "unknown.toml": b"[model]\nwat = 1\n",
    "huge.toml": b"[model]\nembedding_dim = 1000000000\nnum_blocks = 100000\n",
    "big-vocab.toml": b"[model]\nembedding_dim = 64\nnum_heads = 4\nnum_blocks = 1\nvocab_size = 2000000\n",
}

CASES = {  # name: (arguments, {} is the configs' folder; exit code; words the message must contain)
    "info-unknown-preset": (["info", "nonsense"], 2, ["'nonsense'", "preset", "debug"]),
    "info-missing-file": (["info", "{}/missing.toml"], 2, ["missing.toml", "does not exist"]),
    "info-folder": (["info", "{}"], 2, ["is a folder", ".toml"]),
    "info-broken-toml": (["info", "{}/broken.toml"], 2, ["broken.toml", "not valid TOML", "line 1"]),
    "info-binary": (["info", "{}/binary.toml"], 2, ["binary.toml", "utf-8"]),
    "info-negative": (["info", "{}/negative.toml"], 2, ["model.embedding_dim", "-1", "positive"]),
    "info-string": (["info", "{}/string.toml"], 2, ["model.num_heads", "'x'"]),
    "info-unknown-key": (["info", "{}/unknown.toml"], 2, ["'wat'", "valid keys"]),
    "info-huge": (["info", "{}/huge.toml", "--seq-len", "0"], 2, ["huge.toml", "too large", "embedding_dim=1000000000", "lower"]),
    "info-logits-past-memory": (["info", "{}/big-vocab.toml", "--seq-len", "65536"], 2,
                                ["--seq-len 65536", "GiB free", "[1, 65536, 2000000]", "--seq-len 0"]),
    "info-seq-len-negative": (["info", "debug", "--seq-len", "-1"], 2, ["--seq-len", "'-1'", "[0, 65536]"]),
    "info-seq-len-past-cap": (["info", "debug", "--seq-len", "99999999"], 2, ["--seq-len", "'99999999'"]),
    "info-seed-word": (["info", "debug", "--seed", "abc"], 2, ["--seed", "'abc'"]),
    "plan-unknown-preset": (["plan", "nonsense"], 2, ["'nonsense'", "preset"]),
    "plan-missing-file": (["plan", "{}/missing.toml"], 2, ["missing.toml", "does not exist"]),
    "plan-broken-toml": (["plan", "{}/broken.toml"], 2, ["broken.toml", "not valid TOML"]),
    "plan-binary": (["plan", "{}/binary.toml"], 2, ["binary.toml", "not UTF-8", "at byte 0"]),
    "plan-negative": (["plan", "{}/negative.toml"], 2, ["model.embedding_dim", "-1"]),
    "plan-huge": (["plan", "{}/huge.toml"], 2, ["huge.toml", "too large", "num_blocks=100000", "lower"]),
    "plan-gpus-0": (["plan", "debug", "--gpus", "0"], 2, ["--gpus", "'0'", ">= 1"]),
    "plan-gpu-memory-nan": (["plan", "debug", "--gpu-memory-gb", "nan"], 2, ["--gpu-memory-gb", "'nan'", "finite"]),
    "plan-override-word": (["plan", "debug", "--train.steps=abc"], 2, ["train.steps", "'abc'"]),
    "plan-unknown-section": (["plan", "debug", "--nope.key=1"], 2, ["'nope'", "valid sections"]),
    "plan-batch-not-a-multiple": (["plan", "debug", "--train.global_batch_tokens=3"], 2,
                                  ["train.global_batch_tokens=3", "multiple of train.seq_len=64"]),
}


@pytest.fixture
def configs(tmp_path) -> Path:
    for name, data in CONFIGS.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_naming_it(case, configs, capsys):
    argv, code, words = CASES[case]
    before = digests(configs)
    assert main([a.format(configs) for a in argv]) == code
    out = capsys.readouterr()
    last = out.err.strip().splitlines()[-1]  # argparse's usage, then one line naming the option and the value
    assert last.startswith(f"xlstm7b {argv[0]}"), out.err
    assert all(w in last for w in words), (words, out.err)
    assert "Traceback" not in out.err + out.out
    assert digests(configs) == before
