"""lm-evaluation-harness: the `xlstm7b` model type against our own forward pass, batched generation
against one prompt at a time, and a task defined here (local JSONL, no network) through our type
and through lm-eval's `hf` type on the same exported folder."""

import json
import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

import xlstm7b  # noqa: E402
from conftest import random_model  # noqa: E402
from xlstm7b.harness import XLSTMLM  # noqa: E402
from xlstm7b.hub import save_for_hub  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "xlstm7b_tiny_mc"
WORDS = ["the quick brown fox", "hello world", "a stop sign", "jumps over the lazy dog", "hello there", "brown dog"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A 6-question multiple-choice task on local JSONL data."""
    root = tmp_path_factory.mktemp("task")
    rows = [{"question": f"{WORDS[n]}, {WORDS[(n + 1) % 6]} and", "choices": [f" {WORDS[(n + k) % 6]}" for k in range(3)], "answer": n % 3}
            for n in range(6)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    return root


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


PAIRS = [("the quick brown", " fox"), ("", "hello world"), ("hello", " there, hello world"), ("a stop", " sign"),
         ("jumps over the lazy dog " * 12, "and the fox"), ("x", " y"), ("hello world, hello", ""), ("a", " stop sign " * 5),
         ("the lazy dog", " jumps")]


def reference_loglikelihood(model, lm: XLSTMLM, context: str, continuation: str) -> tuple[float, bool]:
    """Our forward pass alone: the BOS, the context, the continuation; lm-eval's tokenization."""
    ctx, cont = lm._encode_pair(context, continuation) if context else ([], lm.tok_encode(continuation))
    row = torch.tensor([[model.config.bos_token_id, *ctx, *cont]])
    with torch.no_grad():
        logp = model(row)[0][0].double().log_softmax(-1)
    n = row.shape[1] - len(cont)
    targets = row[0, n:]
    picked = logp[n - 1 : -1].gather(-1, targets[:, None])[:, 0]
    return picked.sum().item(), bool((logp[n - 1 : -1].argmax(-1) == targets).all())


@pytest.mark.parametrize("batch_size", [1, 8])
def test_loglikelihood_equals_forward(checkpoint_dir, batch_size):
    model = xlstm7b.from_pretrained(checkpoint_dir)
    lm = XLSTMLM(str(checkpoint_dir), batch_size=batch_size, piece_tokens=64, device="cpu")  # the long context: 3 pieces
    got = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (lp, greedy) in zip(PAIRS, got):
        ref_lp, ref_greedy = reference_loglikelihood(model, lm, context, continuation)
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-6), (context, continuation)
        assert greedy == ref_greedy
    texts = [c + x for c, x in PAIRS]
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    for text, lp in zip(texts, rolling):
        ref, _ = reference_loglikelihood(model, lm, "", text)
        assert lp == pytest.approx(ref, rel=1e-5)


def test_generate_until_batch_8_equals_batch_1(checkpoint_dir):
    prompts = ["the quick", "hello world, hello", "a", "jumps over the lazy dog " * 6, "brown", "the lazy dog jumps", "x y z",
               "stop", "hello there"]
    args = [(p, {"until": ["fox", "\n\n"], "max_gen_toks": 12, "do_sample": False}) for p in prompts]
    args += [(p, {"until": "o", "max_gen_toks": 5}) for p in prompts[:3]]  # a second group of settings
    one = XLSTMLM(str(checkpoint_dir), batch_size=1, device="cpu").generate_until(requests("generate_until", args))
    eight = XLSTMLM(str(checkpoint_dir), batch_size=8, device="cpu").generate_until(requests("generate_until", args))
    assert one == eight
    assert all("fox" not in t for t in one[:9]) and all("o" not in t for t in one[9:])
    # The same text as generating alone, cut before the first stop string.
    lm = XLSTMLM(str(checkpoint_dir), device="cpu")
    tokens, _ = xlstm7b.generate(lm.model, [lm.with_bos(lm.tok_encode(prompts[0]))], max_new_tokens=12, eos_token_id=lm.eot_token_id)
    alone = tokens[0].tolist()
    alone = lm.tok_decode(alone[: alone.index(lm.eot_token_id)] if lm.eot_token_id in alone else alone)
    assert one[0] == alone.split("fox")[0].split("\n\n")[0]


def test_bad_arguments(checkpoint_dir, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        XLSTMLM(str(checkpoint_dir), batch_size="auto")
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        XLSTMLM(str(checkpoint_dir), dtype="fp8")
    bare = tmp_path / "bare"
    xlstm7b.save_pretrained(xlstm7b.from_pretrained(checkpoint_dir), bare)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json; pass tokenizer=PATH"):
        XLSTMLM(str(bare))
    lm = XLSTMLM(str(checkpoint_dir))
    with pytest.raises(ValueError, match=r"unsupported generation argument\(s\) \['repetition_penalty'\]"):
        lm.generate_until(requests("generate_until", [("a", {"until": ["x"], "repetition_penalty": 1.2})]))


def test_task_through_our_type_and_hf(tokenizer, task_dir, tmp_path):
    """The task through our type by its registered name (batch 8) and through lm-eval's `hf` type
    (transformers' xLSTM on the same exported folder, batch 1), neither given extra arguments: the
    same scores. The folder's tokenizer files make transformers start every input with the BOS."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "model"
    # Head dimensions 64 / 32: transformers' native chunkwise kernel fails at the debug preset's 16 / 32.
    config = xlstm7b.ModelConfig(embedding_dim=128, num_blocks=2, num_heads=2, vocab_size=tokenizer.get_vocab_size(), chunk_size=16)
    model = random_model(config, seed=2)
    xlstm7b.save_pretrained(model, folder)
    save_for_hub(folder, model, tokenizer, training={"data": "tests", "steps": 0})
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)  # indexing lm-eval's own tasks takes ~50 s

    ours = lm_eval.simple_evaluate(model="xlstm7b", model_args=f"pretrained={folder}", tasks=[TASK], task_manager=tasks,
                                   batch_size=8, device="cpu", log_samples=True)
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=[TASK],
                                 task_manager=tasks, batch_size=1, device="cpu", log_samples=True)
    assert ours["config"]["model"] == "xlstm7b"
    assert hf["results"][TASK]["acc,none"] == ours["results"][TASK]["acc,none"]
    # Every choice's log-likelihood, not only the accuracy they add up to.
    theirs = [float(r[0][0]) for s in hf["samples"][TASK] for r in s["resps"]]
    mine = [float(r[0][0]) for s in ours["samples"][TASK] for r in s["resps"]]
    assert theirs == pytest.approx(mine, rel=1e-4, abs=1e-4)


def test_device_falls_back_to_the_cpu_with_a_notice(checkpoint_dir, capsys, monkeypatch):
    """lm-eval passes device='cuda:0' by default (as its hf type takes it): without CUDA, the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = XLSTMLM(str(checkpoint_dir), device="cuda:0")
    assert lm.device == torch.device("cpu")
    err = capsys.readouterr().err
    assert "'cuda:0'" in err and "no CUDA device" in err and "on the CPU" in err


def test_harness_command_line_error_is_one_line(task_dir, tmp_path, capsys, monkeypatch):
    """`python -m xlstm7b.harness` with a folder that does not exist: exit code 2 and the reason, no traceback."""
    import sys

    from lm_eval.tasks import TaskManager

    from xlstm7b import harness

    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))
    monkeypatch.setattr(sys, "argv", ["xlstm7b.harness", "--model", "xlstm7b", "--model_args", f"pretrained={tmp_path / 'nope'}",
                                      "--tasks", TASK, "--include_path", str(task_dir), "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        harness.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"xlstm7b.harness: {tmp_path / 'nope'}: no such folder" in err, err
    assert "Traceback" not in err


def test_a_token_id_outside_the_vocabulary_is_a_clear_error(checkpoint_dir):
    """Scoring checks its ids once on the host (the forwards run with check_ids=False)."""
    lm = XLSTMLM(str(checkpoint_dir), device="cpu")
    with pytest.raises(ValueError, match="token id -1 outside"):
        lm.score_batch([[0, 5, 6], [0, -1]], [1, 1])
