"""`xlstm7b serve` over HTTP, with the real `openai` client against a real uvicorn server on
127.0.0.1: greedy and seeded results == generate() alone under 64 concurrent requests, streamed and
not; chat, stop strings, usage and metrics; bad requests and API keys; memory flat under load. The
command in its own process: test_serve_cli.py; the rest of the OpenAI surface: test_serve_openai.py."""

import asyncio
import contextlib
import json
import random
import re
import socket
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai", reason="needs the test extra (openai)")
uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra (uvicorn, FastAPI)")
pytest.importorskip("fastapi", reason="needs the serve extra (uvicorn, FastAPI)")

from conftest import heap_bytes_in_use, random_model
from xlstm7b import ModelConfig, State, generate
from xlstm7b.serve import Engine, EngineConfig
from xlstm7b.serve.api import build_app
from xlstm7b.serve.chat import ChatTemplate

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "test-key"
MODEL = "toy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model, tokenizer, config: EngineConfig, api_key: str | None = KEY, **app_kw):
    """An in-process uvicorn server on 127.0.0.1 over an engine of `model`; yields an object with
    url, model, engine, tokenizer and client(api_key) (an openai.AsyncOpenAI)."""
    engine = Engine(model, config, tokenizer).start()
    port = free_port()
    app = build_app(engine, model_name=MODEL, api_key=api_key, **app_kw)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    try:
        yield type("Server", (), dict(url=url, model=model, engine=engine, tokenizer=tokenizer, app=app,
                                      client=lambda api_key=api_key: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key,
                                                                                        max_retries=0)))
    finally:
        uv.should_exit = True
        thread.join()
        engine.stop()


@pytest.fixture(scope="module")
def server(tokenizer):
    """An in-process server over a random debug-shape model (the test tokenizer's vocabulary, EOS 0), 16 slots."""
    config = ModelConfig.from_preset("debug").replace(vocab_size=tokenizer.get_vocab_size())
    one = State.zeros(config, 1).nbytes
    with serving(random_model(config, seed=1), tokenizer, EngineConfig(
            max_batch=16, max_prompt_tokens=2048, max_new_tokens=64, prefill_chunk=64, prefill_tokens=1024,
            prefix_cache_bytes=8 * one, state_dtype=torch.float32)) as s:  # float32, as generate() alone
        yield s


def alone(model, ids, max_tokens, **sampling) -> list[int]:
    out = generate(model, [ids], max_new_tokens=max_tokens, eos_token_id=model.config.eos_token_id, **sampling)
    return out.tokens[0, :int(out.lengths[0])].tolist()


async def complete(client, ids, max_tokens, stream, **kw) -> tuple[list[int], str, str, dict | None]:
    """token ids, text, finish reason and usage of one completion (a stream is checked on the way)."""
    extra = {"return_token_ids": True}
    if not stream:
        r = await client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, extra_body=extra, **kw)
        return r.choices[0].token_ids, r.choices[0].text, r.choices[0].finish_reason, r.usage.model_dump()
    chunks = [c async for c in await client.completions.create(
        model=MODEL, prompt=ids, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, extra_body=extra, **kw)]
    *body, last = chunks
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] is not None and reasons.count(None) == len(reasons) - 1, "one finish reason, in the last choice chunk"
    assert last.choices == []
    return [t for c in body for t in c.choices[0].token_ids], "".join(c.choices[0].text for c in body), reasons[-1], last.usage.model_dump()


def test_64_concurrent_greedy_requests_equal_generate_alone(server):
    rng = random.Random(0)
    lengths = [1, 2000, 2, 1999, 64, 65, 128, 129, 777, 1500] + [rng.randint(1, 300) for _ in range(54)]
    V = server.model.config.vocab_size
    prompts = [[rng.randrange(2, V) for _ in range(n)] for n in lengths]
    max_tokens = [rng.randint(1, 10) for _ in lengths]

    async def run():
        client = server.client()
        return await asyncio.gather(*(complete(client, p, n, stream=i % 2 == 1, temperature=0)
                                      for i, (p, n) in enumerate(zip(prompts, max_tokens))))

    results = asyncio.run(run())
    for i, (p, n, (ids, text, reason, usage)) in enumerate(zip(prompts, max_tokens, results)):
        expected = alone(server.model, p, n)
        assert ids == expected, f"request {i}: prompt of {len(p)} tokens, {'streamed' if i % 2 else 'not streamed'}"
        assert reason == ("stop" if expected[-1] == 0 else "length")
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(p), len(ids))
    assert server.engine.stats()["decoding"] == 0


def test_seeded_sampling_is_reproducible_whatever_the_batch(server):
    ids, sampling = list(range(5, 90)), dict(temperature=1.0, top_p=0.9, seed=1234)

    async def run():
        client = server.client()
        single = await complete(client, ids, 20, stream=False, **sampling)
        others = [complete(client, [7 + k] * (k + 1), 20, stream=k % 2 == 0, temperature=1.0) for k in range(8)]
        crowded = await asyncio.gather(complete(client, ids, 20, stream=True, **sampling), *others)
        return single, crowded[0]

    single, crowded = asyncio.run(run())
    assert single[0] == crowded[0] == alone(server.model, ids, 20, temperature=1.0, top_p=0.9, seed=1234)


def test_chat_text_stop_strings_and_usage(server):
    async def run():
        client = server.client()
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
            max_tokens=12, temperature=0)
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=12, temperature=0, stream=True)]
        full = await client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
        return chat, chunks, full

    chat, chunks, full = asyncio.run(run())
    text = ChatTemplate().render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    assert text == "System: be brief\n\nUser: hello there\n\nAssistant:"
    assert chat.usage.prompt_tokens == 1 + len(server.tokenizer.encode(text).ids)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 12
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")
    full_text = full.choices[0].text
    stop = next(full_text[i:i + 2] for i in range(3, len(full_text) - 2) if "\ufffd" not in full_text[i:i + 2])

    async def stopped():
        return await server.client().completions.create(model=MODEL, prompt="the quick brown", max_tokens=30, temperature=0,
                                                       stop=[stop], extra_body={"ignore_eos": True})

    cut = asyncio.run(stopped()).choices[0]
    assert (cut.text, cut.finish_reason) == (full_text[:full_text.index(stop)], "stop")


def post(server, path, body, key=KEY):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers | {"Content-Type": "application/json"}, timeout=30)


GOOD = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}
BAD = {  # id: (endpoint, body, status, words in the message)
    "malformed_json": ("/v1/completions", b'{"model": "toy", "prompt": ', 400, "not valid JSON"),
    "max_tokens_str": ("/v1/completions", GOOD | {"max_tokens": "2"}, 400, "max_tokens"),
    "max_tokens_neg": ("/v1/completions", GOOD | {"max_tokens": -1}, 400, "max_tokens"),
    "max_tokens_huge": ("/v1/completions", GOOD | {"max_tokens": 10**9}, 400, "max_tokens must be an integer in [1, 64] (this server's limit, --max-tokens)"),
    "temperature_neg": ("/v1/completions", GOOD | {"temperature": -0.1}, 400, "temperature"),
    "top_p_0": ("/v1/completions", GOOD | {"top_p": 0}, 400, "top_p must be a number in (0, 1]"),
    "top_p_big": ("/v1/completions", GOOD | {"top_p": 1.5}, 400, "top_p"),
    "prompt_too_long": ("/v1/completions", GOOD | {"prompt": [5] * 2049}, 400, "limit of 2048"),
    "empty_text": ("/v1/completions", GOOD | {"prompt": ""}, 400, "empty"),
    "empty_ids": ("/v1/completions", GOOD | {"prompt": []}, 400, "empty"),
    "id_outside_vocab": ("/v1/completions", GOOD | {"prompt": [5, 10_000]}, 400, "outside the vocabulary"),
    "negative_id": ("/v1/completions", GOOD | {"prompt": [-3]}, 400, "outside the vocabulary"),
    "negative_id_echoed": ("/v1/completions", GOOD | {"prompt": [[5], [6, -3]], "echo": True}, 400, "outside the vocabulary"),
    "n_above_max": ("/v1/completions", GOOD | {"n": 17}, 400, "--max-n"),
    "best_of_below_n": ("/v1/completions", GOOD | {"n": 2, "best_of": 1}, 400, "best_of must be >= n"),
    "best_of_streamed": ("/v1/completions", GOOD | {"n": 1, "best_of": 2, "stream": True}, 400, "best_of must equal n"),
    "unknown_field": ("/v1/completions", GOOD | {"frobnicate": 1}, 400, "frobnicate: unknown field"),
    "unknown_message_field": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x", "name": "a"}]},
                              400, "messages.0.name: unknown field"),
    "json_mode": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                           "response_format": {"type": "json_object"}}, 400, "response_format"),
    "tools": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                       "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    "top_logprobs_alone": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                    "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    "continue_without_assistant": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                            "continue_final_message": True, "add_generation_prompt": False},
                                   400, "continue_final_message"),
    "suffix": ("/v1/completions", GOOD | {"suffix": "def"}, 400, "suffix"),
    "logprobs_above_20": ("/v1/completions", GOOD | {"logprobs": 21}, 400, "logprobs must be an integer in [0, 20]"),
    "top_k_below_minus_1": ("/v1/completions", GOOD | {"top_k": -2}, 400, "top_k must be an integer >= 1, or 0 or -1"),
    "seed_over_64_bits": ("/v1/completions", GOOD | {"seed": 2**64}, 400, "seed"),
    "max_tokens_0_without_echo": ("/v1/completions", GOOD | {"max_tokens": 0}, 400, "max_tokens must be an integer in [1, 64]"),
    "penalty_out_of_range": ("/v1/completions", GOOD | {"presence_penalty": 2.5}, 400, "presence_penalty must be a number in [-2, 2]"),
    "logit_bias_key": ("/v1/completions", GOOD | {"logit_bias": {"x": 1.0}}, 400, "logit_bias must map token ids"),
    "logit_bias_digit_key": ("/v1/completions", GOOD | {"logit_bias": {"\u00b2": 1.0}}, 400, "logit_bias must map token ids"),
    "logit_bias_id": ("/v1/completions", GOOD | {"logit_bias": {"99999": 1.0}}, 400, "logit_bias must be keyed by token ids"),
    "lone_surrogate": ("/v1/completions", b'{"model": "toy", "prompt": "ab\\ud800c", "max_tokens": 2}', 400, "lone surrogate"),
    "lone_surrogate_chat": ("/v1/chat/completions", b'{"model": "toy", "messages": [{"role": "user", "content": "\\udc00"}]}',
                            400, "lone surrogate"),
    "stop_flood": ("/v1/completions", GOOD | {"stop": [f"s{i}" for i in range(65)]}, 400, "--max-stop-strings"),
    "stop_too_long": ("/v1/completions", GOOD | {"stop": ["x" * 513]}, 400, "--max-stop-chars"),
    "too_many_prompts": ("/v1/completions", GOOD | {"prompt": [[5]] * 65}, 400, "--max-prompts"),
    "stop_type": ("/v1/completions", GOOD | {"stop": 5}, 400, "stop"),
    "unknown_model": ("/v1/completions", GOOD | {"model": "gpt-4"}, 404, "does not exist"),
    "no_messages": ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    "bad_role": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, case):
    path, body, status, words = BAD[case]
    r = post(server, path, body)
    assert r.status_code == status
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert post(server, "/v1/completions", GOOD).status_code == 200


def test_null_fields_take_their_defaults(server):
    """OpenAI's fields are nullable (null: the default), and clients send them so."""
    nulls = dict.fromkeys(["temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "n", "stream",
                           "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                           "ignore_eos", "include_stop_str_in_output", "return_token_ids", "user"])
    r = post(server, "/v1/completions", GOOD | nulls | {"echo": None, "logprobs": None, "best_of": None, "suffix": None})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = post(server, "/v1/chat/completions", chat | nulls | {"logprobs": None, "top_logprobs": None, "response_format": None,
                                                              "tools": None, "max_completion_tokens": None})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text
    r = post(server, "/v1/completions", GOOD | {"prompt": None})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]


def test_api_key(server):
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", GOOD, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401

    async def models(api_key):
        return await server.client(api_key).models.list()

    with pytest.raises(openai.AuthenticationError):
        asyncio.run(models("wrong"))
    models = asyncio.run(models(KEY))
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value}, without the model_name label every metric has."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert f'model_name="{MODEL}"' in name, name
            values[re.sub(f',?model_name="{MODEL}"', "", name).replace("{,", "{").replace("{}", "")] = float(value)
    return values


def test_metrics(server):
    before = metric_values(httpx.get(server.url + "/metrics").text)
    post(server, "/v1/completions", GOOD | {"prompt": list(range(2, 140)), "ignore_eos": True})
    post(server, "/v1/completions", GOOD | {"prompt": list(range(2, 150)), "max_tokens": 5, "ignore_eos": True})  # a prefix cache hit (128 tokens)
    values = metric_values(httpx.get(server.url + "/metrics").text)
    for name in ("xlstm7b_queue_length", "xlstm7b_active_slots", "xlstm7b_generation_tokens_per_second",
                 "xlstm7b_prefix_cache_hit_rate", 'xlstm7b_requests_finished_total{reason="length"}', "xlstm7b_nonfinite_logits_total"):
        assert name in values, name
    assert values["xlstm7b_slots"] == 16
    assert values["xlstm7b_prefix_cache_hits_total"] >= 1 and values["xlstm7b_prefix_cache_saved_tokens_total"] >= 128
    for name in ("time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_seconds", "request_prompt_tokens", "request_generation_tokens"):
        name = f"xlstm7b_{name}_count"
        assert values[name] - before.get(name, 0) == 2, name
    # prompts of 138 and 148 tokens, 2 and 5 tokens generated: 1 + 4 gaps between tokens
    assert values["xlstm7b_request_prompt_tokens_sum"] - before.get("xlstm7b_request_prompt_tokens_sum", 0) == 138 + 148
    assert values["xlstm7b_request_generation_tokens_sum"] - before.get("xlstm7b_request_generation_tokens_sum", 0) == 2 + 5
    assert values["xlstm7b_inter_token_latency_seconds_count"] - before.get("xlstm7b_inter_token_latency_seconds_count", 0) == 5
    assert values['xlstm7b_request_prompt_tokens_bucket{le="200.0"}'] - before.get('xlstm7b_request_prompt_tokens_bucket{le="200.0"}', 0) == 2
    # one request at a time: every decode step is a bucket of 1 and decodes its request (the first
    # token comes from the prefill): 1 + 4 steps
    steps = {name: value - before.get(name, 0) for name, value in values.items() if name.startswith("xlstm7b_decode_steps_total")}
    assert steps.pop('xlstm7b_decode_steps_total{bucket="1"}') == 5 and set(steps.values()) == {0}, steps
    assert values["xlstm7b_decode_rows_total"] - before.get("xlstm7b_decode_rows_total", 0) == 5


def test_memory_flat_under_load(server):
    rng = random.Random(1)

    async def wave():
        client = server.client()
        await asyncio.gather(*(complete(client, [rng.randrange(2, 300) for _ in range(rng.randint(1, 200))], 8,
                                        stream=k % 2 == 0, temperature=1.0) for k in range(16)))

    heap = []
    for _ in range(6):
        asyncio.run(wave())
        heap.append(heap_bytes_in_use())
    assert len(server.engine.cache) <= 8
    growth = max(heap[2:]) - heap[1]
    assert growth < 4 * 2**20, f"heap grew by {growth / 2**20:.1f} MiB over 4 waves of 16 requests: {heap}"


def test_chat_template_from_the_checkpoint(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": {"content": "<s>"}}))
    chat = ChatTemplate.from_checkpoint(tmp_path)
    # the template's leading bos_token is left to the server, which puts the BOS id first
    assert chat.render([{"role": "user", "content": "hi"}]) == "<|user|>hi<|assistant|>" and chat.stop == ()
    plain = ChatTemplate.from_checkpoint(tmp_path / "none")
    assert plain.render([{"role": "user", "content": "hi"}]) == "User: hi\n\nAssistant:" and plain.stop == ("\nUser:",)


def test_stop_token_ids_are_kept_once_each():
    """Each generated token is looked up in them: a body repeating one id cannot make that slow."""
    from xlstm7b.serve.protocol import CompletionBody

    body = CompletionBody(model=MODEL, prompt="x", stop_token_ids=[3, 5] * 50_000 + [4])
    assert body.sampling(4).stop_token_ids == (3, 5, 4)

