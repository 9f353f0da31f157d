"""`xlstm7b eval`: the trainer's validation figure, documents in pieces, loss by position, the command."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import xlstm7b
from xlstm7b.train import trainer
from xlstm7b.train.cli import eval_main
from xlstm7b.train.config import load_config
from xlstm7b.train.data import TokenData, prepare_data
from xlstm7b.train.evaluate import evaluate_documents, source_documents, tokenized_documents
from xlstm7b.train.tokenizer import token_bytes_tensor
from xlstm7b.train.parallel import Dist

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def texts_dir(tmp_path_factory) -> Path:
    """20 short code files and one long one (~4.8k tokens)."""
    import sysconfig

    root = tmp_path_factory.mktemp("texts")
    src = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:16]
    for n, f in enumerate(src):
        (root / f"{f.stem}.txt").write_text(f.read_text(encoding="utf-8", errors="replace")[: 12000 if n == 0 else 1500])
    return root


def test_bpb_equals_trainer_validation(tmp_path, texts_dir, checkpoint_dir):
    """With one training window over the whole validation split (each document scored from its own
    start, resets at the BOS), the trainer's val_bpb and the eval's bits-per-byte are one figure."""
    model = xlstm7b.from_pretrained(checkpoint_dir)
    job = load_config("debug", [f"--data.source={texts_dir}", f"--data.tokenizer={checkpoint_dir / 'tokenizer.json'}",
                                f"--data.cache_dir={tmp_path}", "--data.val_fraction=0.3", "--run.eval_tokens=1000000",
                                "--train.loss_chunk_tokens=100"])
    folder, _, tok = prepare_data(job.data, model.config)
    tokens = json.loads((folder / "manifest.json").read_text())["splits"]["val"]["tokens"]
    val = TokenData(folder, "val", tokens - 1, 0, model.config.vocab_size)
    assert val.num_windows == 1 and int((torch.from_numpy(val.window(0)) == 0).sum()) >= 3  # several documents
    tbytes = token_bytes_tensor(tok, model.config.vocab_size, "cpu")
    expected = trainer.evaluate(model, model.logits, val, tbytes, job, Dist(), contextlib.nullcontext())

    docs = tokenized_documents(source_documents(job.data, "val"), tok, model.config.bos_token_id)
    got = evaluate_documents(model, docs, tbytes, batch_size=3, piece_tokens=40)
    assert got["bpb"] == pytest.approx(expected["val_bpb"], rel=1e-5)
    assert got["bytes"] == json.loads((folder / "manifest.json").read_text())["splits"]["val"]["bytes"]
    assert got["documents"] == int((torch.from_numpy(val.window(0)) == 0).sum())


def test_long_document_in_pieces_equals_one_pass(checkpoint_dir, tokenizer):
    """A 1,500-token document run 16 positions at a time, next to short ones in a batch of 3, carries
    its state exactly: the same total loss, per bucket, as one pass over each document alone."""
    model = xlstm7b.from_pretrained(checkpoint_dir)
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[0], rng.integers(2, model.config.vocab_size, n)]) for n in (1500, 40, 7, 300, 1)]
    tbytes = token_bytes_tensor(tokenizer, model.config.vocab_size, "cpu")
    edges = (100, 1000)
    pieces = evaluate_documents(model, docs, tbytes, batch_size=3, piece_tokens=16, bucket_edges=edges)
    whole = [evaluate_documents(model, [d], tbytes, batch_size=1, piece_tokens=4096, bucket_edges=edges) for d in docs]
    # The reference: each document in one forward, no lanes, no pieces.
    with torch.no_grad():
        nats = [torch.nn.functional.cross_entropy(model(torch.from_numpy(d[None, :-1]))[0][0], torch.from_numpy(d[1:]), reduction="sum")
                for d in docs if d.size > 1]
    assert pieces["tokens"] == sum(d.size - 1 for d in docs) == sum(w["tokens"] for w in whole)
    assert pieces["documents"] == 5
    assert pieces["loss"] * pieces["tokens"] == pytest.approx(float(sum(nats)), rel=1e-5)
    assert [b["bucket"] for b in pieces["by_position"]] == ["0-100", "100-1000", "1000+"]
    # targets at positions 1..n of each document: [1, 100), [100, 1000), [1000, ...)
    assert [b["tokens"] for b in pieces["by_position"]] == [99 + 40 + 7 + 99 + 1, 900 + 201, 501]
    for bucket, ref in zip(pieces["by_position"], whole[0]["by_position"]):
        if bucket["bucket"] == "1000+":  # only the long document reaches it
            assert bucket["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            assert bucket["bpb"] == pytest.approx(ref["bpb"], rel=1e-5)


def test_eval_command(tmp_path, texts_dir, checkpoint_dir, capsys):
    out = tmp_path / "res" / "eval.json"
    args = ["--checkpoint", str(checkpoint_dir), "--data", str(texts_dir), "--split", "all", "--max-documents", "2",
            "--batch-size", "2", "--piece-tokens", "64", "--out", str(out)]
    assert eval_main(args) == 0
    captured = capsys.readouterr()
    assert "eval:" in captured.err and "bits/byte" in captured.out  # the progress bar, the report
    result = json.loads(out.read_text())
    assert result["documents"] == 2 and result["checkpoint"] == str(checkpoint_dir) and result["machine"]["device"] == "cpu"
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert [b["bucket"] for b in result["by_position"]] == ["0-1k", "1k-4k", "4k-16k"]  # the long file: ~4.8k tokens
    assert out.with_suffix(".png").stat().st_size > 0

    # Bad input: one clear error each.
    no_tok = tmp_path / "no_tok"
    xlstm7b.save_pretrained(xlstm7b.from_pretrained(checkpoint_dir), no_tok)
    assert eval_main(["--checkpoint", str(no_tok), "--data", str(texts_dir), "--no-progress"]) == 2
    assert "has no tokenizer.json; pass --tokenizer" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(checkpoint_dir), "--data", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "one"
    empty.mkdir()
    (empty / "a.txt").write_text("x = 1\n")
    assert eval_main(["--checkpoint", str(checkpoint_dir), "--data", str(empty), "--split", "val", "--no-progress"]) == 2
    assert "no documents to evaluate" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert eval_main(["--checkpoint", str(checkpoint_dir), "--data", str(texts_dir), "--out", str(blocker / "r.json")]) == 2
    assert "out " in (err := capsys.readouterr().err) and "cannot be used" in err
    with pytest.raises(SystemExit):
        eval_main(["--checkpoint", str(checkpoint_dir), "--data", str(texts_dir), "--out", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err


def test_eval_quantized(tmp_path, texts_dir, checkpoint_dir, capsys):
    """`--quantize int8` scores the model with int8 weights: close to the float32 figure, not equal to
    it, and recorded; int4 on a CPU exits 2 with the reason, before any scoring."""
    pytest.importorskip("torchao")
    args = ["--checkpoint", str(checkpoint_dir), "--data", str(texts_dir), "--split", "all", "--max-documents", "2",
            "--batch-size", "2", "--piece-tokens", "64", "--no-progress"]
    results = {}
    for method in (None, "int8"):
        out = tmp_path / f"{method}.json"
        assert eval_main(args + ["--out", str(out)] + (["--quantize", method] if method else [])) == 0
        results[method] = json.loads(out.read_text())
        assert results[method]["quantize"] == method
    assert "with int8 weights" in capsys.readouterr().out
    plain, int8 = results[None]["bpb"], results["int8"]["bpb"]
    assert int8 != plain and int8 == pytest.approx(plain, rel=2e-2)
    assert eval_main(args + ["--quantize", "int4"]) == 2
    assert "runs on CUDA only" in capsys.readouterr().err


def test_a_token_id_outside_the_vocabulary_is_a_clear_error(checkpoint_dir, tokenizer):
    """The ids are checked once on the host (the forwards run with check_ids=False)."""
    model = xlstm7b.from_pretrained(checkpoint_dir)
    tbytes = token_bytes_tensor(tokenizer, model.config.vocab_size, "cpu")
    doc = np.asarray([0, 5, model.config.vocab_size, 7])
    with pytest.raises(ValueError, match=f"token id {model.config.vocab_size} outside"):
        evaluate_documents(model, [doc], tbytes, batch_size=1, piece_tokens=16)
