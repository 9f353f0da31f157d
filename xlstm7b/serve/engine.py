"""The serving engine: continuous batching of requests over a fixed pool of recurrent state slots.
No HTTP here (api.py puts an OpenAI-style API in front of it).

    engine = Engine(model, EngineConfig(max_batch=64), tokenizer=tokenizer).start()
    request = engine.generate(prompt_ids, SamplingParams(max_tokens=32))  # blocks until it finishes
    request = engine.submit(prompt_ids, params, on_event)  # on_event(Event), called on the engine's thread
    engine.stop(timeout=30)

Every request's memory is one fixed-size state, so the pool is `max_batch` states allocated once
(one `State` with batch `max_batch`); a request holds one row ("slot") from admission to its end.
The scheduler runs on one thread (torch releases the GIL inside its kernels), in iterations:
1. Cancelled requests free their slots. Waiting requests are admitted into free slots (the lowest
   free row first, so the rows in use stay packed at the top of the pool), each starting from the
   longest cached prefix of its prompt (prefix_cache.py) or from the zero state.
2. Prefill, bounded: one chunkwise forward pass over the next piece (at most `prefill_chunk`
   positions) of the oldest prefilling requests, as many of them as fit in `prefill_tokens` padded
   positions (left padding, masked). A request whose prompt ends in this piece samples its first
   token from the last position's logits and starts decoding.
3. Decode: one batched `model.step` over the first `bucket` rows of the pool (the smallest power of
   two that covers every decoding row), with the `active` mask leaving free and prefilling rows
   untouched; every decoding request then samples its next token with its own parameters and its
   own generator (so a seeded request gets the same tokens whatever else is in the batch).
A long prompt is thus prefilled over several iterations while the decoding requests still get one
token per iteration: a prompt delays everybody's next token by at most one bounded prefill pass.
"""

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..decode import step_runner
from ..model import XLSTM
from ..sampling import sample
from ..state import STORAGE_DTYPES, State
from ..streaming import TextStreamer
from .prefix_cache import PrefixCache, prefix_keys

log = logging.getLogger(__name__)

STATE_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in STORAGE_DTYPES}
"""The slots' state dtypes (State.stored_as), by name."""
RATE_WINDOW_S = 10.0
"""Generated tokens per second are reported over this trailing window."""


class Overloaded(RuntimeError):
    """The queue of waiting requests is full; the client should retry later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down (or stopped) and takes no new requests."""


@dataclass
class EngineConfig:
    max_batch: int = 64
    """State slots: how many requests are prefilled or decoded at once (the decode batch size)."""
    max_queue: int = 1024
    """Requests that may wait for a slot; beyond them `submit` raises `Overloaded`."""
    max_prompt_tokens: int = 32768
    """Longest prompt accepted, in tokens (the state is constant in it; this bounds prefill time)."""
    max_new_tokens: int = 4096
    """Largest `max_tokens` a request may ask for."""
    prefill_chunk: int = 256
    """Prompt positions a request prefills per iteration (rounded down to a multiple of the model's
    chunk size); also the granularity of the prefix cache."""
    prefill_tokens: int = 4096
    """Padded positions (rows x piece length) one prefill pass may run: bounds the stall of decoding."""
    prefix_cache_bytes: int = 1 << 30
    """Bytes of prefix states the cache may hold (0: no prefix cache)."""
    state_dtype: torch.dtype = torch.float32
    """dtype of the slots' C and n (bfloat16 halves state memory and traffic, which dominates the
    decode step at large batch; the step still computes in float32).
    The stabilizer m stays float32: it is an exponent, which bfloat16 would round by up to 0.03 near 15."""
    compile: bool = False
    """Run the decode step compiled by inductor (one compilation per batch bucket): on CPU its C++
    code, on CUDA its fused kernels captured in the bucket's CUDA graph."""
    cuda_graph: bool | None = None
    """On CUDA, replay the decode step from a CUDA graph captured per batch bucket; default: on CUDA."""

    def validate(self, device: torch.device) -> None:
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_new_tokens", "prefill_chunk", "prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.prefix_cache_bytes, int) or self.prefix_cache_bytes < 0:
            raise ValueError(f"EngineConfig.prefix_cache_bytes must be an integer >= 0, got {self.prefix_cache_bytes!r}")
        if self.state_dtype not in STATE_DTYPES.values():
            raise ValueError(f"EngineConfig.state_dtype must be one of {', '.join(STATE_DTYPES)}, got {self.state_dtype}")
        if self.compile and device.type not in ("cpu", "cuda"):
            raise ValueError(f"compile=True compiles the decode step for CPU or CUDA, not {device.type}")
        if self.compile and device.type == "cuda" and self.cuda_graph is False:
            raise ValueError("compile=True on CUDA compiles the step that the CUDA graph replays; leave cuda_graph on")
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """Tokens to generate at most (the finish reason is "length" when they run out)."""
    temperature: float = 0.0
    """0 is greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p."""
    top_k: int | None = None
    """Sample among the top_k most likely tokens only."""
    seed: int | None = None
    """Seeds the request's own generator: the same tokens whatever else is in the batch."""
    stop: tuple[str, ...] = ()
    """Stop at the first of these strings (not part of the text); needs the engine's tokenizer."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop after any of these token ids (not part of the text)."""
    ignore_eos: bool = False
    """Keep generating after the model's EOS token."""

    def validate(self, vocab_size: int, max_new_tokens: int, has_tokenizer: bool) -> None:
        """Raises ValueError naming the parameter at fault and its valid range."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or not 1 <= self.max_tokens <= max_new_tokens:
            raise ValueError(f"max_tokens must be an integer in [1, {max_new_tokens}], got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a number in [0, 100] (0 is greedy), got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.stop and not has_tokenizer:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {list(self.stop)!r}")
        bad = [t for t in self.stop_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids contains {bad[0]!r}, outside the vocabulary [0, {vocab_size})")


@dataclass
class Event:
    """What a request produced in one iteration, handed to its `on_event`."""

    token_ids: list[int]
    """The new token ids (the EOS or stop id included)."""
    text: str
    """The new text (empty without a tokenizer; held back while it may be the start of a stop string)."""
    finish_reason: str | None = None
    """None while running; "stop" (EOS, stop id or stop string), "length", "cancelled" or "error"."""
    error: str | None = None
    """The error message when finish_reason is "error"."""


@dataclass(eq=False)
class Request:
    """One request, from `submit` to its end: its prompt and parameters, and what it produced."""

    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] | None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0
    """Prompt tokens that came from the prefix cache instead of being prefilled."""
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # the scheduler's bookkeeping
    cancelled: bool = False
    slot: int | None = None
    cursor: int = 0
    last_token: int | None = None
    keys: list = field(default_factory=list)
    generator: torch.Generator | None = None
    streamer: TextStreamer | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from submission to the first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival


class Engine:
    """Continuous batching over `config.max_batch` state slots (the module docstring says how).
    `tokenizer` (a `tokenizers.Tokenizer`, optional) turns the tokens into text, for stop strings
    and `Request.text`; without it, requests deal in token ids only."""

    def __init__(self, model: XLSTM, config: EngineConfig | None = None, tokenizer=None):
        self.model, self.config, self.tokenizer = model, config or EngineConfig(), tokenizer
        self.device = model.lm_head.weight.device
        self.config.validate(self.device)
        mc = model.config
        self.piece = max(mc.chunk_size, self.config.prefill_chunk // mc.chunk_size * mc.chunk_size)
        N = self.config.max_batch
        self.pool = State.zeros(mc, N, device=self.device, dtype=self.config.state_dtype).stored_as(self.config.state_dtype)
        self.cache = PrefixCache(self.config.prefix_cache_bytes)
        self.use_graph = self.device.type == "cuda" if self.config.cuda_graph is None else self.config.cuda_graph
        self.buckets = sorted({min(N, 1 << k) for k in range(N.bit_length() + 1)})
        self._runners: dict[int, Callable] = {}
        self._free = list(range(N))  # a heap: the lowest free row first
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []  # in admission order
        self._decoding: dict[int, Request] = {}  # slot -> request
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._accepting, self._closed = True, False
        self._thread: threading.Thread | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) per iteration
        self.counts = {"requests": 0, "prompt_tokens": 0, "prefilled_tokens": 0, "generated_tokens": 0,
                       "finished": {r: 0 for r in ("stop", "length", "cancelled", "error")}}

    # --- the caller's side (any thread) ---------------------------------------------------------

    def start(self, warmup: bool | None = None) -> "Engine":
        """Starts the scheduler thread. warmup (default: with compile or CUDA graphs) runs every
        batch bucket's step once first, so no compilation or capture happens while serving."""
        if warmup if warmup is not None else (self.config.compile or self.use_graph):
            self.warmup()
        self._thread = threading.Thread(target=self._loop, name="xlstm7b-engine", daemon=True)
        self._thread.start()
        return self

    @torch.no_grad()
    def warmup(self) -> None:
        for b in self.buckets:  # all rows inactive: the state is left as it is
            self._runner(b)(torch.full((b,), self.model.config.pad_token_id, device=self.device),
                            torch.zeros(b, dtype=torch.bool, device=self.device))

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None] | None = None) -> Request:
        """Queues a request for `prompt` (token ids); raises ValueError for a bad prompt or bad
        parameters, Overloaded when the queue is full, EngineStopped when shutting down."""
        prompt = self._check_prompt(prompt)
        params.validate(self.model.config.vocab_size, self.config.max_new_tokens, self.tokenizer is not None)
        with self._cond:
            if not self._accepting:
                raise EngineStopped("the server is shutting down and accepts no new requests")
            if len(self._waiting) >= self.config.max_queue:
                raise Overloaded(f"the server is overloaded: {len(self._waiting)} requests are waiting for one of "
                                 f"{self.config.max_batch} slots; retry later")
            request = Request(next(self._ids), prompt, params, on_event)
            self._waiting.append(request)
            self.counts["requests"] += 1
            self.counts["prompt_tokens"] += len(prompt)
            self._cond.notify()
        return request

    def generate(self, prompt: Sequence[int], params: SamplingParams, timeout: float | None = None) -> Request:
        """`submit` and wait for the end; the request holds output_ids, text and finish_reason."""
        request = self.submit(prompt, params)
        if not request.done.wait(timeout):
            self.cancel(request)
            raise TimeoutError(f"request {request.id} did not finish within {timeout} s")
        return request

    def cancel(self, request: Request) -> None:
        """Ends the request at the next iteration (finish reason "cancelled"), freeing its slot."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuses new requests, lets the running and waiting ones finish for up to `timeout`
        seconds, cancels what is left, and ends the scheduler thread."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            while self._busy() and self._thread is not None and self._cond.wait(max(0.0, deadline - time.monotonic())):
                pass
            for request in [*self._waiting, *self._prefilling, *self._decoding.values()]:
                request.cancelled = True
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> dict:
        """Counters and gauges (a snapshot) for monitoring."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= RATE_WINDOW_S]
        return {
            **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counts.items()},
            "waiting": len(self._waiting), "prefilling": len(self._prefilling), "decoding": len(self._decoding),
            "slots": self.config.max_batch, "slot_bytes": self.pool.nbytes // self.config.max_batch,
            "tokens_per_s": sum(n for _, n in recent) / RATE_WINDOW_S,
            "prefix_cache": self.cache.stats(),
        }

    def _check_prompt(self, prompt) -> list[int]:
        if not isinstance(prompt, Sequence) or isinstance(prompt, str) or not all(isinstance(t, int) for t in prompt):
            raise ValueError("the prompt must be a list of integer token ids")
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt) > self.config.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(prompt)} tokens, more than this server's limit of "
                             f"{self.config.max_prompt_tokens} (max_prompt_tokens)")
        V = self.model.config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"the prompt contains token id {bad}, outside the vocabulary [0, {V})")
        return list(prompt)

    # --- the scheduler (its own thread) ---------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding)

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not (self._busy() or self._closed):
                        self._cond.wait()
                    self._reap_cancelled()
                    if self._closed and not self._busy():
                        return
                    self._admit()
                try:
                    self._prefill_piece()
                    self._decode_step()
                except Exception as e:  # a failed pass fails its requests, not the server
                    log.exception("engine iteration failed")
                    for request in [*self._prefilling, *self._decoding.values()]:
                        self._finish(request, "error", error=f"{type(e).__name__}: {e}")
                with self._cond:
                    self._cond.notify_all()  # wakes `stop` when the last request has finished

    def _reap_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._finish(request, "cancelled")
        for request in [*self._prefilling, *self._decoding.values()]:
            if request.cancelled:
                self._finish(request, "cancelled")

    def _admit(self) -> None:
        while self._free and self._waiting:
            request = self._waiting.popleft()
            request.slot = slot = heapq.heappop(self._free)
            if self.cache.enabled:
                request.keys = prefix_keys(request.prompt, self.piece, len(request.prompt))
            request.cursor, cached = self.cache.lookup(request.keys)
            request.cached_tokens = request.cursor
            for n, layer in enumerate(self.pool):
                for j, t in enumerate(layer):
                    if cached is None:
                        t[slot].zero_()
                    else:
                        t[slot].copy_(cached[n][j][0])
            if request.params.seed is not None:
                request.generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
            if self.tokenizer is not None:
                request.streamer = TextStreamer(self.tokenizer, stop=request.params.stop)
            self._prefilling.append(request)

    def _prefill_piece(self) -> None:
        """One chunkwise pass over the next piece of the oldest prefilling requests."""
        batch, lengths, width = [], [], 0
        for request in self._prefilling:
            n = min(len(request.prompt) - request.cursor, self.piece)
            if batch and (len(batch) + 1) * max(width, n) > self.config.prefill_tokens:
                break
            batch.append(request)
            lengths.append(n)
            width = max(width, n)
        if not batch:
            return
        mc = self.model.config
        ids = torch.full((len(batch), width), mc.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for b, (request, n) in enumerate(zip(batch, lengths)):  # left padding: every row ends at width - 1
            ids[b, width - n:] = torch.tensor(request.prompt[request.cursor:request.cursor + n])
            mask[b, width - n:] = True
        rows = torch.tensor([r.slot for r in batch], device=self.device)
        start = self.pool.select(rows).to(dtype=torch.float32)
        logits, new = self.model(ids.to(self.device), start, mask=None if bool(mask.all()) else mask.to(self.device),
                                 last_logits_only=True)
        for mine, theirs in zip(self.pool, new):
            for t, x in zip(mine, theirs):
                t.index_copy_(0, rows, x.to(t.dtype))
        self.counts["prefilled_tokens"] += sum(lengths)
        done = []
        for b, (request, n) in enumerate(zip(batch, lengths)):
            request.cursor += n
            if request.cursor == len(request.prompt):
                done.append(b)
                continue
            # The state at a piece boundary: what a later prompt with this prefix starts from.
            length, key = request.keys[request.cursor // self.piece - 1] if request.keys else (0, None)
            if length == request.cursor and key not in self.cache:
                self.cache.insert(key, new.select([b]).stored_as(self.config.state_dtype))
        if not done:
            return
        # Only the requests whose prompt ended here sample (and draw from their generators).
        first = self._sample(logits[done, 0], [batch[b] for b in done])
        for b, token in zip(done, first):
            self._prefilling.remove(batch[b])
            self._decoding[batch[b].slot] = batch[b]
            self._emit(batch[b], token)

    def _decode_step(self) -> None:
        """One batched step over the decoding rows (those of the smallest bucket covering them)."""
        if not self._decoding:
            return
        bucket = next(b for b in self.buckets if b > max(self._decoding))
        token = torch.full((bucket,), self.model.config.pad_token_id, dtype=torch.long)
        active = torch.zeros(bucket, dtype=torch.bool)
        requests = list(self._decoding.values())
        for request in requests:
            token[request.slot], active[request.slot] = request.last_token, True
        logits = self._runner(bucket)(token.to(self.device), active.to(self.device))
        rows = torch.tensor([r.slot for r in requests], device=self.device)
        for request, t in zip(requests, self._sample(logits.index_select(0, rows), requests)):
            self._emit(request, t)
        self._recent.append((time.perf_counter(), len(requests)))
        while self._recent and self._recent[0][0] < time.perf_counter() - RATE_WINDOW_S:
            self._recent.popleft()

    def _runner(self, bucket: int):
        """The step on the pool's first `bucket` rows (views: the step writes into the pool)."""
        if bucket not in self._runners:
            self._runners[bucket] = step_runner(self.model, self.pool.select(slice(0, bucket)),
                                                cuda_graph=self.use_graph, compile=self.config.compile)
        return self._runners[bucket]

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits [len(requests), V] -> each request's next token, with its own parameters."""
        tokens = logits.argmax(dim=-1).tolist()  # greedy rows, in one operation
        for b, request in enumerate(requests):
            p = request.params
            if p.temperature > 0:  # a [1, V] draw from the request's generator, as generate() makes alone
                tokens[b] = int(sample(logits[b:b + 1], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                       generator=request.generator))
        return tokens

    def _emit(self, request: Request, token: int) -> None:
        """Records a generated token, hands the news to the request, finishes it when it is done."""
        request.output_ids.append(token)
        request.last_token = token
        self.counts["generated_tokens"] += 1
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        p, streamer = request.params, request.streamer
        before = len(streamer.text) if streamer is not None else 0
        reason = None
        if (token == self.model.config.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif streamer is not None and streamer.put(torch.tensor([token])):
            reason = "stop"  # a stop string
        if reason is None and len(request.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is not None and streamer is not None and not streamer.stopped:
            streamer.end()  # flushes the text held back
        text = streamer.text[before:] if streamer is not None else ""
        request.text += text
        if reason is None:
            self._notify(request, Event([token], text))
        else:
            self._finish(request, reason, [token], text)

    def _finish(self, request: Request, reason: str, token_ids: list[int] = (), text: str = "", error: str | None = None) -> None:
        if request.slot is not None:
            if request in self._prefilling:
                self._prefilling.remove(request)
            self._decoding.pop(request.slot, None)
            heapq.heappush(self._free, request.slot)
            request.slot = None
        request.finish_reason, request.error = reason, error
        request.generator = request.streamer = None
        self.counts["finished"][reason] += 1
        self._notify(request, Event(list(token_ids), text, reason, error))
        request.done.set()

    @staticmethod
    def _notify(request: Request, event: Event) -> None:
        if request.on_event is not None:
            try:
                request.on_event(event)
            except Exception:  # a listener's bug must not stop the engine
                log.exception("on_event of request %d failed", request.id)
