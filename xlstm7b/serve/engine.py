"""The serving engine: continuous batching of requests over a fixed pool of recurrent state slots.
No HTTP here (api.py puts an OpenAI-style API in front of it).

    engine = Engine(model, EngineConfig(max_batch=64), tokenizer=tokenizer).start()
    request = engine.generate(prompt_ids, SamplingParams(max_tokens=32))  # blocks until it finishes
    request = engine.submit(prompt_ids, params, on_event)  # on_event(Event), called on the engine's thread
    engine.stop(timeout=30)

Every request's memory is one fixed-size state, so the pool is `max_batch` states allocated once
(one `State` with batch `max_batch`, and one scratch row that no request owns); a request holds one
row ("slot") from admission to its end.
The scheduler runs on one thread (torch releases the GIL inside its kernels), in iterations:
1. Cancelled requests free their slots. Waiting requests are admitted into free slots, each
   starting from the longest cached prefix of its prompt (prefix_cache.py) or from the zero state.
2. Prefill, bounded: one chunkwise forward pass over the next piece (at most `prefill_chunk`
   positions) of the oldest prefilling requests, as many of them as fit in `prefill_tokens` padded
   positions (left padding, masked). A request whose prompt ends in this piece samples its first
   token from the last position's logits and starts decoding.
3. Decode: one batched `model.step` over the decoding rows alone, by slot index (as vLLM's state
   cache does), padded with inactive rows on the scratch row to a bucket: the smallest power of two
   at least the number of decoding requests. Each samples its next token with its own parameters
   and generator (a seeded request gets the same tokens whatever else is in the batch).
A long prompt is thus prefilled over several iterations while the decoding requests still get one
token per iteration: a prompt delays everybody's next token by at most one bounded prefill pass.

A request for prompt log-probabilities (`SamplingParams.prompt_logprobs`, the API's echo) skips the
prefix cache and is prefilled alone, with the logits of every position. Non-finite logits end the
requests whose rows hold them with finish reason "error" (the others go on), are counted, and
`health()` says whether the weights themselves are non-finite.
"""

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from ..decode import check_finite, step_runner
from ..model import XLSTM
from ..sampling import LogitsProcessor, SamplingParams
from ..state import State
from ..streaming import TextStreamer
from .config import EngineConfig
from .prefix_cache import PrefixCache, prefix_keys
from .request import EngineStopped, Event, Logprob, Overloaded, Request, check_prompt
from .scoring import sample_requests, score_prompt

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0
"""Generated tokens per second are reported over this trailing window."""


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
        self.pool = State.zeros(mc, N + 1, device=self.device, dtype=self.config.state_dtype).stored_as(self.config.state_dtype)
        self.scratch, self.slot_bytes = N, self.pool.nbytes // (N + 1)  # row N: the padding's, never a request's
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
        self.counts = {"requests": 0, "prompt_tokens": 0, "prefilled_tokens": 0, "generated_tokens": 0, "nonfinite": 0,
                       "finished": {r: 0 for r in ("stop", "length", "cancelled", "error")},
                       "decode_steps": {b: 0 for b in self.buckets},  # batched decode steps, by bucket size
                       "decode_rows": 0}  # the requests' rows among them (the rest: padding on the scratch row)
        self.nonfinite_error: str | None = None
        """Why the model last produced non-finite logits (None: it never did)."""
        self.weights_finite = True
        """False once non-finite logits were traced to non-finite weights: every request will fail."""

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
        for b in self.buckets:  # all rows inactive, on the scratch row: the state is left as it is
            self._runner(b)(torch.full((b,), self.model.config.pad_token_id, device=self.device),
                            torch.zeros(b, dtype=torch.bool, device=self.device),
                            torch.full((b,), self.scratch, device=self.device))

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None] | None = None) -> Request:
        """Queues a request for `prompt` (token ids); raises ValueError for a bad prompt or bad
        parameters, Overloaded when the queue is full, EngineStopped when shutting down."""
        prompt = check_prompt(prompt, self.config.max_prompt_tokens, self.model.config.vocab_size)
        self.check_params(params)
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

    def check_params(self, params: SamplingParams) -> None:
        """Raises a SamplingError (a ValueError) naming the parameter at fault and its valid range,
        or the limit of this engine it exceeds."""
        self.config.check_params(params, self.model.config.vocab_size, self.tokenizer is not None)

    def health(self) -> dict:
        """{"healthy", "nonfinite_logits" (requests ended by them), "error" (the last cause, or None)}:
        unhealthy when the weights are non-finite, as every request would then fail."""
        return {"healthy": self.weights_finite, "nonfinite_logits": self.counts["nonfinite"], "error": self.nonfinite_error}

    def stats(self) -> dict:
        """Counters and gauges (a snapshot) for monitoring."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= RATE_WINDOW_S]
        return {
            **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counts.items()},
            "waiting": len(self._waiting), "prefilling": len(self._prefilling), "decoding": len(self._decoding),
            "slots": self.config.max_batch, "slot_bytes": self.slot_bytes,
            "tokens_per_s": sum(n for _, n in recent) / RATE_WINDOW_S,
            "prefix_cache": self.cache.stats(),
        }

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
            request.scheduled_time = time.perf_counter()
            p = request.params
            if self.cache.enabled and p.prompt_logprobs is None:  # prompt logprobs need every position's logits
                request.keys = prefix_keys(request.prompt, self.piece, len(request.prompt))
            request.cursor, cached = self.cache.lookup(request.keys) if request.keys else (0, None)
            request.cached_tokens = request.cursor
            for n, layer in enumerate(self.pool):
                for j, t in enumerate(layer):
                    if cached is None:
                        t[slot].zero_()
                    else:
                        t[slot].copy_(cached[n][j][0])
            if p.seed is not None:
                request.generator = torch.Generator(device=self.device).manual_seed(p.seed)
            if p.processed:
                prompt = torch.tensor([request.prompt], device=self.device)
                request.processor = LogitsProcessor(p, self.model.config.vocab_size, prompt)
            if p.prompt_logprobs is not None:
                request.prompt_logprobs = [None]
            if self.tokenizer is not None:
                request.streamer = TextStreamer(self.tokenizer, stop=p.stop)
            self._prefilling.append(request)

    def _prefill_batch(self) -> tuple[list[Request], list[int]]:
        """The oldest prefilling requests that fit in one pass, and the length of each one's next
        piece; a request for prompt logprobs goes alone."""
        batch, lengths, width = [], [], 0
        for request in self._prefilling:
            alone = request.params.prompt_logprobs is not None
            if batch and alone:
                continue
            n = min(len(request.prompt) - request.cursor, self.piece)
            if batch and (len(batch) + 1) * max(width, n) > self.config.prefill_tokens:
                break
            batch.append(request)
            lengths.append(n)
            width = max(width, n)
            if alone:
                break
        return batch, lengths

    def _prefill_piece(self) -> None:
        """One chunkwise pass over the next piece of the oldest prefilling requests."""
        batch, lengths = self._prefill_batch()
        if not batch:
            return
        mc, width = self.model.config, max(lengths)
        ids = torch.full((len(batch), width), mc.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for b, (request, n) in enumerate(zip(batch, lengths)):  # left padding: every row ends at width - 1
            ids[b, width - n:] = torch.tensor(request.prompt[request.cursor:request.cursor + n])
            mask[b, width - n:] = True
        rows = torch.tensor([r.slot for r in batch], device=self.device)
        start = self.pool.select(rows).to(dtype=torch.float32)
        scored = batch[0].params.prompt_logprobs is not None
        logits, new = self.model(ids.to(self.device), start, mask=None if bool(mask.all()) else mask.to(self.device),
                                 last_logits_only=not scored)
        self.pool.index_copy_(rows, new)
        self.counts["prefilled_tokens"] += sum(lengths)
        if scored:
            score_prompt(batch[0], logits[0], ids[0].to(self.device))
        bad = self._nonfinite_rows(logits[:, -1], batch, "after the prompt")
        done = []
        for b, (request, n) in enumerate(zip(batch, lengths)):
            request.cursor += n
            if b in bad:
                continue
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
        requests = [batch[b] for b in done]
        first = sample_requests(logits[done, -1], requests)
        for request, (token, logprob) in zip(requests, first):
            self._prefilling.remove(request)
            self._decoding[request.slot] = request
            self._emit(request, token, logprob)

    def _decode_step(self) -> None:
        """One batched step over the decoding rows, by slot index, padded to the smallest bucket
        that holds them with inactive rows on the scratch row."""
        if not self._decoding:
            return
        requests = list(self._decoding.values())
        B = len(requests)
        bucket = next(b for b in self.buckets if b >= B)
        pad = bucket - B
        token, slots = torch.tensor([[r.last_token for r in requests] + [self.model.config.pad_token_id] * pad,
                                     [r.slot for r in requests] + [self.scratch] * pad]).to(self.device)  # one copy
        logits = self._runner(bucket)(token, torch.arange(bucket, device=self.device) < B, slots)[:B]
        self.counts["decode_steps"][bucket] += 1
        self.counts["decode_rows"] += B
        bad = self._nonfinite_rows(logits, requests, "while decoding")
        keep = [b for b in range(B) if b not in bad]
        if bad:
            requests, logits = [requests[b] for b in keep], logits[keep]
        if keep:
            for request, (t, logprob) in zip(requests, sample_requests(logits, requests)):
                self._emit(request, t, logprob)
        self._recent.append((time.perf_counter(), len(keep)))
        while self._recent and self._recent[0][0] < time.perf_counter() - RATE_WINDOW_S:
            self._recent.popleft()

    def _nonfinite_rows(self, logits: torch.Tensor, requests: list[Request], where: str) -> set[int]:
        """The rows of logits [B, V] holding NaN or inf; their requests end with an error."""
        finite = logits.isfinite().all(dim=-1).tolist()
        bad = {b for b, ok in enumerate(finite) if not ok}
        if bad and self.weights_finite:  # weights found non-finite stay so: no rescan of every weight per request
            try:
                check_finite(torch.tensor(True), self.model, where)
            except FloatingPointError as e:
                self.nonfinite_error = str(e)
            self.weights_finite = all(bool(p.isfinite().all()) for p in self.model.parameters())
        for b in bad:
            self.counts["nonfinite"] += 1
            log.error("request %d: %s", requests[b].id, self.nonfinite_error)
            self._finish(requests[b], "error", error=self.nonfinite_error)
        return bad

    def _runner(self, bucket: int):
        """The step of `bucket` tokens on the pool's rows that each call names by slot index."""
        if bucket not in self._runners:
            self._runners[bucket] = step_runner(self.model, self.pool, cuda_graph=self.use_graph,
                                                compile=self.config.compile, batch=bucket)
        return self._runners[bucket]

    def _emit(self, request: Request, token: int, logprob: Logprob | None) -> None:
        """Records a generated token, hands the news to the request, finishes it when it is done."""
        request.output_ids.append(token)
        request.last_token = token
        request.token_times.append(time.perf_counter())
        self.counts["generated_tokens"] += 1
        if logprob is not None:
            request.logprobs.append(logprob)
            request.cumulative_logprob += logprob.logprob
        p, streamer = request.params, request.streamer
        before = len(streamer.text) if streamer is not None else 0
        reason = None
        if (token == self.model.config.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif streamer is not None and streamer.put(torch.tensor([token])):
            reason = "stop"  # a stop string, at the start of what the streamer holds back
            if p.include_stop_str_in_output:
                streamer.text += next(s for s in p.stop if streamer.pending.startswith(s))
        if reason is None and len(request.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is not None and streamer is not None and not streamer.stopped:
            streamer.end()  # flushes the text held back
        text = streamer.text[before:] if streamer is not None else ""
        request.text += text
        lps = [] if logprob is None else [logprob]
        if reason is None:
            self._notify(request, Event([token], text, logprobs=lps))
        else:
            self._finish(request, reason, [token], text, logprobs=lps)

    def _finish(self, request: Request, reason: str, token_ids: list[int] = (), text: str = "", error: str | None = None,
                logprobs: list[Logprob] = ()) -> None:
        if request.slot is not None:
            if request in self._prefilling:
                self._prefilling.remove(request)
            self._decoding.pop(request.slot, None)
            heapq.heappush(self._free, request.slot)
            request.slot = None
        request.finish_reason, request.error = reason, error
        request.finish_time = time.perf_counter()
        request.generator = request.streamer = request.processor = request.carry = None
        self.counts["finished"][reason] += 1
        self._notify(request, Event(list(token_ids), text, reason, error, list(logprobs)))
        request.done.set()

    @staticmethod
    def _notify(request: Request, event: Event) -> None:
        if request.on_event is not None:
            try:
                request.on_event(event)
            except Exception:  # a listener's bug must not stop the engine
                log.exception("on_event of request %d failed", request.id)
