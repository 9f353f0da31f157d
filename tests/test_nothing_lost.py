"""Nothing the project did not write is overwritten or deleted, whichever writer runs: save_pretrained,
the Hub files of an export, eval --out, plot, tokenizer train and a training run's directory. Each
case: the call, the exit code (or exception), words its message must contain, and the files that
must be byte-for-byte unchanged afterwards (compared by hash)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import xlstm7b
from conftest import random_model
from xlstm7b.cli import main
from xlstm7b.hub import save_for_hub
from xlstm7b.written import ForeignFileError, is_ours

pytestmark = pytest.mark.usefixtures("one_thread")


def hashes(paths) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def model():
    return random_model(xlstm7b.ModelConfig.from_preset("debug").replace(vocab_size=320), seed=4)


def plant(folder: Path, *names: str) -> list[Path]:
    """User files in `folder` (created), each with its own content."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(f"the user's {n}\n".encode())
    return [folder / n for n in names]


# --- save_pretrained ---------------------------------------------------------------------------------

SAVE_CASES = {
    # name: (user files planted, save_pretrained kwargs, raises, words)
    "model_best-beside": (["model_best.safetensors"], {}, ForeignFileError, ["model_best.safetensors", "overwrite=True"]),
    "modelA-beside": (["modelA.safetensors"], {}, ForeignFileError, ["modelA.safetensors", "left untouched"]),
    "foreign-config": (["config.json"], {}, ForeignFileError, ["config.json"]),
    "notes-in-folder": (["notes.txt", "model_best.safetensors"], {}, ForeignFileError, ["1 more"]),
    "overwrite-keeps-others": (["model_best.safetensors", "modelA.safetensors"], {"overwrite": True}, None, []),
}


@pytest.mark.parametrize("case", SAVE_CASES, ids=list(SAVE_CASES))
def test_save_pretrained_never_touches_foreign_files(case, model, tmp_path):
    planted, kwargs, raises, words = SAVE_CASES[case]
    folder = tmp_path / "out"
    files = plant(folder, *planted)
    before = hashes(files)
    if raises is None:
        xlstm7b.save_pretrained(model, folder, **kwargs)
        assert xlstm7b.from_pretrained(folder) is not None
    else:
        with pytest.raises(raises) as e:
            xlstm7b.save_pretrained(model, folder, **kwargs)
        for w in words:
            assert w in str(e.value), str(e.value)
        assert not (folder / "model.safetensors").exists()
    assert hashes(files) == before


def test_save_pretrained_replaces_its_own_earlier_save(model, tmp_path):
    """Saving again into its own folder works; the shards of the earlier save it does not rewrite go,
    the user's file that was allowed beside them stays."""
    folder = tmp_path / "out"
    xlstm7b.save_pretrained(model, folder, max_shard_size=20_000)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(is_ours(p) for p in shards)
    user = plant(folder, "model_best.safetensors")
    before = hashes(user)
    with pytest.raises(ForeignFileError, match="model_best.safetensors"):
        xlstm7b.save_pretrained(model, folder)
    xlstm7b.save_pretrained(model, folder, overwrite=True)
    assert not any(p.exists() for p in shards) and not (folder / "model.safetensors.index.json").exists()
    assert (folder / "model.safetensors").is_file() and hashes(user) == before
    user[0].unlink()
    xlstm7b.save_pretrained(model, folder)  # only its own files left: no flag needed
    assert sorted(p.name for p in folder.iterdir()) == [".xlstm7b-written.json", "config.json", "generation_config.json",
                                                         "model.safetensors"]


def test_a_record_cut_short_by_a_kill_is_not_a_foreign_file(model, tmp_path):
    folder = tmp_path / "out"
    xlstm7b.save_pretrained(model, folder)
    (folder / ".xlstm7b-written.json.tmp").write_text('{"model.safeten')  # killed while remember() wrote it
    xlstm7b.save_pretrained(model, folder)
    assert not (folder / ".xlstm7b-written.json.tmp").exists()


def test_a_file_of_ours_edited_by_the_user_is_theirs(model, tmp_path):
    folder = tmp_path / "out"
    xlstm7b.save_pretrained(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "note": "mine"}))
    before = hashes([folder / "config.json"])
    with pytest.raises(ForeignFileError, match="config.json"):
        xlstm7b.save_pretrained(model, folder)
    assert hashes([folder / "config.json"]) == before


def test_save_for_hub_refuses_a_foreign_readme(model, tokenizer, tmp_path):
    folder = tmp_path / "out"
    xlstm7b.save_pretrained(model, folder)
    readme = plant(folder, "README.md")
    before = hashes(readme)
    with pytest.raises(ForeignFileError, match="README.md"):
        save_for_hub(folder, model, tokenizer)
    assert hashes(readme) == before


# --- the commands ------------------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished run's folder as `xlstm7b plot` reads it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "tokens_per_s": 10.0}) + "\n")
    return run


# name: (argv with {ckpt}, {tmp}, {run} filled in, the user files planted (relative to tmp), exit code, words)
COMMAND_CASES = {
    "eval-out-foreign-file": (["eval", "--checkpoint", "{ckpt}", "--data", "{tmp}/text.txt", "--out", "{tmp}/notes.json"],
                              ["notes.json"], 2, ["notes.json", "not written by xlstm7b", "--overwrite"]),
    "eval-out-foreign-png": (["eval", "--checkpoint", "{ckpt}", "--data", "{tmp}/text.txt", "--out", "{tmp}/result.json"],
                             ["result.png"], 2, ["result.png", "--overwrite"]),
    "eval-out-into-the-checkpoint": (["eval", "--checkpoint", "{ckpt}", "--data", "{tmp}/text.txt", "--out", "{ckpt}/config.json"],
                                     [], 2, ["config.json", "not written by xlstm7b"]),
    "plot-over-foreign-file": (["plot", "{run}", "-o", "{tmp}/figure.png"], ["figure.png"], 1, ["figure.png", "--overwrite"]),
    "tokenizer-over-foreign-file": (["tokenizer", "train", "debug", "-o", "{tmp}/tokenizer.json", "--data.source={tmp}/text.txt"],
                                    ["tokenizer.json"], 1, ["tokenizer.json", "--overwrite"]),
    "train-into-a-users-folder": (["train", "debug", "--run.dir={tmp}/mine", "--data.source={tmp}/text.txt", "--run.progress=false"],
                                  ["mine/thesis.tex"], 1, ["run.dir", "thesis.tex", "not a training run's folder", "new or empty"]),
    "train-export-over-a-foreign-model": (["train", "debug", "--run.dir={tmp}/old", "--data.source={tmp}/text.txt"],
                                          ["old/train.lock", "old/model/model.safetensors"], 1,
                                          ["model.safetensors", "not written by xlstm7b", "Move it away"]),
}


@pytest.mark.parametrize("case", COMMAND_CASES, ids=list(COMMAND_CASES))
def test_commands_never_overwrite_foreign_files(case, checkpoint_dir, run_dir, tmp_path, capsys):
    argv, planted, code, words = COMMAND_CASES[case]
    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    for rel in planted:
        plant((tmp_path / rel).parent, Path(rel).name)
    watched = [tmp_path / rel for rel in planted] + sorted(p for p in checkpoint_dir.iterdir() if p.is_file())
    before = hashes(watched)
    fill = {"ckpt": str(checkpoint_dir), "tmp": str(tmp_path), "run": str(run_dir)}
    got = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert got == code, err
    for w in words:
        assert w in err, err
    assert "Traceback" not in err
    assert hashes(watched) == before


def test_eval_out_and_plot_replace_their_own_files(checkpoint_dir, run_dir, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    argv = ["eval", "--checkpoint", str(checkpoint_dir), "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "r.json"),
            "--no-progress"]
    assert main(argv) == 0
    assert main(argv) == 0, capsys.readouterr().err  # its own result: replaced without a flag
    assert main(["plot", str(run_dir)]) == 0
    assert main(["plot", str(run_dir)]) == 0, capsys.readouterr().err


# --- interop: transformers in the same process ------------------------------------------------------

@pytest.fixture
def fresh_device_constructors():
    """torch builds the table of functions a `with torch.device(...)` context places on first use and
    keeps it; in a fresh process transformers' loading is that first use. Cleared before (as in a
    fresh process) and after (so no later test inherits what transformers left)."""
    from torch.utils._device import _device_constructors

    _device_constructors.cache_clear()
    yield
    _device_constructors.cache_clear()


def test_from_pretrained_after_transformers_loaded_a_model(model, tmp_path, fresh_device_constructors):
    transformers = pytest.importorskip("transformers")
    config = xlstm7b.ModelConfig(embedding_dim=128, num_blocks=2, num_heads=2, vocab_size=300, chunk_size=16)
    folder = tmp_path / "m"
    xlstm7b.save_pretrained(random_model(config, seed=5), folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = xlstm7b.from_pretrained(folder)
    x = torch.randint(2, 300, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = theirs(x).logits, ours(x)[0]
    assert ((a - b).norm() / b.norm()).item() < 1e-4
