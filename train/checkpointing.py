"""Training checkpoints: torch.distributed.checkpoint (sharded), atomic, the last k kept.

RUN_DIR/checkpoints/step_00000100/ holds the DCP shards of model and optimizer, `rng_rank{r}.pt` and
`trainer.json` (step, tokens seen, config). A save goes to `step_N.tmp` and is renamed when every
rank has finished, so a crash mid-save leaves the previous checkpoint as the latest complete one.
A checkpoint damaged later (a truncated shard, a garbled file) is skipped on resume in favour of the
newest intact one, with a warning naming the file, and renamed to `step_N.damaged`: kept for
inspection, never counted among the last k (which would prune the intact ones).
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .parallel import Dist

NAME = re.compile(r"^step_(\d{8})$")

# Config keys a resumed run may change; any other difference is an error.
RESUMABLE_CHANGES = {
    "train": {"steps", "lr", "min_lr_ratio", "schedule", "warmup_steps", "cooldown_steps", "grad_clip", "micro_batch",
              "compile", "activation_checkpointing", "loss_chunk_tokens", "threads", "parallel", "cpu_offload",
              "optimizer_impl"},
    "run": {"dir", "sample_tokens", "log_every", "eval_every", "eval_tokens", "ckpt_every", "keep_checkpoints", "export", "wandb_project",
            "wandb_mode", "progress", "gpu_memory_gb"},
    "data": {"cache_dir", "shard_tokens", "accept_changed_corpus"},
    "model": {"mlstm_backend", "init_from"},
}


@contextlib.contextmanager
def single_process_quiet():
    """One process saves and loads without a process group, which DCP warns that it assumes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / "trainer.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name)


class SaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount); the message says which and that
    the checkpoints before it are intact."""


def save(run_dir: Path, step: int, model, optimizer, meta: dict, d: Dist, keep: int) -> Path:
    """The checkpoint of `step`, written under step_N.tmp and renamed once every rank's part is
    written; the oldest beyond `keep` removed. A SaveError on every rank if any rank's write fails
    (the ranks agree after each stage, so none waits at a barrier the others never reach)."""
    final = run_dir / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    for stage in (prepare_folder, write_state, write_local_files):
        error = None
        try:
            stage(tmp, step, model, optimizer, meta, d)
        except (OSError, CheckpointException) as e:
            error = e
        if d.all_reduce(torch.tensor(int(error is not None), device=d.device)).item():
            if d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # the space it took goes back; the finished checkpoints stay
            good = checkpoints(run_dir)
            kept = f"the last good checkpoint {good[-1]} is intact" if good else "no earlier checkpoint exists"
            why = describe_error(error) if error is not None else "another process failed to write its part (its message says why)"
            raise SaveError(f"cannot write the checkpoint of step {step} to {tmp}: {why}; training stopped, "
                            f"{kept}. Free space (or fix the file system) and rerun the same command to resume.") from error
    if d.is_main:
        if final.exists():  # a checkpoint of this step from an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def prepare_folder(tmp: Path, step: int, model, optimizer, meta: dict, d: Dist) -> None:
    """Rank 0 makes the empty folder `tmp`."""
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)


def write_state(tmp: Path, step: int, model, optimizer, meta: dict, d: Dist) -> None:
    """Every rank's DCP shards of the model and optimizer state (a collective save)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=d.world == 1)


def write_local_files(tmp: Path, step: int, model, optimizer, meta: dict, d: Dist) -> None:
    """Every rank's RNG state, and rank 0's trainer.json."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / f"rng_rank{d.rank}.pt")
    if d.is_main:
        (tmp / "trainer.json").write_text(json.dumps({**meta, "step": step, "world_size": d.world}, indent=2))


def load(path: Path, model, optimizer, d: Dist) -> dict:
    """Restores model, optimizer and this rank's RNG from `path`; returns its trainer.json."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=d.world == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{d.rank}.pt"
    if rng_file.is_file():  # absent when resuming with more processes than saved
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "trainer.json").read_text())


def newest_meta(run_dir: Path) -> dict | None:
    """trainer.json of the newest checkpoint with a readable one: what the run trained on so far."""
    for path in reversed(checkpoints(run_dir)):
        try:
            return json.loads((path / "trainer.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def resume(run_dir: Path, model, optimizer, config: dict, d: Dist) -> tuple[dict | None, list[str]]:
    """Restores the newest intact checkpoint of `run_dir`: its trainer.json, or None if there is none,
    and the damaged checkpoints skipped on the way ('path: what is wrong'). A checkpoint saved with
    an incompatible config is an error (ValueError), not damage. Every rank takes the same decision."""
    def on_any_rank(failed: bool) -> bool:  # the ranks agree before DCP's collective load, and after it
        return bool(d.all_reduce(torch.tensor(int(failed), device=d.device)).item())

    if d.is_main:  # saves cut short by a kill: under the run's lock no other process is writing one
        for stale in (run_dir / "checkpoints").glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    damaged = []
    for path in reversed(checkpoints(run_dir)):
        try:
            saved = json.loads((path / "trainer.json").read_text())
            saved_config = saved["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{path / 'trainer.json'} is unreadable ({type(e).__name__}: {e})"
        else:
            check_compatible(saved_config, config, path)
            problem = missing_bytes(path, d.rank)
        if not on_any_rank(problem is not None):
            try:
                meta = load(path, model, optimizer, d)
            except (Exception, CheckpointException) as e:  # whatever a damaged file raises in DCP, torch.load or json
                problem = describe_error(e)
            if not on_any_rank(problem is not None):
                if d.is_main and (changes := changed_values(meta["config"], config)):
                    print(f"notice: resuming {path.name} with changed settings, applied from step {meta['step']} on: "
                          + "; ".join(changes), file=sys.stderr, flush=True)
                return meta, damaged
        damaged.append(f"{path}: {problem or 'damaged on another rank'}")
        d.barrier()  # every rank has stopped reading it
        if d.is_main:
            aside = path.with_name(path.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            print(f"warning: checkpoint {path} is damaged and skipped: {problem}. Moved to {aside} "
                  "(delete it once inspected)", file=sys.stderr, flush=True)
    return None, damaged


class MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's `.metadata`, a pickle, building only the classes a checkpoint's metadata is made
    of: a crafted file cannot run code. DCP's own reader (plain pickle) runs only after this one has
    accepted the file, so it meets no other global either."""

    def find_class(self, module: str, name: str):
        allowed = (module == "torch.distributed.checkpoint.metadata"
                   or (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                         ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                                         ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}
                   or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


def missing_bytes(path: Path, rank: int) -> str | None:
    """What a cheap look finds wrong with a checkpoint's files (the DCP metadata, every shard at least
    as long as the metadata says, this rank's RNG file), naming the file; None if nothing."""
    try:
        with open(path / ".metadata", "rb") as fh:
            metadata = MetadataUnpickler(fh).load()
    except Exception as e:  # absent or garbled .metadata: whatever the unpickler raises
        return f"{path / '.metadata'} is unreadable ({describe_error(e)})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = (path / name).stat().st_size if (path / name).is_file() else None
        if have is None or have < size:
            return f"{path / name} is {'missing' if have is None else f'truncated ({have} of {size} bytes)'}"
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        try:
            torch.load(rng_file, weights_only=True)
        except Exception as e:
            return f"{rng_file} is unreadable ({describe_error(e)})"
    return None


def describe_error(e: BaseException) -> str:
    """One line for an error of loading or saving: DCP's CheckpointException wraps each rank's error with its traceback."""
    if isinstance(e, CheckpointException):
        e = next(iter(e.failures.values()))[0]
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else 'no message'}"


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    """A resumed run must train the same model on the same data in the same order."""
    diffs = []
    for section, values in current.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key, value)
            if old != value and key not in RESUMABLE_CHANGES.get(section, set()):
                diffs.append(f"{section}.{key}: {old!r} in the checkpoint, {value!r} now")
    if diffs:
        raise ValueError(
            f"cannot resume {path} with this config:\n  " + "\n  ".join(diffs) +
            "\nRestore these values, or start a new run with a different --run.dir.")


def changed_values(saved: dict, current: dict) -> list[str]:
    """'section.key: old -> new' for each value of `current` that differs from `saved`."""
    return [f"{section}.{key}: {saved[section][key]!r} -> {value!r}" for section, values in current.items()
            for key, value in values.items() if key in saved.get(section, {}) and saved[section][key] != value]


def record_config(run_dir: Path, config: dict, step: int) -> None:
    """RUN_DIR/config.json: the values the run trains with now; RUN_DIR/config_history.jsonl, appended
    to and never rewritten: every start of the run (the step it starts at, when, and the values that
    differ from the start before, all of them at the first), so the values of every step are known."""
    history = run_dir / "config_history.jsonl"
    before: dict[str, dict] = {}  # the values of the last start: every entry's changes, in order
    if history.is_file():
        for line in history.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)["changed"]
                for section, values in entry.items():
                    before.setdefault(section, {}).update(values)
            except (ValueError, KeyError, TypeError, AttributeError):  # a line cut by a kill
                continue
    unset = object()
    changed = {section: {k: v for k, v in values.items() if before.get(section, {}).get(k, unset) != v}
               for section, values in config.items()}
    entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "changed": {s: v for s, v in changed.items() if v}}
    with open(history, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, run_dir / "config.json")


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model state dict on the CPU of rank 0 (gathered from shards), for the export."""
    return get_state_dict(model, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]
