"""Folders exported before xlstm7b recorded its files (.xlstm7b-written.json): a run's RUN_DIR/model
is adopted where its files prove themselves ours, so resuming the run works as before; a plain
save_pretrained folder, like any file not provably ours, stays foreign, never replaced.
And a resumed run's export keeps the chat template of the run's tokenizer source."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import xlstm7b
from conftest import random_model
from test_train import job
from xlstm7b.train import trainer
from xlstm7b.train.lock import check_run_dir
from xlstm7b.written import RECORD, ForeignFileError, is_ours

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(xlstm7b.ModelConfig.from_preset("debug").replace(vocab_size=320), seed=5)


def earlier_export(model, folder: Path, **kwargs) -> Path:
    """A folder as save_pretrained wrote it before the record and generation_config.json existed."""
    xlstm7b.save_pretrained(model, folder, **kwargs)
    (folder / RECORD).unlink()
    (folder / "generation_config.json").unlink()
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_plain_earlier_export_stays_foreign_and_overwrite_deletes_none_of_it(model, tmp_path, capsys):
    """Outside a run, an earlier version's save_pretrained folder looks exactly like the released
    model's or transformers' save (config.json of model type xlstm, sharded safetensors): nothing
    proves it ours, so it is refused, and overwrite=True writes beside it without deleting a shard."""
    folder = earlier_export(model, tmp_path / "m", max_shard_size=200_000)
    before = {p: digest(p) for p in folder.iterdir()}
    assert sum(p.name.startswith("model-") for p in before) > 1
    with pytest.raises(ForeignFileError, match="config.json"):
        xlstm7b.save_pretrained(model, folder)
    assert {p: digest(p) for p in folder.iterdir()} == before and "adopted" not in capsys.readouterr().err
    xlstm7b.save_pretrained(model, folder, overwrite=True)
    assert all(p.exists() for p in before if p.name.startswith("model-"))  # every earlier shard kept
    assert is_ours(folder / "model.safetensors")


def earlier_run_export(model, tokenizer, run: Path) -> Path:
    """A run directory whose RUN_DIR/model an earlier version exported: the weights and a copy of
    the run's tokenizer.json, no record."""
    (run / "model").mkdir(parents=True)
    (run / "train.lock").touch()
    tokenizer.save(str(run / "tokenizer.json"))
    earlier_export(model, run / "model")
    shutil.copyfile(run / "tokenizer.json", run / "model" / "tokenizer.json")
    return run


@pytest.mark.parametrize("case, planted, refused", [
    ("a user's file beside the export", {"model_best.safetensors": b"the user's weights"}, "model_best.safetensors"),
    ("a config.json of another model", {"config.json": json.dumps({"model_type": "llama"}).encode()}, "config.json"),
    ("weights that are not safetensors", {"model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"},
     "config.json"),  # nothing adopted: the config is named first
    ("a tokenizer.json that is not the run's", {"tokenizer.json": b"{}"}, "config.json"),
])
def test_what_is_not_provably_ours_stays_foreign(model, tokenizer, tmp_path, case, planted, refused, capsys):
    run = earlier_run_export(model, tokenizer, tmp_path / "run")
    for name, data in planted.items():
        (run / "model" / name).write_bytes(data)
    before = {p: digest(p) for p in (run / "model").iterdir()}
    with pytest.raises(ValueError, match=f"{refused} was not written by xlstm7b"):
        check_run_dir(run)
    with pytest.raises(ForeignFileError, match=refused):
        xlstm7b.save_pretrained(model, run / "model")
    assert {p: digest(p) for p in before} == before, case  # nothing replaced or removed


def test_an_earlier_runs_export_folder_is_adopted(model, tokenizer, tmp_path, capsys):
    run = earlier_run_export(model, tokenizer, tmp_path / "run")
    check_run_dir(run)
    assert all(is_ours(run / "model" / n) for n in ("config.json", "model.safetensors", "tokenizer.json"))
    assert "adopted" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_with_template(tmp_path_factory, corpus, cache):
    """A run whose data.tokenizer is a tokenizer.json with a chat template beside it, exported once."""
    root = tmp_path_factory.mktemp("template")
    first = root / "first"
    assert trainer.train(job(corpus, cache, first, "--train.steps=1", "--run.export=false", "--run.sample_tokens=0")) == 0
    source = root / "source"
    source.mkdir()
    shutil.copyfile(first / "tokenizer.json", source / "tokenizer.json")  # the same bytes: the same token cache
    (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    run = root / "run"
    assert trainer.train(job(corpus, cache, run, "--train.steps=1", "--run.export=true", "--run.sample_tokens=0",
                             f"--data.tokenizer={source / 'tokenizer.json'}")) == 0
    return run, source


def test_a_resumed_runs_export_keeps_the_chat_template(run_with_template, corpus, cache):
    run, source = run_with_template
    assert trainer.train(job(corpus, cache, run, "--train.steps=2", "--run.export=true", "--run.sample_tokens=0",
                             f"--data.tokenizer={source / 'tokenizer.json'}")) == 0
    config = json.loads((run / "model" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "{{ messages[0]['content'] }}"


def test_a_run_exported_by_an_earlier_version_resumes(run_with_template, corpus, cache, capsys):
    run, source = run_with_template
    model = run / "model"
    for name in (RECORD, "generation_config.json", "tokenizer_config.json", "README.md"):  # not written before the record
        (model / name).unlink()
    shutil.copyfile(run / "tokenizer.json", model / "tokenizer.json")  # the earlier export's copy of the run's tokenizer
    (run / "tokenizer_config.json").unlink()  # an earlier run kept no chat template: taken from data.tokenizer's folder
    assert trainer.train(job(corpus, cache, run, "--train.steps=3", "--run.export=true", "--run.sample_tokens=0",
                             f"--data.tokenizer={source / 'tokenizer.json'}")) == 0
    assert "adopted" in capsys.readouterr().err
    assert "optimizer steps: 3" in (model / "README.md").read_text()
    assert json.loads((model / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages[0]['content'] }}"
