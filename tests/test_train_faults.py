"""Faults during training, asserting that nothing is lost: concurrent runs on one run directory,
damaged checkpoints, a damaged metrics log, a changed corpus, a damaged token cache."""

import json
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest

from test_train import job, losses, overrides, run_cli
from xlstm7b.cli import main
from xlstm7b.train import checkpointing, data, metrics, trainer
from xlstm7b.train.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # the runs set torch's threads to 1; restored after the module


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


# --- one job per run directory --------------------------------------------------------------------

def test_second_run_on_a_busy_dir_fails_and_a_killed_runs_lock_is_taken_over(tmp_path, corpus, cache, capsys):
    run = tmp_path / "r"
    first = run_cli(overrides(corpus, cache, run, "--train.steps=1000", "--run.ckpt_every=2"))
    try:
        wait_for(lambda: len(checkpointing.checkpoints(run)) >= 1)
        assert main(["train", "debug", *overrides(corpus, cache, run, "--train.steps=3")]) == 1
        err = capsys.readouterr().err
        assert f"run directory {run} is in use by process {first.pid} on " in err and "train debug" in err, err
        assert "another --run.dir" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The first run's log is its own: one record per step, in order, none from the refused second run.
    logged = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == list(range(1, len(logged) + 1))
    step = int(checkpointing.checkpoints(run)[-1].name.split("_")[1])
    # The killed run's lock is stale: the next run takes it over and resumes.
    assert main(["train", "debug", *overrides(corpus, cache, run, f"--train.steps={step + 1}", "--run.ckpt_every=2")]) == 0
    assert f"resuming {run} at step {step}" in capsys.readouterr().out
    assert sorted(losses(run)) == list(range(1, step + 2))


# --- damaged checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, corpus, cache) -> tuple[Path, dict[int, float]]:
    """A run of 4 steps with checkpoints at steps 2 and 4, and its losses."""
    run = tmp_path_factory.mktemp("four") / "r"
    assert trainer.train(job(corpus, cache, run, "--train.steps=4", "--run.ckpt_every=2")) == 0
    return run, losses(run)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


DAMAGE = [
    ("truncated-shard", lambda ckpt: truncate(ckpt / "__0_0.distcp"), "__0_0.distcp is truncated"),
    ("garbled-shard", lambda ckpt: (ckpt / "__0_0.distcp").write_bytes(b"x" * (ckpt / "__0_0.distcp").stat().st_size),
     "UnpicklingError"),
    ("missing-metadata", lambda ckpt: (ckpt / ".metadata").unlink(), ".metadata is unreadable"),
    ("truncated-rng", lambda ckpt: truncate(ckpt / "rng_rank0.pt"), "rng_rank0.pt is unreadable"),
]


@pytest.mark.parametrize("damage, named", [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_damaged_latest_checkpoint_falls_back_to_the_intact_one(tmp_path, four_steps, corpus, cache, capsys, damage, named):
    original, straight = four_steps
    run = tmp_path / "r"
    shutil.copytree(original, run)
    bad = run / "checkpoints" / "step_00000004"
    damage(bad)
    assert main(["train", "debug", *overrides(corpus, cache, run, "--train.steps=3", "--run.ckpt_every=2")]) == 0
    out = capsys.readouterr()
    assert f"checkpoint {bad} is damaged and skipped" in out.err and named in out.err, out.err
    assert f"resuming {run} at step 2" in out.out
    assert losses(run) == {s: straight[s] for s in (1, 2, 3)}  # step 3 reruns bit-identically from step 2
    # Moved aside, the damaged checkpoint is kept and not counted among the last two.
    assert [p.name for p in checkpointing.checkpoints(run)] == ["step_00000002", "step_00000003"]
    assert (bad.parent / "step_00000004.damaged").is_dir() and "Moved to" in out.err


def test_no_intact_checkpoint_is_an_error_that_keeps_them(tmp_path, four_steps, corpus, cache, capsys):
    run = tmp_path / "r"
    shutil.copytree(four_steps[0], run)
    (run / "checkpoints" / "step_00000002" / "trainer.json").write_text('{"step": 2, "tok')
    (run / "checkpoints" / "step_00000004" / "__0_0.distcp").unlink()
    assert main(["train", "debug", *overrides(corpus, cache, run, "--train.steps=6")]) == 1
    err = capsys.readouterr().err
    assert "no intact checkpoint to resume from" in err and "step_00000002/trainer.json is unreadable" in err, err
    assert "step_00000004/__0_0.distcp is missing" in err
    assert f"move {run / 'checkpoints'} away to start the run over" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.damaged", "step_00000004.damaged"]
    assert sorted(losses(run)) == [1, 2, 3, 4]  # the log is untouched


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_metadata_cannot_run_code(tmp_path, four_steps):
    ckpt = tmp_path / "step_00000004"
    shutil.copytree(four_steps[0] / "checkpoints" / "step_00000004", ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsCode(tmp_path / "ran")))
    problem = checkpointing.missing_bytes(ckpt, 0)
    assert "pathlib.Path.touch is not part of a checkpoint's metadata" in problem and ".metadata is unreadable" in problem
    assert not (tmp_path / "ran").exists()


# --- the metrics log --------------------------------------------------------------------------------

def test_malformed_log_lines_are_skipped_and_a_killed_save_cleaned_up(tmp_path, four_steps, corpus, cache, capsys):
    run = tmp_path / "r"
    shutil.copytree(four_steps[0], run)
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "garbage\n" + "".join(lines[1:]) + '{"step": 5, "lo')  # a kill mid-append
    (run / "checkpoints" / "step_00000007.tmp").mkdir()  # and mid-save
    assert main(["train", "debug", *overrides(corpus, cache, run, "--train.steps=5", "--run.ckpt_every=2")]) == 0
    assert not (run / "checkpoints" / "step_00000007.tmp").exists()
    err = capsys.readouterr().err
    assert f"{log} line 2 is not a metrics record, skipped: 'garbage'" in err and f"{log} line 7" in err, err
    assert losses(run) == {**four_steps[1], 5: losses(run)[5]} and sorted(losses(run)) == [1, 2, 3, 4, 5]


def test_log_truncation_is_atomic(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    log.write_text(text)
    metrics.truncate_log(log, 5)  # nothing to drop: not rewritten
    assert log.read_text() == text and not (tmp_path / "metrics.jsonl.tmp").exists()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics.truncate_log(log, 2)
    assert log.read_text() == text  # a kill before the rename leaves the whole old log
    monkeypatch.undo()
    metrics.truncate_log(log, 2)
    assert [r["step"] for r in metrics.read_metrics(log)] == [1, 2]


# --- a changed corpus on resume ---------------------------------------------------------------------

def test_a_changed_corpus_is_refused_on_resume_or_continued_with_the_runs_tokenizer(tmp_path, corpus, capsys):
    data, cache, run = tmp_path / "corpus", tmp_path / "cache", tmp_path / "r"
    data.mkdir()
    for f in sorted(corpus.iterdir())[:8]:  # small, to tokenize quickly twice
        (data / f.name).write_text(f.read_text()[:4000])

    def args(*extra):
        return ["train", "debug", *overrides(data, cache, run, "--data.val_fraction=0.4", *extra)]

    assert main(args("--train.steps=2")) == 0
    tokenizer = (run / "tokenizer.json").read_bytes()
    first = sorted(p.name for p in (cache / "tokens").iterdir())
    with open(sorted(data.iterdir())[0], "a") as fh:
        fh.write("\n# one appended line moves the ids of a retrained tokenizer\n")
    capsys.readouterr()
    assert main(args("--train.steps=3")) == 1
    err = capsys.readouterr().err
    assert f"the corpus of data.source='{data}' changed since this run started" in err and first[0] in err, err
    assert "--data.accept_changed_corpus=true" in err and "new --run.dir" in err
    assert sorted(p.name for p in (cache / "tokens").iterdir()) == first  # refused before tokenizing
    assert sorted(losses(run)) == [1, 2]

    assert main(args("--train.steps=3", "--data.accept_changed_corpus=true")) == 0
    assert (run / "tokenizer.json").read_bytes() == tokenizer and len(list((cache / "tokenizers").iterdir())) == 1
    new = json.loads((checkpointing.checkpoints(run)[-1] / "trainer.json").read_text())["data"]
    assert Path(new).name not in first and json.loads((Path(new) / "manifest.json").read_text())["tokenizer"] == str(run / "tokenizer.json")
    assert sorted(losses(run)) == [1, 2, 3]
    # The acknowledged corpus is now the run's: the next resume needs no flag.
    assert main(args("--train.steps=4")) == 0


# --- the token cache ------------------------------------------------------------------------------

@pytest.fixture
def small_data(tmp_path, corpus):
    """The [data] and [model] sections of a debug run on a small corpus with its own cache, tokenized
    into shards of 3000 tokens (several per split); its tokenizer is trained once by the fixture."""
    root = tmp_path / "corpus"
    root.mkdir()
    for f in sorted(corpus.iterdir())[:8]:
        (root / f.name).write_text(f.read_text()[:6000])
    cfg = load_config("debug", overrides(root, tmp_path / "cache", tmp_path / "r", "--data.val_fraction=0.4",
                                         "--data.shard_tokens=3000"))
    return cfg.data, cfg.model


def built(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_a_damaged_token_cache_is_detected_and_rebuilt(small_data, monkeypatch, capsys):
    monkeypatch.setattr(data, "ENCODE_BATCH", 2)  # several shards from a small corpus
    folder, _, _ = data.prepare_data(*small_data)
    good = built(folder)
    assert len([f for f in good if f.startswith("train_")]) >= 2
    # The windows run through every shard in order, and the manifest knows the largest id.
    windows, split = data.TokenData(folder, "train", 32, 0, 512), json.loads(good["manifest.json"])["splits"]["train"]
    expected = [shard[j * 32 : j * 32 + 33] for shard in windows.shards for j in range((shard.size - 1) // 32)]
    assert len(expected) == windows.num_windows and all((windows.window(w) == e).all() for w, e in enumerate(expected))
    assert split["max_token_id"] == max(int(shard.max()) for shard in windows.shards)
    truncate(folder / "train_00001.bin")  # would train silently on a part of the data
    tokens = json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"][1]["tokens"]
    damage = f"{folder}/train_00001.bin is {tokens // 3:,} tokens long; the manifest says {tokens:,}"
    with pytest.raises(ValueError) as e:
        data.TokenData(folder, "train", 32, 0, 512)
    assert str(e.value) == f"the token cache {folder} is damaged ({damage}); delete {folder} and rerun to rebuild it"
    capsys.readouterr()
    assert data.prepare_data(*small_data)[0] == folder
    assert f"the token cache {folder} is damaged ({damage}); rebuilding it" in capsys.readouterr().err
    assert built(folder) == good
    (folder / "manifest.json").write_text("{")
    assert "manifest.json is unreadable" in data.cache_damage(folder)


def test_tokenization_streams_and_a_killed_one_resumes(small_data, monkeypatch, capsys):
    cfg, model = small_data
    monkeypatch.setattr(data, "ENCODE_BATCH", 2)  # several shards from a small corpus
    folder, _, _ = data.prepare_data(cfg, model)
    straight = built(folder)
    shutil.rmtree(folder)
    read, at_first_shard = [], []
    documents, save_json = data.Corpus.documents, data.save_json

    def counted(self, split):
        for doc in documents(self, split):
            read.append(doc)
            yield doc

    def killed_after_two_shards(path, progress):
        at_first_shard.append(len(read))
        if len(at_first_shard) == 3:
            raise KeyboardInterrupt  # killed after the second shard's progress was saved
        save_json(path, progress)

    monkeypatch.setattr(data.Corpus, "documents", counted)
    monkeypatch.setattr(data, "save_json", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_data(cfg, model)
    assert at_first_shard[0] < len(list(documents(data.Corpus(cfg), "train")))  # streamed: one shard's documents read, not all
    partial = folder.with_name(folder.name + ".partial")
    assert sorted(f.name for f in partial.iterdir()) == ["progress.json", "train_00000.bin", "train_00001.bin"]
    monkeypatch.setattr(data.Corpus, "documents", documents)
    monkeypatch.setattr(data, "save_json", save_json)
    capsys.readouterr()
    data.prepare_data(cfg, model)
    assert f"resuming the tokenization in {partial}" in capsys.readouterr().out
    assert built(folder) == straight and not partial.exists()  # the same shards, no folder left behind
