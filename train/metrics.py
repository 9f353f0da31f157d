"""Metrics: the FLOP count behind MFU, RUN_DIR/metrics.jsonl, wandb, and the progress bar.

FLOPs per trained token (forward + backward = 3x forward; multiply-add = 2 FLOPs):
    matmuls   2 * (every weight matrix except the embedding lookup, lm_head included)
    mLSTM     per layer and head, chunkwise with chunk L: 2*L*(dqk + dv) inside the chunk (q k^T and
              its product with v, computed densely over the chunk) + 4*dqk*dv across chunks (q C and
              the k v^T state update)
Norms, gates and elementwise work are left out (< 1 %). Activation recomputation is not counted
(MFU counts useful work only).
"""

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from xlstm7b import XLSTM, ModelConfig

from .data import stable_hash

# Dense bf16 peak FLOP/s by device-name fragment (no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}


def matmul_params(c: ModelConfig) -> int:
    """Weights every token is multiplied with: those of every linear layer, the lm_head included (not
    the embedding, a lookup, nor norms and biases), counted on a meta-device model."""
    with torch.device("meta"):
        model = XLSTM(c)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def forward_flops_per_token(c: ModelConfig) -> float:
    L = c.chunk_size
    cell = c.num_heads * (2 * L * (c.qk_head_dim + c.v_head_dim) + 4 * c.qk_head_dim * c.v_head_dim)
    return 2 * matmul_params(c) + c.num_blocks * cell


def train_flops_per_token(c: ModelConfig) -> float:
    return 3 * forward_flops_per_token(c)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU; None on CPUs and unknown devices (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:
        return None


def log_lines(path: Path) -> Iterator[tuple[str, dict | None]]:
    """Each line of a metrics.jsonl with its record, streamed; None (and a warning naming the line)
    for a line that is not a record: the tail of a kill mid-append, an edit."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                print(f"warning: {path} line {n} is not a metrics record, skipped: {line.strip()[:80]!r}", file=sys.stderr)
                record = None
            yield line, record


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; malformed lines are skipped with a warning."""
    return [record for _, record in log_lines(path) if record is not None]


def truncate_log(path: Path, step: int) -> None:
    """Drops the records past `step` and the malformed lines of a metrics.jsonl. The rest goes to a
    temporary file renamed over the log, so a kill at any moment leaves the old log or the new one,
    whole; a log with nothing to drop is not rewritten."""
    tmp = path.with_name(path.name + ".tmp")
    changed = False
    with open(tmp, "w", encoding="utf-8") as out:
        for line, record in log_lines(path):
            if record is None or record["step"] > step:
                changed = True
                continue
            changed |= not line.endswith("\n")  # a last line cut before its newline would merge with the next record
            out.write(line if line.endswith("\n") else line + "\n")
        out.flush()
        os.fsync(out.fileno())
    if changed:
        os.replace(tmp, path)
    else:
        tmp.unlink()


class MetricsLog:
    """Rank 0's metrics.jsonl (appended to, one JSON record per line), wandb and progress bar. Records
    past `step` (from steps run after the last checkpoint of a killed run) are dropped on resume, so
    the file matches the run."""

    def __init__(self, run_dir: Path, step: int, total: int, config: dict, *, progress: bool, wandb_project: str, wandb_mode: str):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            truncate_log(self.path, step)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
        self.wandb = None
        if wandb_project:
            import wandb

            try:
                self.wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(run_dir), config=config, name=run_dir.name,
                                        resume="allow", id=f"{run_dir.name}-{stable_hash(str(run_dir.resolve()))[:8]}")
            except Exception as e:  # wandb raises its own errors (no credentials, no network), and plain ones
                self.close()
                raise ValueError(f"run.wandb_project={wandb_project!r}: wandb could not start a run ({type(e).__name__}: "
                                 f"{str(e).strip()[:200]}); log in with `wandb login` (or set WANDB_API_KEY), or pass "
                                 "--run.wandb_mode=offline to log locally, or --run.wandb_project='' to log without wandb") from e

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
        if self.bar is not None:
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "val_loss", "val_bpb", "tokens_per_s") if record.get(k) is not None}
            self.bar.set_postfix(shown, refresh=False)
        elif "loss" in record or "val_loss" in record:
            print(json.dumps(record), flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def run_facts(run_dir: Path) -> dict:
    """What a run trained on and reached, from its config.json and metrics.jsonl, for the model card
    of its export: data source, steps, tokens seen and the last validation bits per byte."""
    facts: dict = {}
    try:
        facts["data"] = json.loads((run_dir / "config.json").read_text())["data"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    if records:
        facts["steps"] = records[-1]["step"]
        facts["tokens"] = next((r["tokens"] for r in reversed(records) if isinstance(r.get("tokens"), int)), None)
        facts["val_bpb"] = next((r["val_bpb"] for r in reversed(records) if isinstance(r.get("val_bpb"), (int, float))), None)
    return facts
