"""What the engine hands back: a `Request` from `submit` to its end, the `Event`s of its progress,
the log-probabilities of its tokens, and the engine's refusals."""

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..sampling import LogitsProcessor, SamplingParams
from ..streaming import TextStreamer


class Overloaded(RuntimeError):
    """The queue of waiting requests is full; the client should retry later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down (or stopped) and takes no new requests."""


def check_prompt(prompt, max_prompt_tokens: int, vocab_size: int) -> list[int]:
    """The prompt as a list of token ids, or a ValueError saying what is wrong with it."""
    if not isinstance(prompt, Sequence) or isinstance(prompt, str):
        raise ValueError("the prompt must be a list of integer token ids")
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if len(prompt) > max_prompt_tokens:  # before looking at every id
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than this server's limit of "
                         f"{max_prompt_tokens} (--max-prompt-tokens)")
    if not all(isinstance(t, int) for t in prompt):
        raise ValueError("the prompt must be a list of integer token ids")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"the prompt contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    return list(prompt)


@dataclass
class Logprob:
    """The raw log-probability of one token (generated or of the prompt) and the `top` most likely
    tokens at its position, [(token id, log-probability)], most likely first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What a request produced in one iteration, handed to its `on_event`."""

    token_ids: list[int]
    """The new token ids (the EOS or stop id included)."""
    text: str
    """The new text (empty without a tokenizer; held back while it may be the start of a stop string)."""
    finish_reason: str | None = None
    """None while running; "stop" (EOS, stop id or stop string), "length", "cancelled" or "error"."""
    error: str | None = None
    """The error message when finish_reason is "error"."""
    logprobs: list[Logprob] = field(default_factory=list)
    """With params.logprobs: one per token of token_ids."""


@dataclass(eq=False)
class Request:
    """One request, from `submit` to its end: its prompt and parameters, and what it produced."""

    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] | None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0
    """Prompt tokens that came from the prefix cache instead of being prefilled."""
    logprobs: list[Logprob] = field(default_factory=list)
    """With params.logprobs: one per generated token."""
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)
    """With params.prompt_logprobs: one per prompt token, the first None (nothing predicts it)."""
    cumulative_logprob: float = 0.0
    """The sum of the generated tokens' log-probabilities (with params.logprobs)."""
    arrival: float = field(default_factory=time.perf_counter)
    scheduled_time: float | None = None
    """When a slot was given to it (arrival to here: time in the queue)."""
    token_times: list[float] = field(default_factory=list)
    """When each generated token was produced (the first: time to first token; gaps: inter-token latency)."""
    finish_time: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # the scheduler's bookkeeping
    cancelled: bool = False
    slot: int | None = None
    cursor: int = 0
    last_token: int | None = None
    keys: list = field(default_factory=list)
    generator: torch.Generator | None = None
    processor: LogitsProcessor | None = None
    streamer: TextStreamer | None = None
    carry: torch.Tensor | None = None
    """With prompt logprobs: the log-probabilities [V] the last prefilled position gives the next prompt token."""

    @property
    def first_token_time(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def ttft(self) -> float | None:
        """Seconds from submission to the first token."""
        return None if not self.token_times else self.token_times[0] - self.arrival
