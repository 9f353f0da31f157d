"""SamplingParams and the logits processing shared by generate(), the serving engine and the CLI:
the penalties, min_p and logit_bias against their definitions (OpenAI's and vLLM's), greedy
generate() with them against a plain loop over full forward passes, and the checks."""

import math

import pytest
import torch

from conftest import prompt, random_model
from xlstm7b import ModelConfig, generate
from xlstm7b.sampling import LogitsProcessor, SamplingError, SamplingParams, sample, sampling_probs, sequence_seed

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(logits: list[float], params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    """vLLM's order, element by element: logit_bias, repetition (prompt + output), frequency and presence (output)."""
    out = []
    for token, x in enumerate(logits):
        x += (params.logit_bias or {}).get(token, 0.0)
        if token in prompt_ids or token in output_ids:
            x = x / params.repetition_penalty if x > 0 else x * params.repetition_penalty
        count = output_ids.count(token)
        x -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
        out.append(x)
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7, presence_penalty=0.5),
    SamplingParams(frequency_penalty=1.5, presence_penalty=-0.5, logit_bias={3: -100.0, 7: 2.5}),
], ids=["repetition", "repetition_below_1_presence", "frequency_presence_bias"])
def test_processor_equals_the_definitions(params):
    V, g = 12, torch.Generator().manual_seed(0)
    prompts = torch.tensor([[1, 2, 2, 5], [0, 9, 9, 9]])
    mask = torch.tensor([[True] * 4, [False, True, True, True]])  # row 1: one position of left padding
    processor = LogitsProcessor(params, V, prompts, mask)
    outputs = [[], []]
    for step in range(4):
        logits = torch.randn(2, V, generator=g) * 3
        got = processor(logits)
        for b in range(2):
            expected = reference(logits[b].tolist(), params, [t for t, m in zip(prompts[b].tolist(), mask[b]) if m], outputs[b])
            assert got[b].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6), (step, b)
        token = torch.tensor([step % V, 5 + step % 2])
        active = torch.tensor([True, step < 2])  # row 1 finished after two tokens: later ones not counted
        processor.update(token, active)
        for b in range(2):
            if active[b]:
                outputs[b].append(int(token[b]))


def test_min_p_keeps_the_tokens_within_a_factor_of_the_most_likely():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    kept = sampling_probs(probs.log(), temperature=1.0, min_p=0.15) > 0  # threshold 0.075
    assert kept.tolist() == [[True, True, True, False, False]]
    kept = sampling_probs(probs.log(), temperature=1.0, min_p=0.15, top_k=2) > 0
    assert kept.tolist() == [[True, True, False, False, False]]


def test_logit_bias_bans_and_forces_tokens_in_greedy_and_sampled_decoding():
    logits = torch.tensor([[5.0, 4.0, 0.0, -3.0]])
    banned = LogitsProcessor(SamplingParams(logit_bias={0: -100.0}), 4)(logits)
    assert sample(banned).item() == 1
    forced = LogitsProcessor(SamplingParams(logit_bias={3: 100.0}), 4)(logits)
    g = torch.Generator().manual_seed(0)
    assert {sample(forced, temperature=1.0, generator=g).item() for _ in range(50)} == {3}


def test_greedy_generate_with_penalties_equals_a_loop_over_full_forward_passes():
    model = random_model(ModelConfig.from_preset("debug"))
    ids = prompt(20, seed=3)
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3, logit_bias={7: 3.0})
    out = generate(model, [ids], max_new_tokens=12, repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3,
                   logit_bias={7: 3.0}).tokens[0].tolist()
    plain = generate(model, [ids], max_new_tokens=12).tokens[0].tolist()
    text = list(ids)
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([text]))[0][0, -1].tolist()
            processed = reference(logits, params, ids, text[len(ids):])
            text.append(max(range(len(processed)), key=processed.__getitem__))
    assert out == text[len(ids):] and out != plain


@pytest.mark.parametrize("field, value, words", [
    ("temperature", math.nan, "temperature must be a finite number >= 0"),
    ("top_k", -2, "top_k must be an integer >= 1, or 0 or -1 for no limit"),
    ("top_p", 0.0, "top_p must be a number in (0, 1]"),
    ("min_p", 1.5, "min_p must be a number in [0, 1]"),
    ("presence_penalty", 2.5, "presence_penalty must be a number in [-2, 2]"),
    ("frequency_penalty", -3, "frequency_penalty must be a number in [-2, 2]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0"),
    ("logit_bias", {512: 1.0}, "logit_bias must be keyed by token ids in the vocabulary [0, 512)"),
    ("logit_bias", {5: 101.0}, "logit_bias must be valued in [-100, 100]"),
    ("seed", -1, "seed must be an integer in [0, 2**64)"),
    ("logprobs", 21, "logprobs must be an integer in [0, 20]"),
    ("stop", ("",), "stop must be a list of non-empty strings"),
    ("stop_token_ids", (512,), "stop_token_ids must be token ids in the vocabulary"),
])
def test_validate_names_the_field_and_its_range(field, value, words):
    with pytest.raises(SamplingError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("*", r"\*")) as e:
        SamplingParams(**{field: value}).validate(512)
    assert e.value.name == field


def test_off_values_and_the_seed_of_each_choice():
    SamplingParams(top_k=-1, top_p=1.0, temperature=0.0, min_p=0.2).validate(512)  # greedy with filters: allowed, as in vLLM
    for off in (-1, 0):  # vLLM's two spellings of no limit
        assert SamplingParams(top_k=off, top_p=1.0).draw_args() == {"temperature": 0.0, "top_k": None, "top_p": None, "min_p": 0.0}
    assert [sequence_seed(5, j) for j in range(3)] == [5, 6, 7] and sequence_seed(None, 2) is None
    assert sequence_seed(2**64 - 1, 1) == 0


def test_the_generate_command_passes_the_penalties_and_min_p(checkpoint_dir, tokenizer, capsys):
    from xlstm7b import from_pretrained
    from xlstm7b.cli import generate_main

    # Values under which leaving out any one of the four changes these 16 tokens (negative presence
    # and frequency penalties make the random model repeat itself, so they matter).
    sampling = dict(repetition_penalty=1.3, presence_penalty=-2.0, frequency_penalty=-1.0, min_p=0.05, temperature=0.8, top_k=-1, seed=4)
    flags = [x for k, v in sampling.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert generate_main(["--checkpoint", str(checkpoint_dir), "--prompt", "hello", "--max-new-tokens", "16", "--ignore-eos",
                          "--no-stream", *flags]) == 0
    model, ids = from_pretrained(checkpoint_dir), [[0] + tokenizer.encode("hello").ids]
    out = generate(model, ids, max_new_tokens=16, **sampling).tokens[0].tolist()
    assert capsys.readouterr().out == tokenizer.decode(out).rstrip("\ufffd") + "\n"  # a cut last character is not printed
    for name, off in [("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("min_p", 0.0)]:
        assert generate(model, ids, max_new_tokens=16, **(sampling | {name: off})).tokens[0].tolist() != out, name
