"""The training loop: data, model, optimizer, resume, metrics, evaluation, checkpoints, export.

    exit_code = train(load_config("toy", ["--train.steps=100"]))

Run under torchrun for several processes. Running it again on the same run.dir resumes from the
last complete checkpoint.
"""

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.utils.checkpoint import checkpoint

from xlstm7b import XLSTM, generate, save_pretrained
from xlstm7b.hub import save_for_hub
from xlstm7b.threads import set_threads, threads_text

from . import checkpointing
from .config import JobConfig, TrainConfig, user_path, writable_folder
from .data import TokenData, keep_tokenizer, prepare_data
from .lock import RunDirBusy, RunLock
from .metrics import MetricsLog, peak_flops, peak_memory_gb, run_facts, train_flops_per_token
from .optim import build_optimizer, describe, lr_at
from .parallel import Dist, mixed_precision_dtype, init_distributed, build_model
from .plan import device_capacity_gb, estimate, with_micro_batch
from .tokenizer import token_bytes_tensor


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what state the run directory is in."""


class StopSignal:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def sequence_loss(model, head, inputs, targets, reset, autocast, chunk_tokens: int = 0) -> torch.Tensor:
    """Per-token cross-entropy [B, S] in float32; the state is reset at every document start.

    `head` maps final hidden states to logits (`XLSTM.logits`). With `chunk_tokens`, the logits are
    computed that many tokens at a time and, when gradients are on, recomputed piece by piece in the
    backward pass, so no [B*S, V] logits tensor is kept: at the 7B shape an 8k-token sequence's
    logits and their float32 copies are ~4 GiB. 0 computes them all at once.

    The ids' values are not checked here (no host synchronization in a step): TokenData checks
    its tokens against the vocabulary once, when it opens them.
    """
    with autocast:
        hidden, _ = model(inputs, reset=reset, return_hidden=True, check_ids=False)
        return hidden_nats(head, hidden, targets, chunk_tokens)


def hidden_nats(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """Per-token cross-entropy [...] in float32 of final hidden states [..., D] against targets [...],
    the logits computed `chunk_tokens` tokens at a time (0 = all at once), as in `sequence_loss`."""
    flat = targets.flatten()
    hidden = hidden.flatten(0, -2)
    if not chunk_tokens:
        return token_nats(head, hidden, flat).view(targets.shape)
    recompute = torch.is_grad_enabled()
    pieces = [
        checkpoint(token_nats, head, h, t, use_reentrant=False) if recompute else token_nats(head, h, t)
        for h, t in zip(hidden.split(chunk_tokens), flat.split(chunk_tokens))
    ]
    return torch.cat(pieces).view(targets.shape)


def token_nats(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


@torch.no_grad()
def evaluate(model, head, data: TokenData, tbytes: torch.Tensor, job: JobConfig, d: Dist, autocast) -> dict:
    """val_loss (nats per token) and val_bpb (bits per byte of text; special-token targets, which
    stand for no text, are excluded) on a fixed subset of the validation split."""
    model.eval()
    n = min(data.num_windows, max(1, job.run.eval_tokens // job.train.seq_len))
    per_rank = max(1, n // d.world)  # every rank runs the same number of forwards (FSDP needs it)
    windows = [(d.rank * per_rank + j) % data.num_windows for j in range(per_rank)]
    totals = torch.zeros(4, dtype=torch.float64, device=d.device)  # nats, tokens, nats on text, bytes
    for lo in range(0, len(windows), job.train.micro_batch):
        inputs, targets, reset = (t.to(d.device) for t in data.batch(windows[lo : lo + job.train.micro_batch]))
        nats = sequence_loss(model, head, inputs, targets, reset, autocast, job.train.loss_chunk_tokens).double()
        nbytes = tbytes[targets]
        totals += torch.stack([nats.sum(), torch.tensor(nats.numel(), device=d.device), nats[nbytes > 0].sum(), nbytes.sum()])
    d.all_reduce(totals)
    model.train()
    nats, tokens, text_nats, nbytes = totals.tolist()
    return {"val_loss": nats / tokens, "val_bpb": text_nats / math.log(2) / max(nbytes, 1)}


def sample_text(model: XLSTM, tok, prompt: str, n: int, temperature: float = 0.8, seed: int = 0) -> str:
    """`prompt` continued by up to n sampled tokens (stopping at the EOS), as text."""
    c = model.config
    ids = [c.bos_token_id, *tok.encode(prompt, add_special_tokens=False).ids]
    out = generate(model, [ids], max_new_tokens=n, temperature=temperature, seed=seed, eos_token_id=c.eos_token_id)
    new = out.tokens[0, : int(out.lengths[0])].tolist()
    return tok.decode(ids[1:] + (new[:-1] if new[-1:] == [c.eos_token_id] else new))


def export(run_dir: Path, model, plain: XLSTM, tok, tokenizer_path: Path, d: Dist, sample_tokens: int) -> str | None:
    """RUN_DIR/model/: the save_pretrained layout plus tokenizer.json (xlstm7b.from_pretrained,
    transformers); and a sample from the exported model in RUN_DIR/sample.txt."""
    sd = checkpointing.full_model_state(model)
    text = None
    if d.is_main:
        with torch.device("meta"):
            out = XLSTM(plain.config)
        out.load_state_dict(sd, assign=True)
        save_pretrained(out, run_dir / "model")
        save_for_hub(run_dir / "model", out, tokenizer_path, training=run_facts(run_dir))
        if sample_tokens:
            text = sample_text(out.eval(), tok, "def ", sample_tokens)
            (run_dir / "sample.txt").write_text(text)
    d.barrier()
    return text


@contextlib.contextmanager
def locked_run_dir(run_dir: Path, d: Dist):
    """Rank 0 creates the run directory and holds its lock for the whole run; every rank stops if it cannot."""
    with contextlib.ExitStack() as stack:
        error = None
        if d.is_main:
            try:
                stack.enter_context(RunLock(writable_folder(str(run_dir), "run.dir")))
            except (RunDirBusy, ValueError) as e:
                error = str(e)
        if d.all_reduce(torch.tensor(int(error is not None), device=d.device)).item():
            raise TrainingError(error or f"rank 0 could not take the run directory {run_dir}; its message says why")
        yield


def train(job: JobConfig) -> int:
    d = init_distributed()
    try:
        # The cheap checks come before the run directory is created.
        plan = estimate(job, d.world, d.device)
        if not plan.fits:
            raise TrainingError(f"this config does not fit in memory:\n{plan.report(job)}")
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if job.train.cpu_offload and (problem := plan.host_problem(processes, device_capacity_gb(torch.device("cpu"), 0))):
            raise TrainingError(f"this config does not fit in host memory: {problem}")
        if plan.picked and d.is_main:
            print(f"micro_batch  {plan.picked}", flush=True)
        job = with_micro_batch(job, plan.micro_batch)  # the config the run records: the picked micro-batch
        grad_accum = job.grad_accum(d.world)
        with locked_run_dir(user_path(job.run.dir, "run.dir"), d):
            return _train(job, d, grad_accum)
    finally:
        if torch.distributed.is_initialized():  # torchrun's group, or the group of one of FSDP in one process
            torch.distributed.destroy_process_group()


def run_data(job: JobConfig, d: Dist, run_dir: Path) -> tuple[Path, Path, Tokenizer]:
    """The run's token shards, tokenizer path and tokenizer (prepare_data), the tokenizer copied into
    the run directory with its chat template. A resumed run keeps its tokenizer and checks that its corpus is the one it
    trained on."""
    run_tokenizer, saved = run_dir / "tokenizer.json", checkpointing.newest_meta(run_dir)
    folder, tokenizer_path, tok = prepare_data(
        job.data, job.model, d.rank, d.barrier, run_tokenizer=run_tokenizer if saved and run_tokenizer.is_file() else None,
        run_tokens=Path(saved["data"]).name if saved and "data" in saved else None)
    if d.is_main:
        keep_tokenizer(run_tokenizer, tokenizer_path, job.data.tokenizer)
    return folder, tokenizer_path, tok


def resume(run_dir: Path, model, optimizer, config: dict, d: Dist) -> dict | None:
    """The newest intact checkpoint's metadata, its state loaded into model and optimizer; None for a
    new run. A TrainingError if there are checkpoints and none is intact."""
    meta, damaged = checkpointing.resume(run_dir, model, optimizer, config, d)
    if damaged and meta is None:
        raise TrainingError(
            "no intact checkpoint to resume from:\n  " + "\n  ".join(damaged) +
            f"\nRestore them from a backup, or move {run_dir / 'checkpoints'} away to start the run over.")
    return meta


def accumulate_gradients(model, plain: XLSTM, parallel: str, data: TokenData, step: int, grad_accum: int, t: TrainConfig, d: Dist,
                         autocast) -> torch.Tensor:
    """Forward and backward over the step's `grad_accum` micro-batches, the gradients reduced across
    ranks after the last only; returns this rank's mean loss (float64, on the device, not read)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for micro in range(grad_accum):
        last = micro == grad_accum - 1
        inputs, targets, reset = (x.to(d.device) for x in data.train_batch(step, micro, grad_accum, t.micro_batch, d.rank, d.world))
        if parallel == "fsdp":
            model.set_requires_gradient_sync(last)
        sync = model.no_sync() if parallel == "ddp" and not last else contextlib.nullcontext()
        with sync:
            loss = sequence_loss(model, plain.logits, inputs, targets, reset, autocast, t.loss_chunk_tokens).mean() / grad_accum
            loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def check_finite(loss: float, grad_norm: float, step: int, run_dir: Path) -> None:
    """A TrainingError, before the optimizer step, if step `step`'s loss or gradient norm is not finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    good = checkpointing.checkpoints(run_dir)
    where = f"the last good checkpoint {good[-1]} is intact" if good else "no checkpoint was saved yet"
    raise TrainingError(
        f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; training stopped without saving, "
        f"{where}. Lower train.lr, raise train.warmup_steps or set train.grad_clip, then rerun.")


def _train(job: JobConfig, d: Dist, grad_accum: int) -> int:
    t, r = job.train, job.run
    threads = set_threads(t.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.manual_seed(r.seed)
    run_dir = Path(r.dir).expanduser()
    folder, tokenizer_path, tok = run_data(job, d, run_dir)
    train_data = TokenData(folder, "train", t.seq_len, r.seed, job.model.vocab_size)
    val_data = TokenData(folder, "val", t.seq_len, r.seed, job.model.vocab_size)
    tbytes = token_bytes_tensor(tok, job.model.vocab_size, d.device)

    # A resumed run restores its own checkpoint: the init_from weights are read at the start only.
    init_from = "" if checkpointing.checkpoints(run_dir) else job.model.init_from
    model, plain, parallel = build_model(job.model, t, d, r.seed, init_from)
    optimizer = build_optimizer(model, t)
    dtype = mixed_precision_dtype(t, d.device)
    autocast = (torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 and parallel != "fsdp"
                else contextlib.nullcontext())

    config = job.to_dict()
    meta = resume(run_dir, model, optimizer, config, d)
    step, tokens_seen = (meta["step"], meta["tokens_seen"]) if meta is not None else (0, 0)
    if d.is_main:
        checkpointing.record_config(run_dir, config, step)
        info = (f"{plain.num_params():,} parameters, parallel={parallel} x{d.world}, {grad_accum} micro-batch(es) of "
                f"{t.micro_batch} x {t.seq_len} per process per step, {train_data.num_windows * t.seq_len:,} training tokens, "
                f"{describe(optimizer)}" + (f", {threads_text(threads)}" if d.device.type == "cpu" else ""))
        print(f"resuming {run_dir} at step {step}: {info}" if meta is not None else f"training {run_dir}: {info}", flush=True)
    log = MetricsLog(run_dir, step, t.steps, config, progress=r.progress, wandb_project=r.wandb_project,
                     wandb_mode=r.wandb_mode) if d.is_main else None

    def save(at: int):
        meta = {"tokens_seen": tokens_seen, "config": config, "data": str(folder)}
        return checkpointing.save(run_dir, at, model, optimizer, meta, d, r.keep_checkpoints)

    def record(rec: dict):
        if log is not None:
            log.log(rec)

    flops = train_flops_per_token(job.model)
    peak = peak_flops(d.device)
    step_tokens = t.global_batch_tokens
    stop = StopSignal()
    interval_time, interval_tokens = 0.0, 0
    try:
        while step < t.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = accumulate_gradients(model, plain, parallel, train_data, step, grad_accum, t, d, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            # The step's one read back to the host (the loss and the norm together), for the check below.
            loss_value, norm_value = torch.stack([d.all_reduce(loss_sum) / d.world, grad_norm.double()]).tolist()
            check_finite(loss_value, norm_value, step + 1, run_dir)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            interval_time += time.perf_counter() - t0
            interval_tokens += step_tokens
            if log is not None:
                log.advance()
            if step % r.log_every == 0 or step == t.steps:
                tps = interval_tokens / interval_time
                mem = peak_memory_gb(d.device)
                record({"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value, "tokens": tokens_seen,
                        "tokens_per_s": tps, "mfu": tps * flops / (peak * d.world) if peak else None,
                        "peak_memory_gb": None if mem is None else round(mem, 3)})
                interval_time, interval_tokens = 0.0, 0
            if (r.eval_every and step % r.eval_every == 0) or step == t.steps:
                record({"step": step, **evaluate(model, plain.logits, val_data, tbytes, job, d, autocast)})
            signum = stop.signum if d.world == 1 else int(
                d.all_reduce(torch.tensor(stop.signum, device=d.device), op=torch.distributed.ReduceOp.MAX).item())
            if step % r.ckpt_every == 0 or step == t.steps or signum:
                path = save(step)
                if signum:
                    if log is not None:
                        log.write(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}. "
                                  "Run the same command to resume.")
                    return 128 + signum
        if r.export:
            text = export(run_dir, model, plain, tok, tokenizer_path, d, r.sample_tokens)
            if log is not None:
                log.write(f"done: {step} steps; model exported to {run_dir / 'model'}")
                if text is not None:
                    log.write(f"sample ({run_dir / 'sample.txt'}):\n{text}")
        return 0
    finally:
        stop.restore()
        if log is not None:
            log.close()
