"""Data: documents -> tokenizer -> on-disk token shards with a manifest -> deterministic batches.

Each document is written as `BOS tok tok ...` (the model's bos_token_id separates documents; id 0
in the 7B recipe) into
uint16/uint32 shards under `data.cache_dir/tokens/HASH/`, HASH covering the documents and the
tokenizer. Shards are built once (by rank 0, streaming, resumable, in a folder renamed into place
when complete) and reused across runs and processes; a cache entry whose shards no longer match
its manifest is rebuilt.

Training samples are windows of seq_len + 1 tokens at stride seq_len. Sample k of the run is window
perm_e[k mod W] of epoch e = k // W, where perm_e is a permutation seeded by (seed, e): the order
depends only on the step, so a resumed run or a different number of processes sees the same batches.
"""

import fcntl
import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tokenizers import Tokenizer

from xlstm7b import ModelConfig
from xlstm7b.hub import copy_tokenizer

from .config import DataConfig, user_path, writable_folder
from .splits import SPLITS, empty_split_message, lopsided_message
from .tokenizer import check_vocab, load_tokenizer, train_bpe

ENCODE_BATCH = 256
"""Documents read and encoded at a time (the tokenizer encodes a batch on all cores)."""
MAX_INVALID_UTF8 = 0.01
"""Share of a text file's bytes that may be invalid UTF-8 and control bytes each before the file is
taken for binary data and refused (with a NUL byte, always). Text in a legacy encoding (Latin-1,
KOI8-R: a few of the standard library's own test files) has invalid UTF-8 but no control bytes:
it is read with U+FFFD in place of those bytes, with a warning giving the count."""
CONTROL_BYTES = bytes(b for b in range(32) if chr(b) not in "\t\n\v\f\r\x1b")
LOCAL_FORMATS = {".txt": "text", ".md": "text", ".py": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def stable_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_of(name: str, val_fraction: float) -> str:
    """'val' for a fixed share of document names, by hash (stable across machines and runs)."""
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32
    return "val" if h < val_fraction else "train"


class Corpus:
    """The documents of `data.source`, split into train and validation by document name."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.warned: set[Path] = set()  # files whose invalid UTF-8 was reported
        source = cfg.source
        if source == "stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            self.kind, self.root = "files", root
            self.files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
        elif user_path(source, "data.source").exists() or glob.glob(os.path.expanduser(source), recursive=True):
            path = Path(source).expanduser()
            if path.is_dir():
                files = path.rglob("*")
            else:
                files = [path] if path.is_file() else glob.glob(os.path.expanduser(source), recursive=True)
            self.files = sorted(Path(f) for f in files if Path(f).is_file() and Path(f).suffix in LOCAL_FORMATS)
            formats = {LOCAL_FORMATS[f.suffix] for f in self.files}
            if len(formats) > 1:
                raise ValueError(f"data.source={source!r} mixes file formats {sorted(formats)}; point it at one kind of file")
            if not self.files:
                raise ValueError(f"data.source={source!r}: no {'/'.join(LOCAL_FORMATS)} files there; check the path")
            self.kind = "files" if formats == {"text"} else formats.pop()
            self.root = Path(os.path.commonpath([f.parent for f in self.files]))
        elif source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_FORMATS:
            raise ValueError(f"data.source={source!r} does not exist; pass an existing file, folder or glob, 'stdlib', or a hub dataset name")
        else:
            self.kind, self.files, self.root = "hub", [], None

    def fingerprint(self) -> str:
        c = self.cfg
        if self.kind == "hub":
            return stable_hash(c.source, c.hub_config, c.hub_split, c.text_field, c.max_documents, c.val_fraction)
        stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]
        return stable_hash(stats, c.text_field, c.max_documents, c.val_fraction)

    def _all_documents(self) -> Iterator[tuple[str, str]]:
        c = self.cfg
        if self.kind == "files":  # one document per file
            for f in self.files:
                yield str(f.relative_to(self.root)), self.read_text(f)
            return
        import datasets

        # Streamed, local files too: rows are read as they are tokenized, never converted to a copy first.
        if self.kind == "hub":
            try:
                ds = datasets.load_dataset(c.source, c.hub_config or None, split=c.hub_split, streaming=True)
            except Exception as e:  # datasets and huggingface_hub raise their own kinds (missing, gated, offline)
                text = str(e).strip().splitlines()[0][:300] if str(e).strip() else "no message"
                raise ValueError(
                    f"data.source={c.source!r} (hub_config={c.hub_config!r}, hub_split={c.hub_split!r}) cannot be opened "
                    f"({type(e).__name__}: {text}). Check the name; for a gated or private dataset log in (`hf auth "
                    "login`, or set HF_TOKEN); or point data.source at a local file or folder") from e
        else:
            ds = datasets.load_dataset(self.kind, data_files=[str(f) for f in self.files], split="train", streaming=True)
        for n, row in enumerate(ds):
            if c.text_field not in row:
                raise ValueError(f"data.source={c.source!r} has no column {c.text_field!r}; set data.text_field to one of {list(row)}")
            yield f"{n}", row[c.text_field]

    def read_text(self, file: Path) -> str:
        """A text file of the corpus. Binary data under a text name (a NUL byte, or more than
        MAX_INVALID_UTF8 of its bytes both invalid UTF-8 and control bytes) is refused; other invalid
        UTF-8 is replaced (U+FFFD) with a warning giving the count."""
        raw = file.read_bytes()
        nul = b"\x00" in raw
        try:
            text = raw.decode("utf-8")
            if not nul:
                return text
            bad = 0
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        counts = f"{bad:,} of its {len(raw):,} bytes ({bad / len(raw):.2%}) are not valid UTF-8"
        control = sum(map(raw.count, (bytes([b]) for b in CONTROL_BYTES)))
        if nul or (bad > MAX_INVALID_UTF8 * len(raw) and control > MAX_INVALID_UTF8 * len(raw)):
            what = f"{counts}, {control:,} are control bytes" + (" (NUL among them)" if nul else "")
            raise ValueError(f"data.source={self.cfg.source!r}: {file} is not UTF-8 text: {what} (binary data?). "
                             "Remove it from the source, or convert it to UTF-8")
        if file not in self.warned:
            self.warned.add(file)
            print(f"warning: {file}: {counts}; they are read as U+FFFD", file=sys.stderr, flush=True)
        return text

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        limit = self.cfg.max_documents or None
        for n, (name, text) in enumerate(self._all_documents()):
            if limit is not None and n >= limit:
                return
            if text and split_of(name, self.cfg.val_fraction) == split:
                yield name, text


def local_tokenizer(tokenizer: str) -> Path | None:
    """The tokenizer.json that data.tokenizer names on this machine (a file, or a folder holding one); None for
    'train' or a hub name."""
    path = Path(tokenizer).expanduser()
    if tokenizer == "train" or not path.exists():
        return None
    return path if path.is_file() else path / "tokenizer.json"


def keep_tokenizer(run_tokenizer: Path, tokenizer_path: Path, source: str) -> None:
    """Copies the run's tokenizer, `tokenizer_path`, to `run_tokenizer` in the run directory with its
    chat template (xlstm7b.hub.copy_tokenizer), so that a resumed run's export keeps the template. A
    resumed run (`tokenizer_path` is its copy) started before the template was kept takes it from
    data.tokenizer, `source`, where that file is the run's tokenizer byte for byte."""
    if tokenizer_path != run_tokenizer:
        copy_tokenizer(tokenizer_path, run_tokenizer)
    elif (not run_tokenizer.with_name("tokenizer_config.json").exists() and (local := local_tokenizer(source))
          and local.is_file() and local.read_bytes() == run_tokenizer.read_bytes()):
        copy_tokenizer(local, run_tokenizer)


def prepare_tokenizer(corpus: Corpus, tokenizer: str, vocab_size: int, cache: Path, rank: int) -> Path:
    """The tokenizer file to use: `tokenizer` itself, or a BPE trained on the training split (cached)."""
    if tokenizer != "train":
        if path := local_tokenizer(tokenizer):
            return path
        path = cache / "tokenizers" / stable_hash(tokenizer) / "tokenizer.json"  # a hub tokenizer, kept locally
        if rank == 0 and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            load_tokenizer(tokenizer).save(str(path))
        return path
    path = cache / "tokenizers" / stable_hash(corpus.fingerprint(), vocab_size) / "tokenizer.json"
    if rank == 0 and not path.is_file():
        t0 = time.perf_counter()
        print(f"training a byte-level BPE tokenizer ({vocab_size} tokens) on {corpus.cfg.source!r} ...", flush=True)
        tok = train_bpe((text for _, text in corpus.documents("train")), vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
        print(f"tokenizer trained in {time.perf_counter() - t0:.0f}s: {path}", flush=True)
    return path


def cache_damage(folder: Path) -> str | None:
    """What is wrong with a built token folder, naming the file: an unreadable manifest, or a shard
    missing or of another length than the manifest's token count. None if nothing."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        itemsize = np.dtype(manifest["dtype"]).itemsize
        shards = [s for split in SPLITS for s in manifest["splits"][split]["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{folder / 'manifest.json'} is unreadable ({type(e).__name__}: {e})"
    for shard in shards:
        path = folder / shard["file"]
        size = path.stat().st_size if path.is_file() else None
        if size != shard["tokens"] * itemsize:
            found = "missing" if size is None else f"{size // itemsize:,} tokens long"
            return f"{path} is {found}; the manifest says {shard['tokens']:,}"
    return None


def save_json(path: Path, data: dict) -> None:
    """Written to a temporary file and renamed: a kill leaves the old file or the new one."""
    path.with_suffix(".tmp").write_text(json.dumps(data, indent=2))
    os.replace(path.with_suffix(".tmp"), path)


def build_shards(corpus: Corpus, tok: Tokenizer, tokenizer_path: Path, bos: int, out: Path, shard_tokens: int) -> None:
    """Tokenizes every split into `out`, each document after the `bos` id.

    Streaming: documents are read and encoded ENCODE_BATCH at a time and written out every `shard_tokens`
    tokens, so memory stays at about one shard whatever the size of the corpus. Resumable: shards go
    to `out.partial/` with progress.json (documents consumed and shards written per split, replaced
    atomically after each shard), so a killed build continues from its last shard instead of leaving
    an orphaned folder; the folder is renamed to `out` when complete. An flock on `out.lock` makes
    a second process wait for the first one's build instead of repeating it."""
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "manifest.json").is_file():  # built by another process while this one waited
            return
        for old in out.parent.glob(out.name + ".tmp*"):  # the per-process folders of earlier versions
            shutil.rmtree(old, ignore_errors=True)
        partial.mkdir(exist_ok=True)
        progress_path = partial / "progress.json"
        try:
            progress = json.loads(progress_path.read_text())
        except (OSError, ValueError):
            progress = {"dtype": np.dtype(dtype).name, "splits": {}}
        t0, resumed = time.perf_counter(), bool(progress["splits"])
        if resumed:
            print(f"resuming the tokenization in {partial}", flush=True)
        for split in SPLITS:
            state = progress["splits"].setdefault(split, {"shards": [], "documents": 0, "bytes": 0, "max_token_id": 0, "done": False})
            if not state["done"]:
                tokenize_split(corpus, tok, bos, dtype, split, state, partial, shard_tokens, lambda: save_json(progress_path, progress))
        splits = {split: {"shards": st["shards"], "documents": st["documents"], "bytes": st["bytes"],
                          "tokens": sum(shard["tokens"] for shard in st["shards"]), "max_token_id": st["max_token_id"],
                          "largest_document": st.get("largest_document")}
                  for split, st in progress["splits"].items()}
        manifest = {"tokenizer": str(tokenizer_path), "dtype": progress["dtype"], "bos_token_id": bos, "splits": splits}
        save_json(partial / "manifest.json", manifest)
        progress_path.unlink()
        os.rename(partial, out)
    tr = splits["train"]
    print(f"tokenized {tr['documents']} training documents into {tr['tokens']:,} tokens "
          f"in {time.perf_counter() - t0:.0f}s{' (resumed)' if resumed else ''}: {out}", flush=True)
    if warning := lopsided_message(splits):
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def tokenize_split(corpus: Corpus, tok: Tokenizer, bos: int, dtype, split: str, state: dict, partial: Path, shard_tokens: int,
                   save) -> None:
    """Tokenizes the documents of `split` past the `state["documents"]` already done into shards of
    `partial`, updating `state` (shards, counts, the largest document) and calling `save` after each shard."""
    written = {shard["file"] for shard in state["shards"]}
    for f in partial.glob(f"{split}_*.bin"):  # a shard the kill cut short
        if f.name not in written:
            f.unlink()
    buf, pending_docs, pending_bytes = [], 0, 0

    def flush():
        nonlocal pending_docs, pending_bytes
        if buf:
            name = f"{split}_{len(state['shards']):05d}.bin"
            arr = np.concatenate(buf)
            with open(partial / name, "wb") as fh:
                arr.tofile(fh)
                fh.flush()
                os.fsync(fh.fileno())
            state["shards"].append({"file": name, "tokens": int(arr.size)})
            state["max_token_id"] = max(state["max_token_id"], int(arr.max()))
            buf.clear()
        state["documents"] += pending_docs
        state["bytes"] += pending_bytes
        pending_docs = pending_bytes = 0
        save()

    docs = itertools.islice(corpus.documents(split), state["documents"], None)
    while batch := list(itertools.islice(docs, ENCODE_BATCH)):
        texts = [text for _, text in batch]
        for (name, _), enc in zip(batch, tok.encode_batch(texts, add_special_tokens=False)):
            buf.append(np.asarray([bos, *enc.ids], dtype=dtype))
            if buf[-1].size > (state.get("largest_document") or {}).get("tokens", 0):
                state["largest_document"] = {"name": name, "tokens": int(buf[-1].size)}
        pending_docs += len(batch)
        pending_bytes += sum(len(t.encode("utf-8")) for t in texts)
        if sum(a.size for a in buf) >= shard_tokens:
            flush()
    flush()
    state["done"] = True
    save()


def prepare_data(cfg: DataConfig, model: ModelConfig, rank: int = 0, barrier=lambda: None, *,
                 run_tokenizer: Path | None = None, run_tokens: str | None = None) -> tuple[Path, Path, Tokenizer]:
    """(token folder with manifest.json, tokenizer.json, the tokenizer): built by rank 0 if not
    cached yet. The tokenizer must fit the model's vocabulary.

    A resumed run passes its own tokenizer (`run_tokenizer`, used as is: never retrained) and the
    name of the token folder it trained on (`run_tokens`): a corpus that changed since is refused,
    before any tokenization, unless `cfg.accept_changed_corpus`."""
    cache = writable_folder(cfg.cache_dir, "data.cache_dir")
    corpus = Corpus(cfg)
    tokenizer_path = run_tokenizer or prepare_tokenizer(corpus, cfg.tokenizer, model.vocab_size, cache, rank)
    barrier()
    tok = load_tokenizer(tokenizer_path)
    check_vocab(tok, model.vocab_size, str(tokenizer_path))
    tok_hash = hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()[:16]
    # The default document separator (id 0) keeps the hash of shards built before it was a setting.
    separator = () if model.bos_token_id == 0 else (model.bos_token_id,)
    out = cache / "tokens" / stable_hash(corpus.fingerprint(), tok_hash, *separator)
    if run_tokens is not None and out.name != run_tokens and not cfg.accept_changed_corpus:
        raise ValueError(
            f"the corpus of data.source={cfg.source!r} changed since this run started (files added, removed or modified): "
            f"the run trained on token data {run_tokens}, the corpus now gives {out.name}. Restore the corpus, train into a "
            f"new --run.dir, or pass --data.accept_changed_corpus=true to continue on the changed corpus with the run's "
            f"own tokenizer ({tokenizer_path})")
    if rank == 0 and out.is_dir() and (damage := cache_damage(out)):
        print(f"warning: the token cache {out} is damaged ({damage}); rebuilding it", file=sys.stderr, flush=True)
        shutil.rmtree(out)
    if rank == 0 and not (out / "manifest.json").is_file():
        build_shards(corpus, tok, tokenizer_path, model.bos_token_id, out, cfg.shard_tokens)
    barrier()
    return out, tokenizer_path, tok


class TokenData:
    """Windows over the token shards of one split; `batch(...)` returns inputs, targets and resets."""

    def __init__(self, folder: Path, split: str, seq_len: int, seed: int, vocab_size: int):
        if damage := cache_damage(folder):
            raise ValueError(f"the token cache {folder} is damaged ({damage}); delete {folder} and rerun to rebuild it")
        manifest = json.loads((folder / "manifest.json").read_text())
        info = manifest["splits"][split]
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.bos = manifest.get("bos_token_id", 0)  # shards written before the manifest recorded it used 0
        self.bytes = info["bytes"]
        self.shards = [np.memmap(folder / s["file"], dtype=manifest["dtype"], mode="r") for s in info["shards"]]
        counts = [max(0, (s.size - 1) // seq_len) for s in self.shards]
        self.num_windows = sum(counts)
        if self.num_windows == 0:
            raise ValueError(empty_split_message(manifest["splits"], split, seq_len))
        # Window w lies in the shard i with ends[i-1] <= w < ends[i]: one number per shard, not per window.
        self.ends = np.cumsum(counts)
        # Recorded by the build; shards built before it was are scanned (reads the whole split once).
        top = info.get("max_token_id")
        top = max(int(s.max()) for s in self.shards if s.size) if top is None else top
        if top >= vocab_size:
            raise ValueError(f"token id {top} in {folder} exceeds model.vocab_size={vocab_size}; the tokenizer does not fit the model")
        self._perm_epoch, self._perm = -1, None

    def window(self, w: int) -> np.ndarray:
        shard = int(np.searchsorted(self.ends, w, side="right"))
        start = (w - (int(self.ends[shard - 1]) if shard else 0)) * self.seq_len
        return np.asarray(self.shards[shard][start : start + self.seq_len + 1], dtype=np.int64)

    def sample_window(self, k: int) -> int:
        """Window of the k-th sample of the run (shuffled epochs)."""
        epoch, idx = divmod(k, self.num_windows)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_windows, generator=g).numpy(), epoch
        return int(self._perm[idx])

    def batch(self, windows: list[int]):
        """inputs, targets [B, seq_len] (long) and reset [B, seq_len] (True where a document starts)."""
        rows = torch.from_numpy(np.stack([self.window(w) for w in windows]))
        inputs = rows[:, :-1]
        return inputs, rows[:, 1:], inputs == self.bos

    def train_batch(self, step: int, micro: int, grad_accum: int, micro_batch: int, rank: int, world: int):
        """Micro-batch `micro` of rank `rank` at optimizer step `step`: a slice of the step's global batch."""
        first = (step * grad_accum * world + micro * world + rank) * micro_batch
        return self.batch([self.sample_window(first + j) for j in range(micro_batch)])
