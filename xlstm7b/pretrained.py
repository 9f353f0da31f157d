"""Checkpoint I/O compatible with the released xLSTM-7b (spec §4).

Reads two layouts:
- Hugging Face (NX-AI/xLSTM-7b): config.json + model.safetensors, or shards listed in
  model.safetensors.index.json; parameter names `backbone.embeddings.weight`, `backbone.blocks.N...`.
- the xlstm package: config.yaml + model.safetensors (or model_0.safetensors, model_1, ...), with
  `embedding.weight` for the embedding.
Both store the projections one by one (`q`, `k`, `v`, `ogate_preact`, `igate_preact`, `fgate_preact`,
`proj_up_gate`, `proj_up`: the released single layout); the xlstm package may also write its fused
layout (`qkv_opreact`, `ifgate_preact`, `proj_up_gate_z`). Loading converts either to the model's
(`in_proj` [q|k|v|o|i|f] and `gate_bias` [i|f], `proj_up_gate_z`; read as it is where a file holds
it), saving the model's to single (layouts.py), so every file written is in the released layout,
which both `from_pretrained` and transformers' xLSTMForCausalLM load.

Loading builds the model on the meta device and assigns each tensor as it is read, so the weights
exist once (the layout conversion adds one projection at a time).
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .layouts import fuse, split, unfuse
from .model import XLSTM
from .safetensors_io import CheckpointError, read_header, read_safetensors
from .written import ForeignFileError, adopt_earlier_export, foreign_files, forget, remember

INDEX = "model.safetensors.index.json"
EMBEDDING = "backbone.embeddings.weight"

# Released config.json / config.yaml key -> ModelConfig field, for keys whose names differ.
CONFIG_ALIASES = {"hidden_size": "embedding_dim", "num_hidden_layers": "num_blocks"}
# Parameter name spellings of other releases -> ours.
NAME_ALIASES = (
    (re.compile(r"^embedding\.weight$"), "backbone.embeddings.weight"),
    (re.compile(r"\.mlstm_layer\.query\."), ".mlstm_layer.q."),
    (re.compile(r"\.mlstm_layer\.key\."), ".mlstm_layer.k."),
    (re.compile(r"\.mlstm_layer\.value\."), ".mlstm_layer.v."),
)


def checkpoint_path(path, caller: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{caller}: path must be a folder path (str or os.PathLike), got {type(path).__name__}")
    return Path(path).expanduser()


def check_device(device) -> torch.device:
    """`device` (None: the CPU) as a torch.device that exists on this machine, or a ValueError."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: this machine has no CUDA device (or torch was built without "
                             "CUDA); use 'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use 'cpu'")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    return device


def config_from_released(raw: dict, *, source: str) -> ModelConfig:
    """A ModelConfig from a released config.json/config.yaml dict; keys we do not use are ignored."""
    fields = set(ModelConfig.__dataclass_fields__)
    values = {}
    for key, value in raw.items():
        name = CONFIG_ALIASES.get(key, key)
        if name in fields and value is not None and name not in values:
            values[name] = value
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        if isinstance(values.get(key), list):  # some configs list several EOS ids; the first is the main one
            values[key] = values[key][0]
    missing = [k for k in ("embedding_dim", "num_blocks", "num_heads", "vocab_size") if k not in values]
    if missing:
        raise CheckpointError(f"{source}: missing config key(s) {missing} (or their aliases {CONFIG_ALIASES})")
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model config: {e}") from e


def config_to_released(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json in the released field names; the kernel names make transformers run it on any device."""
    c = config
    return {
        "architectures": ["xLSTMForCausalLM"],
        "model_type": "xlstm",
        "vocab_size": c.vocab_size,
        "hidden_size": c.embedding_dim,
        "embedding_dim": c.embedding_dim,
        "num_hidden_layers": c.num_blocks,
        "num_blocks": c.num_blocks,
        "num_heads": c.num_heads,
        "use_bias": c.use_bias,
        "norm_reduction_force_float32": True,
        "tie_word_embeddings": c.tie_word_embeddings,
        "add_out_norm": c.add_out_norm,
        "norm_eps": c.norm_eps,
        "qk_dim_factor": c.qk_dim_factor,
        "v_dim_factor": c.v_dim_factor,
        "chunkwise_kernel": "chunkwise--native_autograd",
        "sequence_kernel": "native_sequence__native",
        "step_kernel": "native",
        "mode": "inference",
        "chunk_size": c.chunk_size,
        "return_last_states": True,
        "autocast_kernel_dtype": "bfloat16",
        "eps": c.eps,
        "inference_state_dtype": "float32",
        "ffn_proj_factor": c.ffn_proj_factor,
        "ffn_round_up_to_multiple_of": c.ffn_round_up_to_multiple_of,
        "gate_soft_cap": c.gate_soft_cap,
        "output_logit_soft_cap": c.output_logit_soft_cap,
        "weight_mode": "single",
        "use_cache": True,
        "bos_token_id": c.bos_token_id,
        "pad_token_id": c.pad_token_id,
        "eos_token_id": c.eos_token_id,
        "max_inference_chunksize": 16384,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def read_config(path: Path) -> ModelConfig:
    if (path / "config.json").is_file():
        file = path / "config.json"
        try:
            raw = json.loads(read_text(file))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from e
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "train" in raw:
            raise CheckpointError(f"{file} is a training run's config, not a model checkpoint; pass the model folder "
                                  f"the run exports at its end, {path / 'model'}")
    elif (path / "config.yaml").is_file():
        import yaml

        file = path / "config.yaml"
        try:
            raw = yaml.safe_load(read_text(file))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not valid YAML ({e})") from e
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            raw = raw["model"]
    else:
        hint = ""
        if (path / "trainer.json").is_file() or (path / "checkpoints").is_dir():
            hint = ("; this is a training run or one of its checkpoints: pass the model folder the run exports at its "
                    "end (RUN_DIR/model)")
        raise CheckpointError(f"{path}: no config.json (Hugging Face layout) or config.yaml (xlstm package layout){hint}")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a mapping of config keys")
    return config_from_released(raw, source=str(file))


def read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from e


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in order."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads(read_text(path / INDEX))["weight_map"]
            files = [path / name for name in dict.fromkeys(weight_map.values())]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX}: not a valid safetensors index, which maps every key to a file "
                                  f"under \"weight_map\" ({type(e).__name__}: {e})") from e
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("model_*.safetensors"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not files:
        raise CheckpointError(f"{path}: no weights (model.safetensors, {INDEX} or model_0.safetensors)")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {INDEX} but missing")
    return files


def canonical_name(name: str) -> str:
    for pattern, repl in NAME_ALIASES:
        name = pattern.sub(repl, name)
    return name


def from_pretrained(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> XLSTM:
    """Loads a checkpoint folder (Hugging Face or xlstm package layout) into an XLSTM in eval mode.

    device: where the weights go (default CPU); each tensor is moved as it is read.
    dtype: the parameter dtype (default: as stored, bf16 for the released 7B).
    """
    path = checkpoint_path(path, "from_pretrained")
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder; pass the checkpoint folder (config.json + safetensors)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass the checkpoint folder that holds it")
    device = check_device(device)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"from_pretrained: dtype must be a floating point torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    config = read_config(path)
    files = weight_files(path)
    # Names and shapes from the headers first: a wrong checkpoint fails before its weights are read.
    shapes: dict[str, torch.Size] = {}
    source: dict[str, Path] = {}
    for file in files:
        for raw_name, (_, shape, _, _) in read_header(file)[1].items():
            name = canonical_name(raw_name)
            shapes[name], source[name] = torch.Size(shape), file
    with torch.device("meta"):
        model = XLSTM(config)
    expected = model.state_dict()
    if not any(".mlstm_layer.in_proj." in name for name in shapes):  # not the model's own layout
        expected = split(expected, config, "package" if any(".qkv_opreact." in name for name in shapes) else "single")
    check_shapes(config, expected, shapes, source, path)
    tensors = {canonical_name(name): t.to(device=device, dtype=dtype or t.dtype) for file in files for name, t in read_safetensors(file)}
    if config.tie_word_embeddings:
        head = tensors.pop("lm_head.weight", None)
        # transformers' xLSTMForCausalLM never ties: it writes (and needs) lm_head.weight.
        if head is not None and not torch.equal(head, tensors[EMBEDDING]):
            raise CheckpointError(
                f"{source['lm_head.weight']}: lm_head.weight differs from {EMBEDDING} although {path / 'config.json'} "
                "sets tie_word_embeddings = true; set it to false to load the two as separate weights")
        tensors["lm_head.weight"] = tensors[EMBEDDING]
    model.load_state_dict(fuse(tensors, config), assign=True)
    model.tie_weights()
    return model.eval()


def check_shapes(config: ModelConfig, expected: dict, shapes: dict, source: dict, path: Path) -> None:
    """Every expected key present with its shape, and no unknown key; errors name the file."""
    expected = {k: v.shape for k, v in expected.items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}  # compared with the embedding on load
    unexpected = [k for k in shapes if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source[unexpected[0]]}: unexpected key(s) {unexpected[:5]} for this config")
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise CheckpointError(f"{source[k]}: key {k} has shape {list(shapes[k])}, the config expects {list(shape)}")


def save_pretrained(model: XLSTM, path: str | os.PathLike, *, max_shard_size: int = 5 * 2**30, dtype: torch.dtype | None = None,
                    overwrite: bool = False) -> None:
    """Writes config.json, generation_config.json and safetensors in the released single layout;
    several shards plus an index when the weights exceed `max_shard_size` bytes. Files are written
    under temporary names and renamed, so an interrupted save never leaves a half-written file under
    a final name.

    The folder must be new, empty or hold only files xlstm7b wrote (an earlier save's: replaced, and
    its shards this save does not write removed; a run's export by an earlier version, which has no
    record, is adopted: `xlstm7b.written.adopt_earlier_export`); otherwise a ForeignFileError names a file that is
    not ours. overwrite=True writes anyway: files under the names this save writes are replaced,
    every other file is left as it is (never deleted)."""
    if not isinstance(model, XLSTM):
        raise TypeError(f"save_pretrained: model must be an xlstm7b.XLSTM, got {type(model).__name__}")
    path = checkpoint_path(path, "save_pretrained")
    if not isinstance(max_shard_size, int) or isinstance(max_shard_size, bool) or max_shard_size < 1:
        raise ValueError(f"save_pretrained: max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"save_pretrained: dtype must be a floating point torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ValueError(f"save_pretrained: {path} cannot be a folder: {e.filename} is a file; pass another path") from e
    adopt_earlier_export(path)
    if not overwrite and (foreign := foreign_files(path)):
        raise ForeignFileError(
            f"save_pretrained: {foreign[0]} was not written by xlstm7b{f' (nor {len(foreign) - 1} more file(s))' if len(foreign) > 1 else ''}; "
            "it is left untouched. Save into a new or empty folder, or pass overwrite=True to write beside it "
            "(files of the same names are replaced, no other file is removed)")
    shards = shard(weights_to_save(model, dtype), max_shard_size)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))
    ]
    for name, tensors in zip(names, shards):
        save_file(tensors, path / f"{name}.tmp", metadata={"format": "pt"})
        os.replace(path / f"{name}.tmp", path / name)
    written = [*names, "config.json", "generation_config.json"]
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
            "weight_map": {k: name for name, tensors in zip(names, shards) for k in tensors},
        }
        write_text_atomic(path / INDEX, json.dumps(index, indent=2))
        written.append(INDEX)
    stored_dtype = next(iter(shards[0].values())).dtype
    write_text_atomic(path / "config.json", json.dumps(config_to_released(model.config, stored_dtype), indent=2))
    write_text_atomic(path / "generation_config.json", json.dumps(generation_config(model.config), indent=2))
    # Weights of an earlier save into the same folder that this one did not overwrite: removed only
    # where the record proves them ours (a model_best.safetensors beside them is the user's).
    stale = [p.name for p in [*path.glob("model*.safetensors"), path / INDEX] if p.name not in written]
    remember(path, written, "save_pretrained")
    forget(path, stale, "save_pretrained")


def weights_to_save(model: XLSTM, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's state in the released single layout, on the CPU, in `dtype` (None: as it is)."""
    sd = unfuse(model.state_dict(), model.config)
    if model.config.tie_word_embeddings:
        if model.lm_head.weight is not model.backbone.embeddings.weight and not torch.equal(sd["lm_head.weight"], sd[EMBEDDING]):
            raise ValueError("save_pretrained: the model's config ties the embeddings, but its lm_head.weight is a different "
                             "tensor; call model.tie_weights() (the lm_head becomes the embedding) or untie the config")
        # Written as a copy, as transformers' xLSTMForCausalLM (which never ties) needs the key.
        sd["lm_head.weight"] = sd[EMBEDDING].clone()
    return {k: v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous() for k, v in sd.items()}


def shard(sd: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, a new shard whenever the next would take one past `max_shard_size` bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    return shards


def generation_config(config: ModelConfig) -> dict:
    """generation_config.json: the special tokens transformers' generate() reads, greedy by default."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
            "do_sample": False}


def write_text_atomic(file: Path, text: str) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)
