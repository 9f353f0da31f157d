"""Constant-memory text generation: chunkwise prefill, then single-token steps on a preallocated state.

    tokens, state = generate(model, input_ids, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)

How it runs:
- Prefill: the chunkwise kernel over the prompt, in pieces of `prefill_chunk_size` positions carrying
  the state (memory bounded for any prompt length), logits only at the last position.
- Decode: one token per step through the step kernel, writing into the state allocated once before
  the loop, so memory does not grow with the number of generated tokens. No host synchronization
  per token on GPU (EOS and non-finite logits are tracked in tensors; "all rows finished" and "all
  logits finite" are checked every `SYNC_EVERY` tokens), and on CUDA the step is captured once in a
  CUDA graph and replayed (from `GRAPH_MIN_TOKENS` new tokens on). Non-finite logits raise a
  FloatingPointError naming the cause.
  On CPU, `compile=True` compiles the step with inductor (weights frozen into the compiled GEMMs,
  the cell fused): faster than eager, most at small batch, after a compilation of seconds; on CUDA
  it fuses the step's small kernels before the graph captures them.
- Ragged batches (a list of prompts of different lengths): prompts are left-padded and the padding
  is masked (spec §2: i = -inf, lf = 0), so it never touches the state, and rows finished at EOS are
  masked from then on; every row's tokens and final state are those of generating it alone.

Speculative decoding: `generate(model, ..., draft=small_model, speculate_k=K)` lets a small xLSTM
with the same vocabulary propose K tokens per block that the target verifies in one chunkwise pass
(xlstm7b/speculative.py). The output has exactly the target's distribution (greedy: the same tokens).

The pieces (prompt batching, prefill, the step runners) are in decode.py, sampling in sampling.py,
streamers in streaming.py.

Streamer protocol: `streamer` is a callable `f(tokens)` or an object with `put(tokens)` and
`end()`. After every step it receives the new token of each row as a CPU LongTensor [B] (the pad id
for rows that have finished); `end()` is called once after the last step. If `put` (or the
callable) returns True, generation stops after that step. A streamer forces one host sync per token.
With a draft, the tokens a block commits are streamed one position at a time (the pad id for rows
that committed fewer); a stop request drops the rest of the block.
"""

import functools
from collections.abc import Sequence

import torch

from .decode import batch_prompts, check_finite, decoding_state, prefill, step_runner, token_buffer
from .model import XLSTM
from .sampling import LogitsProcessor, SamplingParams, is_int, sample
from .speculative import speculative_decode
from .state import State
from .streaming import end_stream, stream

SYNC_EVERY = 32
"""On GPU without a streamer, how many tokens pass between checks that every row has finished and
every logit was finite (each check syncs)."""

GRAPH_MIN_TOKENS = 8
"""With cuda_graph=None and without compile, the fewest new tokens for which the decode step is
captured in a CUDA graph. A capture costs two eager warm-up steps and the capture itself; at the 7B
shape and batch 1 an eager step took 24.5 ms (50.7 ms in another run) and a replayed one 6.7 ms on an
H200, so the graph pays after about five steps, and a one-token call (time to first token) runs its
one step eagerly. compile=True always captures (the compiled step is made for the graph)."""


class GenerateOutput(tuple):
    """The result of `generate`: unpacks as `tokens, state`, and also has `.lengths`.

    tokens: LongTensor [B, max_new_tokens], rows that finished early padded with the pad id.
    state: the State after the prompt and every generated token of each row (the EOS included), so
        `generate(model, next_ids, state=state, ...)` continues the text.
    lengths: LongTensor [B], the number of generated tokens of each row (the EOS included).
    draft_state: with a draft, the draft's State over the same text (pass it back with `state` to
        continue speculative decoding); else None.
    stats: with a draft, a dict: blocks, drafted, accepted and rejected draft tokens,
        acceptance_rate (accepted / drafted), token_acceptance (accepted / (accepted + rejected): the
        chance a draft token is accepted after accepted ones) and tokens_per_block (per row); else None.
    """

    def __new__(cls, tokens: torch.Tensor, state: State, lengths: torch.Tensor, draft_state: State | None = None, stats: dict | None = None):
        out = super().__new__(cls, (tokens, state))
        out.lengths, out.draft_state, out.stats = lengths, draft_state, stats
        return out

    @property
    def tokens(self) -> torch.Tensor:
        return self[0]

    @property
    def state(self) -> State:
        return self[1]


def generate(
    model: XLSTM,
    input_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    state: State | None = None,
    streamer=None,
    prefill_chunk_size: int = 8192,
    cuda_graph: bool | None = None,
    compile: bool | None = None,
    draft: XLSTM | None = None,
    speculate_k: int = 4,
    draft_state: State | None = None,
    state_dtype: torch.dtype = torch.float32,
) -> GenerateOutput:
    """Generates `max_new_tokens` tokens after each prompt; returns `(tokens, state)` with `.lengths`.

    input_ids: LongTensor [B, S] (or [S] for one prompt), or a list of 1-D id sequences of different
        lengths (a ragged batch). An empty prompt is replaced by the BOS token (a document start).
    max_new_tokens: tokens to generate per row; 0 only runs the prompt into the state.
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k, top_p, min_p, presence_penalty, frequency_penalty, repetition_penalty, logit_bias: as in
        `SamplingParams` (sampling.py), which checks them all, with OpenAI's and vLLM's meanings and
        order; top_k, top_p and min_p only change a sampled draw (temperature > 0), the penalties and
        logit_bias the greedy choice too. The repetition penalty covers this call's prompt and output
        (not the text behind a `state` passed in). With a draft, only temperature, top_k and top_p.
    eos_token_id: a row that produces it stops (the EOS is kept, the rest is the pad id). None (the
        default) never stops early; pass `model.config.eos_token_id` to stop at the model's EOS.
    seed: seeds a private generator, so sampled output is reproducible; None uses torch's global RNG.
    state: continue from this State ([B] rows) instead of the empty one; it is not modified.
    streamer: receives the tokens of every step (protocol in the module docstring).
    prefill_chunk_size: prompt positions run at once during prefill; bounds prefill memory.
    cuda_graph: capture the decode step in a CUDA graph; default: on CUDA devices, for at least
        GRAPH_MIN_TOKENS new tokens (a capture costs more than a few eager steps) or with compile.
    compile: compile the decode step (and the draft's) with torch.compile; None (the default):
        wherever the step is captured in a CUDA graph. On CPU: inductor's C++ code with the weights
        frozen in (`decode.CompiledStep`); the first call for a model, batch size and set of
        weights compiles (seconds to a minute), later calls reuse it. On CUDA: the step's small
        kernels fused, captured in the CUDA graph (`decode.CUDAGraphStep`); compiled once per
        model, batch size and state dtype in a process (later processes reuse inductor's cached
        kernels); if compiling fails, a warning says so and the graph captures the eager step.
    draft: a smaller XLSTM with the same vocabulary, on the same device: speculative decoding (the
        draft proposes `speculate_k` tokens per block, the target verifies them in one pass). The
        output follows the target's distribution exactly; greedy output equals plain greedy output.
    speculate_k: draft tokens per block (>= 1).
    draft_state: the draft's State to continue from, with `state` (e.g. a previous `.draft_state`);
        default: the empty state (the output is still exact, the draft only proposes worse).
    state_dtype: what the decoding state keeps C and n in: float32 (exact), or torch.bfloat16, which
        halves the state's memory and the traffic of a decoding step at large batch (the state's
        update is computed in float32 and rounded each step, so greedy tokens drift from float32's
        where logits are near-tied; the prompt itself runs in float32). The returned state has it.
        Speculative decoding keeps float32.
    """
    if not isinstance(model, XLSTM):
        raise TypeError(f"model must be an xlstm7b.XLSTM, got {type(model).__name__}")
    if streamer is not None and not (hasattr(streamer, "put") or callable(streamer)):
        raise TypeError(f"streamer must be a callable or have a put(tokens) method, got {type(streamer).__name__}")
    config = model.config
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            repetition_penalty=repetition_penalty, logit_bias=logit_bias, seed=seed)
    check_decoding(max_new_tokens, eos_token_id, prefill_chunk_size, config.vocab_size)
    params.validate(config.vocab_size)
    device = model.lm_head.weight.device
    ids, mask = batch_prompts(input_ids, config, device)
    B = ids.shape[0]
    if draft is not None and state_dtype != torch.float32:
        raise ValueError("speculative decoding keeps float32 states (its rollback re-advances them): "
                         "leave state_dtype at torch.float32 with a draft")
    state = decoding_state(state, config, B, device, state_dtype)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    use_graph = device.type == "cuda" and (compile or max_new_tokens >= GRAPH_MIN_TOKENS) if cuda_graph is None else cuda_graph
    if use_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device}")
    if compile and device.type not in ("cpu", "cuda"):
        raise ValueError(f"compile=True compiles the decode step for CPU or CUDA, not {device.type}")
    if compile and device.type == "cuda" and cuda_graph is False:
        raise ValueError("compile=True on CUDA compiles the step that the CUDA graph replays; leave cuda_graph on")
    if draft is not None:
        if params.processed or params.min_p:
            raise ValueError("speculative decoding samples with temperature, top_k and top_p only: leave min_p, the "
                             "penalties and logit_bias at their defaults with a draft")
        draw = params.draw_args()
        return _generate_speculative(
            model, draft, ids, mask, state, draft_state, max_new_tokens=max_new_tokens, speculate_k=speculate_k,
            temperature=temperature, top_k=draw["top_k"], top_p=draw["top_p"], eos_token_id=eos_token_id, generator=generator,
            streamer=streamer, prefill_chunk_size=prefill_chunk_size, use_graph=use_graph, compile=compile,
        )
    if draft_state is not None:
        raise ValueError("draft_state is given without a draft model")
    return _generate_plain(model, ids, mask, state, params, eos_token_id=eos_token_id, generator=generator, streamer=streamer,
                           prefill_chunk_size=prefill_chunk_size, use_graph=use_graph, compile=compile)


def _generate_plain(model, ids, mask, state, params: SamplingParams, *, eos_token_id, generator, streamer, prefill_chunk_size,
                    use_graph, compile) -> GenerateOutput:
    """Prefill, then one step per token (the module docstring says how)."""
    config, device, max_new_tokens = model.config, ids.device, params.max_tokens
    B = ids.shape[0]
    tokens = token_buffer(B, max_new_tokens, config.pad_token_id, device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    with torch.no_grad():
        logits = prefill(model, ids, mask, state, prefill_chunk_size)
        # Non-finite logits anywhere so far (a device flag, read at the syncs): never sampled from
        # silently, as argmax would turn them into token 0.
        nonfinite = ~logits.isfinite().all()
        check_finite(nonfinite, model, "after the prompt")
        # Only rows that can finish need the mask; without EOS every step runs unmasked.
        finished = torch.zeros(B, dtype=torch.bool, device=device) if eos_token_id is not None else None
        step = step_runner(model, state, cuda_graph=use_graph and max_new_tokens > 0, compile=compile and max_new_tokens > 0)
        processor = LogitsProcessor(params, config.vocab_size, ids, mask) if params.processed else None
        draw = params.draw_args()
        # A streamer syncs every token anyway: check every token then, before the next one is streamed.
        sync_every = 1 if device.type == "cpu" or streamer is not None else SYNC_EVERY
        for t in range(max_new_tokens):
            token = sample(logits if processor is None else processor(logits), **draw, generator=generator)
            active = None
            if finished is not None:
                active = ~finished
                token = token.masked_fill(finished, config.pad_token_id)
                finished = finished | (token == eos_token_id)
            if processor is not None:
                processor.update(token, active)
            tokens[:, t] = token
            # The step is launched before the streamer's sync, so the device works meanwhile; it
            # also feeds the last token, so the state covers everything that was generated.
            logits = step(token, active=active)
            nonfinite |= ~logits.isfinite().all()
            lengths += 1 if active is None else active
            stop = stream(streamer, token)
            at_sync = (t + 1) % sync_every == 0
            if at_sync:
                check_finite(nonfinite, model, f"by generated token {t + 2}")
            if stop or (finished is not None and at_sync and bool(finished.all())):
                break
        check_finite(nonfinite, model, "by the last generated token")  # the returned state is finite too
    end_stream(streamer)
    return GenerateOutput(tokens, state, lengths)


def _generate_speculative(model, draft, ids, mask, state, draft_state, *, speculate_k, streamer, **kwargs) -> GenerateOutput:
    if not isinstance(draft, XLSTM):
        raise TypeError(f"draft must be an XLSTM model, got {type(draft).__name__}")
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"the draft's vocab_size={draft.config.vocab_size} differs from the target's {model.config.vocab_size}: "
            "speculative decoding needs both models to share one tokenizer"
        )
    draft_device = draft.lm_head.weight.device
    if draft_device != ids.device:
        raise ValueError(f"the draft model is on {draft_device} but the target on {ids.device}; put both on one device")
    if not is_int(speculate_k) or speculate_k < 1:
        raise ValueError(f"speculate_k must be an integer >= 1, got {speculate_k!r}")
    draft_state = decoding_state(draft_state, draft.config, ids.shape[0], ids.device)
    on_tokens = None if streamer is None else functools.partial(stream, streamer)
    with torch.no_grad():
        tokens, lengths, stats = speculative_decode(
            model, draft, ids, mask, state, draft_state, speculate_k=speculate_k, stream=on_tokens, **kwargs)
    end_stream(streamer)
    return GenerateOutput(tokens, state, lengths, draft_state, stats)


def check_decoding(max_new_tokens, eos_token_id, prefill_chunk_size, vocab_size) -> None:
    """A ValueError naming max_new_tokens, eos_token_id or prefill_chunk_size when it is of the wrong
    type or out of range (the sampling arguments are SamplingParams.validate's)."""
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if eos_token_id is not None and (not is_int(eos_token_id) or not 0 <= eos_token_id < vocab_size):
        raise ValueError(f"eos_token_id must be a token id in the vocabulary [0, {vocab_size}) or None, got {eos_token_id!r}")
    if not is_int(prefill_chunk_size) or prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be a positive integer, got {prefill_chunk_size!r}")
