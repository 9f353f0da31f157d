"""Serving: a continuous-batching engine over recurrent state slots (engine.py; its settings in
config.py, its requests and events in request.py, per-request sampling and log-probabilities in
scoring.py), its prefix state cache (prefix_cache.py), and an OpenAI-compatible HTTP API in front of
it (api.py, `xlstm7b serve`: request bodies in protocol.py, limits in limits.py, the generating
endpoints' work in handlers.py, one HTTP request's sequences in jobs.py, answers in responses.py,
metrics and the access log in metrics.py, the draining server in server.py). The engine needs only
torch; the API needs the `serve` extra (FastAPI, uvicorn, prometheus-client)."""

from ..sampling import SamplingParams
from .config import EngineConfig
from .engine import Engine
from .request import EngineStopped, Event, Logprob, Overloaded, Request
from .prefix_cache import PrefixCache

__all__ = ["Engine", "EngineConfig", "EngineStopped", "Event", "Logprob", "Overloaded", "PrefixCache", "Request", "SamplingParams"]
