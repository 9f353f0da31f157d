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
any work (limits.py); text is tokenized and chat templates rendered off the event loop (handlers.py).
"""

import asyncio
import contextlib

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from .chat import ChatTemplate
from .engine import Engine
from .handlers import Handlers
from .limits import BodyLimit, Limits
from .metrics import Metrics, access_log
from .protocol import ChatBody, CompletionBody
from .responses import APIError


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
    limits = limits or Limits(max_prompt_chars=default_prompt_chars(engine))
    metrics = Metrics(engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop, 0)  # uvicorn has let the running requests finish (or cut them)

    app = FastAPI(title="xlstm7b", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.shutting_down, app.state.jobs = False, set()
    add_error_handlers(app)
    handlers = Handlers(engine, model_name=model_name, chat_template=chat_template or ChatTemplate(), limits=limits,
                        metrics=metrics, state=app.state)

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
        handlers.check_model(model_id)
        return card

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionBody, request: Request):
        return await handlers.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatBody, request: Request):
        return await handlers.chat_completions(body, request)

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's shape and written to the access log."""

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
