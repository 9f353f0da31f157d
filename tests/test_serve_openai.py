"""The OpenAI surface of `xlstm7b serve` a vLLM user relies on, with the real `openai` client against
a real uvicorn server on 127.0.0.1: logprobs and echo (== the model's own log_softmax), n and best_of
(choice j == a single request with seed + j), lists of prompts, penalties, min_p and logit_bias
(== generate()), chat logprobs, include_stop_str_in_output, continue_final_message, /v1/models/{id},
non-finite logits, limits checked before work while other clients stay served, and the access log."""

import asyncio
import logging
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai", reason="needs the test extra (openai)")
pytest.importorskip("uvicorn", reason="needs the serve extra (uvicorn, FastAPI)")

from conftest import random_model
from test_serve import KEY, MODEL, alone, post, serving
from xlstm7b import ModelConfig, generate
from xlstm7b.serve import EngineConfig
from xlstm7b.serve.limits import Limits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tokenizer):
    config = ModelConfig.from_preset("debug").replace(vocab_size=tokenizer.get_vocab_size())
    limits = Limits(max_body_bytes=8 << 20, max_prompt_chars=20_000)
    with serving(random_model(config, seed=1), tokenizer, EngineConfig(max_batch=8, max_prompt_tokens=2048, max_new_tokens=64,
                                                                        prefill_chunk=32, state_dtype=torch.float32),  # as generate()
                 limits=limits) as s:
        yield s


def run(coro):
    return asyncio.run(coro)


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one full forward pass, in float64."""
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0][0].double().log_softmax(-1)
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_logprobs_equal_the_models_log_softmax(server):
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 1), on a prompt of 100 ids
    (4 prefill pieces: each piece's first token is scored by the previous piece's last position)."""
    ids = [(7 * i) % 300 + 2 for i in range(100)]
    r = run(server.client().completions.create(model=MODEL, prompt=ids, echo=True, logprobs=3, max_tokens=1, temperature=0))
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 101
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    generated = alone(server.model, ids, 1)[0]
    expected = forward_logprobs(server.model, ids + [generated])
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:], dtype=torch.float64), expected, atol=1e-4)
    text = server.tokenizer.decode(ids)
    assert r.choices[0].text.startswith(text)
    assert lp.tokens[:3] == [server.tokenizer.decode([t]) for t in ids[:3]] and lp.text_offset[:2] == [0, len(lp.tokens[0])]
    with torch.no_grad():
        logp = server.model(torch.tensor([ids]))[0][0].double().log_softmax(-1)
    for position in (5, 99):  # the 3 most likely tokens and the chosen one (keyed by text, as in OpenAI's format)
        top, best = lp.top_logprobs[position], logp[position - 1].topk(3)
        assert {server.tokenizer.decode([t]) for t in best.indices.tolist()} | {lp.tokens[position]} == set(top)
        assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
    # a text prompt: the BOS the server puts first is the first token, with no logprob
    r = run(server.client().completions.create(model=MODEL, prompt="hello world", echo=True, logprobs=0, max_tokens=2, temperature=0))
    lp, tokens = r.choices[0].logprobs, [0] + server.tokenizer.encode("hello world").ids
    assert r.choices[0].text.startswith("hello world") and lp.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:len(tokens)], dtype=torch.float64), forward_logprobs(server.model, tokens), atol=1e-4)


def test_echo_with_max_tokens_0_scores_the_prompt_alone(server):
    """OpenAI's and vLLM's way to score a text: echo, logprobs and max_tokens 0 give the prompt's
    tokens and log-probabilities, nothing generated (streamed too)."""
    ids = [(5 * i) % 200 + 2 for i in range(40)]
    r = run(server.client().completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=0,
                                               extra_body={"return_token_ids": True}))
    c, lp = r.choices[0], r.choices[0].logprobs
    assert c.text == server.tokenizer.decode(ids) and c.token_ids == [] and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:], dtype=torch.float64), forward_logprobs(server.model, ids), atol=1e-4)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)

    async def streamed(max_tokens):
        return [c async for c in await server.client().completions.create(
            model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"return_token_ids": True})]

    chunks = run(streamed(0))
    assert "".join(c.choices[0].text for c in chunks) == c.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert chunks[-1].choices[0].finish_reason is not None and [t for c in chunks for t in c.choices[0].token_ids] == []
    # with tokens generated, a stream's token_ids are those generated, as in the answer not streamed
    chunks = run(streamed(3))
    r = run(server.client().completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=3, temperature=0,
                                               extra_body={"return_token_ids": True}))
    assert [t for c in chunks for t in c.choices[0].token_ids] == r.choices[0].token_ids and len(r.choices[0].token_ids) > 0


def test_vllms_seed_conventions(server):
    """seed -1 is no seed (vLLM's convention); another negative seed is taken modulo 2**64."""
    ids = list(range(5, 30))
    assert single(server, -5, ids) == single(server, 2**64 - 5, ids)
    unseeded = {tuple(single(server, -1, ids)) for _ in range(3)}
    assert len(unseeded) > 1  # 8 tokens at temperature 1 from a random model: a repeat of all of them is unlikely


def single(server, seed: int, prompt, **kw) -> list[int]:
    r = run(server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=seed,
                                               extra_body={"return_token_ids": True, "ignore_eos": True}, **kw))
    return r.choices[0].token_ids


def test_n_with_a_seed_equals_single_requests_with_seed_plus_j(server):
    ids = list(range(5, 40))
    r = run(server.client().completions.create(model=MODEL, prompt=ids, n=4, max_tokens=8, temperature=1.0, seed=7,
                                               extra_body={"return_token_ids": True, "ignore_eos": True}))
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = [single(server, 7 + j, ids) for j in range(4)]
    assert [c.token_ids for c in r.choices] == singles and len({tuple(s) for s in singles}) == 4
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 32

    async def streamed():
        chunks = [c async for c in await server.client().completions.create(
            model=MODEL, prompt=ids, n=4, max_tokens=8, temperature=1.0, seed=7, stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True})]
        return [[t for c in chunks for t in (c.choices[0].token_ids or []) if c.choices[0].index == j] for j in range(4)]

    assert run(streamed()) == singles


def test_a_list_of_prompts_and_best_of(server):
    prompts = ["the quick brown", "hello world"]
    r = run(server.client().completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=8, temperature=1.0, seed=3,
                                               extra_body={"return_token_ids": True, "ignore_eos": True}))
    assert [c.token_ids for c in r.choices] == [single(server, 3 + j, p) for p in prompts for j in range(2)]
    # best_of 3, n 1: the candidate (seed + j) with the highest sum of log-probabilities
    r = run(server.client().completions.create(model=MODEL, prompt="a stop", best_of=3, max_tokens=8, temperature=1.0, seed=11,
                                               extra_body={"return_token_ids": True, "ignore_eos": True}))
    candidates = []
    for j in range(3):
        c = run(server.client().completions.create(model=MODEL, prompt="a stop", max_tokens=8, temperature=1.0, seed=11 + j, logprobs=0,
                                                   extra_body={"return_token_ids": True, "ignore_eos": True})).choices[0]
        candidates.append((sum(c.logprobs.token_logprobs), c.token_ids))
    assert len(r.choices) == 1 and r.choices[0].logprobs is None and r.choices[0].token_ids == max(candidates)[1]
    assert r.usage.completion_tokens == 24  # every candidate was generated


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.4, logit_bias={9: 4.0}),
    dict(temperature=0.9, min_p=0.05, top_k=0, repetition_penalty=0.8, seed=5),
    dict(temperature=0.7, top_k=20, top_p=0.9, presence_penalty=-1.0, logit_bias={3: -100.0}, seed=6),
], ids=["greedy_penalties_bias", "min_p_no_top_k", "top_k_top_p_ban"])
def test_penalties_min_p_and_logit_bias_equal_generate(server, sampling):
    ids = [2, 3, 4, 5, 3, 4, 5, 3, 4] * 3
    body = {k: v for k, v in sampling.items() if k not in ("top_k", "min_p", "repetition_penalty")}
    extra = {k: v for k, v in sampling.items() if k in ("top_k", "min_p", "repetition_penalty")}
    body["logit_bias"] = {str(t): b for t, b in body.get("logit_bias", {}).items()} or None
    r = run(server.client().completions.create(model=MODEL, prompt=ids, max_tokens=16, **body,
                                               extra_body=extra | {"return_token_ids": True, "ignore_eos": True}))
    expected = generate(server.model, [ids], max_new_tokens=16, **sampling).tokens[0].tolist()
    assert r.choices[0].token_ids == expected
    if "logit_bias" in sampling and sampling["logit_bias"].get(3) == -100.0:
        assert 3 not in expected


def test_chat_logprobs(server):
    messages = [{"role": "user", "content": "hello there"}]
    r = run(server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                                    top_logprobs=2, extra_body={"return_token_ids": True, "ignore_eos": True}))
    content, ids = r.choices[0].logprobs.content, r.choices[0].token_ids
    assert len(content) == len(ids) == 6
    prompt = [0] + server.tokenizer.encode("User: hello there\n\nAssistant:").ids
    expected = forward_logprobs(server.model, prompt + ids)[-6:]
    assert torch.allclose(torch.tensor([c.logprob for c in content], dtype=torch.float64), expected, atol=1e-4)
    for c, t in zip(content, ids):
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.token == server.tokenizer.decode([t]) and c.top_logprobs[0].token == c.token  # greedy: the top one
    plain = run(server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2))
    assert plain.choices[0].logprobs is None


def test_include_stop_str_in_output_and_continue_final_message(server):
    full = run(server.client().completions.create(model=MODEL, prompt="the quick brown", max_tokens=30, temperature=0,
                                                  extra_body={"ignore_eos": True})).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    kept = run(server.client().completions.create(model=MODEL, prompt="the quick brown", max_tokens=30, temperature=0, stop=[stop],
                                                  extra_body={"ignore_eos": True, "include_stop_str_in_output": True})).choices[0]
    assert (kept.text, kept.finish_reason) == (full[:full.index(stop)] + stop, "stop")
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the quick"}]
    r = run(server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                                    extra_body={"continue_final_message": True, "add_generation_prompt": False}))
    assert r.usage.prompt_tokens == 1 + len(server.tokenizer.encode("User: hello\n\nAssistant: the quick").ids)


def test_models_by_id(server):
    model = run(server.client().models.retrieve(MODEL))
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        run(server.client().models.retrieve("gpt-4"))


def test_the_access_log_has_one_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="xlstm7b.serve.access"):
        run(server.client().completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, n=2, temperature=0, user="alice",
                                               extra_body={"ignore_eos": True}))
        post(server, "/v1/completions", {"model": MODEL, "prompt": [5], "bogus": 1})
    lines = [r.getMessage() for r in caplog.records if r.name == "xlstm7b.serve.access"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("cmpl-") and "/v1/completions status=200 prompt_tokens=3 output_tokens=6" in lines[0]
    assert "ttft=" in lines[0] and "total=" in lines[0] and "finish=length,length" in lines[0] and "user='alice'" in lines[0]
    assert "status=400" in lines[1] and "bogus: unknown field" in lines[1]


def test_non_finite_logits_end_the_request_with_an_error_and_fail_health(tokenizer):
    config = ModelConfig.from_preset("debug").replace(vocab_size=tokenizer.get_vocab_size())
    model = random_model(config)
    with torch.no_grad():
        model.lm_head.weight[5].fill_(float("nan"))
    with serving(model, tokenizer, EngineConfig(max_batch=2, max_new_tokens=16)) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        with pytest.raises(openai.InternalServerError, match="non-finite logits.*lm_head.weight"):
            run(s.client().completions.create(model=MODEL, prompt="hello", max_tokens=4))

        async def streamed():
            return [c async for c in await s.client().completions.create(model=MODEL, prompt=[5, 6], max_tokens=4, stream=True)]

        with pytest.raises(openai.APIError, match="non-finite logits"):
            run(streamed())
        with httpx.stream("POST", s.url + "/v1/completions", json={"model": MODEL, "prompt": [5], "max_tokens": 4, "stream": True},
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy" and "lm_head.weight" in health.json()["error"]
        assert 'xlstm7b_nonfinite_logits_total{model_name="toy"} 3.0' in httpx.get(s.url + "/metrics").text


def test_oversized_requests_are_refused_before_work_while_others_are_served(server):
    """An 11 MB prompt (over the 8 MiB body limit; also sent chunked, without a Content-Length), a
    1 MB one (over the characters limit) and a flood of stop strings each get their 4xx within
    seconds, and a normal request meanwhile too."""
    abuse = {
        "body": ({"model": MODEL, "prompt": "x" * (11 << 20), "max_tokens": 4}, 413, "--max-body-mb"),
        "chars": ({"model": MODEL, "prompt": "the quick brown fox " * 50_000, "max_tokens": 4}, 400, "--max-prompt-chars"),
        "stops": ({"model": MODEL, "prompt": "a", "stop": ["ab"] * 100_000}, 400, "--max-stop-strings"),
    }
    results = {}

    def send(name, body):
        t0 = time.perf_counter()
        r = post(server, "/v1/completions", body)
        results[name] = (r, time.perf_counter() - t0)

    def chunked():  # no Content-Length: the limit applies as the bytes arrive
        yield b'{"model": "toy", "max_tokens": 4, "prompt": "'
        for _ in range(9):
            yield b"x" * (1 << 20)
        yield b'"}'

    def send_chunked():
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/completions", content=chunked(), timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        results["chunked"] = (r, time.perf_counter() - t0)

    abuse_chunked = {"chunked": (None, 413, "--max-body-mb")}
    threads = [threading.Thread(target=send, args=(name, body)) for name, (body, _, _) in abuse.items()]
    threads.append(threading.Thread(target=send_chunked))
    threads.append(threading.Thread(target=send, args=("normal", {"model": MODEL, "prompt": "hello", "max_tokens": 4})))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (_, status, flag) in (abuse | abuse_chunked).items():
        r, seconds = results[name]
        assert r.status_code == status and flag in r.json()["error"]["message"], (name, r.text[:300])
        assert seconds < 10, f"{name}: {seconds:.1f} s"
    r, seconds = results["normal"]
    assert r.status_code == 200 and seconds < 10, f"the normal request took {seconds:.1f} s"
