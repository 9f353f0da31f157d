"""Starting a run from a saved model: `[model] init_from = "DIR"` (continued pretraining, fine-tuning).

The folder is anything `xlstm7b.from_pretrained` reads (ours, the released Hugging Face folder, the
xlstm package's). It decides the architecture: `[model]` keys left out take the folder's values,
and a key that contradicts it is an error. Its tokenizer.json, when it has one, is the run's
tokenizer unless `data.tokenizer` names another. The weights are read one tensor at a time straight
into the model's parameters, sharded or not (`load_weights`), in place of the random
initialization; the optimizer starts fresh and the schedule's warmup applies. A resumed run
restores its own checkpoint and never reads the folder's weights again.
"""

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from xlstm7b import CheckpointError
from xlstm7b.layouts import layout_groups
from xlstm7b.pretrained import canonical_name, read_config, read_safetensors, weight_files

RUNTIME_FIELDS = ("mlstm_backend", "chunk_size")
"""[model] keys that choose how the model runs, not what it computes: a run may set its own."""


def resolve_init_from(data: dict, source: str) -> None:
    """Completes a config's raw [model] and [data] tables from `model.init_from`, in place."""
    model = data.get("model", {})
    folder = model.get("init_from")
    if not folder:
        return
    path = Path(str(folder)).expanduser()
    try:
        saved = read_config(path)
    except CheckpointError as e:
        raise ValueError(f"{source}: model.init_from={folder!r} is not a saved model folder: {e}") from None
    for key, value in vars(saved).items():
        if key not in model:
            model[key] = value
        elif model[key] != value and key not in RUNTIME_FIELDS:
            raise ValueError(
                f"{source}: model.{key} = {model[key]!r} contradicts {value!r} in model.init_from={folder!r}; the architecture "
                f"comes from that folder: remove model.{key} (or set it to {value!r})")
    data_table = data.setdefault("data", {})
    if data_table.get("tokenizer", "train") == "train":
        if not (path / "tokenizer.json").is_file():
            raise ValueError(
                f"{source}: model.init_from={folder!r} has no tokenizer.json, and a tokenizer trained anew would not match its "
                "embedding; set data.tokenizer to the model's tokenizer (a tokenizer.json or a hub name)")
        data_table["tokenizer"] = str(path / "tokenizer.json")


@torch.no_grad()
def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Copies a saved model's weights into `model` (an XLSTM whose parameters are materialized, plain
    or sharded by FSDP2), one tensor at a time: a process never holds more than its own parameters
    and one tensor (one fused projection group) of the file. Unknown, missing or misshapen keys raise
    a CheckpointError naming the file and the key."""
    folder = Path(folder).expanduser()
    config = model.config
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as the embedding
    # a part of the released or the xlstm package's layout -> (the model's fused tensor, the parts it concatenates)
    groups = {f"backbone.blocks.{n}.{s}": (f"backbone.blocks.{n}.{fused}", [f"backbone.blocks.{n}.{x}" for x in singles])
              for n in range(config.num_blocks) for layout in ("single", "package")
              for fused, singles in layout_groups(config, layout) for s in singles}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    loaded = set()
    for file in weight_files(folder):
        for raw, tensor in read_safetensors(file):
            name = canonical_name(raw)
            if name in groups:
                fused, singles = groups[name]
                pending.setdefault(fused, {})[name] = tensor
                if len(pending[fused]) < len(singles):
                    continue
                parts = pending.pop(fused)
                name, tensor = fused, torch.cat([parts[s] for s in singles])
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # the embedding it is tied to is loaded under its own name
            p = params.get(name)
            if p is None:
                raise CheckpointError(f"{file}: unexpected key {raw} for a model of this config")
            if tensor.shape != p.shape:
                raise CheckpointError(f"{file}: key {raw} has shape {list(tensor.shape)}, the model expects {list(p.shape)}")
            tensor = tensor.to(p.device, p.dtype)
            p.copy_(distribute_tensor(tensor, p.device_mesh, p.placements) if isinstance(p, DTensor) else tensor)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing or pending:
        keys = missing + [s for group in pending.values() for s in group]
        raise CheckpointError(f"{folder}: missing key(s) {keys[:5]}{' ...' if len(keys) > 5 else ''}")
