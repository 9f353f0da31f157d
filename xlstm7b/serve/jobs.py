"""One HTTP request's sequences in the engine (a `Job`): n (or best_of) sequences for each of its
prompts, submitted together, their events on one queue, answered as one JSON body or one stream of
server-sent events, cancelled together when the client goes away, then measured and logged."""

import asyncio
import functools
import time
import uuid
from collections.abc import Callable

from ..sampling import SamplingParams
from .engine import Engine
from .metrics import Metrics, log_request
from .request import EngineStopped, Event, Logprob, Overloaded, Request
from .responses import APIError, chat_logprobs, completion_logprobs, sse, usage


class Job:
    """`per_prompt` sequences for each prompt; the answer keeps the `n` with the highest cumulative
    log-probability of each prompt (all of them unless best_of > n), choice i * n + j being the
    j-th of prompt i. `echo`: the prompts' texts, put before the choices' texts (completions);
    `generated` False: the choices hold the echoed prompt alone (echo with max_tokens 0)."""

    def __init__(self, engine: Engine, metrics: Metrics, token_text: Callable[[int], str], *, chat: bool, model_name: str,
                 n: int, per_prompt: int, report_logprobs: bool, echo: list[str] | None = None, generated: bool = True,
                 return_token_ids: bool = False, include_usage: bool = False, user: str | None = None):
        self.engine, self.metrics, self.text = engine, metrics, token_text
        self.chat, self.n, self.per_prompt, self.echo, self.generated = chat, n, per_prompt, echo, generated
        self.report, self.return_token_ids, self.include_usage, self.user = report_logprobs, return_token_ids, include_usage, user
        self.rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.head = {"id": self.rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                     "model": model_name}
        self.requests: list[Request] = []
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.finished, self.status = 0, 200
        self.offsets: dict[int, int] = {}  # a streamed choice's text_offset so far

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """Queues every sequence, or none (an APIError: 400 bad input, 503 overloaded or shutting down)."""
        try:
            for ids in prompts:
                for p in params:
                    self.requests.append(self.engine.submit(ids, p, functools.partial(self._put, len(self.requests))))
        except (ValueError, Overloaded, EngineStopped) as e:
            for r in self.requests:
                self.engine.cancel(r)
            if isinstance(e, Overloaded):
                raise APIError(503, str(e), "server_error", code="overloaded") from None
            if isinstance(e, EngineStopped):
                raise APIError(503, str(e), "server_error", code="shutting_down") from None
            raise APIError(400, str(e), param=getattr(e, "name", "prompt")) from None

    def _put(self, index: int, event: Event) -> None:  # on the engine's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

    async def next_event(self) -> tuple[int, Event]:
        index, event = await self.events.get()
        self.finished += event.finish_reason is not None
        return index, event

    @property
    def done(self) -> bool:
        return self.finished == len(self.requests)

    async def wait(self, http_request) -> bool:
        """Until every sequence has ended; False when the client went away first (checked every second)."""
        getter, checked = None, time.monotonic()
        while not self.done:
            getter = getter or asyncio.ensure_future(self.next_event())
            done, _ = await asyncio.wait({getter}, timeout=1.0)
            if done:
                getter = None
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if await http_request.is_disconnected():
                    if getter is not None:
                        getter.cancel()
                    self.status = 499
                    return False
        return True

    def response(self) -> dict:
        """The JSON answer once every sequence has ended (an APIError 500 if one failed)."""
        failed = next((r for r in self.requests if r.finish_reason == "error"), None)
        if failed is not None:
            self.status = 500
            raise APIError(500, f"generation failed: {failed.error}", "server_error", code="generation_failed")
        choices = []
        for start in range(0, len(self.requests), self.per_prompt):
            group = self.requests[start:start + self.per_prompt]
            if self.per_prompt > self.n:
                group = sorted(group, key=lambda r: -r.cumulative_logprob)[:self.n]
            for r in group:
                choices.append(self.choice(len(choices), r, start // self.per_prompt))
        return {**self.head, "choices": choices, "usage": self.usage()}

    def usage(self) -> dict:
        return usage(self.requests, self.per_prompt, self.generated)

    def output(self, r: Request) -> tuple[list[int], list[Logprob], str]:
        """What the answer shows of a sequence's output: its ids, log-probabilities and text."""
        return (r.output_ids, r.logprobs, r.text) if self.generated else ([], [], "")

    def choice(self, index: int, r: Request, prompt: int) -> dict:
        if self.chat:
            c = {"index": index, "message": {"role": "assistant", "content": r.text},
                 "logprobs": chat_logprobs(r.output_ids, r.logprobs, self.text) if self.report else None}
        else:
            ids, entries, text = self.output(r)
            if self.echo is not None:
                ids, entries, text = r.prompt + ids, r.prompt_logprobs + entries, self.echo[prompt] + text
            c = {"index": index, "text": text, "logprobs": completion_logprobs(ids, entries, self.text) if self.report else None}
        c["finish_reason"] = r.finish_reason
        if self.return_token_ids:
            c["token_ids"] = self.output(r)[0]
        return c

    async def stream(self):
        """Server-sent events: per choice (its index) the role (chat) or the echoed prompt, the text as
        it comes, a last chunk with its finish reason; the usage if asked; then [DONE]. An error
        ends the stream with an error event and [DONE]."""
        try:
            if self.chat:
                for index in range(len(self.requests)):
                    yield self.chunk(index, "", [], [], role=True)
            started: set[int] = set()
            while not self.done:
                index, event = await self.next_event()
                if event.finish_reason == "error":
                    self.status = 500
                    yield sse(APIError(500, f"generation failed: {event.error}", "server_error", code="generation_failed").body())
                    break
                if self.echo is not None and index not in started:
                    started.add(index)
                    r = self.requests[index]
                    yield self.chunk(index, self.echo[index // self.per_prompt], r.prompt, r.prompt_logprobs, echoed=True)
                if self.generated and (event.token_ids or event.text):
                    yield self.chunk(index, event.text, event.token_ids, event.logprobs)
                if event.finish_reason is not None:
                    yield self.chunk(index, None, [], [], event.finish_reason)
            else:
                if self.include_usage:
                    yield sse(self.head | {"object": self.chunk_object, "choices": [], "usage": self.usage()})
            yield sse("[DONE]")
        finally:  # also when the client went away (the response was cancelled): free the slots now
            self.close()

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, index: int, text: str | None, token_ids: list[int], logprobs: list[Logprob | None],
              finish_reason: str | None = None, role: bool = False, echoed: bool = False) -> str:
        """One choice's server-sent event; `echoed`: the prompt's (its ids are not generated ones,
        so not among the chunk's token_ids, as in the answer that is not streamed)."""
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
            lp = chat_logprobs(token_ids, logprobs, self.text) if self.report and logprobs else None
            c = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            lp = None
            if self.report and logprobs:
                lp = completion_logprobs(token_ids, logprobs, self.text, self.offsets.get(index, 0))
                self.offsets[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            c = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        if self.return_token_ids:
            c["token_ids"] = [] if echoed else token_ids
        return sse(self.head | {"object": self.chunk_object, "choices": [c]})

    def close(self) -> None:
        """Cancels what still runs; measures and logs what ended."""
        for r in self.requests:
            if r.finish_reason is None:
                self.engine.cancel(r)
            else:
                self.metrics.observe(r)
        endpoint = "/v1/chat/completions" if self.chat else "/v1/completions"
        log_request(self.rid, endpoint, self.status, self.requests, self.usage(), self.user)
