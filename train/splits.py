"""What the token shards' manifest says about the training and validation splits when one has too
little data: why, with the counts, and the one change that fixes it."""

SPLITS = ("train", "val")


def lopsided_message(splits: dict) -> str | None:
    """What to do when one document holds most of the corpus's tokens: documents are assigned to a
    split whole, so the split it lands in gets most of the data and the other little (None otherwise)."""
    total = sum(splits[s]["tokens"] for s in SPLITS)
    documents = sum(splits[s]["documents"] for s in SPLITS)
    split, largest = max(((s, splits[s].get("largest_document") or {"tokens": 0}) for s in SPLITS), key=lambda x: x[1]["tokens"])
    if documents < 2 or 2 * largest["tokens"] <= total:
        return None
    other = "val" if split == "train" else "train"
    return (f"document {largest['name']!r} holds {largest['tokens']:,} of the corpus's {total:,} tokens "
            f"({largest['tokens'] / total:.1%}) and lies whole in the {split} split (documents are split whole, by name), "
            f"leaving the {other} split {splits[other]['tokens']:,} tokens in {splits[other]['documents']} documents. "
            "Split it into several files (one document per file) for balanced splits")


def empty_split_message(splits: dict, split: str, seq_len: int) -> str:
    """Why `split` has no training window, and the one change that gives it one."""
    info = splits[split]
    documents = sum(splits[s]["documents"] for s in SPLITS)
    problem = (f"the {split} split has {info['tokens']} tokens in {info['documents']} documents: not one sequence of "
               f"train.seq_len={seq_len} + 1 tokens")
    if documents < 2:
        return (f"{problem}. The corpus has {documents} document(s) (one per file, or per row), and the training and "
                "validation splits need one each: add documents (e.g. split the text into several files) or lower train.seq_len")
    if lopsided := lopsided_message(splits):
        return f"{problem}: {lopsided}"
    share = "raise data.val_fraction (more documents for validation)" if split == "val" else \
        "lower data.val_fraction (more documents for training)"
    return f"{problem}. Add data, lower train.seq_len or {share}"
