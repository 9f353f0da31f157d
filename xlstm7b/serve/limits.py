"""The server's limits on a request, checked before any work is done on it: the body's size (as it
arrives), the number of prompts and choices, and the prompt's length in characters (before it is
tokenized). Each refusal names the limit and the `xlstm7b serve` flag that sets it."""

import json
from dataclasses import dataclass

from starlette.exceptions import HTTPException


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 << 20
    """Largest request body (--max-body-mb)."""
    max_prompt_chars: int = 1 << 20
    """Longest prompt text, in characters, checked before tokenizing (--max-prompt-chars); the API
    defaults it to max_prompt_tokens times the longest token's text, which no prompt that fits in
    max_prompt_tokens exceeds."""
    max_n: int = 16
    """Largest n and best_of (--max-n)."""
    max_prompts: int = 64
    """Most prompts in one completions request (--max-prompts)."""


class LimitExceeded(ValueError):
    """A request over one of the limits: the message names it and its flag; status 400 or 413."""

    def __init__(self, message: str, param: str | None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def check_text(text: str, param: str, limits: Limits) -> None:
    """A LimitExceeded when `text` is longer than --max-prompt-chars or is not valid Unicode (a lone
    surrogate, which JSON's \\ud800 escapes can carry and no tokenizer can encode)."""
    if len(text) > limits.max_prompt_chars:
        raise LimitExceeded(f"{param} has {len(text):,} characters, more than this server's limit of "
                            f"{limits.max_prompt_chars:,} (--max-prompt-chars)", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LimitExceeded(f"{param} holds a lone surrogate ({text[e.start]!r} at character {e.start}), which is not "
                            "valid Unicode; send whole characters (a surrogate pair in JSON's \\u escapes)", param) from None


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 before it is read (by its
    Content-Length) or as soon as the bytes received pass the limit (a chunked body)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self) -> str:
        return (f"the request body is larger than this server's limit of {self.max_bytes:,} bytes "
                f"(--max-body-mb {self.max_bytes / 2**20:g})")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self.refuse(send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI passes HTTPException on to the app's handler
                    raise HTTPException(413, self.message())
            return message

        await self.app(scope, limited, send)

    async def refuse(self, send) -> None:
        body = json.dumps({"error": {"message": self.message(), "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
