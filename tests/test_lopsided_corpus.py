"""A document that holds most of the corpus's tokens: documents go to a split whole, so the split it
lands in gets most of the data. The build warns with the counts and the document's name; a split it
starves of every window is an error that names the document and says to split it."""

import itertools
from pathlib import Path

import pytest

from test_train import overrides
from xlstm7b.cli import main
from xlstm7b.train.data import split_of
from xlstm7b.train.splits import lopsided_message

pytestmark = pytest.mark.usefixtures("one_thread")


def names(split: str, n: int, stem: str) -> list[str]:
    """The first `n` file names `stem_K.py` that data.val_fraction = 0.5 assigns to `split`."""
    return list(itertools.islice((f"{stem}_{k}.py" for k in itertools.count() if split_of(f"{stem}_{k}.py", 0.5) == split), n))


def corpus(root: Path, big_split: str, small_split: str, small_text: str) -> Path:
    """A folder of one large document in `big_split` and three small ones in `small_split`."""
    root.mkdir()
    (root / names(big_split, 1, "big")[0]).write_text("".join(f"def f{k}(x):\n    return x * {k} + {k % 7}\n" for k in range(600)))
    for name in names(small_split, 3, "small"):
        (root / name).write_text(small_text)
    return root


def test_a_split_starved_by_one_large_document_names_it(tmp_path, cache, capsys):
    source = corpus(tmp_path / "c", "val", "train", "x = 1\n")
    code = main(["train", "debug", *overrides(source, cache, tmp_path / "r", "--train.steps=1", "--data.val_fraction=0.5")])
    err = capsys.readouterr().err
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    big = names("val", 1, "big")[0]
    for words in ("the train split has", f"document {big!r} holds", "lies whole in the val split", "Split it into several files"):
        assert words in line, (words, err)
    assert "Traceback" not in err


def test_a_large_document_that_leaves_the_other_split_a_little_is_warned_about(tmp_path, cache, capsys):
    source = corpus(tmp_path / "c", "train", "val", "def g(y):\n    return y - 1\n" * 30)
    code = main(["train", "debug", *overrides(source, cache, tmp_path / "r", "--train.steps=1", "--data.val_fraction=0.5")])
    err = capsys.readouterr().err
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning: document"))
    assert repr(names("train", 1, "big")[0]) in warning and "lies whole in the train split" in warning
    assert "leaving the val split" in warning and "in 3 documents" in warning


@pytest.mark.parametrize("largest, warned", [(60, True), (50, False), (None, False)])
def test_the_warning_starts_past_half_of_the_tokens(largest, warned):
    splits = {"train": {"tokens": 100 - 40, "documents": 2, "largest_document": largest and {"name": "a.py", "tokens": largest}},
              "val": {"tokens": 40, "documents": 1, "largest_document": {"name": "b.py", "tokens": 40}}}
    assert (lopsided_message(splits) is not None) == warned
