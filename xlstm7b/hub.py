"""What makes a `save_pretrained` folder complete for the Hugging Face tools and the Hub: the
tokenizer with its tokenizer_config.json (special tokens declared, a chat template where the model
has one) and a README.md model card.

    save_pretrained(model, folder)
    save_for_hub(folder, model, "tokenizer.json", training={"data": "stdlib", "steps": 1000, "val_bpb": 1.23})

The exported tokenizer.json prepends the BOS when special tokens are added (transformers' default),
as every document started in training: `lm_eval --model hf` and transformers' generate() then see
the inputs this model was trained on without extra arguments. xlstm7b's own code encodes with
add_special_tokens=False and places the BOS itself, so it reads the same ids either way.
"""

import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer, processors

from .config import ModelConfig
from .model import XLSTM
from .written import ForeignFileError, adopt_earlier_export, foreign_files, remember

FILES = ("tokenizer.json", "tokenizer_config.json", "README.md")


def hub_tokenizer(tokenizer: Tokenizer, bos_token: str) -> Tokenizer:
    """A copy of `tokenizer` whose post-processor prepends `bos_token` (after what it did before),
    unless it already does (an exported tokenizer.json, a released one that adds it): never two."""
    out = Tokenizer.from_str(tokenizer.to_str())
    bos_id = tokenizer.token_to_id(bos_token)
    if tokenizer.encode("a").ids[:1] == [bos_id] != tokenizer.encode("a", add_special_tokens=False).ids[:1]:
        return out
    bos = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B:1",
                                        special_tokens=[(bos_token, bos_id)])
    out.post_processor = bos if tokenizer.post_processor is None else processors.Sequence([tokenizer.post_processor, bos])
    return out


def tokenizer_config(tokenizer: Tokenizer, config: ModelConfig, chat_template: str | None) -> dict:
    """tokenizer_config.json: the class transformers loads tokenizer.json with and the special tokens."""
    def token(i: int) -> str:
        text = tokenizer.id_to_token(i)
        if text is None:
            raise ValueError(f"the tokenizer has no token with id {i}, the model's special token id; pass the tokenizer "
                             "the model was trained with")
        return text

    out = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(config.bos_token_id),
           "eos_token": token(config.eos_token_id), "pad_token": token(config.pad_token_id), "add_bos_token": True,
           "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if chat_template:
        out["chat_template"] = chat_template
    return out


def chat_template_beside(tokenizer_file: Path) -> str | None:
    """The chat template of the tokenizer_config.json next to a tokenizer.json (a released model's), if any."""
    path = Path(tokenizer_file).with_name("tokenizer_config.json")
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None


def copy_tokenizer(source: Path, dest: Path) -> None:
    """Copies the tokenizer.json `source` to `dest` (atomically), with its chat template
    (`chat_template_beside`) in a tokenizer_config.json beside `dest`, so that an export made from the
    copy alone (a resumed run's) keeps the template."""
    source, dest = Path(source), Path(dest)
    shutil.copyfile(source, dest.with_name(dest.name + ".tmp"))
    os.replace(dest.with_name(dest.name + ".tmp"), dest)
    config = dest.with_name("tokenizer_config.json")
    if template := chat_template_beside(source):
        config.with_name(config.name + ".tmp").write_text(json.dumps({"chat_template": template}, indent=2))
        os.replace(config.with_name(config.name + ".tmp"), config)


def model_card(model: XLSTM, training: dict | None) -> str:
    """README.md: the architecture, its size, what it was trained on and how to load it."""
    c, t = model.config, training or {}
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [xlstm, mlstm, recurrent]", "---", "",
             "# xLSTM language model", "",
             f"A recurrent xLSTM (mLSTM) language model with {model.num_params():,} parameters: {c.num_blocks} blocks, "
             f"embedding dimension {c.embedding_dim}, {c.num_heads} heads (query/key head dimension {c.qk_head_dim}, value "
             f"head dimension {c.v_head_dim}), feed-forward dimension {c.ffn_dim}, vocabulary {c.vocab_size}. Its state has "
             "a constant size whatever the length of the context.", "", "## Training", ""]
    if t:
        facts = {"data": "training data", "steps": "optimizer steps", "tokens": "tokens seen", "config": "configuration"}
        lines += [f"- {label}: {t[key]:,}" if isinstance(t[key], int) else f"- {label}: {t[key]}"
                  for key, label in facts.items() if t.get(key) is not None]
        bpb = t.get("val_bpb")
        lines.append(f"- validation bits per byte at the end: {bpb:.4f}" if bpb is not None else "- validation bits per byte: not measured")
    else:
        lines.append("Not recorded: this folder was written by `save_pretrained` outside a training run.")
    lines += ["", "## Use", "", "With xlstm7b:", "", "```python", "import xlstm7b", "",
              'model = xlstm7b.from_pretrained("PATH")', "```", "",
              "or `xlstm7b generate --checkpoint PATH --prompt '...'`. With transformers (its xLSTMForCausalLM):", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("PATH")  # adds the BOS token every input starts with',
              'model = AutoModelForCausalLM.from_pretrained("PATH")', "```", "",
              "Evaluation: `lm_eval --model hf --model_args pretrained=PATH` and `python -m xlstm7b.harness --model xlstm7b "
              "--model_args pretrained=PATH` score the same inputs.", ""]
    return "\n".join(lines)


def save_for_hub(folder: str | os.PathLike, model: XLSTM, tokenizer: Tokenizer | str | os.PathLike, *,
                 training: dict | None = None, chat_template: str | None = None, overwrite: bool = False) -> None:
    """Writes tokenizer.json, tokenizer_config.json and README.md into a `save_pretrained` folder.

    tokenizer: a `tokenizers.Tokenizer` or a tokenizer.json path (then its neighbouring
        tokenizer_config.json's chat template is kept unless `chat_template` is given).
    training: facts for the model card: data, steps, tokens, config, val_bpb (each optional).
    overwrite: replace these files even where xlstm7b did not write them (else a ForeignFileError).
    """
    folder = Path(folder)
    if not isinstance(model, XLSTM):
        raise TypeError(f"save_for_hub: model must be an xlstm7b.XLSTM, got {type(model).__name__}")
    adopt_earlier_export(folder)
    if not overwrite and (foreign := foreign_files(folder, FILES)):
        raise ForeignFileError(f"save_for_hub: {foreign[0]} was not written by xlstm7b; it is left untouched. Move it "
                               "away, or pass overwrite=True to replace it")
    if not isinstance(tokenizer, Tokenizer):
        chat_template = chat_template or chat_template_beside(Path(tokenizer))
        tokenizer = Tokenizer.from_file(str(tokenizer))
    config = tokenizer_config(tokenizer, model.config, chat_template)
    hub_tokenizer(tokenizer, config["bos_token"]).save(str(folder / "tokenizer.json.tmp"))
    os.replace(folder / "tokenizer.json.tmp", folder / "tokenizer.json")
    for name, text in (("tokenizer_config.json", json.dumps(config, indent=2)), ("README.md", model_card(model, training))):
        (folder / f"{name}.tmp").write_text(text)
        os.replace(folder / f"{name}.tmp", folder / name)
    remember(folder, FILES, "save_for_hub")
