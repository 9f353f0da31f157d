"""The serving engine's settings (`xlstm7b serve`'s flags)."""

from dataclasses import dataclass

import torch

from ..sampling import SamplingError, SamplingParams
from ..state import STORAGE_DTYPES

STATE_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in STORAGE_DTYPES}
"""The slots' state dtypes (State.stored_as), by name."""


@dataclass
class EngineConfig:
    """How the engine batches, bounds and stores its requests: `xlstm7b serve`'s flags of the same
    names, but max_new_tokens is --max-tokens and prefix_cache_bytes is --prefix-cache-mb."""

    max_batch: int = 64
    """State slots: how many requests are prefilled or decoded at once (the decode batch size)."""
    max_queue: int = 1024
    """Requests that may wait for a slot; beyond them `submit` raises `Overloaded`."""
    max_prompt_tokens: int = 32768
    """Longest prompt accepted, in tokens (the state is constant in it; this bounds prefill time)."""
    max_new_tokens: int = 4096
    """Largest `max_tokens` a request may ask for."""
    prefill_chunk: int = 256
    """Prompt positions a request prefills per iteration (rounded down to a multiple of the model's
    chunk size); also the granularity of the prefix cache."""
    prefill_tokens: int = 4096
    """Padded positions (rows x piece length) one prefill pass may run: bounds the stall of decoding."""
    prefix_cache_bytes: int = 1 << 30
    """Bytes of prefix states the cache may hold (0: no prefix cache)."""
    state_dtype: torch.dtype = torch.bfloat16
    """dtype of the slots' C and n: bfloat16 (the default) halves state memory and traffic against
    float32, which dominate the decode step at large batch; the step still computes in float32, and
    prompts are prefilled in float32. float32 keeps decoding bit-faithful to `generate`'s default.
    The stabilizer m stays float32: it is an exponent, which bfloat16 would round by up to 0.03 near 15."""
    compile: bool = False
    """Run the decode step compiled by inductor (one compilation per batch bucket): on CPU its C++
    code, on CUDA its fused kernels captured in the bucket's CUDA graph."""
    cuda_graph: bool | None = None
    """On CUDA, replay the decode step from a CUDA graph captured per batch bucket; default: on CUDA."""
    max_stop_strings: int = 64
    """Most stop strings a request may give (each is looked for after every token)."""
    max_stop_chars: int = 512
    """Longest stop string, in characters."""

    def validate(self, device: torch.device) -> None:
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_new_tokens", "prefill_chunk", "prefill_tokens",
                     "max_stop_strings", "max_stop_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.prefix_cache_bytes, int) or self.prefix_cache_bytes < 0:
            raise ValueError(f"EngineConfig.prefix_cache_bytes must be an integer >= 0, got {self.prefix_cache_bytes!r}")
        if self.state_dtype not in STATE_DTYPES.values():
            raise ValueError(f"EngineConfig.state_dtype must be one of {', '.join(STATE_DTYPES)}, got {self.state_dtype}")
        if self.compile and device.type not in ("cpu", "cuda"):
            raise ValueError(f"compile=True compiles the decode step for CPU or CUDA, not {device.type}")
        if self.compile and device.type == "cuda" and self.cuda_graph is False:
            raise ValueError("compile=True on CUDA compiles the step that the CUDA graph replays; leave cuda_graph on")
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device}")

    def check_params(self, params: SamplingParams, vocab_size: int, has_tokenizer: bool) -> None:
        """Raises a SamplingError (a ValueError) naming the parameter at fault and its valid range,
        or the limit of this configuration it exceeds (and the flag of `xlstm7b serve` that sets it)."""
        try:
            params.validate(vocab_size, max_tokens=(1, self.max_new_tokens))
        except SamplingError as e:
            if e.name != "max_tokens":
                raise
            raise SamplingError("max_tokens", f"{e.requirement} (this server's limit, --max-tokens)", e.value) from None
        if len(params.stop) > self.max_stop_strings:
            raise SamplingError("stop", f"at most {self.max_stop_strings} strings (this server's limit, --max-stop-strings)",
                                f"{len(params.stop)} strings")
        longest = max(map(len, params.stop), default=0)
        if longest > self.max_stop_chars:
            raise SamplingError("stop", f"strings of at most {self.max_stop_chars} characters (this server's "
                                "limit, --max-stop-chars)", f"one of {longest}")
        if params.stop and not has_tokenizer:
            raise SamplingError("stop", "empty: stop strings need a tokenizer and this engine has none (use stop_token_ids)",
                                params.stop)
