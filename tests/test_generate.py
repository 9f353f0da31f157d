"""generate(): greedy == teacher-forced argmax, ragged batch == each row alone, EOS, seeded sampling,
final state == one forward over the whole text, constant decoding memory, streaming and the CLI."""

import importlib
import io
import warnings

import pytest
import torch

from xlstm7b import XLSTM, ModelConfig, State, from_pretrained, generate
from conftest import assert_states_close, decoding_heap_growth, heap_bytes_in_use, prompt, random_model
from xlstm7b.cli import generate_main
from xlstm7b.decode import CompiledStep, decoding_state, step_compilations, step_runner
from xlstm7b.sampling import sample
from xlstm7b.streaming import TextStreamer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> XLSTM:
    return random_model(ModelConfig.from_preset("debug"))  # D 64, 2 blocks, V 512, chunk 16


def forward_state(model: XLSTM, ids: list[int]) -> tuple[torch.Tensor, State]:
    with torch.no_grad():
        return model(torch.tensor([ids]))


@pytest.mark.parametrize("n", [1, 7, 40], ids=lambda n: f"prompt{n}")
def test_greedy_equals_teacher_forced_argmax_and_state(model, n):
    ids = prompt(n, seed=n)
    tokens, state = generate(model, torch.tensor([ids]), max_new_tokens=12)
    assert tokens.shape == (1, 12) and tokens.dtype == torch.long
    logits, full_state = forward_state(model, ids + tokens[0].tolist())
    assert torch.equal(logits[0, n - 1 : -1].argmax(-1), tokens[0])  # each step's argmax, teacher forced
    assert_states_close(state, full_state)  # prefill + decoding == one forward over the whole text


def test_prefill_in_pieces_equals_one_pass(model):
    ids = torch.tensor([prompt(45, seed=1)])
    one = generate(model, ids, max_new_tokens=6)
    pieces = generate(model, ids, max_new_tokens=6, prefill_chunk_size=16)
    assert torch.equal(one.tokens, pieces.tokens)
    assert_states_close(pieces.state, one.state, 1e-5)


def test_ragged_batch_equals_each_row_alone(model):
    prompts = [prompt(5, 2), prompt(1, 3), prompt(23, 4), []]
    batch = generate(model, prompts, max_new_tokens=10)
    for b, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=10)
        assert torch.equal(batch.tokens[b], alone.tokens[0]), f"row {b}"
        assert_states_close(batch.state.select([b]), alone.state)
    assert batch.lengths.tolist() == [10] * 4


def test_eos_per_row(model):
    prompts = [prompt(6, 5), prompt(17, 6)]
    free = generate(model, prompts, max_new_tokens=10)
    eos = int(free.tokens[0, 3])  # row 0 produces it at step 3; row 1 later or never
    out = generate(model, prompts, max_new_tokens=10, eos_token_id=eos)
    pad = model.config.pad_token_id
    for b, p in enumerate(prompts):
        hits = (free.tokens[b] == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 10
        assert int(out.lengths[b]) == n
        assert torch.equal(out.tokens[b, :n], free.tokens[b, :n])
        assert (out.tokens[b, n:] == pad).all()
        alone = generate(model, [p], max_new_tokens=10, eos_token_id=eos)
        assert torch.equal(alone.tokens[0], out.tokens[b])
        # A finished row's state stops at its EOS: the padding after it never touches the state.
        assert_states_close(out.state.select([b]), forward_state(model, p + out.tokens[b, :n].tolist())[1])
    assert int(out.lengths[0]) == 4


def test_stops_when_every_row_finished(model):
    ids = torch.tensor([prompt(4, 7)])
    first = int(generate(model, ids, max_new_tokens=1).tokens[0, 0])
    out = generate(model, ids, max_new_tokens=50, eos_token_id=first)
    assert out.lengths.tolist() == [1] and (out.tokens[0, 1:] == model.config.pad_token_id).all()


def test_continue_from_state(model):
    a, b = prompt(9, 8), prompt(4, 9)
    first = generate(model, [a], max_new_tokens=5)
    kept = first.state.clone()
    second = generate(model, [b], max_new_tokens=6, state=first.state)
    assert_states_close(first.state, kept, 0.0)  # the given state is not modified
    whole = generate(model, [a + first.tokens[0].tolist() + b], max_new_tokens=6)
    assert torch.equal(second.tokens, whole.tokens)
    assert_states_close(second.state, whole.state)


def test_sampling_reproducible_by_seed(model):
    ids = [prompt(5, 10), prompt(8, 11)]
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    a = generate(model, ids, seed=123, **kw).tokens
    assert torch.equal(a, generate(model, ids, seed=123, **kw).tokens)
    assert not torch.equal(a, generate(model, ids, seed=124, **kw).tokens)
    greedy = generate(model, ids, max_new_tokens=16).tokens
    assert torch.equal(greedy, generate(model, ids, max_new_tokens=16, temperature=0.7, top_k=1, seed=0).tokens)
    assert torch.equal(greedy, generate(model, ids, max_new_tokens=16, temperature=0.7, top_p=1e-6, seed=0).tokens)


def test_sample_filters():
    # probabilities 0.5, 0.3, 0.15, 0.05 over four tokens, 4000 draws at once
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, temperature=1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, temperature=1.0, top_p=0.75, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, temperature=1.0, top_p=0.5, generator=g).tolist()) == {0}
    draws = sample(logits, temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert torch.equal(sample(logits[:3]), torch.zeros(3, dtype=torch.long))


def test_empty_prompt_starts_from_bos(model):
    bos = [model.config.bos_token_id]
    expected = generate(model, [bos], max_new_tokens=5).tokens
    assert torch.equal(generate(model, [[]], max_new_tokens=5).tokens, expected)
    assert torch.equal(generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=5).tokens, expected)


def test_zero_new_tokens_runs_the_prompt_only(model):
    ids = prompt(11, 12)
    out = generate(model, [ids], max_new_tokens=0)
    assert out.tokens.shape == (1, 0) and out.lengths.tolist() == [0]
    assert_states_close(out.state, forward_state(model, ids)[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=[[3, 512]]), "outside the vocabulary"),
        (dict(input_ids=[[-1, 3]]), "outside the vocabulary"),
        (dict(input_ids=[]), "empty list"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_k=-2), "top_k"),
        (dict(eos_token_id=512), "eos_token_id"),
        (dict(state="zeros2"), "batch size 1"),
        (dict(cuda_graph=True), "CUDA device"),
        (dict(state_dtype=torch.float16), "state_dtype"),
        (dict(state_dtype=torch.bfloat16, draft="self"), "float32 states"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_input_errors(model, kwargs, match):
    if kwargs.get("state") == "zeros2":
        kwargs["state"] = State.zeros(model.config, 2)
    if kwargs.get("draft") == "self":
        kwargs["draft"] = model
    args = dict(input_ids=[[3, 4]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, args.pop("input_ids"), **args)


def test_bfloat16_state(model):
    """C and n decode in bfloat16, m in float32; the prompt runs in float32, so the first token is
    float32's; random weights' near-tied logits let later greedy tokens differ (a broken state
    would agree on about 1 token in 512); the returned state continues."""
    ids = prompt(30, seed=1)
    exact = generate(model, [ids], max_new_tokens=24)
    out = generate(model, [ids], max_new_tokens=24, state_dtype=torch.bfloat16)
    assert [(C.dtype, n.dtype, m.dtype) for C, n, m in out.state] == [(torch.bfloat16, torch.bfloat16, torch.float32)] * 2
    assert out.state.nbytes < 0.51 * exact.state.nbytes
    assert out.tokens[0, 0] == exact.tokens[0, 0]
    assert (out.tokens == exact.tokens).float().mean() > 0.5
    before = out.state.clone()
    more = generate(model, out.tokens[:, -1:], max_new_tokens=4, state=out.state, state_dtype=torch.bfloat16)
    assert more.state[0][0].dtype == torch.bfloat16 and more.tokens.shape == (1, 4)
    assert all(torch.equal(a, b) for x, y in zip(out.state, before) for a, b in zip(x, y))  # not modified


def test_float_ids_are_rejected(model):
    for ids in ([[1.5, 2.0]], torch.tensor([[1.0, 2.0]])):
        with pytest.raises(TypeError, match="integer token ids"):
            generate(model, ids, max_new_tokens=1)


def test_streamer_protocol(model):
    ids = [prompt(3, 13), prompt(6, 14)]
    seen = []
    out = generate(model, ids, max_new_tokens=7, streamer=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out.tokens)

    class StopAfterThree:
        def __init__(self):
            self.steps, self.ended = 0, False

        def put(self, tokens):
            assert tokens.shape == (2,) and tokens.device.type == "cpu"
            self.steps += 1
            return self.steps == 3

        def end(self):
            self.ended = True

    s = StopAfterThree()
    stopped = generate(model, ids, max_new_tokens=7, streamer=s)
    assert s.ended and stopped.lengths.tolist() == [3, 3]
    assert torch.equal(stopped.tokens[:, :3], out.tokens[:, :3])
    assert (stopped.tokens[:, 3:] == model.config.pad_token_id).all()
    assert_states_close(stopped.state.select([0]), forward_state(model, ids[0] + out.tokens[0, :3].tolist())[1])


def test_decoding_memory_constant_in_generated_tokens():
    # A tiny model (1 block, D 32, V 64) so that 11k decoding steps take a few seconds on CPU.
    model = random_model(ModelConfig(embedding_dim=32, num_blocks=1, num_heads=2, vocab_size=64, chunk_size=16))
    heap_bytes_in_use()  # skips early where it cannot measure
    small, large = decoding_heap_growth(model, 1_000), decoding_heap_growth(model, 10_000)
    assert large <= small + 64 * 1024, f"decoding memory grows with tokens: {small} B after 1k, {large} B after 10k"


def stream_text(tokenizer, text: str, stop=()) -> tuple[str, bool]:
    out = io.StringIO()
    s = TextStreamer(tokenizer, stop=stop, out=out)
    stopped = False
    for i in tokenizer.encode(text).ids:
        if s.put(torch.tensor([i])):
            stopped = True
            break
    s.end()
    assert out.getvalue() == s.text + "\n"
    return s.text, stopped


def test_text_streamer_multibyte_and_stop(tokenizer):
    text = "héllo wörld ✓ 日本 the fox"  # characters of 2-3 bytes split across byte-level tokens
    assert len(tokenizer.encode("日").ids) > 1
    assert stream_text(tokenizer, text) == (text, False)
    assert stream_text(tokenizer, "hello there stop here", stop=["stop"]) == ("hello there ", True)
    assert stream_text(tokenizer, "hello sto", stop=["stop"]) == ("hello sto", False)  # held back, then flushed
    assert stream_text(tokenizer, "日本 over", stop=["本 o", "lazy"]) == ("日", True)


def test_cli_streams_the_greedy_continuation(checkpoint_dir, tokenizer, capsys):
    from xlstm7b.cli import main

    assert main(["generate", "--checkpoint", str(checkpoint_dir), "--prompt", "hello", "--max-new-tokens", "12"]) == 0
    streamed = capsys.readouterr()
    model = from_pretrained(checkpoint_dir)
    ids = [0] + tokenizer.encode("hello").ids
    out = generate(model, [ids], max_new_tokens=12, eos_token_id=model.config.eos_token_id)
    assert streamed.out == tokenizer.decode(out.tokens[0, : int(out.lengths[0])].tolist()) + "\n"
    assert "tok/s" in streamed.err
    assert main(["generate", "--checkpoint", str(checkpoint_dir), "--prompt", "hello", "--max-new-tokens", "12", "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == streamed.out and "compiling the decode step" in compiled.err

    assert generate_main(["--checkpoint", str(checkpoint_dir), "--prompt", "", "--max-new-tokens", "5", "--no-stream",
                     "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert generate_main(["--checkpoint", str(checkpoint_dir), "--prompt", "", "--max-new-tokens", "5", "--stream",
                     "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


def test_cli_errors(checkpoint_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in checkpoint_dir.iterdir():
        if f.name != "tokenizer.json":
            (bare / f.name).write_bytes(f.read_bytes())
    assert generate_main(["--checkpoint", str(bare), "--prompt", "hi"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(bare), "--tokenizer", str(checkpoint_dir / "tokenizer.json"), "--prompt", "hi",
                     "--max-new-tokens", "-3"]) == 2
    assert "--max-new-tokens: must be an integer >= 0" in capsys.readouterr().err


def test_compiled_decoding_equals_eager():
    """compile=True gives eager decoding's tokens, lengths and states, and a compilation (weights
    frozen in) serves only its own model and version of the weights."""
    model = random_model(ModelConfig.from_preset("debug"), seed=5)
    prompts = [prompt(5, 17), prompt(30, 18), []]
    kw = dict(max_new_tokens=10)
    eager = generate(model, prompts, **kw)
    eos = int(eager.tokens[0, 2])
    for eos_token_id in (None, eos):  # without / with the per-row mask of finished rows
        a = generate(model, prompts, compile=True, eos_token_id=eos_token_id, **kw)
        b = generate(model, prompts, eos_token_id=eos_token_id, **kw)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        assert_states_close(a.state, b.state, 1e-5)
    assert int(a.lengths[0]) == 3
    compilations = step_compilations(model)
    assert len(compilations) == 1 and compilations[0].compile_seconds > 0 and compilations[0].error is None
    # Above GEMM_TEMPLATE_MAX_BATCH rows the compiled step keeps MKL's GEMMs: a second compilation.
    many = [prompt(3 + b, 40 + b) for b in range(CompiledStep.GEMM_TEMPLATE_MAX_BATCH + 1)]
    a, b = generate(model, many, compile=True, **kw), generate(model, many, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert_states_close(a.state, b.state, 1e-5)
    # Another model of the same shape is not served the first one's frozen weights ...
    other = random_model(ModelConfig.from_preset("debug"), seed=6)
    assert torch.equal(generate(other, prompts, compile=True, **kw).tokens, generate(other, prompts, **kw).tokens)
    # ... nor is the first model after an in-place update of its weights (an optimizer step).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    assert torch.equal(generate(model, prompts, compile=True, **kw).tokens, generate(model, prompts, **kw).tokens)


def test_failed_compilation_decodes_uncompiled():
    """A compilation that fails (here: no C++ compiler) warns once, in one line, and the step runs
    uncompiled, with eager decoding's tokens; later calls never try to compile it again."""
    model = random_model(ModelConfig(embedding_dim=32, num_heads=2, num_blocks=1, vocab_size=512), seed=3)
    prompts = [prompt(5 + b, 3) for b in range(CompiledStep.GEMM_TEMPLATE_MAX_BATCH + 1)]  # no GEMM autotuning
    eager = generate(model, prompts, max_new_tokens=4)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            failed = generate(model, prompts, max_new_tokens=4, compile=True)
            again = generate(model, prompts, max_new_tokens=4, compile=True)
        notices = [str(w.message) for w in caught if "compiling the decode step failed" in str(w.message)]
        assert len(notices) == 1 and "\n" not in notices[0], notices
        [compilation] = step_compilations(model)
        assert compilation.error is not None and compilation.compile_seconds is None
    assert torch.equal(failed.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    assert_states_close(failed.state, eager.state, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True, None], ids=["graph", "compiled-graph", "default"])
def test_cuda_graph_decoding_equals_eager(compile):
    """The step replayed from a CUDA graph (with compile=True, and by default: inductor's step,
    captured) gives the eager step's tokens and state (ragged prompts, EOS; a bfloat16 state too), a
    draft's steps too, and seeded sampling repeats."""
    cuda_model = random_model(ModelConfig.from_preset("debug")).cuda()
    prompts = [prompt(5, 15), prompt(30, 16), []]
    kw = dict(max_new_tokens=20, eos_token_id=7)
    graphed = generate(cuda_model, prompts, cuda_graph=True, compile=compile, **kw)
    eager = generate(cuda_model, prompts, cuda_graph=False, **kw)
    assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.lengths, eager.lengths)
    assert_states_close(graphed.state, eager.state, 1e-5 if compile is False else 1e-4)
    sampled = [generate(cuda_model, prompts, temperature=1.0, top_k=20, seed=5, compile=compile, **kw).tokens for _ in range(2)]
    assert torch.equal(*sampled)
    if compile is False:  # with a bfloat16 state too (the compiled step may round the bfloat16 update otherwise)
        half = [generate(cuda_model, prompts, cuda_graph=g, compile=False, state_dtype=torch.bfloat16, **kw) for g in (True, False)]
        assert torch.equal(half[0].tokens, half[1].tokens) and half[0].state[0][0].dtype == torch.bfloat16
    if compile:
        speculative = generate(cuda_model, prompts, compile=True, draft=cuda_model, speculate_k=3, **kw)
        assert torch.equal(speculative.tokens, eager.tokens)
        with pytest.raises(ValueError, match="leave cuda_graph on"):
            generate(cuda_model, prompts, compile=True, cuda_graph=False, **kw)


@pytest.mark.gpu
def test_graphed_step_without_a_mask_steps_every_row():
    """A CUDA-graph step called without `active` steps every row, also after a call that masked
    one (not the earlier call's mask, left in its buffer); slots are refused where the graph was
    built without them, and required where it was built with them."""
    model = random_model(ModelConfig.from_preset("debug")).cuda()
    graphed, eager = (decoding_state(None, model.config, 2, "cuda") for _ in range(2))
    token, first_only = torch.tensor([3, 4], device="cuda"), torch.tensor([True, False], device="cuda")
    with torch.no_grad():
        step = step_runner(model, graphed, cuda_graph=True, compile=False)
        step(token, first_only)
        model.step(token, eager, first_only)
        logits = step(token).clone()
        reference = model.step(token, eager)
    assert_states_close(graphed, eager, 1e-5)
    assert torch.allclose(logits, reference, atol=1e-4)
    with pytest.raises(ValueError, match="pass batch= to step_runner"):
        step(token, None, torch.tensor([0, 1], device="cuda"))
    pool = decoding_state(None, model.config, 3, "cuda")
    with torch.no_grad(), pytest.raises(ValueError, match="pass slots on every call"):
        step_runner(model, pool, cuda_graph=True, compile=False, batch=2)(token)


@pytest.mark.gpu
def test_cuda_graph_only_where_it_pays(monkeypatch):
    """By default a call for fewer than GRAPH_MIN_TOKENS tokens steps eagerly (a capture costs more)."""
    module = importlib.import_module("xlstm7b.generate")  # the package's `generate` is the function
    cuda_model = random_model(ModelConfig.from_preset("debug")).cuda()
    graphed = []
    real = module.step_runner
    monkeypatch.setattr(module, "step_runner", lambda *a, cuda_graph, **kw: graphed.append(cuda_graph) or real(*a, cuda_graph=cuda_graph, **kw))
    for n in (1, module.GRAPH_MIN_TOKENS - 1, module.GRAPH_MIN_TOKENS):
        generate(cuda_model, [prompt(5, 15)], max_new_tokens=n)
    assert graphed == [False, False, True]
