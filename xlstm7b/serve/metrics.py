"""What the server reports about itself: Prometheus metrics at /metrics, labelled by model_name
(as vLLM's are), and one access-log line per request on the logger `xlstm7b.serve.access`.

Histograms, observed for each sequence that has ended when its HTTP request is answered (those the
shutdown cancelled included; one cancelled because its client went away is not): time to first
token, inter-token latency (between consecutive tokens of a request), time in the queue (arrival to
a slot), prefill time (slot to first token), decode time (first token to last), end-to-end latency,
and the prompt and generation lengths in tokens. Gauges and counters are read from the engine at
every scrape."""

import logging

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine import Engine
from .request import Request

access_log = logging.getLogger("xlstm7b.serve.access")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)
LENGTH_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))


class EngineCollector:
    """The engine's counters and gauges, read at every scrape."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.label = engine, model_name

    def family(self, kind, name: str, doc: str, value: float, labels: dict | None = None):
        labels = {"model_name": self.label} | (labels or {})
        metric = kind(f"xlstm7b_{name}", doc, labels=list(labels))
        metric.add_metric(list(labels.values()), value)
        return metric

    def collect(self):
        s = self.engine.stats()
        cache = s["prefix_cache"]
        gauges = {
            "queue_length": ("requests waiting for a state slot", s["waiting"]),
            "active_slots": ("state slots in use (prefilling or decoding)", s["prefilling"] + s["decoding"]),
            "prefilling_slots": ("requests being prefilled", s["prefilling"]),
            "decoding_slots": ("requests being decoded", s["decoding"]),
            "slots": ("state slots in the pool", s["slots"]),
            "slot_bytes": ("bytes of one state slot", s["slot_bytes"]),
            "generation_tokens_per_second": ("generated tokens per second over the last 10 s", s["tokens_per_s"]),
            "prefix_cache_bytes": ("bytes of prefix states cached", cache["bytes"]),
            "prefix_cache_entries": ("prefix states cached", cache["entries"]),
            "prefix_cache_hit_rate": ("prefix cache hits per lookup", cache["hit_rate"]),
        }
        for name, (doc, value) in gauges.items():
            yield self.family(GaugeMetricFamily, name, doc, value)
        counters = {
            "requests": ("requests accepted", s["requests"]),
            "prompt_tokens": ("prompt tokens accepted", s["prompt_tokens"]),
            "prefill_tokens": ("prompt tokens prefilled (those not served by the prefix cache)", s["prefilled_tokens"]),
            "generation_tokens": ("tokens generated", s["generated_tokens"]),
            "nonfinite_logits": ("requests ended by non-finite (NaN or inf) logits", s["nonfinite"]),
            "prefix_cache_lookups": ("prefix cache lookups (one per admitted request)", cache["lookups"]),
            "prefix_cache_hits": ("prefix cache hits", cache["hits"]),
            "prefix_cache_saved_tokens": ("prompt tokens not prefilled thanks to the prefix cache", cache["saved_tokens"]),
            "prefix_cache_evictions": ("prefix states evicted", cache["evictions"]),
            "decode_rows": ("rows of batched decode steps that decoded a request (the rest padded a bucket)", s["decode_rows"]),
        }
        for name, (doc, value) in counters.items():
            yield self.family(CounterMetricFamily, name, doc, value)
        finished = CounterMetricFamily("xlstm7b_requests_finished", "requests finished, by finish reason",
                                       labels=["model_name", "reason"])
        for reason, value in s["finished"].items():
            finished.add_metric([self.label, reason], value)
        yield finished
        # by bucket, so that a dashboard sees how much of each step was padding: rows stepped are
        # sum(bucket x steps), of which decode_rows decoded a request
        steps = CounterMetricFamily("xlstm7b_decode_steps", "batched decode steps, by bucket (rows stepped)",
                                    labels=["model_name", "bucket"])
        for bucket, value in s["decode_steps"].items():
            steps.add_metric([self.label, str(bucket)], value)
        yield steps


class Metrics:
    """The registry /metrics serves, and the per-request histograms."""

    def __init__(self, engine: Engine, model_name: str):
        self.registry, self.label = CollectorRegistry(), model_name
        self.registry.register(EngineCollector(engine, model_name))

        def histogram(name: str, doc: str, buckets):
            return Histogram(f"xlstm7b_{name}", doc, ["model_name"], buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "seconds from request to first token", LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "seconds between consecutive tokens of a request", TOKEN_LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "seconds a request waited for a state slot", LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "seconds from a slot to the first token", LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "seconds from the first token to the last", LATENCY_BUCKETS)
        self.e2e = histogram("request_seconds", "seconds from request to its end", LATENCY_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "prompt length in tokens", LENGTH_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens", "tokens generated per request", LENGTH_BUCKETS)

    def observe(self, request: Request) -> None:
        """Records a finished engine request."""
        times, end = request.token_times, request.finish_time or request.arrival
        self.e2e.observe(end - request.arrival)
        self.prompt_tokens.observe(len(request.prompt))
        self.generation_tokens.observe(len(request.output_ids))
        if request.scheduled_time is not None:
            self.queue.observe(request.scheduled_time - request.arrival)
        if times:
            self.ttft.observe(times[0] - request.arrival)
            if request.scheduled_time is not None:
                self.prefill.observe(times[0] - request.scheduled_time)
            self.decode.observe(times[-1] - times[0])
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)


def log_request(rid: str, endpoint: str, status: int, requests: list[Request], usage: dict, user: str | None = None) -> None:
    """One access-log line for an HTTP request served by the engine `requests` (its choices)."""
    first = [r.token_times[0] for r in requests if r.token_times]
    ends = [r.finish_time for r in requests if r.finish_time is not None]
    start = min((r.arrival for r in requests), default=0.0)
    ttft = f"{min(first) - start:.3f}s" if first else "-"
    total = f"{max(ends) - start:.3f}s" if ends else "-"
    reasons = ",".join(r.finish_reason or "running" for r in requests)
    access_log.info("%s %s status=%d prompt_tokens=%d output_tokens=%d ttft=%s total=%s finish=%s%s", rid, endpoint, status,
                    usage["prompt_tokens"], usage["completion_tokens"], ttft, total, reasons,
                    f" user={user[:64]!r}" if user else "")  # a client's string: bounded in the log
