"""Speculative decoding for recurrent models: a small draft xLSTM proposes K tokens with its step
kernel, the target verifies them in one chunkwise pass, and both states roll back to the accepted
prefix. Entered through `generate(model, ..., draft=draft_model, speculate_k=K)`.

One block, per row, with `last` the newest committed token (not yet in either state):
1. Draft: K single-token steps from its state over [last, d1, .., d_{K-1}] propose d1..dK,
   dj ~ q_{j-1} (greedy: the argmax).
2. Target: one chunkwise pass over the K+1 positions [last, d1..dK] from its state gives p_0..p_K,
   p_j predicting the token after position j.
3. Acceptance (Leviathan et al. 2023, Chen et al. 2023): accept dj with probability
   min(1, p_{j-1}(dj) / q_{j-1}(dj)), stop at the first rejection; at a rejection after a accepted
   tokens, draw the correction from norm(max(0, p_a - q_a)); when all K are accepted, draw a bonus
   token from p_K. Every block commits a + 1 tokens and the text has exactly the target's
   distribution (same temperature / top-k / top-p transform on p and q). Greedy: accept dj iff it
   is the target's argmax; the output is that of plain greedy decoding.

Rollback (constant memory: two states per model plus one block of cell inputs, whatever the number
of generated tokens; per-token states are never kept). Before a block each model's state is copied
into a spare buffer (one state-sized copy each). After acceptance, row b keeps the first
n_b = a_b + 1 positions of [last, d1..dK] (fewer at EOS or at max_new_tokens); the token after them
becomes the new `last`:
- Target: when every running row keeps all K+1 positions, the verification pass's state is the new
  state (no extra work). Otherwise the saved pre-block state is re-advanced over the kept positions
  with the mLSTM cells alone: the verification pass records each layer's cell inputs (k, v, i, f,
  which keep their fused projection output alive: ~24 KiB per position and layer at the 7B shape in
  bf16, 6 MiB per row at K = 7 against 128 MiB of state), and positions >= n_b are masked as
  padding (spec §2: i = -inf writes nothing, lf = 0 forgets nothing), so each row advances over
  exactly its accepted prefix. Cost: the closed-form chunk-state update over K+1 positions per
  layer (no projections, feed-forward, output head or cell outputs h): about the state traffic of
  one decoding step's cell update, plus the state copy.
- Draft: its K steps already covered [last, d1..d_{K-1}]; rows that keep K+1 positions get one more
  (masked) step over dK. Rows that keep fewer are re-advanced from the saved state the same way,
  with the cells alone over the inputs its steps recorded. Under a CUDA graph or a compiled step (no
  Python runs in them, so nothing records) that is one masked chunkwise pass of the draft over the
  K+1 ids.
The alternative, snapshots of per-step states, costs K+1 state copies per block and K+1 state-sized
buffers (for the 7B, 128 MiB per row each: 1 GiB per row at K = 7).

Finished rows (EOS, max_new_tokens) are masked in every pass, so ragged batches advance each row by
its own accepted count. At the end the pending `last` token of every row is fed with one step, so
the returned states cover the prompt and every generated token, as with plain decoding.
"""

import torch

from .generate import _prefill, _step_runner, decode_step, sample_from, sampling_probs
from .kernels import mlstm_advance
from .model import XLSTM
from .state import State


def speculative_decode(
    model: XLSTM,
    draft: XLSTM,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    state: State,
    draft_state: State,
    *,
    max_new_tokens: int,
    speculate_k: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    generator: torch.Generator | None,
    stream,
    prefill_chunk_size: int,
    use_graph: bool,
    compile: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The speculative decoding loop of `generate`: prompts ids [B, S] (left-padded, `mask`) ->
    (tokens [B, max_new_tokens], lengths [B], stats). `state` and `draft_state` (contiguous float32,
    owned by the caller) are updated in place to cover the prompt and every generated token.
    `stream(tokens [B]) -> bool` receives the committed tokens position by position (True stops)."""
    B, device, K = ids.shape[0], ids.device, speculate_k
    pad = model.config.pad_token_id
    greedy = temperature == 0

    def probs(logits):
        return sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)

    # Prefill all but the last prompt token (every row's last token sits at S - 1): it is the first
    # `last`, fed by the first block.
    if ids.shape[1] > 1:
        head = None if mask is None else mask[:, :-1]
        _prefill(model, ids[:, :-1], head, state, prefill_chunk_size)
        _prefill(draft, ids[:, :-1], head, draft_state, prefill_chunk_size)
    last = ids[:, -1].clone()
    saved, draft_saved = state.clone(), draft_state.clone()  # the spare buffers for rollback
    cells = _CellInputs(model)
    fast = max_new_tokens > 0 and (use_graph or compile)
    draft_step = _step_runner(draft, draft_state, use_graph=use_graph, compile=compile) if fast else None
    # A captured or compiled step runs no Python, so nothing can record the draft's cell inputs there.
    draft_cells = _CellInputs(draft) if draft_step is None else None

    # Room for one whole block past max_new_tokens, so writes never collide; cut at the end.
    tokens = torch.full((B, max_new_tokens + K + 1), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stats = {"blocks": 0, "drafted": 0, "accepted": 0, "rejected": 0}
    stopped = False
    while not stopped:
        running = ~finished & (lengths < max_new_tokens)
        budget = int(torch.where(running, max_new_tokens - lengths, 0).max())  # host syncs: a few per block
        if budget == 0:
            break
        k = min(K, budget - 1)  # drafting beyond the last token that can be kept is wasted work
        # Finished rows are masked; a captured step always takes the mask (its buffer persists).
        active = running if draft_step is not None or not bool(running.all()) else None

        # 1. Draft: k steps from its state over [last, d1 .. d_{k-1}] propose d1 .. dk.
        draft_saved.copy_(draft_state)
        if draft_cells is not None:
            draft_cells.clear()
        drafted, q = [], []
        token = last
        for _ in range(k):
            if draft_step is not None:
                logits = draft_step(token, active)
            else:
                with draft_cells:
                    logits = decode_step(draft, token, draft_state, active)
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                q.append(probs(logits))
                token = sample_from(q[-1], generator)
            drafted.append(token)
        x = torch.stack([last, *drafted], dim=1)  # [B, k + 1]

        # 2. Target: one chunkwise pass over the k + 1 positions (step kernel when k = 0).
        saved.copy_(state)
        rows = None if active is None else active[:, None].expand(B, k + 1)
        cells.clear()
        with cells:  # records each layer's cell inputs for the rollback
            logits, _ = model.run(x, state, mask=rows, inplace=True)  # [B, k + 1, V]

        # 3. Acceptance: a accepted draft tokens per row, then the correction / bonus token.
        if greedy:
            accepted, nxt = _accept_greedy(logits, x[:, 1:])
        else:
            accepted, nxt = _accept(probs(logits), torch.stack(q, dim=1) if q else None, x[:, 1:], generator)
        # The committed tokens of the block: d1 .. da, then the correction / bonus token.
        new = torch.cat([x[:, 1:], torch.full_like(last[:, None], pad)], dim=1).scatter(1, accepted[:, None], nxt[:, None])
        pos = torch.arange(k + 1, device=device)
        keep = torch.minimum(accepted + 1, max_new_tokens - lengths)
        if eos_token_id is not None:
            is_eos = (new == eos_token_id) & (pos < keep[:, None])
            first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, keep)
            keep = torch.minimum(keep, first)
            finished |= is_eos.any(dim=1)
        keep = torch.where(running, keep, 0)
        stats["blocks"] += 1
        stats["drafted"] += k * int(running.sum())
        stats["accepted"] += int(torch.where(running, accepted, 0).sum())
        stats["rejected"] += int((running & (accepted < k)).sum())

        # Stream the committed tokens position by position; a stop request cuts the block there.
        if stream is not None:
            for j in range(int(keep.max())):
                if stream(torch.where(pos[j] < keep, new[:, j], pad)):
                    keep = keep.clamp(max=j + 1)
                    stopped = True
                    break
        tokens.scatter_(1, lengths[:, None] + pos, torch.where(pos < keep[:, None], new, pad))
        lengths += keep
        # The newest committed token is the next `last`; rows that committed nothing keep theirs.
        last = torch.where(keep > 0, new.gather(1, (keep - 1).clamp(min=0)[:, None])[:, 0], last)

        # 4. Rollback: each model's state must cover its row's first `keep` positions of x.
        if not bool(((keep == k + 1) | ~running).all()):
            cells.readvance(saved, state, keep)
        _rollback_draft(draft, draft_state, draft_saved, draft_cells, draft_step, x, keep, running)

    # Feed every row's pending last token, so the states cover everything that was generated.
    decode_step(model, last, state)
    decode_step(draft, last, draft_state)
    stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
    # The probability that a draft token is accepted given that the ones before it were (the alpha of
    # the speculative decoding papers); accepted / drafted falls with K even at a fixed alpha.
    stats["token_acceptance"] = stats["accepted"] / max(stats["accepted"] + stats["rejected"], 1)
    stats["tokens_per_block"] = int(lengths.sum()) / max(stats["blocks"], 1) / B
    return tokens[:, :max_new_tokens], lengths, stats


def _accept_greedy(logits: torch.Tensor, drafted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: logits [B, k+1, V], drafted [B, k] -> (accepted count [B], next token [B])."""
    best = logits.argmax(dim=-1)  # [B, k + 1]
    accepted = (drafted == best[:, :-1]).long().cumprod(dim=1).sum(dim=1)
    return accepted, best.gather(1, accepted[:, None])[:, 0]


def _accept(p: torch.Tensor, q: torch.Tensor | None, drafted: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling: target probs p [B, k+1, V], draft probs q [B, k, V] (None when k = 0),
    drafted [B, k] -> (accepted count [B], correction or bonus token [B])."""
    B, k1, V = p.shape
    if k1 > 1:
        p_d = p[:, :-1].gather(2, drafted[..., None])[..., 0]  # [B, k]
        q_d = q.gather(2, drafted[..., None])[..., 0]  # > 0: each draft token was sampled from q
        u = torch.rand(p_d.shape, device=p.device, generator=generator)
        accepted = (u * q_d < p_d).long().cumprod(dim=1).sum(dim=1)
        q = torch.cat([q, q.new_zeros(B, 1, V)], dim=1)  # q_k = 0: the bonus token comes from p_k
    else:
        accepted = torch.zeros(B, dtype=torch.long, device=p.device)
        q = torch.zeros_like(p)
    index = accepted[:, None, None].expand(B, 1, V)
    p_a, q_a = p.gather(1, index)[:, 0], q.gather(1, index)[:, 0]
    residual = (p_a - q_a).clamp(min=0)
    # p == q up to rounding leaves no residual (a rejection there has probability ~0): fall back to p.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_a)
    return accepted, sample_from(residual, generator)


class _CellInputs:
    """Within `with cells:`, records the cell inputs (k, v, i, f) that every mLSTM layer of `model`
    computes, by wrapping each layer's `project`; records of successive passes (e.g. decoding steps)
    accumulate until `clear()`. `readvance` then moves a saved state over the first `keep` recorded
    positions with the mLSTM cells alone: no projections, feed-forward or output head, only
    O(positions * DK * DV) per head and layer."""

    def __init__(self, model: XLSTM):
        self.config = model.config
        self.layers = [block.mlstm_layer for block in model.backbone.blocks]
        self.clear()

    def clear(self) -> None:
        self.inputs: list[list[tuple]] = [[] for _ in self.layers]

    def __enter__(self):
        for n, layer in enumerate(self.layers):
            def project(x, n=n, original=layer.project):
                out = original(x)
                self.inputs[n].append(out[1:3] + out[4:])  # k, v, i, f (q and the output gate are not needed)
                return out
            layer.project = project  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.project

    def readvance(self, saved: State, state: State, keep: torch.Tensor) -> None:
        """state <- saved advanced, per row b, over the first keep[b] recorded positions."""
        NH = self.config.num_heads
        for n, records in enumerate(self.inputs):
            k, v, i, f = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0] for parts in zip(*records))
            B, S, _ = k.shape
            dropped = (torch.arange(S, device=k.device) >= keep[:, None])[:, None]  # [B, 1, S]
            # [B, S, NH*DH] -> [B, NH, S, DH]; dropped positions are padding (spec §2: i = -inf, lf = 0)
            k, v = (t.view(B, S, NH, -1).transpose(1, 2) for t in (k, v))
            i = i.transpose(1, 2).masked_fill(dropped, float("-inf"))
            f = f.transpose(1, 2).masked_fill(dropped, float("inf"))
            mlstm_advance(k, v, i, f, saved[n], out=state[n])


def _rollback_draft(draft, state, saved, cells, step, x, keep, running) -> None:
    """Makes the draft's `state` cover, per row, the first `keep` positions of x = [last, d1..dk] on
    top of `saved`; its k steps covered the first k positions of every running row."""
    k = x.shape[1] - 1
    if bool(((keep >= k) | ~running).all()):
        pass  # the steps advanced exactly the kept positions, up to dk
    elif cells is not None:
        cells.readvance(saved, state, keep.clamp(max=k))
    else:  # no recorded inputs (CUDA graph, compiled step): one masked chunkwise pass of the draft over x
        rows = torch.arange(k + 1, device=x.device) < keep[:, None]
        draft.run(x, saved, mask=rows, inplace=True, last_logits_only=True)
        state.copy_(saved)
        return
    extra = running & (keep > k)  # rows that keep all k+1 positions: one more step adds dk
    if bool(extra.any()):
        if step is not None:
            step(x[:, -1], extra)
        else:
            decode_step(draft, x[:, -1], state, extra)
