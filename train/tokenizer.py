"""Tokenizers: load a `tokenizer.json` (e.g. GPT-NeoX-20B's) or train a byte-level BPE on a corpus.

Trained tokenizers follow the 7B's conventions: id 0 `<|endoftext|>` separates documents (BOS/EOS),
id 1 `<|padding|>` pads.
"""

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)
"""The smallest byte-level BPE: every byte and the special tokens, no merges."""


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (the special tokens first)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file, a folder holding one, or a hub model name (e.g. EleutherAI/gpt-neox-20b)."""
    name, path = str(path), Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if "/" in name and not name.startswith((".", "/", "~")) and not path.suffix:
        return Tokenizer.from_pretrained(name)
    raise FileNotFoundError(f"tokenizer {path} not found; pass a tokenizer.json, a hub name, or data.tokenizer='train' to train one")


def check_vocab(tok: Tokenizer, vocab_size: int, source: str) -> None:
    """Every id the tokenizer can emit must index the embedding."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(
            f"tokenizer {source} has {n} tokens but model.vocab_size={vocab_size}: ids would exceed the embedding. "
            f"Set --model.vocab_size={-(-n // 64) * 64} (rounded up to 64) or use a smaller tokenizer")
    if tok.token_to_id(SPECIAL_TOKENS[0]) != 0:
        print(f"warning: tokenizer {source} does not have {SPECIAL_TOKENS[0]} at id 0; id 0 still separates documents")


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """Bytes of text each id stands for (0 for special tokens): the denominator of bits-per-byte."""
    n = tok.get_vocab_size(with_added_tokens=True)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    byte_level = "ByteLevel" in tok.to_str()[:4000] and isinstance(tok.decoder, decoders.ByteLevel)
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        piece = tok.id_to_token(i)
        if piece is None or piece in special:
            continue
        # A byte-level token spells one byte per character; otherwise decode it.
        out[i] = len(piece) if byte_level else len(tok.decode([i]).encode("utf-8"))
    return out


def token_bytes_tensor(tok: Tokenizer, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """`token_bytes` padded to the model's vocabulary (ids past the tokenizer stand for no text)."""
    tb = token_bytes(tok)
    if tb.size > vocab_size:
        raise ValueError(f"the tokenizer has {tb.size} tokens but the model's vocab_size is {vocab_size}: they do not belong together")
    out = np.zeros(vocab_size, dtype=np.int64)
    out[: tb.size] = tb
    return torch.from_numpy(out).to(device)
