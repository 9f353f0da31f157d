"""The OpenAI-compatible HTTP API in front of an `Engine` (FastAPI):

    POST /v1/completions        prompt text or token ids (or a list of them) -> text (streamed as server-sent events or not)
    POST /v1/chat/completions   messages -> the assistant's reply, through the chat template (chat.py)
    GET  /v1/models, /v1/models/{id}   the one model served
    GET  /health                200 while serving; 503 while shutting down or once the weights are found non-finite
    GET  /metrics               Prometheus text format (metrics.py)

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request
(an unknown field included: nothing is silently ignored), 401 for a missing or wrong API key, 404
for an unknown model or route, 413 for a body over --max-body-mb, 503 when the queue is full or the
server is shutting down, 500 when generation fails (non-finite logits). Limits are checked before
any work (limits.py); text is tokenized and chat templates rendered off the event loop.
"""

import asyncio
import contextlib
import functools
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..sampling import SamplingParams, sequence_seed
from .chat import ChatTemplate
from .engine import Engine
from .jobs import Job
from .limits import BodyLimit, LimitExceeded, Limits, check_text
from .metrics import Metrics, access_log
from .protocol import ChatBody, CompletionBody, FieldError, SamplingFields
from .request import check_prompt
from .responses import APIError

log = logging.getLogger(__name__)


def default_prompt_chars(engine: Engine) -> int:
    """max_prompt_tokens times the longest token's text: no prompt within max_prompt_tokens is longer."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        return engine.config.max_prompt_tokens
    texts = tokenizer.decode_batch([[i] for i in range(tokenizer.get_vocab_size())])
    return engine.config.max_prompt_tokens * max(1, max(map(len, texts)))


def build_app(engine: Engine, *, model_name: str, chat_template: ChatTemplate | None = None, api_key: str | None = None,
              limits: Limits | None = None) -> FastAPI:
    """The API over a started `engine` (which needs a tokenizer for text prompts and chat); the
    engine is stopped when the app shuts down. `app.state.shutting_down = True` refuses new
    requests (503); `app.state.jobs` holds the requests being answered."""
    tokenizer, config = engine.tokenizer, engine.model.config
    chat_template = chat_template or ChatTemplate()
    limits = limits or Limits(max_prompt_chars=default_prompt_chars(engine))
    metrics = Metrics(engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop, 0)  # uvicorn has let the running requests finish (or cut them)

    app = FastAPI(title="xlstm7b", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.shutting_down, app.state.jobs = False, set()

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        access_log.info("- %s status=%d error=%r", request.url.path, exc.status, exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            return await api_error(request, APIError(400, f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}"))
        param = ".".join(str(p) for p in error["loc"][1:]) or None
        if error["type"] == "extra_forbidden":
            return await api_error(request, APIError(400, f"{param}: unknown field; this server refuses the fields it does not "
                                                          "implement (the README's Serving section lists those it does)", param=param))
        return await api_error(request, APIError(400, f"{param or 'body'}: {error['msg']}", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return await api_error(request, APIError(exc.status_code, str(exc.detail), kind))

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if app.state.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        h = engine.health()
        if not h["healthy"]:
            return JSONResponse({"status": "unhealthy", "error": h["error"], "nonfinite_logits": h["nonfinite_logits"]}, status_code=503)
        return {"status": "ok"} | ({"nonfinite_logits": h["nonfinite_logits"], "error": h["error"]} if h["nonfinite_logits"] else {})

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "xlstm7b", "max_model_len": engine.config.max_prompt_tokens}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        check_model(model_id)
        return card

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionBody, request: Request):
        check(body)
        prompts = body.prompts()
        if len(prompts) > limits.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts, more than this server's limit of {limits.max_prompts} per request "
                                "(--max-prompts)", param="prompt")
        for p in prompts:
            if isinstance(p, str):
                refuse(check_text, p, "prompt", limits)
            else:
                try:
                    check_prompt(p, engine.config.max_prompt_tokens, config.vocab_size)
                except ValueError as e:
                    raise APIError(400, str(e), param="prompt") from None
        per_prompt, k = body.best_of or body.n, body.logprobs
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        # echo with max_tokens 0 scores the prompt alone (OpenAI's and vLLM's way): one token is
        # generated, as vLLM does, and left out of the answer
        echo_only = body.echo and max_tokens == 0
        # best_of ranks the sequences by their log-probabilities, so they are computed even if not reported
        params = sequences(body, per_prompt, 1 if echo_only else max_tokens,
                           logprobs=k if k is not None else 0 if per_prompt > body.n else None,
                           prompt_logprobs=k if body.echo else None)
        ids = [await asyncio.to_thread(encode, p) if isinstance(p, str) else p for p in prompts]
        echo = [p if isinstance(p, str) else await asyncio.to_thread(decode, p) for p in prompts] if body.echo else None
        job = make_job(body, chat=False, per_prompt=per_prompt, report_logprobs=k is not None, echo=echo,
                       generated=not echo_only)
        return await answer(job, request, body, ids, params)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatBody, request: Request):
        check(body)
        messages = body.texts()
        for i, m in enumerate(messages):
            refuse(check_text, m["content"], f"messages.{i}.content", limits)
        if sum(len(m["content"]) for m in messages) > limits.max_prompt_chars:
            raise APIError(400, f"the messages are longer than this server's limit of {limits.max_prompt_chars:,} characters "
                                "(--max-prompt-chars)", param="messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = sequences(body, body.n, engine.config.max_new_tokens if max_tokens is None else max_tokens,
                           chat_template.stop, logprobs=k)
        try:
            text = await asyncio.to_thread(chat_template.render, messages, body.add_generation_prompt, body.continue_final_message)
        except ValueError as e:
            raise APIError(400, str(e), param="continue_final_message") from None
        refuse(check_text, text, "the templated chat", limits)
        ids = await asyncio.to_thread(encode, text)
        job = make_job(body, chat=True, per_prompt=body.n, report_logprobs=body.logprobs)
        return await answer(job, request, body, [ids], params)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", param="model",
                           code="model_not_found")

    def check(body: SamplingFields) -> None:
        check_model(body.model)
        refuse(body.check)
        for name in ("n", "best_of"):
            value = getattr(body, name, None)
            if value is not None and not 1 <= value <= limits.max_n:
                raise APIError(400, f"{name} must be in [1, {limits.max_n}] (this server's --max-n), got {value}", param=name)
        for s in (body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []):
            refuse(check_text, s, "stop", limits)

    def refuse(fn, *args, **kwargs):
        """fn(*args, **kwargs), its FieldError or LimitExceeded turned into the APIError naming the field or limit."""
        try:
            return fn(*args, **kwargs)
        except FieldError as e:
            raise APIError(400, str(e), param=e.param) from None
        except LimitExceeded as e:
            raise APIError(e.status, str(e), param=e.param) from None

    def sequences(body: SamplingFields, count: int, max_tokens: int, extra_stop: tuple[str, ...] = (), **kw) -> list[SamplingParams]:
        """The engine's parameters for `count` sequences of a prompt, sequence j seeded with seed + j
        (so choice j is what a single request with seed + j gives), checked before any work."""
        params = [refuse(body.sampling, max_tokens, extra_stop, seed=sequence_seed(body.first_seed, j), **kw) for j in range(count)]
        try:
            engine.check_params(params[0])
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "name", None)) from None
        return params

    def encode(text: str) -> list[int]:  # in a worker thread
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send the prompt as token ids", param="prompt")
        if not text:
            raise APIError(400, "the prompt is empty; give at least one character", param="prompt")
        return [config.bos_token_id] + tokenizer.encode(text, add_special_tokens=False).ids

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else ""

    @functools.lru_cache(maxsize=1 << 16)
    def token_text(token: int) -> str:
        return tokenizer.decode([token]) if tokenizer is not None else f"token_id:{token}"

    def make_job(body: SamplingFields, **kw) -> Job:
        return Job(engine, metrics, token_text, model_name=model_name, n=body.n, return_token_ids=body.return_token_ids,
                   include_usage=body.stream_options is not None and body.stream_options.include_usage, user=body.user, **kw)

    async def answer(job: Job, request: Request, body: SamplingFields, prompts: list[list[int]], params: list[SamplingParams]):
        if app.state.shutting_down:
            raise APIError(503, "the server is shutting down and accepts no new requests", "server_error", code="shutting_down")
        job.submit(prompts, params)
        if body.stream:
            async def events():
                app.state.jobs.add(job)  # once it runs (a client gone before never starts it)
                try:
                    async for event in job.stream():
                        yield event
                finally:
                    app.state.jobs.discard(job)
            return StreamingResponse(events(), media_type="text/event-stream")
        app.state.jobs.add(job)
        try:
            if not await job.wait(request):
                return Response(status_code=499)  # nobody waits for the answer
            return job.response()
        finally:
            job.close()
            app.state.jobs.discard(job)

    return app
