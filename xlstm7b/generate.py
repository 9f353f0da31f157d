"""Constant-memory text generation: chunkwise prefill, then single-token steps on a preallocated state.

    tokens, state = generate(model, input_ids, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)

How it runs:
- Prefill: the chunkwise kernel over the prompt, in pieces of `prefill_chunk_size` positions carrying
  the state (memory bounded for any prompt length), logits only at the last position.
- Decode: one token per step through the step kernel, writing into the state allocated once before
  the loop, so memory does not grow with the number of generated tokens. No host synchronization
  per token on GPU (EOS is tracked in tensors; "all rows finished" is checked every
  `SYNC_EVERY` tokens), and on CUDA the step is captured once in a CUDA graph and replayed.
  On CPU, `compile=True` compiles the step with inductor (weights frozen into the compiled GEMMs,
  the cell fused): faster than eager, most at small batch, after a compilation of seconds.
- Ragged batches (a list of prompts of different lengths): prompts are left-padded and the padding
  is masked (spec §2: i = -inf, lf = 0), so it never touches the state, and rows finished at EOS are
  masked from then on; every row's tokens and final state are those of generating it alone.

Speculative decoding: `generate(model, ..., draft=small_model, speculate_k=K)` lets a small xLSTM
with the same vocabulary propose K tokens per block that the target verifies in one chunkwise pass
(xlstm7b/speculative.py). The output has exactly the target's distribution (greedy: the same tokens).

Streamer protocol: `streamer` is a callable `f(tokens)` or an object with `put(tokens)` and
`end()`. After every step it receives the new token of each row as a CPU LongTensor [B] (the pad id
for rows that have finished); `end()` is called once after the last step. If `put` (or the
callable) returns True, generation stops after that step. A streamer forces one host sync per token.
With a draft, the tokens a block commits are streamed one position at a time (the pad id for rows
that committed fewer); a stop request drops the rest of the block.
"""

import argparse
import functools
import sys
import time
import types
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from .model import XLSTM
from .state import State

SYNC_EVERY = 32
"""On GPU, how many tokens pass between checks that every row has finished (each check syncs)."""


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
    eos_token_id: int | None = None,
    seed: int | None = None,
    state: State | None = None,
    streamer=None,
    prefill_chunk_size: int = 8192,
    cuda_graph: bool | None = None,
    compile: bool = False,
    draft: XLSTM | None = None,
    speculate_k: int = 4,
    draft_state: State | None = None,
) -> GenerateOutput:
    """Generates `max_new_tokens` tokens after each prompt; returns `(tokens, state)` with `.lengths`.

    input_ids: LongTensor [B, S] (or [S] for one prompt), or a list of 1-D id sequences of different
        lengths (a ragged batch). An empty prompt is replaced by the BOS token (a document start).
    max_new_tokens: tokens to generate per row; 0 only runs the prompt into the state.
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k: sample among the k most likely tokens only. top_p: among the smallest set of most likely
        tokens whose probability reaches p (nucleus sampling). Both need temperature > 0.
    eos_token_id: a row that produces it stops (the EOS is kept, the rest is the pad id). None (the
        default) never stops early; pass `model.config.eos_token_id` to stop at the model's EOS.
    seed: seeds a private generator, so sampled output is reproducible; None uses torch's global RNG.
    state: continue from this State ([B] rows) instead of the empty one; it is not modified.
    streamer: receives the tokens of every step (protocol in the module docstring).
    prefill_chunk_size: prompt positions run at once during prefill; bounds prefill memory.
    cuda_graph: capture the decode step in a CUDA graph; default: on CUDA devices.
    compile: on CPU, compile the decode step (and the draft's) with torch.compile; worth it for long
        generations (see `_CompiledStep`). The first call for a model, batch size and set of
        weights compiles (seconds to a minute); later calls reuse it.
    draft: a smaller XLSTM with the same vocabulary, on the same device: speculative decoding (the
        draft proposes `speculate_k` tokens per block, the target verifies them in one pass). The
        output follows the target's distribution exactly; greedy output equals plain greedy output.
    speculate_k: draft tokens per block (>= 1).
    draft_state: the draft's State to continue from, with `state` (e.g. a previous `.draft_state`);
        default: the empty state (the output is still exact, the draft only proposes worse).
    """
    config = model.config
    _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_token_id, prefill_chunk_size, config.vocab_size)
    device = model.lm_head.weight.device
    ids, mask = _batch_prompts(input_ids, config, device)
    B = ids.shape[0]
    state = _decoding_state(state, config, B, device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    if use_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device}")
    if compile and device.type != "cpu":
        raise ValueError(f"compile=True compiles the CPU decode step; on {device.type} use cuda_graph=True (the default on CUDA)")
    if draft is not None:
        return _generate_speculative(
            model, draft, ids, mask, state, draft_state, max_new_tokens=max_new_tokens, speculate_k=speculate_k,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
            streamer=streamer, prefill_chunk_size=prefill_chunk_size, use_graph=use_graph, compile=compile,
        )
    if draft_state is not None:
        raise ValueError("draft_state is given without a draft model")

    tokens = torch.full((B, max_new_tokens), config.pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    with torch.no_grad():
        logits = _prefill(model, ids, mask, state, prefill_chunk_size)
        # Only rows that can finish need the mask; without EOS every step runs unmasked.
        finished = torch.zeros(B, dtype=torch.bool, device=device) if eos_token_id is not None else None
        step = _step_runner(model, state, use_graph=use_graph and max_new_tokens > 0, compile=compile)
        sync_every = 1 if device.type == "cpu" else SYNC_EVERY
        for t in range(max_new_tokens):
            token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            active = None
            if finished is not None:
                active = ~finished
                token = token.masked_fill(finished, config.pad_token_id)
                finished = finished | (token == eos_token_id)
            tokens[:, t] = token
            # The step is launched before the streamer's sync, so the device works meanwhile; it
            # also feeds the last token, so the state covers everything that was generated.
            logits = step(token, active=active)
            lengths += 1 if active is None else active
            stop = _stream(streamer, token)
            if stop or (finished is not None and (t + 1) % sync_every == 0 and bool(finished.all())):
                break
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return GenerateOutput(tokens, state, lengths)


def _decoding_state(state: State | None, config, B: int, device) -> State:
    """The state the decode loop writes into in place (contiguous float32, as the fused step kernel
    needs): the empty one, or a copy of the given one, which is never modified."""
    if state is not None and (not isinstance(state, State) or state.batch_size != B or len(state) != config.num_blocks):
        raise ValueError(f"state must be a State with {config.num_blocks} layers and batch size {B} (one row per prompt)")
    if state is None:
        return State.zeros(config, B, device=device)
    fresh = dict(device=device, dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    return State([tuple(t.to(**fresh) for t in layer) for layer in state])


def _generate_speculative(model, draft, ids, mask, state, draft_state, *, speculate_k, streamer, **kwargs) -> GenerateOutput:
    from .speculative import speculative_decode

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
    if not isinstance(speculate_k, int) or isinstance(speculate_k, bool) or speculate_k < 1:
        raise ValueError(f"speculate_k must be an integer >= 1, got {speculate_k!r}")
    draft_state = _decoding_state(draft_state, draft.config, ids.shape[0], ids.device)
    stream = None if streamer is None else functools.partial(_stream, streamer)
    with torch.no_grad():
        tokens, lengths, stats = speculative_decode(
            model, draft, ids, mask, state, draft_state, speculate_k=speculate_k, stream=stream, **kwargs)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return GenerateOutput(tokens, state, lengths, draft_state, stats)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_token_id, prefill_chunk_size, vocab_size) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p apply to sampling; set temperature > 0 (temperature 0 is greedy)")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} lies outside the vocabulary [0, {vocab_size})")
    if not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be a positive integer, got {prefill_chunk_size!r}")


def _batch_prompts(input_ids, config, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> ids [B, S] on `device` and mask [B, S] (False at left padding; None without any)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], [S] or a list of 1-D sequences, got shape {list(input_ids.shape)}")
        rows = list(input_ids) if input_ids.shape[1] == 0 else None
    else:
        rows = list(input_ids)
    if rows is not None:
        if not rows:
            raise ValueError("input_ids is an empty list; pass at least one prompt (an empty prompt is fine)")
        rows = [torch.as_tensor(r).reshape(-1) for r in rows]
        # An empty prompt has no last position to predict from: start a document with BOS.
        rows = [r if r.numel() else torch.tensor([config.bos_token_id]) for r in rows]
        for r in rows:
            _check_integer(r)
        S = max(r.numel() for r in rows)
        input_ids = torch.full((len(rows), S), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.bool)
        for b, r in enumerate(rows):  # left padding: every row's last prompt token is at S - 1
            input_ids[b, S - r.numel():] = r
            mask[b, S - r.numel():] = True
        mask = None if bool(mask.all()) else mask.to(device)
    else:
        mask = None
    _check_integer(input_ids)
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"input_ids contains token id {lo if lo < 0 else hi} outside the vocabulary [0, {config.vocab_size})")
    return input_ids.to(device=device, dtype=torch.long), mask


def _check_integer(ids: torch.Tensor) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")


def _prefill(model: XLSTM, ids: torch.Tensor, mask: torch.Tensor | None, state: State, chunk: int) -> torch.Tensor:
    """Runs the prompt into `state` (in place), piece by piece; returns the last position's logits [B, V]."""
    # Pieces on kernel-chunk boundaries give the same chunking as one pass over the whole prompt.
    L = model.config.chunk_size
    chunk = max(L, chunk // L * L)
    for start in range(0, ids.shape[1], chunk):
        piece = slice(start, start + chunk)
        logits, _ = model(ids[:, piece], state, mask=None if mask is None else mask[:, piece], inplace=True, last_logits_only=True)
    return logits[:, -1]


def decode_step(model: XLSTM, token: torch.Tensor, state: State, active: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step: token [B] -> logits [B, V]; `state` is updated in place by the step kernel.

    Rows where `active` [B] is False leave the state untouched. Runs `model.run`, which does not
    validate the ids (a host sync), so it can be captured in a CUDA graph; the ids come from sampling.
    """
    mask = None if active is None else active[:, None]
    logits, _ = model.run(token[:, None], state, mask=mask, inplace=True)
    return logits[:, 0]


def _step_runner(model: XLSTM, state: State, *, use_graph: bool, compile: bool):
    """The decode step on `state` as `step(token, active) -> logits`: captured, compiled or eager."""
    if use_graph:
        return _CUDAGraphStep(model, state)
    if compile:
        return _CompiledStep(model, state)
    return functools.partial(decode_step, model, state=state)


class _CompiledStep:
    """`decode_step` on `state` compiled by inductor for CPU: the weights frozen into the compiled
    code and the norms, gates and cell fused into a few loops. Up to `GEMM_TEMPLATE_MAX_BATCH` rows
    the matrix products are inductor's C++ GEMM templates (max-autotune, CPP backend), which stream
    the weights far faster than MKL's matrix-vector products (slow on AMD CPUs); above it, where the
    products are compute-bound, MKL's packed GEMMs are faster and are kept.

    Frozen weights are constants of the compiled code, so a compilation serves one model and one
    version of its weights: each model gets its own copies of `decode_step`'s code object (dynamo
    keeps compiled graphs per code object) and a fingerprint of its parameters; an in-place weight
    update (an optimizer step, load_state_dict) compiles anew. That makes the guards on the model's
    modules redundant, and they are skipped: they cost more than the step at batch 1.
    """

    GEMM_TEMPLATE_MAX_BATCH = 16
    _compiled: "weakref.WeakKeyDictionary[XLSTM, tuple[tuple, dict[bool, object]]]" = weakref.WeakKeyDictionary()

    def __init__(self, model: XLSTM, state: State):
        self.model, self.state = model, state
        fingerprint = tuple((p.data_ptr(), p._version) for p in model.parameters())
        entry = self._compiled.get(model)
        if entry is None or entry[0] != fingerprint:
            entry = self._compiled[model] = fingerprint, {}
        templates = state.batch_size <= self.GEMM_TEMPLATE_MAX_BATCH
        if templates not in entry[1]:
            entry[1][templates] = self._compile(templates)
        self.fn = entry[1][templates]

    @staticmethod
    def _compile(gemm_templates: bool):
        code = decode_step.__code__.replace()  # a new code object: a fresh dynamo cache
        fn = types.FunctionType(code, decode_step.__globals__, decode_step.__name__, decode_step.__defaults__)
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if gemm_templates:
            options |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}
        return torch.compile(fn, dynamic=False, options=options)

    def __call__(self, token: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        # Freezing is read when dynamo hands the graph over, which torch.compile's options do not reach.
        with torch._inductor.config.patch(freezing=True):
            return self.fn(self.model, token, self.state, active)


class _CUDAGraphStep:
    """`decode_step` captured once in a CUDA graph over static buffers and replayed per token: one
    launch instead of hundreds of small kernels, which dominate batch-1 decoding time."""

    def __init__(self, model: XLSTM, state: State):
        B, device = state.batch_size, state.device
        self.token = torch.zeros(B, dtype=torch.long, device=device)
        self.active = torch.ones(B, dtype=torch.bool, device=device)
        # Warm-up and capture run the step on the real state buffers; restore them afterwards.
        saved = state.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
            for _ in range(2):
                decode_step(model, self.token, state, self.active)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(model, self.token, state, self.active)
        state.copy_(saved)

    def __call__(self, token: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        self.token.copy_(token)
        if active is not None:
            self.active.copy_(active)
        self.graph.replay()
        return self.logits  # overwritten by the next replay: sample from it before that


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
    logits = logits.float() / temperature
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


def _stream(streamer, token: torch.Tensor) -> bool:
    if streamer is None:
        return False
    put = streamer.put if hasattr(streamer, "put") else streamer
    return bool(put(token.cpu()))


class TextStreamer:
    """A streamer for one row that turns tokens into text as they arrive.

    Decodes a short window of recent ids and emits only the new suffix, holding back text that ends
    in an incomplete UTF-8 character (byte-level BPE splits characters across tokens) or that could
    be the start of a stop string. Generation stops at the first stop string, which is not emitted.
    """

    def __init__(self, tokenizer, *, stop: Sequence[str] = (), out=None):
        self.tokenizer, self.stop, self.out = tokenizer, [s for s in stop if s], out
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] give context; ids[read:] are not yet emitted
        self.text = ""  # emitted text
        self.pending = ""  # decoded but held back (a possible stop-string start)
        self.stopped = False

    def put(self, tokens: torch.Tensor) -> bool:
        if self.stopped:
            return True
        self.ids.append(int(tokens.reshape(-1)[0]))
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read])
        new = self.tokenizer.decode(self.ids[self.prefix:])
        if len(new) <= len(seen) or new.endswith("\ufffd"):
            return False  # an incomplete character: wait for the next token
        self.pending += new[len(seen):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._flush(final=False)

    def end(self) -> None:
        if not self.stopped:
            self._flush(final=True)
        if self.out is not None:
            self.out.write("\n")
            self.out.flush()

    def _flush(self, final: bool) -> bool:
        # Emitted text never ends in a possible stop-string start (it is held back), so a stop
        # string can only begin inside `pending`.
        hits = [self.pending.find(s) for s in self.stop if s in self.pending]
        if hits:
            cut, self.stopped = min(hits), True
        elif final:
            cut = len(self.pending)
        else:  # hold back the longest tail that is a prefix of a stop string
            tail = max((n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
            cut = len(self.pending) - tail
        self._emit(self.pending[:cut])
        self.pending = self.pending[cut:]
        return self.stopped

    def _emit(self, text: str) -> None:
        self.text += text
        if self.out is not None and text:
            self.out.write(text)
            self.out.flush()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cli_main(argv: list[str]) -> int:
    """`xlstm7b generate`: loads a checkpoint folder and its tokenizer, streams the continuation."""
    p = argparse.ArgumentParser(prog="xlstm7b generate", description="Generate text from a checkpoint folder.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--prompt", required=True, help="prompt text ('' starts from the BOS token alone)")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the one in the checkpoint folder)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding (the default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], metavar="STRING", help="stop at this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS token")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="CPU: compile the decode step (faster decoding, after a compilation of seconds to a minute)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="print text as it is produced")
    p.add_argument("--draft", metavar="DIR", help="a smaller checkpoint with the same tokenizer: speculative decoding")
    p.add_argument("--speculate-k", type=int, default=4, metavar="K", help="draft tokens per verification (with --draft)")
    args = p.parse_args(argv)

    from tokenizers import Tokenizer

    from .checkpoint import CheckpointError, from_pretrained

    tok_path = Path(args.tokenizer) if args.tokenizer else Path(args.checkpoint) / "tokenizer.json"
    if not tok_path.is_file():
        hint = "" if args.tokenizer else " (the checkpoint folder has none); pass --tokenizer PATH/tokenizer.json"
        print(f"xlstm7b generate: tokenizer file {tok_path} not found{hint}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(str(tok_path))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        model = from_pretrained(args.checkpoint, device=device, dtype=dtype, weight_mode="fused")
        config = model.config
        draft = None
        if args.draft is not None:
            draft = from_pretrained(args.draft, device=device, dtype=dtype, weight_mode="fused")
            draft_tok = Path(args.draft) / "tokenizer.json"  # the vocab sizes are checked by generate()
            if draft_tok.is_file() and draft_tok.read_bytes() != tok_path.read_bytes():
                print(f"xlstm7b generate: warning: {draft_tok} differs from {tok_path}; the output is still the "
                      "target's, but a draft with another tokenizer is rarely accepted", file=sys.stderr)
        ids = [config.bos_token_id] + tokenizer.encode(args.prompt, add_special_tokens=False).ids
        streamer = TextStreamer(tokenizer, stop=args.stop, out=sys.stdout if args.stream else None)
        if args.compile:
            print("compiling the decode step (the first time for a model and batch size takes up to a minute) ...",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = generate(
            model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, eos_token_id=None if args.ignore_eos else config.eos_token_id,
            streamer=streamer, draft=draft, speculate_k=args.speculate_k, compile=args.compile,
        )
    except (CheckpointError, ValueError, TypeError) as e:
        print(f"xlstm7b generate: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    if not args.stream:
        print(streamer.text)
    n = int(out.lengths[0])
    spec = "" if out.stats is None else f", draft acceptance {out.stats['acceptance_rate']:.2f} at K={args.speculate_k}"
    print(f"[{len(ids)} prompt + {n} generated tokens in {dt:.2f} s, {n / dt:.1f} tok/s on {device}{spec}]", file=sys.stderr)
    return 0
