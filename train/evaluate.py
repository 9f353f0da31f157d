"""`xlstm7b eval`: bits-per-byte, loss and perplexity of a saved model on any source the trainer reads,
and the same figures by token position (does the model use long context?).

    result = evaluate_documents(model, documents, tbytes, batch_size=8, piece_tokens=2048)

Every document is scored whole, `BOS tok tok ...`, each token predicted from all the tokens before it
in its document. Documents are packed into `batch_size` lanes: a lane runs its documents one after
another, `piece_tokens` positions per forward, carrying the recurrent state from piece to piece and
resetting it where a document starts (resets are exact), so memory is constant in document length
and a short document never waits for a long one. The loss comes from the trainer's own code
(`hidden_nats`) and bits-per-byte counts the same bytes as its validation (`token_bytes`): with one
window over the whole validation split, `val_bpb` and this command agree.
"""

import json
import math
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from xlstm7b import XLSTM, __version__, check_token_ids
from xlstm7b.threads import threads_text
from xlstm7b.written import remember

from .config import DataConfig
from .data import Corpus
from .plot import plot_by_position
from .trainer import hidden_nats

BUCKET_EDGES = (1024, 4096, 16384, 65536, 262144)
"""Token positions where the loss-by-position buckets change: 0-1k, 1k-4k, 4k-16k, ..."""


MAX_FORWARD_TOKENS = 2**22
"""Most positions one forward of `evaluate_documents` may run (batch_size x piece_tokens)."""


def forward_positions(batch_size: int, piece_tokens: int, chunk_size: int) -> int:
    """piece_tokens rounded up to the kernel chunk; a ValueError naming both options if batch_size of
    them exceed MAX_FORWARD_TOKENS (checked before any lane, buffer or model is allocated)."""
    P = -(-piece_tokens // chunk_size) * chunk_size
    if batch_size * P > MAX_FORWARD_TOKENS:
        raise ValueError(f"--batch-size {batch_size} x --piece-tokens {piece_tokens} = {batch_size * P:,} positions per "
                         f"forward, more than {MAX_FORWARD_TOKENS:,} (whose activations alone would not fit in memory); "
                         "lower either")
    return P


def tokenized_documents(texts: Iterable[str], tok: Tokenizer, bos: int, batch: int = 64) -> Iterator[np.ndarray]:
    """`BOS tok tok ...` per text, tokenized `batch` texts at a time."""
    texts = iter(texts)
    while chunk := [t for _, t in zip(range(batch), texts)]:
        for enc in tok.encode_batch(chunk, add_special_tokens=False):
            yield np.asarray([bos, *enc.ids], dtype=np.int64)


class Lane:
    """One row of the batch: the tokens of its documents still to run, with each token's position in
    its document (0 = the BOS that starts it)."""

    def __init__(self):
        self.tokens = np.zeros(0, dtype=np.int64)
        self.positions = np.zeros(0, dtype=np.int64)

    def fill(self, n: int, documents: Iterator[np.ndarray]) -> None:
        """Takes documents until the lane holds n tokens or the documents run out."""
        parts, pos = [self.tokens], [self.positions]
        have = self.tokens.size
        while have < n and (doc := next(documents, None)) is not None:
            parts.append(doc)
            pos.append(np.arange(doc.size))
            have += doc.size
        self.tokens, self.positions = np.concatenate(parts), np.concatenate(pos)

    def drop(self, n: int) -> None:
        self.tokens, self.positions = self.tokens[n:], self.positions[n:]


def take_piece(lanes: list[Lane], P: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The next P + 1 tokens of every lane [B, P + 1] and their positions in their documents (after a
    lane's last document: `pad`, position -1), taken from the lanes but for the last token."""
    ids = np.full((len(lanes), P + 1), pad, dtype=np.int64)
    pos = np.full((len(lanes), P + 1), -1, dtype=np.int64)
    for b, lane in enumerate(lanes):
        n = min(P + 1, lane.tokens.size)
        ids[b, :n], pos[b, :n] = lane.tokens[:n], lane.positions[:n]
        # The last token stays: it is the input that predicts the next piece's first target
        # (a token left alone at the end of the documents predicts nothing and goes).
        lane.drop(n - 1 if n > 1 else n)
    return ids, pos


def bucket_names(edges: tuple[int, ...]) -> list[str]:
    lows = (0, *edges)
    highs = (*edges, None)

    def short(n):
        return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)

    return [f"{short(lo)}-{short(hi)}" if hi else f"{short(lo)}+" for lo, hi in zip(lows, highs)]


@torch.no_grad()
def evaluate_documents(
    model: XLSTM,
    documents: Iterable[np.ndarray],
    tbytes: torch.Tensor,
    *,
    batch_size: int = 8,
    piece_tokens: int = 2048,
    loss_chunk_tokens: int = 4096,
    bucket_edges: tuple[int, ...] = BUCKET_EDGES,
    progress=None,
) -> dict:
    """Scores every token of every document (each a 1-D array starting with the BOS) but the BOS.

    tbytes: bytes of text per token id (`token_bytes`); special tokens count 0 and are left out of
        bits-per-byte, as in the trainer's validation.
    piece_tokens: positions per lane per forward (rounded to the kernel chunk, whose boundaries
        then fall where one pass over the document would put them).
    loss_chunk_tokens: logits computed this many tokens at a time (bounds the [tokens, V] logits).
    progress: called with (tokens scored, running bits-per-byte) after every forward.
    Returns the totals and the figures per position bucket (empty buckets left out).
    """
    if batch_size < 1 or piece_tokens < 1:
        raise ValueError(f"batch_size and piece_tokens must be >= 1, got {batch_size} and {piece_tokens}")
    c = model.config
    device = model.lm_head.weight.device
    P = forward_positions(batch_size, piece_tokens, c.chunk_size)
    edges = torch.tensor(bucket_edges, device=device)
    nb = len(bucket_edges) + 1
    # per bucket: tokens, nats, nats on text tokens, bytes
    totals = torch.zeros(4, nb, dtype=torch.float64, device=device)
    docs = iter(documents)
    lanes = [Lane() for _ in range(batch_size)]
    state = None
    n_docs = 0
    t0 = time.perf_counter()
    while True:
        for lane in lanes:
            before = lane.positions.size
            lane.fill(P + 1, docs)
            n_docs += int((lane.positions[before:] == 0).sum())
        # Lanes the documents ran out for leave the batch, with their rows of the state.
        keep = [b for b, lane in enumerate(lanes) if lane.tokens.size]
        if not keep:
            break
        if len(keep) < len(lanes):
            lanes = [lanes[b] for b in keep]
            state = None if state is None else state.select(keep)
        ids, pos = take_piece(lanes, P, c.pad_token_id)
        ids_t = torch.from_numpy(ids)
        check_token_ids(ids_t, c.vocab_size)  # once, on the host copy: the forward need not check them
        ids_t, pos_t = ids_t.to(device), torch.from_numpy(pos).to(device)
        inputs, targets = ids_t[:, :-1], ids_t[:, 1:]
        in_pos, target_pos = pos_t[:, :-1], pos_t[:, 1:]
        mask = in_pos >= 0
        scored = mask & (target_pos > 0)  # a target at position 0 is the next document's BOS
        padded = bool((pos[:, :-1] < 0).any())  # from the host copy
        hidden, state = model(inputs, state, reset=in_pos == 0, mask=mask if padded else None, return_hidden=True,
                              check_ids=False)
        t = targets[scored]
        nats = hidden_nats(model.logits, hidden[scored], t, loss_chunk_tokens).double()
        nbytes = tbytes[t]
        bucket = torch.bucketize(target_pos[scored], edges, right=True)
        for row, values in enumerate((torch.ones_like(nats), nats, nats * (nbytes > 0), nbytes.double())):
            totals[row].index_add_(0, bucket, values)
        if progress is not None:
            tokens, _, text_nats, nbytes_all = totals.sum(1).tolist()
            progress(int(tokens), text_nats / math.log(2) / max(nbytes_all, 1))
    seconds = time.perf_counter() - t0
    if n_docs == 0:
        raise ValueError("no documents to evaluate: the source (or the chosen split of it) is empty")
    tokens, nats, text_nats, nbytes = totals.tolist()
    result = figures(sum(tokens), sum(nats), sum(text_nats), sum(nbytes))
    result.update(documents=n_docs, seconds=round(seconds, 3), tokens_per_s=sum(tokens) / seconds)
    result["by_position"] = [
        {"bucket": name, "start": lo, "end": hi, **figures(*vals)}
        for name, lo, hi, *vals in zip(bucket_names(bucket_edges), (0, *bucket_edges), (*bucket_edges, None),
                                       tokens, nats, text_nats, nbytes)
        if vals[0] > 0
    ]
    return result


def figures(tokens: float, nats: float, text_nats: float, nbytes: float) -> dict:
    loss = nats / max(tokens, 1)
    return {"tokens": int(tokens), "bytes": int(nbytes), "loss": loss, "perplexity": math.exp(loss),
            "bpb": text_nats / math.log(2) / max(nbytes, 1)}


def source_documents(data: DataConfig, split: str) -> Iterator[str]:
    """The texts of `split` ('val', 'train' or 'all') of a source, as the trainer splits it."""
    if split == "all":  # with no validation share, every document falls in the training split
        data, split = DataConfig(**{**data.__dict__, "val_fraction": 0.0}), "train"
    return (text for _, text in Corpus(data).documents(split))


def machine(device: torch.device) -> dict:
    """Where a result was measured (written into its JSON)."""
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif Path("/proc/cpuinfo").is_file():
        cpus = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        name = f"{cpus[0]} ({len(cpus)} cores)" if cpus else name
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "xlstm7b": __version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def report(result: dict, threads: int) -> str:
    weights = f" with {result['quantize']} weights" if result.get("quantize") else ""
    lines = [f"{result['documents']:,} documents, {result['tokens']:,} tokens, {result['bytes']:,} bytes{weights}: "
             f"{result['bpb']:.4f} bits/byte, loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f} "
             f"({result['tokens_per_s']:,.0f} tokens/s, {threads_text(threads)})", f"{'positions':>12} {'tokens':>12} {'bits/byte':>10} {'loss':>8}"]
    for b in result["by_position"]:
        lines.append(f"{b['bucket']:>12} {b['tokens']:>12,} {b['bpb']:>10.4f} {b['loss']:>8.4f}")
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> list[Path]:
    """out (JSON) and, when matplotlib is installed, the loss-by-position plot beside it (.png); both
    recorded as xlstm7b's (`xlstm7b.written`), so a later eval may replace them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    written = [out]
    try:
        written.append(plot_by_position(result, out.with_suffix(".png")))
    except ImportError:
        print("no loss-by-position PNG: it needs matplotlib (pip install 'xlstm7b[plot]')", file=sys.stderr)
    remember(out.parent, [p.name for p in written], "eval")
    return written
