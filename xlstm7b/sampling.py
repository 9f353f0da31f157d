"""How a token is chosen from logits, with one parameters object for `generate`, the serving engine
and the `generate` command (model-independent).

    params = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    params.validate(vocab_size)                      # a SamplingError naming the field at fault
    processor = LogitsProcessor(params, vocab_size, prompt_ids, device)   # penalties and logit_bias
    token = sample(processor(logits), **params.draw_args(), generator=g)
    processor.update(token)

The parameters mean what they mean in OpenAI's API and in vLLM, and are applied in vLLM's order:
1. `logit_bias` is added to the logits of the tokens it names;
2. the penalties: `repetition_penalty` (as in vLLM and Hugging Face: over the tokens of the prompt
   and the output, a positive logit is divided by it and a negative one multiplied), then
   `frequency_penalty` (subtracted once per occurrence of the token in the output) and
   `presence_penalty` (subtracted once if the token occurs in the output);
3. temperature 0 takes the argmax of these logits (greedy: min_p, top_k and top_p then change
   nothing); otherwise the logits are divided by the temperature, tokens below `min_p` times the
   most likely token's probability are dropped, then all but the `top_k` most likely, then those
   outside the `top_p` nucleus, and a token is drawn.
Log-probabilities reported to a caller (`token_logprobs`) are those of the model's raw logits, before
any of these steps (vLLM's default, "raw_logprobs").
"""

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20
"""The most alternatives per position `logprobs` and `prompt_logprobs` may ask for (vLLM's default
--max-logprobs, OpenAI's top_logprobs limit)."""
MAX_LOGIT_BIAS = 100.0
"""|logit_bias| values are at most this (OpenAI's range: -100 bans a token, 100 forces it)."""


class SamplingError(ValueError):
    """A sampling parameter out of range: `name` (the field), `requirement` (what it must be)."""

    def __init__(self, name: str, requirement: str, value):
        self.name, self.requirement, self.value = name, requirement, value
        super().__init__(f"{name} must be {requirement}, got {value!r}")


def is_int(x) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded (the module docstring gives the order the steps are applied in)."""

    max_tokens: int = 16
    """Tokens to generate at most (the finish reason is "length" when they run out)."""
    temperature: float = 0.0
    """0 is greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p (None or 1: off)."""
    top_k: int | None = None
    """Sample among the top_k most likely tokens only (None, 0 or -1: off, as in vLLM)."""
    min_p: float = 0.0
    """Drop the tokens whose probability is below min_p times the most likely one's (0: off)."""
    presence_penalty: float = 0.0
    """In [-2, 2]: subtracted from the logit of every token already in the output."""
    frequency_penalty: float = 0.0
    """In [-2, 2]: subtracted from a token's logit once per time it occurs in the output."""
    repetition_penalty: float = 1.0
    """> 0: the logits of tokens in the prompt or the output are divided by it when positive and
    multiplied by it when negative (1: off; > 1 discourages repetition)."""
    logit_bias: Mapping[int, float] | None = None
    """token id -> a value in [-100, 100] added to its logit before everything else."""
    seed: int | None = None
    """Seeds the sequence's own generator: the same tokens whatever else is decoded alongside."""
    stop: tuple[str, ...] = ()
    """Stop at the first of these strings (not part of the text unless include_stop_str_in_output)."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop after any of these token ids (not part of the text)."""
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended the text at its end."""
    ignore_eos: bool = False
    """Keep generating after the model's EOS token."""
    logprobs: int | None = None
    """Report the log-probability of every generated token and of this many most likely alternatives
    (0: the chosen token's only; None: none)."""
    prompt_logprobs: int | None = None
    """The same for the prompt's tokens (the first has none: nothing predicts it)."""

    def validate(self, vocab_size: int, *, max_tokens: tuple[int, int] = (0, 2**62)) -> None:
        """Raises a SamplingError naming the first field of the wrong type or out of range;
        `max_tokens` is the range the caller allows for the field of that name."""
        lo, hi = max_tokens
        if not is_int(self.max_tokens) or not lo <= self.max_tokens <= hi:
            raise SamplingError("max_tokens", f"an integer in [{lo}, {hi}]", self.max_tokens)
        if not _is_real(self.temperature) or self.temperature < 0:
            raise SamplingError("temperature", "a finite number >= 0 (0 is greedy)", self.temperature)
        if self.top_p is not None and (not _is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise SamplingError("top_p", "a number in (0, 1]", self.top_p)
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < -1):
            raise SamplingError("top_k", "an integer >= 1, or 0 or -1 for no limit", self.top_k)
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise SamplingError("min_p", "a number in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not -2 <= value <= 2:
                raise SamplingError(name, "a number in [-2, 2]", value)
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SamplingError("repetition_penalty", "a finite number > 0 (1 is no penalty)", self.repetition_penalty)
        self._validate_ids(vocab_size)
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise SamplingError("seed", "an integer in [0, 2**64)", self.seed)
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop", "a list of non-empty strings", self.stop)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise SamplingError(name, f"an integer in [0, {MAX_LOGPROBS}] or None", value)

    def _validate_ids(self, vocab_size: int) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise SamplingError("logit_bias", "a mapping of token ids to numbers", self.logit_bias)
            for token, bias in self.logit_bias.items():
                if not is_int(token) or not 0 <= token < vocab_size:
                    raise SamplingError("logit_bias", f"keyed by token ids in the vocabulary [0, {vocab_size})", token)
                if not _is_real(bias) or abs(bias) > MAX_LOGIT_BIAS:
                    raise SamplingError("logit_bias", f"valued in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", bias)
        bad = [t for t in self.stop_token_ids if not is_int(t) or not 0 <= t < vocab_size]
        if bad:
            raise SamplingError("stop_token_ids", f"token ids in the vocabulary [0, {vocab_size})", bad[0])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processed(self) -> bool:
        """Whether the logits change before temperature (logit_bias or a penalty)."""
        return self.penalized or bool(self.logit_bias)

    def draw_args(self) -> dict:
        """The keyword arguments of `sample` (off values as None)."""
        return {"temperature": self.temperature, "top_k": None if self.top_k in (None, 0, -1) else self.top_k,
                "top_p": None if self.top_p in (None, 1) else self.top_p, "min_p": self.min_p}


@dataclass
class LogitsProcessor:
    """logit_bias and the penalties of one SamplingParams over a batch of B sequences: call it on the
    logits [B, V] of a step, then `update` it with the tokens chosen. On the logits' device, without
    host syncs. The repetition penalty covers `prompts` (the prompt ids [B, S] of this call, False
    in `prompt_mask` at padding) and the output; presence and frequency the output only."""

    params: SamplingParams
    vocab_size: int
    prompts: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    bias: torch.Tensor | None = field(init=False, default=None)
    counts: torch.Tensor | None = field(init=False, default=None)
    seen: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self):
        p, V = self.params, self.vocab_size
        device = self.prompts.device if self.prompts is not None else None
        if p.logit_bias:
            self.bias = torch.zeros(V, device=device)
            self.bias[list(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device)
        if p.penalized:
            B = 1 if self.prompts is None else self.prompts.shape[0]
            self.counts = torch.zeros(B, V, dtype=torch.float32, device=device)
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=device)
            if self.prompts is not None:
                present = torch.ones_like(self.prompts, dtype=torch.bool) if self.prompt_mask is None else self.prompt_mask
                self._mark(self.prompts, present)
        self.prompts = self.prompt_mask = None  # only their token set is kept

    def _mark(self, ids: torch.Tensor, present: torch.Tensor) -> None:
        hits = torch.zeros(self.seen.shape, dtype=torch.int32, device=self.seen.device)
        hits.scatter_add_(1, ids, present.to(torch.int32))
        self.seen |= hits > 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> the processed float32 logits (a new tensor)."""
        p, logits = self.params, logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if self.counts is not None:
            if p.repetition_penalty != 1:
                penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
                logits = torch.where(self.seen, penalized, logits)
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        return logits

    def update(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Counts `tokens` [B] into the output (rows where `active` is False are skipped)."""
        if self.counts is None:
            return
        weight = torch.ones(tokens.shape, device=tokens.device) if active is None else active.float()
        self.counts.scatter_add_(1, tokens.reshape(-1, 1), weight.reshape(-1, 1))
        self.seen |= self.counts > 0


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax when temperature is 0, else a sample after
    temperature scaling and min-p / top-k / top-p filtering."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_from(sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), generator)


def sampling_probs(logits: torch.Tensor, *, temperature: float, top_k: int | None = None, top_p: float | None = None,
                   min_p: float = 0.0) -> torch.Tensor:
    """logits [..., V] -> the float32 probabilities [..., V] that `sample` draws from (temperature > 0):
    softmax(logits / temperature) after min-p / top-k / top-p filtering, filtered tokens at exactly 0."""
    logits = logits.float()
    # Shifted so that the largest logit is 0 before scaling: a tiny temperature then sends the others
    # to -inf (greedy in the limit) rather than every logit to +-inf (NaN probabilities); below
    # float32's smallest normal number, every temperature gives that limit.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if min_p > 0:  # p / p_max = exp(logit) once the largest logit is 0
        logits = logits.masked_fill(logits < math.log(min_p), float("-inf"))
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the most likely always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def sample_from(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """weights [..., V] (probabilities, or any nonnegative weights with a positive sum) -> ids [...]."""
    # argmax(p / E) with E ~ Exp(1) is a sample from p (the exponential race), without the host
    # sync of torch.multinomial on CUDA.
    race = torch.empty_like(weights).exponential_(generator=generator)
    return (weights / race).argmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw log-probabilities of `tokens` [B] under `logits` [B, V], and the `k` most likely
    tokens of each row: (chosen [B], top_ids [B, k], top_logprobs [B, k]), float32."""
    logp = logits.float().log_softmax(dim=-1)
    top = logp.topk(k, dim=-1)
    return logp.gather(-1, tokens.reshape(-1, 1))[:, 0], top.indices, top.values


def sequence_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request for several sequences with one seed: seed + index
    (mod 2**64), so choice j is the single request with seed + j."""
    return None if seed is None else (seed + index) % 2**64


def as_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """OpenAI's `stop` (a string, a list of strings or None) as a tuple."""
    return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
