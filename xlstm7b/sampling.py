"""Sampling a token from logits: greedy, temperature, top-k and top-p (nucleus), without host sync."""

import torch


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax when temperature is 0, else a sample after
    temperature scaling and top-k / top-p filtering."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_from(sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p), generator)


def sampling_probs(logits: torch.Tensor, *, temperature: float, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [..., V] -> the float32 probabilities [..., V] that `sample` draws from (temperature > 0):
    softmax(logits / temperature) after top-k / top-p filtering, filtered tokens at exactly 0."""
    logits = logits.float()
    # Shifted so that the largest logit is 0 before scaling: a tiny temperature then sends the others
    # to -inf (greedy in the limit) rather than every logit to +-inf (NaN probabilities); below
    # float32's smallest normal number, every temperature gives that limit.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
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
