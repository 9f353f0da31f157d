"""The engine's per-request sampling and log-probabilities: each request's next token from its
row of logits, with its own parameters and generator, and the raw log-probabilities of generated
and prompt tokens (the API's `logprobs` and `echo`)."""

import torch

from ..sampling import sample, token_logprobs
from .request import Logprob, Request


def logprob_entries(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[Logprob]:
    """logits [B, V] and tokens [B] -> each token's raw log-probability with the k most likely."""
    chosen, top_ids, top_values = token_logprobs(logits, tokens, k)
    return [Logprob(c, list(zip(i, v))) for c, i, v in zip(chosen.tolist(), top_ids.tolist(), top_values.tolist())]


def sample_requests(logits: torch.Tensor, requests: list[Request]) -> list[tuple[int, Logprob | None]]:
    """logits [len(requests), V] -> each request's next token (a [1, V] draw from its generator,
    as generate() draws alone) and its log-probability when the request asks for them."""
    tokens = logits.argmax(dim=-1).tolist()  # plain greedy rows, in one operation
    for b, request in enumerate(requests):
        p = request.params
        if p.greedy and not p.processed:
            continue
        row = logits[b:b + 1] if request.processor is None else request.processor(logits[b:b + 1])
        tokens[b] = int(sample(row, **p.draw_args(), generator=request.generator))
        if request.processor is not None:
            request.processor.update(torch.tensor([tokens[b]], device=logits.device))
    scored = [b for b, r in enumerate(requests) if r.params.logprobs is not None]
    logprobs: list[Logprob | None] = [None] * len(requests)
    if scored:
        k = max(requests[b].params.logprobs for b in scored)
        chosen = logprob_entries(logits[scored], torch.tensor([tokens[b] for b in scored], device=logits.device), k)
        for b, lp in zip(scored, chosen):
            logprobs[b] = Logprob(lp.logprob, lp.top[:requests[b].params.logprobs])
    return list(zip(tokens, logprobs))


def score_prompt(request: Request, logits: torch.Tensor, ids: torch.Tensor) -> None:
    """Appends the log-probabilities of a piece's prompt tokens (ids [n], on the logits' device) to
    request.prompt_logprobs: each predicted by the position before it, the piece's first by the
    previous piece's last position (carried in request.carry), from logits [n, V]."""
    logp = logits.float().log_softmax(dim=-1)
    before = logp[:-1] if request.carry is None else torch.cat([request.carry[None], logp[:-1]])
    targets = ids if request.carry is not None else ids[1:]
    request.carry = logp[-1]
    if len(targets):
        request.prompt_logprobs += logprob_entries(before, targets, request.params.prompt_logprobs)
