"""Speculative decoding: greedy == plain greedy for any draft and K, sampled tokens follow the target's
distribution exactly (a statistical test that wrong acceptance rules fail), states after rollback ==
one forward over the text, ragged batches, EOS, streaming, constant memory, the CLI flags."""

import copy

import pytest
import torch

from conftest import assert_states_close, decoding_heap_growth, heap_bytes_in_use, perturb, prompt, random_model
from xlstm7b import XLSTM, ModelConfig, State, generate
from xlstm7b import speculative
from xlstm7b.cli import generate_main
from xlstm7b.decode import batch_prompts
from xlstm7b.sampling import sample_from, sampling_probs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target() -> XLSTM:
    return random_model(ModelConfig.from_preset("debug"))  # D 64, 2 blocks, V 512, chunk 16


def noisy_copy(model: XLSTM, scale: float, seed: int) -> XLSTM:
    """A draft that agrees with the target often but not always: rows accept different counts."""
    return perturb(copy.deepcopy(model), scale, seed)


@pytest.fixture(scope="module")
def drafts(target) -> dict[str, XLSTM]:
    return {
        "unrelated": random_model(ModelConfig.from_preset("debug").replace(num_blocks=1, embedding_dim=32), seed=3),
        "noisy": noisy_copy(target, 0.02, seed=4),
        "perfect": target,
    }


def full_states(model: XLSTM, texts: list[list[int]]) -> list[State]:
    with torch.no_grad():
        return [model(torch.tensor([t]))[1] for t in texts]


@pytest.mark.parametrize("kind", ["unrelated", "noisy", "perfect"])
@pytest.mark.parametrize("k", [1, 2, 4, 7], ids=lambda k: f"K{k}")
def test_greedy_equals_plain_greedy_and_states(target, drafts, kind, k):
    draft = drafts[kind]
    prompts = [prompt(9, 1), prompt(22, 2)]
    plain = generate(target, prompts, max_new_tokens=19)
    spec = generate(target, prompts, max_new_tokens=19, draft=draft, speculate_k=k)
    assert torch.equal(spec.tokens, plain.tokens) and spec.lengths.tolist() == [19, 19]
    assert_states_close(spec.state, plain.state)
    texts = [p + spec.tokens[b].tolist() for b, p in enumerate(prompts)]
    for b, (t, d) in enumerate(zip(full_states(target, texts), full_states(draft, texts))):
        assert_states_close(spec.state.select([b]), t)  # after every rollback: a plain run over the text
        assert_states_close(spec.draft_state.select([b]), d)
    rate = spec.stats["acceptance_rate"]
    if kind == "perfect":
        assert rate == 1.0 and spec.stats["blocks"] == -(-19 // (k + 1))
    elif kind == "noisy" and k > 1:
        assert 0 < rate < 1  # partial acceptance: the rollback paths are exercised


def test_compiled_steps(target, drafts):
    prompts = [prompt(9, 1), prompt(22, 2)]
    plain = generate(target, prompts, max_new_tokens=15)
    spec = generate(target, prompts, max_new_tokens=15, draft=drafts["noisy"], speculate_k=3, compile=True)
    assert torch.equal(spec.tokens, plain.tokens) and 0 < spec.stats["acceptance_rate"] < 1
    assert_states_close(spec.state, plain.state)
    texts = [p + spec.tokens[b].tolist() for b, p in enumerate(prompts)]
    for b, d in enumerate(full_states(drafts["noisy"], texts)):  # the rollback from a compiled step's cell inputs
        assert_states_close(spec.draft_state.select([b]), d)


def test_ragged_batch_eos_and_continuation(target, drafts):
    draft = drafts["noisy"]
    prompts = [prompt(5, 5), prompt(1, 6), prompt(31, 7), []]
    free = generate(target, prompts, max_new_tokens=16)
    eos = int(free.tokens[0, 6])  # row 0 stops at step 6; the others later or never
    plain = generate(target, prompts, max_new_tokens=16, eos_token_id=eos)
    spec = generate(target, prompts, max_new_tokens=16, eos_token_id=eos, draft=draft, speculate_k=3)
    assert torch.equal(spec.tokens, plain.tokens) and torch.equal(spec.lengths, plain.lengths)
    assert int(spec.lengths[0]) == 7
    for b in range(len(prompts)):
        assert_states_close(spec.state.select([b]), plain.state.select([b]))
    # Continuing from both states == continuing plain decoding.
    more = [prompt(3, 8 + b) for b in range(len(prompts))]
    plain2 = generate(target, more, max_new_tokens=9, state=plain.state)
    spec2 = generate(target, more, max_new_tokens=9, state=spec.state, draft=draft, draft_state=spec.draft_state, speculate_k=4)
    assert torch.equal(spec2.tokens, plain2.tokens)
    # Without its state the draft starts empty: still exact, but it proposes worse.
    cold = generate(target, more, max_new_tokens=9, state=spec.state, draft=draft, speculate_k=4)
    assert torch.equal(cold.tokens, plain2.tokens)
    assert spec2.stats["accepted"] > cold.stats["accepted"]


def test_streamer_and_stop(target, drafts):
    ids = [prompt(8, 9)]
    seen = []
    out = generate(target, ids, max_new_tokens=12, draft=drafts["perfect"], speculate_k=4, streamer=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out.tokens)
    stop = generate(target, ids, max_new_tokens=12, draft=drafts["perfect"], speculate_k=4, streamer=lambda t: True)
    assert stop.lengths.tolist() == [1] and (stop.tokens[0, 1:] == target.config.pad_token_id).all()
    with torch.no_grad():
        _, whole = target(torch.tensor([ids[0] + out.tokens[0, :1].tolist()]))
    assert_states_close(stop.state, whole)


def test_zero_tokens_and_errors(target, drafts):
    ids = [prompt(6, 10)]
    out = generate(target, ids, max_new_tokens=0, draft=drafts["noisy"])
    assert out.tokens.shape == (1, 0)
    assert_states_close(out.state, full_states(target, ids)[0])
    other_vocab = random_model(ModelConfig.from_preset("debug").replace(vocab_size=256))
    with pytest.raises(ValueError, match="vocab_size"):
        generate(target, ids, max_new_tokens=2, draft=other_vocab)
    for k in (0, -1, 2.0):
        with pytest.raises(ValueError, match="speculate_k"):
            generate(target, ids, max_new_tokens=2, draft=drafts["noisy"], speculate_k=k)
    with pytest.raises(ValueError, match="draft_state"):
        generate(target, ids, max_new_tokens=2, draft_state=State.zeros(target.config, 1))


# --- Sampling: the tokens follow the target's distribution exactly --------------------------------

TINY = ModelConfig(embedding_dim=32, num_blocks=1, num_heads=2, vocab_size=16, chunk_size=8)
PROMPT = [3, 7, 2]


def exact_distributions(model, **sampling):
    """The target's joint distribution of the first two tokens [V, V] and marginal of the third [V]."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = sampling_probs(model(torch.tensor([PROMPT]))[0][0, -1], **sampling)
        x1 = torch.arange(V)[:, None]
        p2 = sampling_probs(model(torch.cat([torch.tensor([PROMPT] * V), x1], 1))[0][:, -1], **sampling)
        joint = p1[:, None] * p2  # [x1, x2]
        x12 = torch.cartesian_prod(torch.arange(V), torch.arange(V))
        p3 = sampling_probs(model(torch.cat([torch.tensor([PROMPT] * V * V), x12], 1))[0][:, -1], **sampling)
    return joint, (joint.reshape(-1, 1) * p3).sum(0)


def distance_from_target(target, draft, n=8000, **sampling) -> dict[str, tuple[float, float]]:
    """TV distances between n sampled rows and the exact distributions (of tokens 1, 2, 3 and of the
    pair 1-2), each with the bound a correct sampler stays under (3x the expected sampling noise)."""
    V = TINY.vocab_size
    out = generate(target, [PROMPT] * n, max_new_tokens=3, draft=draft, speculate_k=2, seed=0, **sampling)
    joint, third = exact_distributions(target, **sampling)
    exact = {"token1": joint.sum(1), "token2": joint.sum(0), "token3": third, "pair12": joint.reshape(-1)}
    t = out.tokens
    samples = {"token1": t[:, 0], "token2": t[:, 1], "token3": t[:, 2], "pair12": t[:, 0] * V + t[:, 1]}
    result = {}
    for name, p in exact.items():
        p = p.double()
        freq = torch.bincount(samples[name], minlength=p.numel()).double() / n
        bound = 3 * 0.5 * (2 * p * (1 - p) / (torch.pi * n)).sqrt().sum().item()  # E|freq - p| per cell
        result[name] = (0.5 * (freq - p).abs().sum().item(), bound)
    return result


def always_accept(p, q, drafted, generator):
    B, k1, V = p.shape
    return torch.full((B,), k1 - 1, dtype=torch.long), sample_from(p[:, -1], generator)


RIGHT_ACCEPT = speculative._accept


def resample_from_p(p, q, drafted, generator):
    """Right acceptance test, but a rejection draws from p instead of norm(max(0, p - q))."""
    accepted, _ = RIGHT_ACCEPT(p, q, drafted, generator)
    return accepted, sample_from(p.gather(1, accepted[:, None, None].expand(-1, 1, p.shape[2]))[:, 0], generator)


@pytest.fixture(scope="module")
def tiny_pair():
    return random_model(TINY, seed=11), random_model(TINY, seed=12)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=10, top_p=0.9)],
                         ids=["t1", "t0.8-topk-topp"])
def test_sampled_tokens_follow_the_target_distribution(tiny_pair, sampling, monkeypatch):
    target, draft = tiny_pair
    right = distance_from_target(target, draft, **sampling)
    assert all(tv < bound for tv, bound in right.values()), f"TV (bound) by statistic: {right}"
    # The test has power: wrong acceptance rules fail it.
    for wrong in (always_accept, resample_from_p):
        monkeypatch.setattr(speculative, "_accept", wrong)
        result = distance_from_target(target, draft, **sampling)
        assert any(tv > bound for tv, bound in result.values()), f"{wrong.__name__} was not detected: {result}"
        monkeypatch.undo()


def test_sampling_reproducible_and_perfect_draft_accepts_all(tiny_pair):
    target, draft = tiny_pair
    runs = [generate(target, [PROMPT] * 3, max_new_tokens=10, temperature=1.0, seed=7, draft=draft, speculate_k=3)
            for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    perfect = generate(target, [PROMPT] * 3, max_new_tokens=10, temperature=1.0, seed=7, draft=target, speculate_k=3)
    assert perfect.stats["acceptance_rate"] == 1.0


def test_memory_constant_in_generated_tokens():
    target = random_model(ModelConfig(embedding_dim=32, num_blocks=1, num_heads=2, vocab_size=64, chunk_size=16))
    draft = noisy_copy(target, 0.05, seed=1)
    heap_bytes_in_use()  # skips early where it cannot measure
    small, large = (decoding_heap_growth(target, n, draft=draft, speculate_k=4) for n in (300, 2000))
    assert large <= small + 64 * 1024, f"speculative decoding memory grows: {small} B after 300, {large} B after 2000"


def test_cli_draft_flags(checkpoint_dir, capsys):
    args = ["--checkpoint", str(checkpoint_dir), "--prompt", "hello", "--max-new-tokens", "12", "--no-stream"]
    assert generate_main(args) == 0
    plain = capsys.readouterr().out
    assert generate_main(args + ["--draft", str(checkpoint_dir), "--speculate-k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "acceptance" in out.err
    assert generate_main(args + ["--draft", str(checkpoint_dir), "--speculate-k", "0"]) == 2
    assert "--speculate-k: must be an integer >= 1" in capsys.readouterr().err


class EagerVerify:
    """VerifyGraph's interface on the CPU, counting its calls: the eager pass on the same buffers."""

    calls = 0

    def __init__(self, model, state, cells):
        self.run = lambda x, mask: model(x, state, mask=mask, cell_inputs=cells, check_ids=False)

    def __call__(self, x, mask):
        EagerVerify.calls += 1
        return self.run(x, mask)


def test_graphed_verification_where_blocks_are_full(target, drafts, monkeypatch):
    """With graphs, the verification pass goes through the captured pass (here its CPU stand-in) in
    every block of the full K and eagerly in a shorter last block, with plain greedy's tokens; the
    draft's steps run as captured steps do (always with the mask)."""
    monkeypatch.setattr(speculative, "VerifyGraph", EagerVerify)
    monkeypatch.setattr(speculative, "step_runner", lambda model, state, *, cuda_graph, compile, cell_inputs:
                        lambda token, active=None: model.step(token, state, active, cell_inputs))
    EagerVerify.calls = 0
    prompts = [prompt(5, 15), prompt(9, 16)]
    plain = generate(target, prompts, max_new_tokens=11)
    ids, mask = batch_prompts(prompts, target.config, "cpu")
    state, draft_state = (State.zeros(m.config, 2) for m in (target, drafts["perfect"]))
    with torch.no_grad():
        tokens, lengths, stats = speculative.speculative_decode(
            target, drafts["perfect"], ids, mask, state, draft_state, max_new_tokens=11, speculate_k=4, temperature=0.0,
            top_k=None, top_p=None, eos_token_id=None, generator=None, stream=None, prefill_chunk_size=64,
            use_graph=True, compile=False)
    assert torch.equal(tokens, plain.tokens)
    # The perfect draft commits 5 tokens per block: blocks of K = 4, 4, then 11 - 10 - 1 = 0 drafts.
    assert (stats["blocks"], EagerVerify.calls) == (3, 2)


@pytest.mark.gpu
def test_cuda_verify_graph_equals_the_eager_pass(target):
    """The captured verification pass gives the eager pass's logits, state and cell inputs, and
    leaves the state it starts from untouched."""
    model = copy.deepcopy(target).cuda()
    state = model(torch.tensor([prompt(7, 2)], device="cuda"))[1]
    before = state.clone()
    cells, eager_cells = model.cell_inputs_buffer(1, 5), model.cell_inputs_buffer(1, 5)
    x, mask = torch.tensor([prompt(5, 3)], device="cuda"), torch.tensor([[True] * 4 + [False]], device="cuda")
    with torch.no_grad():
        verify = speculative.VerifyGraph(model, state, cells)
        logits, verified = verify(x, mask)
        want, want_state = model(x, state, mask=mask, cell_inputs=eager_cells)
    assert torch.allclose(logits, want, atol=1e-5) and torch.allclose(cells, eager_cells, atol=1e-6)
    assert_states_close(verified, want_state, 1e-5)
    assert_states_close(state, before, 0.0)


@pytest.mark.gpu
def test_cuda_speculative_equals_plain():
    target = random_model(ModelConfig.from_preset("debug")).cuda()
    draft = noisy_copy(target, 0.02, seed=4)
    prompts = [prompt(5, 15), prompt(30, 16), []]
    kw = dict(max_new_tokens=20, eos_token_id=7)
    plain = generate(target, prompts, **kw)
    for graph in (True, False):
        spec = generate(target, prompts, draft=draft, speculate_k=4, cuda_graph=graph, **kw)
        assert torch.equal(spec.tokens, plain.tokens) and torch.equal(spec.lengths, plain.lengths)
        assert_states_close(spec.state, plain.state, 1e-4)
    sampled = [generate(target, prompts, temperature=1.0, top_k=20, seed=5, draft=draft, **kw).tokens for _ in range(2)]
    assert torch.equal(*sampled)
