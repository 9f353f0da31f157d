"""The request bodies of the OpenAI-compatible API, and what they ask of the engine.

Every field a body may have is declared here; any other is refused (a 400 naming it), and so is a
declared field this server cannot honour (JSON mode, tools), so nothing a client sends is silently
dropped. Known fields are type-checked strictly; their ranges are SamplingParams' (sampling.py).
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..sampling import SamplingParams, as_stop

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


class FieldError(ValueError):
    """A declared field with a value this server refuses (one it does not implement, or a bad
    combination): `param` names it."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def null_is_the_default(cls, data):
        """A known field sent as null takes its default, as OpenAI's nullable fields do (and vLLM's)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(Strict):
    include_usage: StrictBool = False


class SamplingFields(Strict):
    """The fields both endpoints share (OpenAI's, and vLLM's extensions)."""

    model: str
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    """None: OpenAI's default, 1."""
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    min_p: StrictFloat = 0.0
    seed: Annotated[int, Field(strict=True, ge=-2**63, lt=2**64)] | None = None
    """vLLM's range: -1 is no seed; another negative seed is taken modulo 2**64."""
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] = []
    include_stop_str_in_output: StrictBool = False
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    presence_penalty: StrictFloat = 0.0
    frequency_penalty: StrictFloat = 0.0
    repetition_penalty: StrictFloat = 1.0
    logit_bias: dict[str, StrictFloat] | None = None
    return_token_ids: StrictBool = False
    user: str | None = None
    """An end-user id: written to the access log."""

    def check(self) -> None:
        """Raises FieldError for a field whose value this server cannot honour."""
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed with stream=true")

    @property
    def first_seed(self) -> int | None:
        """The seed of the first sequence: None for no seed or vLLM's -1 (the others: sampling.sequence_seed)."""
        return None if self.seed in (None, -1) else self.seed

    def sampling(self, max_tokens: int, extra_stop: tuple[str, ...] = (), *, logprobs: int | None = None,
                 prompt_logprobs: int | None = None, seed: int | None = None) -> SamplingParams:
        """The engine's parameters for one sequence (checked by the engine); stop_token_ids once each,
        as vLLM keeps them (each generated token is looked up in them)."""
        bias = None
        if self.logit_bias:
            bad = next((k for k in self.logit_bias if not k.isascii() or not k.lstrip("-").isdigit()), None)
            if bad is not None:
                raise FieldError("logit_bias", f"logit_bias must map token ids (strings of digits) to numbers, got the key {bad!r}")
            bias = {int(token): value for token, value in self.logit_bias.items()}
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty, logit_bias=bias,
            seed=seed, stop=as_stop(self.stop) + extra_stop, stop_token_ids=tuple(dict.fromkeys(self.stop_token_ids)),
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )


class CompletionBody(SamplingFields):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise FieldError("suffix", "suffix (fill-in-the-middle) is not supported by this model; leave it out")
        if self.best_of is not None and self.best_of < self.n:
            raise FieldError("best_of", f"best_of must be >= n ({self.n}), got {self.best_of}")
        if self.stream and self.best_of not in (None, self.n):
            raise FieldError("best_of", "best_of must equal n when streaming (the best are known only at the end)")

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one text or id list, or several."""
        p = self.prompt
        return list(p) if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False

    def check(self) -> None:
        super().check()
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise FieldError("response_format", f"response_format {self.response_format.get('type')!r} is not supported: "
                              "this server has no constrained decoding (JSON mode); leave response_format out or use "
                              "{'type': 'text'}")
        if self.tools:
            raise FieldError("tools", "tools (function calling) are not supported by this server; leave them out")
        if self.tool_choice not in (None, "none"):
            raise FieldError("tool_choice", "tool_choice must be 'none' or absent: this server does not call tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs=true")
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError("continue_final_message", "continue_final_message needs add_generation_prompt=false")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise FieldError("continue_final_message", "continue_final_message needs the last message to be the assistant's")

    def texts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]
