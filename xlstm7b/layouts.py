"""The model's weight layout and the checkpoints' (spec §4): the released single layout (`q`, `k`, `v`,
`ogate_preact`, `igate_preact`, `fgate_preact`, `proj_up_gate`, `proj_up`), the xlstm package's fused
one (`qkv_opreact` [q|k|v|o], `ifgate_preact` [i|f], `proj_up_gate_z`) and the model's (`in_proj`
[q|k|v|o|i|f] with `gate_bias` [i|f], `proj_up_gate_z`), converted along the output dimension."""

import torch

from .config import ModelConfig

# The mLSTM layer's input projections of the released single layout, in the rows of the model's in_proj.
MLSTM_INPUTS = ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact")


def layout_groups(config: ModelConfig, layout: str) -> list[tuple[str, tuple[str, ...]]]:
    """Each fused tensor of the model (its name after `backbone.blocks.N.`) and, in row order, the
    tensors of another layout it concatenates: `layout` "single" (the release's) or "package" (the
    xlstm package's fused `qkv_opreact` [q|k|v|o] and `ifgate_preact` [i|f]; its `proj_up_gate_z` is
    ours). With use_bias the gates' bias is in_proj's last rows, else its own `gate_bias`."""
    m = "mlstm_layer."
    if layout == "single":
        inputs, gates = [m + s for s in MLSTM_INPUTS], [m + "igate_preact", m + "fgate_preact"]
        ffn = [("ffn.proj_up_gate_z", ("ffn.proj_up_gate", "ffn.proj_up"))]
    else:
        inputs, gates, ffn = [m + "qkv_opreact", m + "ifgate_preact"], [m + "ifgate_preact"], []
    kinds = ("weight", "bias") if config.use_bias else ("weight",)
    groups = [(f"{m}in_proj.{kind}", tuple(f"{p}.{kind}" for p in inputs)) for kind in kinds]
    if not config.use_bias:
        groups.append((m + "gate_bias", tuple(f"{p}.bias" for p in gates)))
    groups += [(f"{fused}.{kind}", tuple(f"{p}.{kind}" for p in parts)) for fused, parts in ffn for kind in kinds]
    return groups


def part_rows(config: ModelConfig, name: str) -> int:
    """The rows of `name` (a part in layout_groups) within the fused tensor that concatenates it."""
    c = config
    return {"q": c.qk_dim, "k": c.qk_dim, "v": c.v_dim, "ogate_preact": c.v_dim, "igate_preact": c.num_heads,
            "fgate_preact": c.num_heads, "qkv_opreact": 2 * c.qk_dim + 2 * c.v_dim, "ifgate_preact": 2 * c.num_heads,
            "proj_up_gate": c.ffn_dim, "proj_up": c.ffn_dim}[name.split(".")[-2]]


def fuse(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The released single layout or the xlstm package's fused one -> the model's, in place: the
    parts are replaced by their concatenation one group at a time, so peak memory grows by one
    projection at most. Keys already in the model's layout are kept. Returns `state_dict`."""
    out = state_dict
    for n in range(config.num_blocks):
        for layout in ("single", "package"):
            for fused, parts in layout_groups(config, layout):
                keys = [f"backbone.blocks.{n}.{p}" for p in parts]
                if all(k in out for k in keys):
                    out[f"backbone.blocks.{n}.{fused}"] = torch.cat([out.pop(k) for k in keys], dim=0)
    return out


def split(state_dict: dict[str, torch.Tensor], config: ModelConfig, layout: str) -> dict[str, torch.Tensor]:
    """The model's layout -> `layout` (see layout_groups): each part a view of its rows."""
    out = dict(state_dict)
    for n in range(config.num_blocks):
        for fused, parts in layout_groups(config, layout):
            key = f"backbone.blocks.{n}.{fused}"
            if key in out:
                views = out.pop(key).split([part_rows(config, p) for p in parts], dim=0)
                out.update((f"backbone.blocks.{n}.{p}", view) for p, view in zip(parts, views))
    return out


def unfuse(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's layout -> the released single one (each projection a copy of its rows)."""
    single = split(state_dict, config, "single")
    return {k: v.clone() if k not in state_dict else v for k, v in single.items()}


def package_fused(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's layout -> the xlstm package's fused one (`weight_mode="fused"`), as views of the
    same tensors: an xLSTMLarge loads it with `assign=True` and shares the weights."""
    return split(state_dict, config, "package")
