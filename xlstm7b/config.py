"""Model configuration: one dataclass with the released field names, and TOML presets.

Presets live in `configs/NAME.toml` (installed as the package `xlstm7b.configs`); their `[model]`
section is a ModelConfig. Unknown keys are errors, so a typo never silently falls back to a default.

`check_fields` is the one validator of every config section (this one and the trainer's): strict
types from the dataclass annotations (a bool is `true`/`false`, never the string "False" or 0; an
int is never a bool; a float is finite) and the ranges of the section's `bounds` table.
"""

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal


@dataclass(frozen=True)
class Bound:
    """An allowed interval of a number field; `off` names a value that switches the feature off."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    off: str = ""

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self, kind: type) -> str:
        noun = "an integer" if kind is int else "a number"
        if (self.lo, self.hi) == (0, math.inf) and self.lo_open or kind is int and (self.lo, self.hi) == (1, math.inf):
            text = f"a positive {'integer' if kind is int else 'number'}"
        elif self.hi == math.inf:
            text = f"{noun} {'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = f"{noun} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return f"{text} ({self.off})" if self.off else text


POSITIVE = Bound(0, lo_open=True)
"""> 0: sizes, counts (for ints the same as >= 1), learning rates, epsilons."""
NON_NEGATIVE = Bound(0)
NON_EMPTY = "non-empty"
"""The bound of a string field that must not be empty."""


def check_fields(config) -> None:
    """Checks every field of a config dataclass against its annotation and its class's `bounds`
    ({field: Bound or NON_EMPTY}), in place: an int given for a float field becomes a float. The
    error names `section.key` (the class's `section`), the value and what is allowed."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kind, where = getattr(config, f.name), hints[f.name], f"{config.section}.{f.name}"
        options = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in options:
            if value is None:
                continue
            kind = next(k for k in options if k is not type(None))
        if typing.get_origin(kind) is Literal:
            if value not in typing.get_args(kind) or isinstance(value, bool):
                raise ValueError(f"{where} must be one of {list(typing.get_args(kind))}, got {value!r}")
            continue
        if kind is bool and not isinstance(value, bool):
            hint = " (TOML booleans are lowercase)" if str(value).lower() in ("true", "false") else ""
            raise ValueError(f"{where} must be true or false{hint}, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        bound = config.bounds.get(f.name)
        if kind is str and bound == NON_EMPTY and not value.strip():
            raise ValueError(f"{where} must be a non-empty string, got {value!r}")
        if kind in (int, float):
            number = isinstance(value, int) if kind is int else isinstance(value, (int, float)) and math.isfinite(value)
            if not number or isinstance(value, bool) or (bound is not None and value not in bound):
                expected = bound.describe(kind) if bound is not None else ("an integer" if kind is int else "a finite number")
                infinite = isinstance(value, float) and not math.isfinite(value)
                raise ValueError(f"{where} must be {expected}, got {value!r}{', which is not finite' if infinite else ''}")
            if kind is float:
                object.__setattr__(config, f.name, float(value))


@dataclass
class ModelConfig:
    embedding_dim: int = 4096
    """Width D of the residual stream (the released config also calls it hidden_size)."""
    num_blocks: int = 32
    """Number of residual blocks, each an mLSTM layer and a gated feed-forward (num_hidden_layers)."""
    num_heads: int = 8
    """mLSTM heads NH; must divide the query/key and value dimensions."""
    vocab_size: int = 50304
    """Rows of the embedding and the lm_head (GPT-NeoX-20B's 50,277 tokens padded to 50,304)."""
    qk_dim_factor: float = 0.5
    """Query/key width Dqk = int(D * qk_dim_factor)."""
    v_dim_factor: float = 1.0
    """Value (and output gate) width Dv = int(D * v_dim_factor)."""
    ffn_proj_factor: float = 2.667
    """Feed-forward width Dff = round_up(D * ffn_proj_factor, ffn_round_up_to_multiple_of)."""
    ffn_round_up_to_multiple_of: int = 64
    """Dff is rounded up to a multiple of this."""
    gate_soft_cap: float = 15.0
    """Input and forget gate pre-activations are soft-capped: c * tanh(x / c)."""
    output_logit_soft_cap: float = 30.0
    """Logits are soft-capped with this value."""
    norm_eps: float = 1e-6
    """Epsilon of RMSNorm and of the per-head LayerNorm."""
    use_bias: bool = False
    """Biases in the linear layers and norms (the i/f gates always have one). False in the release."""
    add_out_norm: bool = True
    """RMSNorm after the last block, before the lm_head."""
    tie_word_embeddings: bool = False
    """Share the embedding and the lm_head (the 7B keeps them separate)."""
    chunk_size: int = 64
    """Chunk length of the chunkwise mLSTM kernel; any sequence length works with any value."""
    eps: float = 1e-6
    """Epsilon of the mLSTM normalizer, added in stabilized units (spec §2)."""
    mlstm_backend: Literal["auto", "torch", "triton"] = "auto"
    """mLSTM kernel: 'auto' (Triton on CUDA, PyTorch elsewhere), 'torch' or 'triton'."""
    bos_token_id: int = 0
    """Token that starts every prompt and separates documents."""
    pad_token_id: int = 1
    """Token used to pad finished or shorter rows."""
    eos_token_id: int = 0
    """Token that ends generation (id 0, <|endoftext|>, in the 7B's tokenizer)."""

    section: ClassVar[str] = "model"
    bounds: ClassVar[dict] = {
        **dict.fromkeys(("embedding_dim", "num_blocks", "num_heads", "vocab_size", "ffn_round_up_to_multiple_of", "chunk_size",
                         "qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "gate_soft_cap", "output_logit_soft_cap",
                         "norm_eps", "eps"), POSITIVE),
        **dict.fromkeys(("bos_token_id", "pad_token_id", "eos_token_id"), NON_NEGATIVE),
    }

    def __post_init__(self):
        self.validate()

    # Derived dimensions, computed as the xlstm package does (int(), no rounding to 64).
    @property
    def qk_dim(self) -> int:
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        m = self.ffn_round_up_to_multiple_of
        return int(math.ceil(self.embedding_dim * self.ffn_proj_factor / m) * m)

    def validate(self) -> None:
        check_fields(self)
        for name, dim in (("qk_dim", self.qk_dim), ("v_dim", self.v_dim)):
            if dim == 0 or dim % self.num_heads:
                raise ValueError(
                    f"model.num_heads={self.num_heads} must divide {name} = int(embedding_dim * "
                    f"{name}_factor) = {dim}; change num_heads, embedding_dim or {name}_factor"
                )
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"model.{name}={value} must lie in [0, vocab_size={self.vocab_size})")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        """Strict: every key must be a field; the error names the unknown key and the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown model config key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> "ModelConfig":
        """The [model] section of a TOML file (other sections belong to the trainer)."""
        path = Path(path)
        with open(path, "rb") as fh:
            try:
                data = tomllib.load(fh)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from e
        if not isinstance(data.get("model"), dict):
            raise ValueError(f"{path}: no [model] section")
        return cls.from_dict(data["model"], source=str(path))

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        return cls.from_toml(preset_path(name))


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("xlstm7b.configs").iterdir() if p.name.endswith(".toml"))


def preset_path(name: str) -> Path:
    """Path of the preset `name` (e.g. 'toy', '7b'), or of `name` itself if it is a TOML file."""
    if name.endswith(".toml") or "/" in name:
        path = Path(name).expanduser()
        if not path.exists():
            raise ValueError(f"config file {name} does not exist; pass an existing .toml file or a preset name ({', '.join(preset_names())})")
        if not path.is_file():
            raise ValueError(f"config {name} is a folder, not a TOML file; pass a .toml file or a preset name ({', '.join(preset_names())})")
        return path
    path = resources.files("xlstm7b.configs") / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose one of {preset_names()} or pass a path to a .toml file")
    return Path(str(path))
