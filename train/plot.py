"""`xlstm7b plot RUN_DIR`: loss, bits-per-byte and throughput curves from metrics.jsonl as a PNG."""

from pathlib import Path

from .metrics import read_metrics


def plot(run_dir: Path, out: Path) -> Path:
    if not (run_dir / "metrics.jsonl").is_file():
        raise ValueError(f"{run_dir / 'metrics.jsonl'} not found; pass a run directory written by `xlstm7b train`")
    if out.is_dir():
        raise ValueError(f"--output {out} is a folder; pass a .png file path")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
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


def plot_by_position(result: dict, out: Path) -> Path:
    """Bits-per-byte by token position (an `xlstm7b eval` result) as a bar chart: whether a model
    gets better with more context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["by_position"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(rows)), [r["bpb"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), [f"{r['bucket']}\n{r['tokens']:,} tok" for r in rows])
    ax.set_xlabel("token position in the document")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{result.get('checkpoint', '')} on {result.get('data', '')}: {result['bpb']:.3f} bits/byte overall", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
