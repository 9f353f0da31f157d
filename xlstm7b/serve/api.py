"""The OpenAI-compatible HTTP API in front of an `Engine` (FastAPI):

    POST /v1/completions        prompt text or token ids -> text (streamed as server-sent events or not)
    POST /v1/chat/completions   messages -> the assistant's reply, through the chat template (chat.py)
    GET  /v1/models             the one model served
    GET  /health                200 while serving, 503 while shutting down
    GET  /metrics               Prometheus text format: queue, slots, tokens/s, time to first token, prefix cache

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request,
401 for a missing or wrong API key, 404 for an unknown model or route, 503 when the queue is full or
the server is shutting down, 500 when the engine fails. Beyond OpenAI's fields (as vLLM does):
`top_k`, `ignore_eos`, `stop_token_ids`, and `return_token_ids` (the generated ids in each choice).
"""

import asyncio
import contextlib
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .chat import ChatTemplate
from .engine import Engine, EngineStopped, Event, Overloaded, SamplingParams

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored (clients send many); known ones
    are type-checked strictly, and the OpenAI features this server does not have are refused."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    """None: OpenAI's default, 1."""
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] = []
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    presence_penalty: StrictFloat = 0.0
    frequency_penalty: StrictFloat = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    return_token_ids: StrictBool = False

    def unsupported(self) -> str | None:
        if self.n != 1:
            return "n"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                return name
        for name in ("logit_bias", "logprobs"):
            if getattr(self, name) not in (None, False, {}):
                return name
        return None


class CompletionBody(SamplingFields):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


class EngineCollector:
    """The engine's counters and gauges, read at every scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        cache = s["prefix_cache"]
        gauges = {
            "queue_length": ("requests waiting for a state slot", s["waiting"]),
            "active_slots": ("state slots in use (prefilling or decoding)", s["prefilling"] + s["decoding"]),
            "prefilling_slots": ("requests being prefilled", s["prefilling"]),
            "decoding_slots": ("requests being decoded", s["decoding"]),
            "slots": ("state slots in the pool", s["slots"]),
            "slot_bytes": ("bytes of one state slot", s["slot_bytes"]),
            "generation_tokens_per_second": ("generated tokens per second over the last 10 s", s["tokens_per_s"]),
            "prefix_cache_bytes": ("bytes of prefix states cached", cache["bytes"]),
            "prefix_cache_entries": ("prefix states cached", cache["entries"]),
            "prefix_cache_hit_rate": ("prefix cache hits per lookup", cache["hit_rate"]),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"xlstm7b_{name}", doc, value=value)
        counters = {
            "requests": ("requests accepted", s["requests"]),
            "prompt_tokens": ("prompt tokens accepted", s["prompt_tokens"]),
            "prefill_tokens": ("prompt tokens prefilled (those not served by the prefix cache)", s["prefilled_tokens"]),
            "generation_tokens": ("tokens generated", s["generated_tokens"]),
            "prefix_cache_lookups": ("prefix cache lookups (one per admitted request)", cache["lookups"]),
            "prefix_cache_hits": ("prefix cache hits", cache["hits"]),
            "prefix_cache_saved_tokens": ("prompt tokens not prefilled thanks to the prefix cache", cache["saved_tokens"]),
            "prefix_cache_evictions": ("prefix states evicted", cache["evictions"]),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"xlstm7b_{name}", doc, value=value)
        finished = CounterMetricFamily("xlstm7b_requests_finished", "requests finished, by finish reason", labels=["reason"])
        for reason, value in s["finished"].items():
            finished.add_metric([reason], value)
        yield finished


def build_app(engine: Engine, *, model_name: str, chat_template: ChatTemplate | None = None, api_key: str | None = None) -> FastAPI:
    """The API over a started `engine` (which needs a tokenizer for text prompts and chat); the
    engine is stopped when the app shuts down."""
    tokenizer, config = engine.tokenizer, engine.model.config
    chat_template = chat_template or ChatTemplate()
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    ttft = Histogram("xlstm7b_time_to_first_token_seconds", "seconds from request to first token",
                     buckets=LATENCY_BUCKETS, registry=registry)
    latency = Histogram("xlstm7b_request_seconds", "seconds from request to its last token", buckets=LATENCY_BUCKETS, registry=registry)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has let the running requests finish (or cut them at its graceful timeout)
        await asyncio.to_thread(engine.stop, 0)

    app = FastAPI(title="xlstm7b", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.shutting_down = False

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}").response()
        param = ".".join(str(p) for p in error["loc"][1:]) or None
        return APIError(400, f"{param or 'body'}: {error['msg']}", param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error").response()

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if app.state.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "xlstm7b"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionBody, request: Request):
        check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (this server does not batch prompts in one request)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode(prompt)
        else:
            ids = prompt
        params = sampling_params(body, body.max_tokens if body.max_tokens is not None else 16, ())
        return await respond(request, body, ids, params, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatBody, request: Request):
        check(body)
        text = chat_template.render([{"role": m.role, "content": m.text()} for m in body.messages])
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(body, engine.config.max_new_tokens if max_tokens is None else max_tokens, chat_template.stop)
        return await respond(request, body, encode(text), params, chat=True)

    def check(body: SamplingFields) -> None:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}", param="model", code="model_not_found")
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, f"{bad}={getattr(body, bad)!r} is not supported by this server", param=bad)

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send the prompt as token ids", param="prompt")
        if not text:
            raise APIError(400, "the prompt is empty; give at least one character", param="prompt")
        return [config.bos_token_id] + tokenizer.encode(text, add_special_tokens=False).ids

    def sampling_params(body: SamplingFields, max_tokens: int, template_stop: tuple[str, ...]) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=None if body.top_p == 1 else body.top_p,
            top_k=body.top_k, seed=body.seed, stop=tuple(stop) + template_stop, stop_token_ids=tuple(body.stop_token_ids),
            ignore_eos=body.ignore_eos,
        )
        try:
            params.validate(config.vocab_size, engine.config.max_new_tokens, tokenizer is not None)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
        return params

    async def respond(request: Request, body: SamplingFields, ids: list[int], params: SamplingParams, chat: bool):
        if app.state.shutting_down:
            raise APIError(503, "the server is shutting down and accepts no new requests", "server_error", code="shutting_down")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            handle = engine.submit(ids, params, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        except Overloaded as e:
            raise APIError(503, str(e), "server_error", code="overloaded") from None
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model_name}

        first = True

        async def next_event() -> Event:
            nonlocal first
            event = await events.get()
            if first and event.token_ids:
                first = False
                ttft.observe(handle.ttft)
            if event.finish_reason is not None:
                latency.observe(time.perf_counter() - handle.arrival)
            return event

        def usage() -> dict:
            n = len(handle.output_ids)
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n,
                    "prompt_tokens_details": {"cached_tokens": handle.cached_tokens}}

        if body.stream:
            return StreamingResponse(stream(head, next_event, handle, usage, body, chat), media_type="text/event-stream")
        getter, checked = None, time.monotonic()
        try:
            while True:  # up to the final event, checking every second that the client is still there
                getter = getter or asyncio.ensure_future(next_event())
                done, _ = await asyncio.wait({getter}, timeout=1.0)
                if done:
                    if getter.result().finish_reason is not None:
                        break
                    getter = None
                if time.monotonic() - checked >= 1.0:
                    checked = time.monotonic()
                    if await request.is_disconnected():  # nobody waits for the answer: free the slot
                        if getter is not None:
                            getter.cancel()
                        engine.cancel(handle)
                        return Response(status_code=499)
        finally:
            if handle.finish_reason is None:
                engine.cancel(handle)
        if handle.finish_reason == "error":
            raise APIError(500, f"generation failed: {handle.error}", "server_error")
        choice = {"index": 0, "finish_reason": handle.finish_reason, "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": handle.text}} if chat else {"text": handle.text}
        if body.return_token_ids:
            choice["token_ids"] = handle.output_ids
        return {**head, "choices": [choice], "usage": usage()}

    async def stream(head, next_event, handle, usage, body: SamplingFields, chat: bool):
        head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, token_ids: list[int], finish_reason: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            if body.return_token_ids:
                choice["token_ids"] = token_ids
            return sse(head | {"choices": [choice]})

        try:
            if chat:
                yield chunk("", [], None, role=True)
            while True:
                event = await next_event()
                if event.finish_reason == "error":
                    yield sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error", "param": None, "code": None}})
                    break
                if event.token_ids or event.text:
                    yield chunk(event.text, event.token_ids, None)
                if event.finish_reason is not None:
                    yield chunk(None if chat else "", [], event.finish_reason)
                    break
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse(head | {"choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the response was cancelled): free the slot now
            if handle.finish_reason is None:
                engine.cancel(handle)

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
