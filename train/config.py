"""Trainer configuration: one dataclass per TOML section, a docstring per field.

    config = load_config("configs/toy.toml", ["--train.steps=100", "--run.dir=runs/x"])

A preset's `[model]` section is a ModelConfig; `[data]`, `[train]` and `[run]` are below. Unknown
sections or keys are errors that name the key and the valid ones, in the file and on the command line.
Every section is checked by the one validator, `xlstm7b.config.check_fields`: types from the field
annotations, ranges from each class's `bounds` table, all at load, before any expensive work.
"""

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from xlstm7b.config import NON_EMPTY, NON_NEGATIVE, POSITIVE, Bound, ModelConfig, check_fields, preset_path

from .finetune import resolve_init_from
from .tokenizer import MIN_BPE_VOCAB


@dataclass
class DataConfig:
    source: str = "stdlib"
    """'stdlib' (the Python standard library of the running interpreter, split by file: offline
    everywhere), a local file/folder/glob of .txt/.json/.jsonl/.parquet files, or a hub dataset name."""
    text_field: str = "text"
    """Column holding the document text in json/parquet/hub datasets."""
    hub_config: str = ""
    """Hub dataset configuration (subset) name, if the dataset has several."""
    hub_split: str = "train"
    """Hub dataset split to read (streamed)."""
    max_documents: int = 0
    """Read at most this many documents (0 = all); bounds a streamed hub corpus."""
    val_fraction: float = 0.02
    """Share of documents (whole files for 'stdlib') held out for validation, chosen by a hash of the name."""
    tokenizer: str = "train"
    """Path to a tokenizer.json, or 'train' to train a byte-level BPE of model.vocab_size on the training split."""
    cache_dir: str = "~/.cache/xlstm7b"
    """Where tokenizers and token shards are cached, keyed by a hash of the files and the tokenizer."""
    shard_tokens: int = 1 << 26
    """Tokens per on-disk shard (about the most tokenization holds in memory; a killed tokenization
    resumes from its last complete shard)."""
    accept_changed_corpus: bool = False
    """On resume, continue on a corpus that changed since the run started (files added, removed or
    modified), tokenized with the run's own tokenizer; without it such a resume is refused."""

    section: ClassVar[str] = "data"
    bounds: ClassVar[dict] = {
        "source": NON_EMPTY, "text_field": NON_EMPTY, "hub_split": NON_EMPTY, "tokenizer": NON_EMPTY, "cache_dir": NON_EMPTY,
        "max_documents": Bound(0, off="0 = all"), "val_fraction": Bound(0, 1, hi_open=True), "shard_tokens": POSITIVE,
    }

    def __post_init__(self):
        check_fields(self)


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps of the whole run."""
    seq_len: int = 2048
    """Tokens per training sequence (the context length)."""
    global_batch_tokens: int = 524288
    """Tokens per optimizer step over all ranks; must be a multiple of seq_len * micro_batch * world size.
    Gradient accumulation is derived from it."""
    micro_batch: int = 8
    """Sequences per rank per forward/backward; 0 = the largest that fits the device's memory by the
    plan (`xlstm7b plan` shows it): a divisor of the sequences per rank per step."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate (exponential, cosine) or floor before cool-down, as a fraction of the peak."""
    schedule: Literal["exponential", "cosine", "wsd", "constant"] = "exponential"
    """'exponential' (the 7B recipe: decay to min_lr_ratio, then linear cool-down to 0), 'cosine',
    'wsd' (warmup-stable-decay: constant, then linear decay to 0) or 'constant' after warmup."""
    warmup_steps: int = 100
    """Linear warmup from 0 to the peak."""
    cooldown_steps: int = 0
    """Final steps of linear decay to 0 ('exponential' and 'wsd'; for 'wsd' 0 means 20% of steps)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to weight matrices only (not biases, norms, embedding)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Compute dtype: 'auto' = bf16 autocast on GPU, float32 on CPU."""
    parallel: Literal["auto", "fsdp", "ddp", "none"] = "auto"
    """'fsdp' (FSDP2 fully_shard per block), 'ddp', 'none' (one process), 'auto' = fsdp on several
    processes or with cpu_offload, none otherwise."""
    cpu_offload: bool = False
    """Keep parameters, gradients and optimizer state in host memory (FSDP2 CPUOffloadPolicy): the
    7B on one 80 GB GPU."""
    optimizer_impl: Literal["auto", "fused", "foreach", "loop"] = "auto"
    """AdamW's implementation: 'fused' (one kernel per parameter group; CUDA), 'foreach' (multi-tensor
    ops), 'loop' (tensor by tensor), 'auto' = fused where the parameters are on a GPU, foreach
    elsewhere (CPU, and cpu_offload's host copies). The same update up to float rounding."""
    compile: bool = False
    """torch.compile each block (the mLSTM kernels stay single opaque nodes of the graph)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    loss_chunk_tokens: int = 0
    """Compute the output logits and the loss this many tokens at a time, recomputing them in the
    backward pass, so the [tokens, vocab] logits are never held whole (0 = all at once)."""
    threads: int = 0
    """CPU threads per process for torch (0 = the cores other processes do not keep busy, divided by
    the local processes: on a busy machine a thread whose core is taken stalls every step)."""

    section: ClassVar[str] = "train"
    bounds: ClassVar[dict] = {
        **dict.fromkeys(("steps", "seq_len", "global_batch_tokens", "lr", "eps"), POSITIVE),
        "micro_batch": Bound(0, off="0 = the largest that fits"),
        "min_lr_ratio": Bound(0, 1), "warmup_steps": NON_NEGATIVE, "cooldown_steps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE, "beta1": Bound(0, 1, hi_open=True), "beta2": Bound(0, 1, hi_open=True),
        "grad_clip": Bound(0, off="0 = off"), "loss_chunk_tokens": Bound(0, off="0 = all at once"),
        "threads": Bound(0, off="0 = the idle cores"),
    }

    def __post_init__(self):
        check_fields(self)


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: checkpoints, metrics.jsonl, the exported model. An existing run is resumed."""
    seed: int = 0
    """Seed of the initialization, the data order and every random draw."""
    log_every: int = 10
    """Log a metrics record every this many steps."""
    eval_every: int = 100
    """Evaluate on the validation split every this many steps (and at the end; 0 = end only)."""
    eval_tokens: int = 262144
    """Validation tokens per evaluation (a fixed subset of the validation split)."""
    ckpt_every: int = 500
    """Save a checkpoint every this many steps (and at the end, and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 2
    """Keep the last k checkpoints."""
    export: bool = True
    """At the end, export RUN_DIR/model/ (save_pretrained layout + tokenizer.json)."""
    sample_tokens: int = 200
    """After the export, sample this many tokens from the model into RUN_DIR/sample.txt (0 = off)."""
    wandb_project: str = ""
    """Log to Weights & Biases under this project ('' = off)."""
    wandb_mode: Literal["online", "offline"] = "offline"
    """wandb mode; 'offline' works without a network (sync later with `wandb sync`)."""
    progress: bool = True
    """Show a progress bar with ETA on rank 0."""
    gpu_memory_gb: float = 0.0
    """Memory per GPU for the up-front fit check (0 = ask the device)."""

    section: ClassVar[str] = "run"
    bounds: ClassVar[dict] = {
        "dir": NON_EMPTY, "seed": Bound(0, 2**32, hi_open=True), "log_every": POSITIVE, "eval_every": Bound(0, off="0 = at the end only"),
        "eval_tokens": POSITIVE, "ckpt_every": POSITIVE, "keep_checkpoints": POSITIVE, "sample_tokens": Bound(0, off="0 = off"),
        "gpu_memory_gb": Bound(0, off="0 = ask the device"),
    }

    def __post_init__(self):
        check_fields(self)


@dataclass
class ModelSection(ModelConfig):
    """[model] of a training config: the architecture (a ModelConfig) and where its weights start."""

    init_from: str = ""
    """A saved model folder (any layout from_pretrained reads) to start from instead of random weights:
    continued pretraining or fine-tuning. Its config sets the architecture ([model] keys left out take
    its values; a contradicting key is an error) and its tokenizer.json the tokenizer (unless
    data.tokenizer names another). A resumed run restores its own checkpoint instead ('' = random init)."""

    def architecture(self) -> ModelConfig:
        """The plain ModelConfig, without init_from."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in dataclasses.fields(self)}

    def validate(self) -> None:
        """What no single section can check: relations between fields (each section checks its own)."""
        t = self.train
        if self.data.tokenizer == "train" and self.model.vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is too small for the byte-level BPE that data.tokenizer='train' "
                             f"trains: at least {MIN_BPE_VOCAB} (256 bytes + {MIN_BPE_VOCAB - 256} special tokens)")
        if t.global_batch_tokens % t.seq_len:
            raise ValueError(f"train.global_batch_tokens={t.global_batch_tokens} must be a multiple of train.seq_len={t.seq_len}")

    def sequences_per_rank(self, world_size: int) -> int:
        """Sequences each rank trains per optimizer step."""
        t = self.train
        sequences = t.global_batch_tokens // t.seq_len
        if sequences % world_size:
            raise ValueError(
                f"train.global_batch_tokens={t.global_batch_tokens} is {sequences} sequences of {t.seq_len}, not a multiple "
                f"of the {world_size} process(es); change train.global_batch_tokens or the number of processes")
        return sequences // world_size

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per step, derived from the global batch (train.micro_batch = 0 must
        be resolved first: plan.estimate picks it)."""
        t = self.train
        if not t.micro_batch:
            raise ValueError("train.micro_batch = 0 (the largest that fits) is picked by the memory plan before training")
        sequences = t.global_batch_tokens // t.seq_len
        per_micro = t.micro_batch * world_size
        if sequences % per_micro:
            raise ValueError(
                f"train.global_batch_tokens={t.global_batch_tokens} is {sequences} sequences of {t.seq_len}, not a multiple "
                f"of micro_batch {t.micro_batch} x {world_size} process(es); change train.micro_batch or train.global_batch_tokens")
        return sequences // per_micro


SECTIONS = {"model": ModelSection, "data": DataConfig, "train": TrainConfig, "run": RunConfig}


def _section(cls, values: dict, source: str, name: str):
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid [{name}] keys: {names}")
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def user_path(value: str, key: str) -> Path:
    """The path `value` of config key `key`, with ~ expanded; without a home folder, an error that says so."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        raise ValueError(f"{key}={value!r} starts with ~, but there is no home folder (HOME is not set); set HOME or "
                         f"pass --{key}=/an/absolute/path") from None


def writable_folder(value: str, key: str) -> Path:
    """The folder `value` of config key `key`, created if needed; an error naming the key if it cannot be written."""
    path = user_path(value, key)
    try:
        path.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(path, os.W_OK | os.X_OK) else "Permission denied"
    except OSError as e:
        problem = "it is a file" if path.is_file() else f"{e.strerror} ({e.filename})"
    if problem:
        raise ValueError(f"{key} {path} cannot be used: {problem}; pass a writable folder with --{key}")
    return path


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, quoted strings); else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> None:
    for arg in overrides:
        key, sep, text = arg.removeprefix("--").partition("=")
        section, dot, name = key.partition(".")
        if not arg.startswith("--") or not sep or not dot:
            raise ValueError(f"override {arg!r} must look like --section.key=value (e.g. --train.steps=100)")
        if section not in SECTIONS:
            raise ValueError(f"override {arg!r}: unknown section {section!r}; valid sections: {list(SECTIONS)}")
        name, value = name.replace("-", "_"), parse_value(text)
        field_type = typing.get_type_hints(SECTIONS[section]).get(name)
        if field_type is str and not isinstance(value, str):  # --run.dir=2024 names a folder, not a number
            value = text
        data.setdefault(section, {})[name] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """A preset name ('toy') or TOML path, plus `--section.key=value` overrides."""
    path = preset_path(str(path))
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ValueError(f"cannot read the config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [{name}] must be a table of keys, got {name} = {table!r}")
    apply_overrides(data, list(overrides))
    source = f"{path} (with overrides)" if overrides else str(path)
    resolve_init_from(data, source)
    job = JobConfig(**{name: _section(cls, data.get(name, {}), source, name) for name, cls in SECTIONS.items()})
    try:
        job.validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return job
