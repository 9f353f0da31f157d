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

Rollback (constant memory: one spare state for the draft plus one block of cell inputs per model,
whatever the number of generated tokens; per-token states are never kept). Both models hand out what
their cells saw through `cell_inputs` buffers (k, v, i, f of every layer and position: ~24 KiB per
position and layer at the 7B shape, 6 MiB per row at K = 7 against 128 MiB of state). After
acceptance, row b keeps the first n_b = a_b + 1 positions of [last, d1..dK] (fewer at EOS or at
max_new_tokens); the token after them becomes the new `last`:
- Target: the verification pass leaves the state it started from untouched. When every running row
  keeps all K+1 positions, the pass's final state is the new state; otherwise the old state is
  re-advanced over the kept positions with the mLSTM cells alone (`kernels.mlstm_advance`), positions
  >= n_b masked as padding (spec §2: i = -inf writes nothing, lf = 0 forgets nothing), so each row
  advances over exactly its accepted prefix. Cost: the closed-form chunk-state update over K+1
  positions per layer (no projections, feed-forward, output head or cell outputs h).
- Draft: its K steps (eager, CUDA graph or compiled alike: each fills the runner's buffer) already
  covered [last, d1..d_{K-1}]; rows that keep K+1 positions get one more (masked) step over dK. Rows
  that keep fewer are re-advanced the same way from the state saved before the block.
The alternative, snapshots of per-step states, costs K+1 state copies per block and K+1 state-sized
buffers (for the 7B, 128 MiB per row each: 1 GiB per row at K = 7).

With CUDA graphs (generate's default on CUDA) the draft's step is replayed from its graph (compiled
by default) and the verification pass over K+1 positions from a graph of its own (`VerifyGraph`,
captured once per call at the fixed K; a last block with fewer drafts runs eagerly): at the 7B shape
an eager pass launches hundreds of small kernels, which would cost more than the steps it saves.
The model's forward reads no values back to the host (check_ids=False: the ids are the model's and
the draft's own tokens), so it can be captured.

Finished rows (EOS, max_new_tokens) are masked in every pass, so ragged batches advance each row by
its own accepted count. At the end the pending `last` token of every row is fed with one step, so
the returned states cover the prompt and every generated token, as with plain decoding.
"""

import torch

from .decode import check_finite, prefill, step_runner, token_buffer
from .kernels import mlstm_advance
from .model import XLSTM, split_cell_inputs
from .sampling import sample_from, sampling_probs
from .state import State


def speculative_decode(
    model: XLSTM, draft: XLSTM, ids: torch.Tensor, mask: torch.Tensor | None, state: State, draft_state: State, *,
    max_new_tokens: int, speculate_k: int, temperature: float, top_k: int | None, top_p: float | None,
    eos_token_id: int | None, generator: torch.Generator | None, stream, prefill_chunk_size: int, use_graph: bool,
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
        for m, st in ((model, state), (draft, draft_state)):
            prefill(m, ids[:, :-1], None if mask is None else mask[:, :-1], st, prefill_chunk_size)
    last = ids[:, -1].clone()
    draft_saved = draft_state.clone()  # the spare buffer for the draft's rollback
    cells = model.cell_inputs_buffer(B, K + 1)  # the verification pass's cell inputs
    draft_cells = draft.cell_inputs_buffer(B, K)  # the draft steps' cell inputs, one position per step
    step_cells = draft.cell_inputs_buffer(B)  # what the draft's step runner fills each step
    draft_step = (step_runner(draft, draft_state, cuda_graph=use_graph, compile=compile, cell_inputs=step_cells)
                  if max_new_tokens > 0 else None)
    verify = VerifyGraph(model, state, cells) if use_graph and max_new_tokens > K else None

    # Room for one whole block past max_new_tokens, so writes never collide; cut at the end.
    tokens = token_buffer(B, max_new_tokens + K + 1, pad, device)
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
        # Finished rows are masked. A captured step always takes the mask (its buffer persists), and
        # so does a compiled one (a mask appearing mid-generation would compile the step again).
        active = running if use_graph or compile or not bool(running.all()) else None

        # 1. Draft: k steps from its state over [last, d1 .. d_{k-1}] propose d1 .. dk.
        draft_saved.copy_(draft_state)
        drafted, q, draft_nonfinite = _draft(draft_step, last, k, active, draft_cells, step_cells,
                                             None if greedy else probs, generator)
        x = torch.stack([last, *drafted], dim=1)  # [B, k + 1]

        # 2. Target: one chunkwise pass over the k + 1 positions; `state` stays the pre-block state.
        rows = None if active is None else active[:, None].expand(B, k + 1)
        block_cells = cells[:, :, : k + 1]
        # [B, k + 1, V] and the state after x; from a graph: static buffers, read before the next replay
        logits, verified = (verify(x, rows) if verify is not None and k == K else
                            model(x, state, mask=rows, cell_inputs=block_cells, check_ids=False))
        # Non-finite logits are an error, never tokens: NaN would be accepted or drawn as token 0.
        where = f"in speculative block {stats['blocks'] + 1}"
        check_finite(~logits.isfinite().all(), model, where)
        check_finite(draft_nonfinite, draft, where, role="draft model")

        # 3. Acceptance: a accepted draft tokens per row, then the correction / bonus token.
        accepted, nxt = (_accept_greedy(logits, x[:, 1:]) if greedy else
                         _accept(probs(logits), torch.stack(q, dim=1) if q else None, x[:, 1:], generator))
        # The committed tokens of the block: d1 .. da, then the correction / bonus token.
        new = torch.cat([x[:, 1:], torch.full_like(last[:, None], pad)], dim=1).scatter(1, accepted[:, None], nxt[:, None])
        keep = _kept(new, accepted, running, finished, max_new_tokens - lengths, eos_token_id)
        for key, n in (("blocks", 1), ("drafted", k * running.sum()), ("accepted", torch.where(running, accepted, 0).sum()),
                       ("rejected", (running & (accepted < k)).sum())):
            stats[key] += int(n)
        keep, stopped = _stream_block(stream, new, keep, pad)
        pos = torch.arange(k + 1, device=device)
        tokens.scatter_(1, lengths[:, None] + pos, torch.where(pos < keep[:, None], new, pad))
        lengths += keep
        # The newest committed token is the next `last`; rows that committed nothing keep theirs.
        last = torch.where(keep > 0, new.gather(1, (keep - 1).clamp(min=0)[:, None])[:, 0], last)

        # 4. Rollback: each model's state must cover its row's first `keep` positions of x.
        if bool(((keep == k + 1) | ~running).all()):
            state.copy_(verified)
        else:
            readvance(model.config, block_cells, state, keep, out=state)
        _roll_back_draft(draft, draft_step, draft_state, draft_saved, draft_cells, x, keep, running)

    # Feed every row's pending last token, so the states cover everything that was generated.
    check_finite(~model.step(last, state).isfinite().all(), model, "by the last generated token")
    draft.step(last, draft_state)
    return tokens[:, :max_new_tokens], lengths, _rates(stats, int(lengths.sum()), B)


def _roll_back_draft(draft: XLSTM, draft_step, draft_state: State, draft_saved: State, draft_cells: torch.Tensor,
                     x: torch.Tensor, keep: torch.Tensor, running: torch.Tensor) -> None:
    """The draft's state to its row's first keep[b] positions of the block's x [B, k+1]: its k steps
    covered x[:, :k]; rows that kept fewer are re-advanced from `draft_saved`, the state before the
    block, and rows that kept all k + 1 take one more step over x[:, k]."""
    k = x.shape[1] - 1
    if not bool(((keep >= k) | ~running).all()):  # the draft's steps went past a rejection
        readvance(draft.config, draft_cells[:, :, :k], draft_saved, keep.clamp(max=k), out=draft_state)
    extra = running & (keep > k)
    if bool(extra.any()):
        draft_step(x[:, -1], extra)


def _rates(stats: dict, tokens: int, B: int) -> dict:
    """`stats` (blocks, drafted, accepted, rejected) with the rates derived from them, for `tokens`
    generated over B rows."""
    stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
    # The probability that a draft token is accepted given that the ones before it were (the alpha of
    # the speculative decoding papers); accepted / drafted falls with K even at a fixed alpha.
    stats["token_acceptance"] = stats["accepted"] / max(stats["accepted"] + stats["rejected"], 1)
    stats["tokens_per_block"] = tokens / max(stats["blocks"], 1) / B
    return stats


def _draft(draft_step, last: torch.Tensor, k: int, active: torch.Tensor | None, draft_cells: torch.Tensor,
           step_cells: torch.Tensor, probs, generator) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The draft's k steps from its state over [last, d1 .. d_{k-1}]: (d1 .. dk, their distributions
    q_0 .. q_{k-1} (none when `probs` is None: greedy, the argmax), a device flag of non-finite
    logits). Step j's cell inputs go to draft_cells[:, :, j]."""
    drafted, q = [], []
    token = last
    nonfinite = torch.zeros((), dtype=torch.bool, device=last.device)
    for j in range(k):
        logits = draft_step(token, active)
        nonfinite |= ~logits.isfinite().all()
        draft_cells[:, :, j : j + 1].copy_(step_cells)
        if probs is None:
            token = logits.argmax(dim=-1)
        else:
            q.append(probs(logits))
            token = sample_from(q[-1], generator)
        drafted.append(token)
    return drafted, q, nonfinite


def _kept(new: torch.Tensor, accepted: torch.Tensor, running: torch.Tensor, finished: torch.Tensor, room: torch.Tensor,
          eos_token_id: int | None) -> torch.Tensor:
    """How many of the block's committed tokens `new` [B, k+1] each row keeps: the accepted ones and
    the next, at most `room`, up to and including an EOS (which marks the row `finished`, in place);
    none for rows not running."""
    keep = torch.minimum(accepted + 1, room)
    if eos_token_id is not None:
        pos = torch.arange(new.shape[1], device=new.device)
        is_eos = (new == eos_token_id) & (pos < keep[:, None])
        first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, keep)
        keep = torch.minimum(keep, first)
        finished |= is_eos.any(dim=1)
    return torch.where(running, keep, 0)


def _stream_block(stream, new: torch.Tensor, keep: torch.Tensor, pad: int) -> tuple[torch.Tensor, bool]:
    """Streams the block's kept tokens position by position; a stop request cuts the block there.
    Returns (keep, whether the stream asked to stop)."""
    if stream is None:
        return keep, False
    pos = torch.arange(new.shape[1], device=new.device)
    for j in range(int(keep.max())):
        if stream(torch.where(pos[j] < keep, new[:, j], pad)):
            return keep.clamp(max=j + 1), True
    return keep, False


class VerifyGraph:
    """The target's verification pass `model(x, state, mask=mask, cell_inputs=cells)` over the K+1
    positions of `cells` ([num_blocks, B, K+1, W]), captured once in a CUDA graph on these buffers
    and replayed per block: `verify(x [B, K+1], mask [B, K+1]) -> (logits [B, K+1, V], state after
    the block)`, both overwritten by the next replay. `state` is read, never written; `cells` is
    filled by every replay."""

    def __init__(self, model: XLSTM, state: State, cells: torch.Tensor):
        B, K1, device = cells.shape[1], cells.shape[2], cells.device
        self.x = torch.zeros(B, K1, dtype=torch.long, device=device)
        self.mask = torch.ones(B, K1, dtype=torch.bool, device=device)

        def run():
            return model(self.x, state, mask=self.mask, cell_inputs=cells, check_ids=False)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream (kernels tuned and compiled), as capture requires
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.verified = run()

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, State]:
        self.x.copy_(x)
        if mask is None:
            self.mask.fill_(True)
        else:
            self.mask.copy_(mask)
        self.graph.replay()
        return self.logits, self.verified


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


def readvance(config, cell_inputs: torch.Tensor, start: State, keep: torch.Tensor, *, out: State) -> None:
    """out <- `start` advanced, per row b, over the first keep[b] positions whose cell inputs
    [num_blocks, B, S, W] a pass or steps from `start` recorded (`out` may be `start`): the mLSTM
    cells alone, O(positions * DK * DV) per head and layer."""
    NH = config.num_heads
    _, B, S, _ = cell_inputs.shape
    dropped = (torch.arange(S, device=cell_inputs.device) >= keep[:, None])[:, None]  # [B, 1, S]
    for n, (k, v, i, f) in enumerate(zip(*split_cell_inputs(cell_inputs, config))):
        # [B, S, NH*DH] -> [B, NH, S, DH]; dropped positions are padding (spec §2: i = -inf, lf = 0)
        k, v = (t.unflatten(-1, (NH, -1)).transpose(1, 2) for t in (k, v))
        i = i.transpose(1, 2).masked_fill(dropped, float("-inf"))
        f = f.transpose(1, 2).masked_fill(dropped, float("inf"))
        mlstm_advance(k, v, i, f, start[n], out=out[n])
