"""A training run's export is Hub-ready (tokenizer files declaring BOS/EOS/pad, generation_config.json,
a model card with what the run trained on and reached), exports again over its own files when the
run continues, and `xlstm7b eval` of the export on the run's corpus scores the run's validation split."""

import json

import pytest

import xlstm7b
from test_train import job
from xlstm7b.cli import main
from xlstm7b.train import trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus, cache):
    run = tmp_path_factory.mktemp("hub") / "r"
    assert trainer.train(job(corpus, cache, run, "--train.steps=2", "--run.export=true", "--run.sample_tokens=0")) == 0
    return run


def test_the_export_declares_its_tokens_and_describes_the_run(exported):
    folder = exported / "model"
    config = xlstm7b.from_pretrained(folder).config
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == tok_config["eos_token"] == "<|endoftext|>" and tok_config["pad_token"] == "<|padding|>"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        config.bos_token_id, config.eos_token_id, config.pad_token_id)
    card = (folder / "README.md").read_text()
    bpb = [json.loads(line) for line in (exported / "metrics.jsonl").read_text().splitlines()][-1]["val_bpb"]
    for words in ("parameters", f"{config.num_blocks} blocks", "optimizer steps: 2", "training data:", f"{bpb:.4f}",
                  "xlstm7b.from_pretrained", "AutoModelForCausalLM", "lm_eval --model hf"):
        assert words in card, words


def test_transformers_tokenizer_starts_every_input_with_the_bos(exported):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(exported / "model"))
    ids = tok("def f(x):").input_ids
    assert ids[0] == tok.bos_token_id == 0 and ids[1:] == tok("def f(x):", add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "def f(x):"


def test_a_continued_run_exports_over_its_own_files(exported, corpus, cache, capsys):
    before = (exported / "model" / "README.md").read_text()
    assert trainer.train(job(corpus, cache, exported, "--train.steps=3", "--run.export=true", "--run.sample_tokens=0")) == 0
    after = (exported / "model" / "README.md").read_text()
    assert "optimizer steps: 2" in before and "optimizer steps: 3" in after


def test_eval_of_the_export_on_its_corpus_scores_the_validation_split(exported, corpus, capsys, tmp_path):
    out = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(exported / "model"), "--data", str(corpus), "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["split"] == "val" and result["val_fraction"] == 0.1  # the run's, not eval's default
    few = result["documents"] + 2  # "all" of the first few documents: more than the validation split
    assert main(["eval", "--checkpoint", str(exported / "model"), "--data", str(corpus), "--no-progress", "--split", "all",
                 "--max-documents", str(few), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["documents"] == few


def test_a_chat_template_beside_the_source_tokenizer_is_kept(tokenizer, tmp_path):
    from conftest import random_model
    from xlstm7b.hub import save_for_hub

    source = tmp_path / "released"
    source.mkdir()
    tokenizer.save(str(source / "tokenizer.json"))
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    model = random_model(xlstm7b.ModelConfig.from_preset("debug").replace(vocab_size=tokenizer.get_vocab_size()))
    xlstm7b.save_pretrained(model, tmp_path / "out")
    save_for_hub(tmp_path / "out", model, source / "tokenizer.json")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == template
    assert "Not recorded" in (tmp_path / "out" / "README.md").read_text()


def test_a_tokenizer_that_already_adds_the_bos_gets_no_second_one(exported, tmp_path):
    """save_for_hub from an exported tokenizer.json (which prepends the BOS) keeps one BOS."""
    from tokenizers import Tokenizer

    from xlstm7b.hub import save_for_hub

    model = xlstm7b.from_pretrained(exported / "model")
    xlstm7b.save_pretrained(model, tmp_path / "again")
    save_for_hub(tmp_path / "again", model, exported / "model" / "tokenizer.json")
    bos = model.config.bos_token_id
    ids = Tokenizer.from_file(str(tmp_path / "again" / "tokenizer.json")).encode("def f(x):").ids
    assert ids[0] == bos and ids[1] != bos, ids
