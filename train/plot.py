"""`xlstm7b plot RUN_DIR`: loss, bits-per-byte and throughput curves from metrics.jsonl as a PNG."""

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a run directory written by `xlstm7b train`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (
        (axes[0], "loss (nats/token)", [(train, "loss", "train"), (val, "val_loss", "validation")]),
        (axes[1], "validation bits per byte", [(val, "val_bpb", "validation")]),
        (axes[2], "tokens / s", [(train, "tokens_per_s", "throughput")]),
    )
    for ax, title, series in panels:
        for rows, key, label in series:
            rows = [r for r in rows if r.get(key) is not None]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o" if len(rows) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
