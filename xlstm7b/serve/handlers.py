"""What the two generating endpoints do (api.py routes them here): check a request against the
server's limits before any work, tokenize it off the event loop, turn it into the engine's
parameters for each sequence, and answer it through a `Job` (jobs.py)."""

import asyncio
import functools

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..sampling import SamplingParams, sequence_seed
from .chat import ChatTemplate
from .engine import Engine
from .jobs import Job
from .limits import LimitExceeded, Limits, check_text
from .metrics import Metrics
from .protocol import ChatBody, CompletionBody, FieldError, SamplingFields
from .request import check_prompt
from .responses import APIError


def refuse(fn, *args, **kwargs):
    """fn(*args, **kwargs), its FieldError or LimitExceeded turned into the APIError naming the field or limit."""
    try:
        return fn(*args, **kwargs)
    except FieldError as e:
        raise APIError(400, str(e), param=e.param) from None
    except LimitExceeded as e:
        raise APIError(e.status, str(e), param=e.param) from None


class Handlers:
    """/v1/completions and /v1/chat/completions over `engine`; `state` is the app's (its
    shutting_down flag refuses new requests, its jobs set holds those being answered)."""

    def __init__(self, engine: Engine, *, model_name: str, chat_template: ChatTemplate, limits: Limits, metrics: Metrics, state):
        self.engine, self.model_name, self.chat_template, self.limits, self.metrics, self.state = (
            engine, model_name, chat_template, limits, metrics, state)
        self.tokenizer, self.config = engine.tokenizer, engine.model.config
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)

    async def completions(self, body: CompletionBody, request: Request):
        self.check(body)
        prompts = self.check_prompts(body.prompts())
        per_prompt, k = body.best_of or body.n, body.logprobs
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        # echo with max_tokens 0 scores the prompt alone (OpenAI's and vLLM's way): one token is
        # generated, as vLLM does, and left out of the answer
        echo_only = body.echo and max_tokens == 0
        # best_of ranks the sequences by their log-probabilities, so they are computed even if not reported
        params = self.sequences(body, per_prompt, 1 if echo_only else max_tokens,
                                logprobs=k if k is not None else 0 if per_prompt > body.n else None,
                                prompt_logprobs=k if body.echo else None)
        ids = [await asyncio.to_thread(self.encode, p) if isinstance(p, str) else p for p in prompts]
        echo = [p if isinstance(p, str) else await asyncio.to_thread(self.decode, p) for p in prompts] if body.echo else None
        job = self.job(body, chat=False, per_prompt=per_prompt, report_logprobs=k is not None, echo=echo, generated=not echo_only)
        return await self.answer(job, request, body, ids, params)

    async def chat_completions(self, body: ChatBody, request: Request):
        self.check(body)
        messages, limit = body.texts(), self.limits.max_prompt_chars
        for i, m in enumerate(messages):
            refuse(check_text, m["content"], f"messages.{i}.content", self.limits)
        if sum(len(m["content"]) for m in messages) > limit:
            raise APIError(400, f"the messages are longer than this server's limit of {limit:,} characters "
                                "(--max-prompt-chars)", param="messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sequences(body, body.n, self.engine.config.max_new_tokens if max_tokens is None else max_tokens,
                                self.chat_template.stop, logprobs=k)
        try:
            text = await asyncio.to_thread(self.chat_template.render, messages, body.add_generation_prompt,
                                           body.continue_final_message)
        except ValueError as e:
            raise APIError(400, str(e), param="continue_final_message") from None
        refuse(check_text, text, "the templated chat", self.limits)
        ids = await asyncio.to_thread(self.encode, text)
        job = self.job(body, chat=True, per_prompt=body.n, report_logprobs=body.logprobs)
        return await self.answer(job, request, body, [ids], params)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}", param="model",
                           code="model_not_found")

    def check(self, body: SamplingFields) -> None:
        """The fields both endpoints share, against this server's limits (before any work)."""
        self.check_model(body.model)
        refuse(body.check)
        for name in ("n", "best_of"):
            value = getattr(body, name, None)
            if value is not None and not 1 <= value <= self.limits.max_n:
                raise APIError(400, f"{name} must be in [1, {self.limits.max_n}] (this server's --max-n), got {value}", param=name)
        for s in (body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []):
            refuse(check_text, s, "stop", self.limits)

    def check_prompts(self, prompts: list[str | list[int]]) -> list[str | list[int]]:
        """Completions' prompts, each text checked on its characters and each id list on its ids."""
        if len(prompts) > self.limits.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts, more than this server's limit of {self.limits.max_prompts} per "
                                "request (--max-prompts)", param="prompt")
        for p in prompts:
            if isinstance(p, str):
                refuse(check_text, p, "prompt", self.limits)
                continue
            try:
                check_prompt(p, self.engine.config.max_prompt_tokens, self.config.vocab_size)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
        return prompts

    def sequences(self, body: SamplingFields, count: int, max_tokens: int, extra_stop: tuple[str, ...] = (),
                  **kw) -> list[SamplingParams]:
        """The engine's parameters for `count` sequences of a prompt, sequence j seeded with seed + j
        (so choice j is what a single request with seed + j gives), checked before any work."""
        params = [refuse(body.sampling, max_tokens, extra_stop, seed=sequence_seed(body.first_seed, j), **kw)
                  for j in range(count)]
        try:
            self.engine.check_params(params[0])
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "name", None)) from None
        return params

    def encode(self, text: str) -> list[int]:  # in a worker thread
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send the prompt as token ids", param="prompt")
        if not text:
            raise APIError(400, "the prompt is empty; give at least one character", param="prompt")
        return [self.config.bos_token_id] + self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"token_id:{token}"

    def job(self, body: SamplingFields, **kw) -> Job:
        return Job(self.engine, self.metrics, self.token_text, model_name=self.model_name, n=body.n,
                   return_token_ids=body.return_token_ids, user=body.user,
                   include_usage=body.stream_options is not None and body.stream_options.include_usage, **kw)

    async def answer(self, job: Job, request: Request, body: SamplingFields, prompts: list[list[int]],
                     params: list[SamplingParams]):
        """Submits every sequence of the job and answers: a stream of events, or the JSON once all have ended."""
        if self.state.shutting_down:
            raise APIError(503, "the server is shutting down and accepts no new requests", "server_error", code="shutting_down")
        job.submit(prompts, params)
        jobs = self.state.jobs
        if body.stream:
            async def events():
                jobs.add(job)  # once it runs (a client gone before never starts it)
                try:
                    async for event in job.stream():
                        yield event
                finally:
                    jobs.discard(job)
            return StreamingResponse(events(), media_type="text/event-stream")
        jobs.add(job)
        try:
            if not await job.wait(request):
                return Response(status_code=499)  # nobody waits for the answer
            return job.response()
        finally:
            job.close()
            jobs.discard(job)
