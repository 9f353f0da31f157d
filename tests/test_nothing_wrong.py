"""Nothing silently wrong and no traceback: every error names the option and value and says what to
do (eval's options, a one-document corpus, a full disk mid-training), data that is not what it
claims is refused or counted (binary bytes in a .txt corpus, safetensors whose tensors overlap or
leave gaps), a changed hyperparameter on resume is announced and recorded, `--threads` is taken and
reported, and eval scores all of a file that is not the training corpus."""

import errno
import json
import struct
import sysconfig
from pathlib import Path

import pytest
import torch

import xlstm7b
from test_train import job, overrides
from xlstm7b.cli import main
from xlstm7b.train import checkpointing, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 40)
    return path


# --- eval's options --------------------------------------------------------------------------------

EVAL_CASES = {  # name: (extra arguments, words the message must contain)
    "batch-size-0": (["--batch-size", "0"], ["--batch-size", "'0'", ">= 1"]),
    "piece-tokens-0": (["--piece-tokens", "0"], ["--piece-tokens", "'0'", ">= 1"]),
    "val-fraction-2": (["--val-fraction", "2"], ["--val-fraction", "'2'", "[0, 1)"]),
    "val-fraction-1": (["--val-fraction", "1"], ["--val-fraction", "'1'"]),
    "max-documents--1": (["--max-documents", "-1"], ["--max-documents", "'-1'", ">= 0"]),
    "threads--1": (["--threads", "-1"], ["--threads", "'-1'"]),
    "threads-absurd": (["--threads", "100000"], ["--threads", "'100000'", "per core"]),
    "device-nonsense": (["--device", "tpu9"], ["tpu9", "'cpu'"]),
    "absurd-sizes": (["--batch-size", "100000000", "--piece-tokens", "100000"], ["--batch-size 100000000", "--piece-tokens 100000",
                                                                               "lower either"]),
}


@pytest.mark.parametrize("case", EVAL_CASES, ids=list(EVAL_CASES))
def test_eval_errors_name_the_option(case, checkpoint_dir, text_file, capsys):
    extra, words = EVAL_CASES[case]
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--data", text_file, *extra)
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # argparse's usage, then one line with the option and the value
    assert all(w in last for w in words), err
    assert "Traceback" not in err


def test_generate_threads_option_and_report(checkpoint_dir, capsys):
    code, _, err = run(capsys, "generate", "--checkpoint", checkpoint_dir, "--prompt", "hello", "--max-new-tokens", "3",
                       "--threads", "1")
    assert code == 0 and "tok/s on cpu" in err and "1 CPU thread]" in err, err
    assert torch.get_num_threads() == 1
    code, _, err = run(capsys, "generate", "--checkpoint", checkpoint_dir, "--prompt", "x", "--threads", "many")
    assert code == 2 and "--threads" in err and "'many'" in err


def test_eval_scores_all_of_a_file_that_is_not_the_training_corpus(checkpoint_dir, text_file, capsys):
    code, out, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--data", text_file, "--no-progress", "--threads", "1")
    assert code == 0, err
    assert out.startswith("1 documents") and "1 CPU thread" in out, out
    # Asked for, the validation split of a one-file source is empty: an error that says so.
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--data", text_file, "--split", "val", "--no-progress")
    assert code == 2 and "no documents to evaluate" in err


# --- data that is not what it claims ----------------------------------------------------------------

def test_random_bytes_named_txt_are_refused_and_a_few_bad_bytes_counted(tmp_path, corpus, cache, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    code, _, err = run(capsys, "train", "debug", *overrides(bad, cache, tmp_path / "r", "--train.steps=1"))
    assert code == 1 and "a.txt is not UTF-8 text" in err and "bytes" in err and "%" in err, err
    assert "Traceback" not in err
    few = tmp_path / "few"
    few.mkdir()
    (few / "b.txt").write_bytes(b"def f():\n    return 1\n" * 200 + b"\xff\xfe")
    from xlstm7b.train.config import DataConfig
    from xlstm7b.train.data import Corpus

    docs = list(Corpus(DataConfig(source=str(few), val_fraction=0.0)).documents("train"))
    assert len(docs) == 1 and docs[0][1].endswith("\ufffd\ufffd")
    assert "b.txt: 2 of its 4,402 bytes (0.05%)" in capsys.readouterr().err


def test_legacy_encoded_text_is_read_and_nul_bytes_are_refused(tmp_path, capsys):
    """Text in a legacy encoding (like the standard library's own Latin-1 and KOI8-R test modules,
    part of the bundled corpus) is text: read with U+FFFD and counted, however many of its bytes are
    not UTF-8. A NUL byte marks binary data, valid UTF-8 or not."""
    from xlstm7b.train.config import DataConfig
    from xlstm7b.train.data import Corpus

    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "m.py").write_bytes("# café crème brûlée\nx = 'déjà'\n".encode("latin-1") * 50)
    docs = list(Corpus(DataConfig(source=str(latin), val_fraction=0.0)).documents("train"))
    assert len(docs) == 1 and docs[0][1].startswith("# caf\ufffd cr\ufffdme")
    assert "m.py: 300 of its 1,550 bytes (19.35%) are not valid UTF-8" in capsys.readouterr().err
    nul = tmp_path / "nul"
    nul.mkdir()
    (nul / "z.txt").write_bytes(b"plain text\n" * 100 + b"\x00\x00")
    with pytest.raises(ValueError, match=r"z.txt is not UTF-8 text: .*NUL among them.*binary data"):
        list(Corpus(DataConfig(source=str(nul), val_fraction=0.0)).documents("train"))


def test_the_bundled_corpus_legacy_encoded_modules_are_read():
    """The demo's corpus: the standard library holds Latin-1 and KOI8-R modules; refusing them
    stopped `scripts/demo.sh` before training."""
    from xlstm7b.train.config import DataConfig
    from xlstm7b.train.data import Corpus

    files = sorted((Path(sysconfig.get_paths()["stdlib"]) / "test" / "encoded_modules").glob("*.py"))
    if not files:
        pytest.skip("this interpreter ships without its test package")
    corpus = Corpus(DataConfig(source="stdlib"))
    assert all(corpus.read_text(f) for f in files)


def safetensors_file(path, entries: dict, data_len: int) -> None:
    header = json.dumps({k: {"dtype": "F32", "shape": [n // 4], "data_offsets": [a, a + n]} for k, (a, n) in entries.items()}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_len))


@pytest.mark.parametrize("entries,data_len,words", [
    ({"a": (0, 8), "b": (4, 8)}, 12, ["overlaps key a"]),
    ({"a": (0, 8), "b": (12, 8)}, 20, ["4 bytes", "before key b", "belong to no tensor"]),
    ({"a": (4, 8)}, 12, ["4 bytes", "before key a"]),
    ({"a": (0, 8)}, 12, ["last 4 bytes", "after key a", "belong to no tensor"]),
], ids=["overlap", "gap", "gap-at-start", "gap-at-end"])
def test_safetensors_whose_tensors_overlap_or_leave_gaps_are_refused(tmp_path, entries, data_len, words):
    from xlstm7b.safetensors_io import read_header

    safetensors_file(tmp_path / "w.safetensors", entries, data_len)
    with pytest.raises(xlstm7b.CheckpointError) as e:
        read_header(tmp_path / "w.safetensors")
    assert all(w in str(e.value) for w in words), str(e.value)


# --- training: one document, a full disk, a changed setting ----------------------------------------

def test_a_one_document_corpus_is_told_to_add_documents(tmp_path, cache, capsys):
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("def f(x):\n    return x\n" * 200)
    code, _, err = run(capsys, "train", "debug", *overrides(one, cache, tmp_path / "r", "--train.steps=1"))
    assert code == 1 and "1 document(s)" in err and "add documents" in err, err
    assert "raise data.val_fraction" not in err and "lower data.val_fraction" not in err


def test_disk_full_during_training_says_so_and_keeps_the_last_checkpoint(tmp_path, corpus, cache, capsys, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    run_dir = tmp_path / "r"
    real_save, real_write, saves = checkpointing.dcp.save, filesystem._write_item, []

    def save(*args, **kwargs):
        saves.append(kwargs["checkpoint_id"])
        return real_save(*args, **kwargs)

    def write(*args, **kwargs):  # the second checkpoint's writes find the disk full, deep inside DCP
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpointing.dcp, "save", save)
    monkeypatch.setattr(filesystem, "_write_item", write)
    code, _, err = run(capsys, "train", "debug", *overrides(corpus, cache, run_dir, "--train.steps=2", "--run.ckpt_every=1"))
    assert code == 1, err
    assert "No space left on device" in err and "step_00000001 is intact" in err and "rerun" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in checkpointing.checkpoints(run_dir)] == ["step_00000001"]
    assert not (run_dir / "checkpoints" / "step_00000002.tmp").exists()


def test_a_failed_write_after_the_shards_stops_with_the_last_checkpoint(tmp_path, corpus, cache, capsys, monkeypatch):
    """The disk fills while the RNG state is saved (after DCP's shards): the same one-line stop."""
    run_dir = tmp_path / "r"
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("rng_rank0.pt"):
            saves.append(f)
            if len(saves) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", save)
    code, _, err = run(capsys, "train", "debug", *overrides(corpus, cache, run_dir, "--train.steps=2", "--run.ckpt_every=1"))
    assert code == 1 and "No space left on device" in err and "step_00000001 is intact" in err, err
    assert [p.name for p in checkpointing.checkpoints(run_dir)] == ["step_00000001"]
    assert not (run_dir / "checkpoints" / "step_00000002.tmp").exists()


def test_a_full_disk_under_a_named_file_says_to_free_space():
    from xlstm7b.train.cli import os_error

    message = os_error(OSError(errno.ENOSPC, "No space left on device", "/runs/r/model/model.safetensors.tmp"))
    assert "No space left on device" in message and "free space" in message and "exists and is readable" not in message


def test_a_save_that_fails_on_another_rank_stops_every_rank(tmp_path, monkeypatch):
    """Rank 0's own writes succeed, another rank's fail: rank 0 learns it at the stage's agreement
    (no barrier the failed rank never reaches), stops with a SaveError and removes the partial folder."""
    from xlstm7b.train.parallel import Dist

    class OtherRankFails(Dist):
        def all_reduce(self, t, op=None):
            return torch.ones_like(t)  # the sum of the ranks' failure flags: another rank's is 1

        def barrier(self):
            raise AssertionError("a barrier after a failed stage would wait forever")

    monkeypatch.setattr(checkpointing, "write_state", lambda *args: None)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(checkpointing.SaveError, match="another process failed to write its part"):
        checkpointing.save(tmp_path, 1, model, torch.optim.SGD(model.parameters()), {}, OtherRankFails(world=2), keep=2)
    assert not (tmp_path / "checkpoints" / "step_00000001.tmp").exists()
    assert checkpointing.checkpoints(tmp_path) == []


def test_a_changed_setting_on_resume_is_announced_and_recorded(tmp_path, corpus, cache, capsys):
    run_dir = tmp_path / "r"
    assert trainer.train(job(corpus, cache, run_dir, "--train.steps=2", "--train.lr=0.001")) == 0
    assert trainer.train(job(corpus, cache, run_dir, "--train.steps=3", "--train.lr=0.002")) == 0
    out, err = capsys.readouterr()
    assert "AdamW (foreach), 1 CPU thread\n" in out, out
    assert "notice: resuming step_00000002 with changed settings" in err and "train.lr: 0.001 -> 0.002" in err, err
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 2]
    assert history[0]["changed"]["train"]["lr"] == 0.001 and history[1]["changed"] == {"train": {"steps": 3, "lr": 0.002}}
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 0.002


def test_wandb_without_credentials_is_one_line_that_says_what_to_do(tmp_path, corpus, cache, capsys, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def no_key(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", no_key)
    code, _, err = run(capsys, "train", "debug", *overrides(corpus, cache, tmp_path / "r", "--train.steps=1",
                                                              "--run.wandb_project=p", "--run.wandb_mode=online"))
    assert code == 1 and "run.wandb_project='p'" in err and "wandb login" in err and "--run.wandb_mode=offline" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("cores,machine,load,processes,expected", [
    (2, 2, 0.0, 1, 2), (2, 2, 1.2, 1, 1), (2, 2, 7.0, 1, 1), (16, 16, 3.4, 1, 13), (16, 16, 3.4, 4, 3), (2, 2, 0.0, 4, 1),
    (4, 64, 10.0, 1, 3),  # a cpuset of 4 cores: their share of the machine's load average, not all of it
])
def test_default_threads_leave_out_the_busy_cores(monkeypatch, cores, machine, load, processes, expected):
    from xlstm7b import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: machine)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    assert threads.default_threads(processes) == expected


@pytest.mark.parametrize("cpu_max,expected", [("150000 100000\n", 2), ("max 100000\n", 2), ("50000 100000", 1), ("junk", 2)])
def test_usable_cores_follow_a_containers_cpu_quota(tmp_path, monkeypatch, cpu_max, expected):
    from xlstm7b import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert threads.usable_cores() == expected


def test_serve_takes_threads(capsys):
    pytest.importorskip("uvicorn")
    from xlstm7b.serve.cli import parse_args

    assert parse_args(["--checkpoint", "x", "--threads", "3"]).threads == 3
    with pytest.raises(SystemExit) as e:
        parse_args(["--checkpoint", "x", "--threads", "-2"])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err


def test_a_gated_hub_dataset_says_to_log_in(checkpoint_dir, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def gated(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'org/gated' is a gated dataset on the Hub. You must be authenticated")

    monkeypatch.setattr(datasets, "load_dataset", gated)
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--data", "org/gated", "--no-progress")
    assert code == 2 and "data.source='org/gated'" in err and "gated dataset" in err and "HF_TOKEN" in err, err
    assert "Traceback" not in err
