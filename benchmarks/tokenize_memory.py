"""Peak memory of tokenizing a corpus into token shards, against the corpus size: streamed, it should
stay flat (about one shard of tokens plus one batch of documents) however large the corpus.

    python benchmarks/tokenize_memory.py                  # corpora of 32 and 128 MB of text
    python benchmarks/tokenize_memory.py --sizes-mb 64 256 512

Each corpus is the standard library's .py files repeated as .txt documents (one per file) up to the
size. A byte-level BPE of 4,096 tokens is trained once on a 2 MB sample and passed as
data.tokenizer, so only the tokenization is measured. Every size runs in a fresh process, which
reports its peak resident memory (ru_maxrss) and the time of `prepare_data`. JSON goes to
benchmarks/results/tokenize_memory_cpu.json.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def make_corpus(root: Path, megabytes: int) -> int:
    """Writes .txt copies of stdlib modules into `root` until `megabytes` MB; returns the byte count."""
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in sources]
    root.mkdir(parents=True)
    total, n = 0, 0
    while total < megabytes * 2**20:
        text = texts[n % len(texts)]
        (root / f"doc_{n:07d}.txt").write_text(f"# copy {n}\n{text}")
        total += len(text.encode()) + 12
        n += 1
    return total


def child(corpus: Path, cache: Path, tokenizer: Path, shard_tokens: int) -> None:
    """Tokenizes `corpus` and prints the peak memory and time as JSON (runs in its own process)."""
    from xlstm7b.train.config import load_config
    from xlstm7b.train.data import prepare_data

    job = load_config("toy", [f"--data.source={corpus}", f"--data.cache_dir={cache}", f"--data.tokenizer={tokenizer}",
                              f"--data.shard_tokens={shard_tokens}"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    folder, _, _ = prepare_data(job.data, job.model)
    seconds = time.perf_counter() - t0
    manifest = json.loads((folder / "manifest.json").read_text())
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_mb": before / 1024, "seconds": seconds,
                      "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
                      "shards": sum(len(s["shards"]) for s in manifest["splits"].values())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[32, 128])
    p.add_argument("--shard-tokens", type=int, default=1 << 20)
    p.add_argument("--child", nargs=3, metavar=("CORPUS", "CACHE", "TOKENIZER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*map(Path, args.child), args.shard_tokens)
        return

    from xlstm7b.train.tokenizer import train_bpe

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
        tokenizer = tmp / "tokenizer.json"
        train_bpe(sample[:60], 4096).save(str(tokenizer))
        for mb in args.sizes_mb:
            corpus = tmp / f"corpus_{mb}"
            nbytes = make_corpus(corpus, mb)
            out = subprocess.run([sys.executable, __file__, "--shard-tokens", str(args.shard_tokens), "--child", str(corpus),
                                  str(tmp / f"cache_{mb}"), str(tokenizer)], capture_output=True, text=True, check=True)
            row = {"corpus_mb": round(nbytes / 2**20, 1), "documents": len(list(corpus.iterdir())),
                   **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    result = {"benchmark": "tokenize_memory", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{cpu}, {len(__import__('os').sched_getaffinity(0))} cores (shared with other jobs)",
              "python": platform.python_version(), "shard_tokens": args.shard_tokens, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "tokenize_memory_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
