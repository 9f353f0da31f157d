"""lm-evaluation-harness through the server: a local multiple-choice task and a rolling
log-likelihood task run with `--model local-completions` against a real uvicorn server give the
numbers `--model xlstm7b` gives on the same exported folder (offline: local task files)."""

import json

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn", reason="needs the serve extra (uvicorn, FastAPI)")
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import xlstm7b  # noqa: E402
import xlstm7b.harness  # noqa: E402,F401  (registers the xlstm7b model type with lm-eval)
from conftest import random_model  # noqa: E402
from test_serve import MODEL, serving  # noqa: E402
from xlstm7b.hub import save_for_hub  # noqa: E402
from xlstm7b.serve import EngineConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MC, ROLLING = "xlstm7b_serve_mc", "xlstm7b_serve_rolling"
WORDS = ["the quick brown fox", "hello world", "a stop sign", "jumps over the lazy dog", "hello there", "brown dog"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A 6-question multiple-choice task and a 4-document rolling log-likelihood task on local JSONL."""
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"{WORDS[n]}, {WORDS[(n + 1) % 6]} and", "choices": [f" {WORDS[(n + k) % 6]}" for k in range(3)],
             "answer": n % 3} for n in range(6)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = [{"text": " ".join(WORDS[(n + k) % 6] for k in range(n + 2))} for n in range(4)]
    (root / "rolling.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\n"
    (root / f"{MC}.yaml").write_text(
        f"task: {MC}\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (root / f"{ROLLING}.yaml").write_text(
        f"task: {ROLLING}\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'rolling.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return TaskManager(include_path=str(root), include_defaults=False)  # indexing lm-eval's own tasks takes ~50 s


def scores(result: dict, task: str) -> list[float]:
    return [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for s in result["samples"][task] for r in s["resps"]]


def test_local_completions_through_the_server_equal_the_xlstm7b_type(tokenizer, tasks, tmp_path):
    import lm_eval

    folder = tmp_path / "model"
    config = xlstm7b.ModelConfig.from_preset("debug").replace(vocab_size=tokenizer.get_vocab_size())
    model = random_model(config, seed=3)
    xlstm7b.save_pretrained(model, folder)
    save_for_hub(folder, model, tokenizer, training={"data": "tests", "steps": 0})
    ours = lm_eval.simple_evaluate(model="xlstm7b", model_args=f"pretrained={folder}", tasks=[MC, ROLLING], task_manager=tasks,
                                   batch_size=4, device="cpu", log_samples=True)
    served = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with serving(xlstm7b.from_pretrained(folder), served, EngineConfig(max_batch=4, prefill_chunk=16, state_dtype=torch.float32),
                 api_key=None) as server:  # float32 prefix states, as the xlstm7b type's
        # The server takes token ids as they come: lm-eval puts the BOS first itself, for the
        # multiple-choice contexts with add_bos_token and for rolling windows as their prefix token.
        args = f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={folder},max_retries=1"
        mc = lm_eval.simple_evaluate(model="local-completions", model_args=args + ",add_bos_token=True", tasks=[MC],
                                     task_manager=tasks, log_samples=True)
        rolling = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[ROLLING], task_manager=tasks,
                                          log_samples=True)
    assert mc["results"][MC]["acc,none"] == ours["results"][MC]["acc,none"]
    assert scores(mc, MC) == pytest.approx(scores(ours, MC), rel=1e-4, abs=1e-4)
    assert scores(rolling, ROLLING) == pytest.approx(scores(ours, ROLLING), rel=1e-4, abs=1e-4)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert rolling["results"][ROLLING][metric] == pytest.approx(ours["results"][ROLLING][metric], rel=1e-4)
