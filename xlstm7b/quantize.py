"""Weight-only quantisation for decoding: the large matrices stored in int8 or int4, the activations
and the state unchanged, through torchao's weight-only configurations (the library's kernels, as
gpt-fast and vLLM use them).

    model = from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    quantize(model, "int4")                        # in place; then generate(model, ...) as before

A batch-1 decode step reads every weight once, so its time falls with the bytes per weight: int8
halves them, int4 (groups of 128 inputs sharing a scale) quarters them. Which configuration runs
where:
- "int8" (`Int8WeightOnlyConfig`: one scale per output channel): CUDA and CPU;
- "int4" (`Int4WeightOnlyConfig` in the TILE_PACKED_TO_4D layout of torch's tinygemm kernel, one
  scale and zero point per group of 128 inputs, or 64 or 32 where 128 does not divide the layer's
  input width: 64 for the 7B's feed-forward down-projection of 10,944 inputs): CUDA (compute
  capability 8.0 or newer), bfloat16 weights.
Quantised are every block's projections and the output head (unless it is tied to the embedding):
an mLSTM layer's i and f gate rows with its q, k, v and o (one matrix, one product; each row keeps
its own scales, and the gates' bias and soft-cap stay in float32). The embedding table (a step reads
one row of it) stays as it is. A quantised model decodes only:
training it or saving it as a checkpoint is not supported.
"""

import torch
from torch import nn

from .model import XLSTM

METHODS = ("int8", "int4")
"""The weight-only quantisations `quantize` makes."""

INT4_GROUP_SIZES = (128, 64, 32)
"""Inputs sharing one int4 scale and zero point: the first of these that divides a layer's input
width (torchao leaves a layer that none divides unquantised, so `quantize` refuses it)."""


def quantize(model: XLSTM, method: str) -> XLSTM:
    """Quantises `model`'s large linear weights in place with `method` ("int8" or "int4"); returns it.
    A ValueError says what to change where the method does not run (device, dtype, shape), an
    ImportError what to install without torchao."""
    if not isinstance(model, XLSTM):
        raise TypeError(f"quantize takes an xlstm7b.XLSTM, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"quantize: the method must be one of {', '.join(METHODS)}, got {method!r}")
    layers = quantized_layers(model)
    if any(type(layer.weight) is not nn.Parameter for layer in layers):
        raise ValueError("quantize: the model is quantised already; load it again to quantise it another way")
    weight = model.lm_head.weight
    if method == "int4":
        if weight.device.type != "cuda":
            raise ValueError(f"quantize='int4' runs on CUDA only (torchao's int4 weight-only kernel, tinygemm), and the "
                             f"model is on {weight.device}: use 'int8' there, or move the model to a GPU")
        if weight.dtype != torch.bfloat16:
            raise ValueError(f"quantize='int4' needs bfloat16 weights, the model has {weight.dtype}: "
                             "model.to(torch.bfloat16) first (--dtype bfloat16)")
        odd = sorted({layer.in_features for layer in layers if int4_group_size(layer.in_features) is None})
        if odd:
            raise ValueError(f"quantize='int4' quantises inputs in groups of {' / '.join(map(str, INT4_GROUP_SIZES))}, none of "
                             f"which divides {odd}, the input width of some of this model's layers: use 'int8'")
    configs, quantize_ = _torchao(method)
    for group, config in configs.items():  # one pass per int4 group size (int8: one pass, group None)
        chosen = {id(layer) for layer in layers if group is None or int4_group_size(layer.in_features) == group}
        quantize_(model, config, filter_fn=lambda module, name, chosen=chosen: id(module) in chosen)
    return model


def int4_group_size(in_features: int) -> int | None:
    """The int4 group size of a layer with `in_features` inputs (None: no size fits)."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def quantized_layers(model: XLSTM) -> list[nn.Linear]:
    """The linear layers `quantize` quantises: all, the output head unless it is tied to the
    embedding table."""
    skip = {id(model.lm_head)} if model.lm_head.weight is model.backbone.embeddings.weight else set()
    return [module for module in model.modules() if isinstance(module, nn.Linear) and id(module) not in skip]


def _torchao(method: str):
    """torchao's configurations for `method` (int4: one per group size) and its quantize_ function;
    an ImportError saying how to install it where it is missing."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError(f"quantize={method!r} needs torchao (its weight-only quantisation kernels): "
                          "pip install 'xlstm7b[quantize]' (torchao >= 0.18 with torch >= 2.11)") from e
    if method == "int8":
        return {None: Int8WeightOnlyConfig()}, quantize_
    return {g: Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d") for g in INT4_GROUP_SIZES}, quantize_
