"""The JSON the API answers with: choices, log-probabilities in OpenAI's two formats (the legacy
completions one and chat's), usage, server-sent events."""

import json
from collections.abc import Callable

from fastapi.responses import JSONResponse

from .request import Logprob, Request


class APIError(Exception):
    """An error answer in OpenAI's shape, {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def completion_logprobs(token_ids: list[int], entries: list[Logprob | None], text: Callable[[int], str],
                        offset: int = 0) -> dict:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs and text_offset (from
    `offset`); an entry None (the first prompt token) gives nulls. As in vLLM, a position's
    top_logprobs holds its chosen token beside the most likely ones (keyed by their text, as in
    OpenAI's format, so tokens of the same text share one key)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(token_ids, entries):
        s = text(token)
        out["tokens"].append(s)
        out["text_offset"].append(offset)
        offset += len(s)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry.logprob)
        top: dict[str, float] = {}
        for t, lp in [*entry.top, (token, entry.logprob)]:  # tokens of the same text keep the likeliest
            top.setdefault(text(t), lp)
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(token_ids: list[int], entries: list[Logprob], text: Callable[[int], str]) -> dict:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token: int, logprob: float) -> dict:
        s = text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {"content": [item(t, e.logprob) | {"top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for t, e in zip(token_ids, entries)]}


def usage(requests: list[Request], per_prompt: int, generated: bool = True) -> dict:
    """Token counts of an HTTP request whose engine requests are `per_prompt` sequences of each
    prompt in turn: every prompt once, every sequence generated (best_of's too; none when the
    answer leaves out what was `generated`, the echo of a prompt alone)."""
    firsts = requests[::per_prompt]
    prompt, cached = sum(len(r.prompt) for r in firsts), sum(r.cached_tokens for r in firsts)
    n = sum(len(r.output_ids) for r in requests) if generated else 0
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
