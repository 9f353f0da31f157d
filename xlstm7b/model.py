"""The xLSTM 7B architecture (spec §1) in one file, bottom-up: norms, feed-forward, mLSTM layer,
block, backbone, language model.

Module names mirror the released Hugging Face checkpoint, so `state_dict()` keys are the released
parameter names (`backbone.blocks.0.mlstm_layer.q.weight`, ...). The fused weight layout uses the
xlstm package's names (`qkv_opreact`, `ifgate_preact`, `proj_up_gate_z`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, WeightMode
from .kernels import mlstm, mlstm_step
from .state import State


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float, use_bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        return y if self.bias is None else y + self.bias


class MultiHeadLayerNorm(nn.Module):
    """Mean-centred LayerNorm over each head's dv features (float32), then one weight over all heads."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, use_bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if use_bias else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, S, NH, DH = h.shape
        hf = h.float()
        hf = hf - hf.mean(dim=-1, keepdim=True)
        hf = hf * torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        y = hf.to(h.dtype).reshape(B, S, NH * DH) * self.weight
        return y if self.bias is None else y + self.bias


class FeedForward(nn.Module):
    """(silu(x W_gate) * (x W_up)) W_down; 'fused' computes [gate | z] in one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, F_, bias = config.embedding_dim, config.ffn_dim, config.use_bias
        self.ffn_dim = F_
        if config.weight_mode == "single":
            self.proj_up_gate = nn.Linear(D, F_, bias=bias)
            self.proj_up = nn.Linear(D, F_, bias=bias)
        else:
            self.proj_up_gate_z = nn.Linear(D, 2 * F_, bias=bias)
        self.proj_down = nn.Linear(F_, D, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "proj_up_gate_z"):
            gate, z = self.proj_up_gate_z(x).split(self.ffn_dim, dim=-1)
        else:
            gate, z = self.proj_up_gate(x), self.proj_up(x)
        return self.proj_down(F.silu(gate) * z)


class mLSTMLayer(nn.Module):
    """Post-up-projection mLSTM layer: projections, soft-capped gates, the mLSTM cell, per-head
    LayerNorm, output gate applied after the norm, output projection. No conv, no skip."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, Dqk, Dv, NH, bias = config.embedding_dim, config.qk_dim, config.v_dim, config.num_heads, config.use_bias
        if config.weight_mode == "single":
            self.q = nn.Linear(D, Dqk, bias=bias)
            self.k = nn.Linear(D, Dqk, bias=bias)
            self.v = nn.Linear(D, Dv, bias=bias)
            self.ogate_preact = nn.Linear(D, Dv, bias=bias)
            self.igate_preact = nn.Linear(D, NH, bias=True)
            self.fgate_preact = nn.Linear(D, NH, bias=True)
        else:
            self.qkv_opreact = nn.Linear(D, 2 * Dqk + 2 * Dv, bias=bias)
            self.ifgate_preact = nn.Linear(D, 2 * NH, bias=True)
        self.multihead_norm = MultiHeadLayerNorm(NH, config.v_head_dim, config.norm_eps, bias)
        self.out_proj = nn.Linear(Dv, D, bias=bias)

    def project(self, x: torch.Tensor):
        """x [B, S, D] -> q, k [B, S, Dqk]; v, o [B, S, Dv]; i, f [B, S, NH] soft-capped, float32."""
        c = self.config
        if hasattr(self, "qkv_opreact"):
            q, k, v, o = self.qkv_opreact(x).split([c.qk_dim, c.qk_dim, c.v_dim, c.v_dim], dim=-1)
            i, f = self.ifgate_preact(x).float().split(c.num_heads, dim=-1)
        else:
            q, k, v, o = self.q(x), self.k(x), self.v(x), self.ogate_preact(x)
            i, f = self.igate_preact(x).float(), self.fgate_preact(x).float()
        return q, k, v, o, soft_cap(i, c.gate_soft_cap), soft_cap(f, c.gate_soft_cap)

    def forward(self, x, state=None, *, reset=None, mask=None, inplace=False):
        """x [B, S, D] -> y [B, S, D] and the layer's new state; `inplace` writes it into `state`."""
        c = self.config
        B, S, _ = x.shape
        q, k, v, o, i, f = self.project(x)
        if mask is not None:  # padding writes nothing (i = -inf) and forgets nothing (lf = 0)
            i = i.masked_fill(~mask[..., None], float("-inf"))
            f = f.masked_fill(~mask[..., None], float("inf"))
        if S == 1 and state is not None and reset is None and not torch.is_grad_enabled():
            # Decoding: the fused single-token step. [B, 1, NH*DH] -> [B, NH, DH]
            h, state = mlstm_step(
                q.view(B, c.num_heads, -1), k.view(B, c.num_heads, -1), v.view(B, c.num_heads, -1),
                i.view(B, c.num_heads), f.view(B, c.num_heads), state,
                backend=c.mlstm_backend, eps=c.eps, inplace=inplace,
            )
            h = h.view(B, 1, c.num_heads, -1)  # [B, S=1, NH, DV]
        else:
            # [B, S, NH*DH] -> [B, NH, S, DH]
            q, k, v = (t.view(B, S, c.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            h, new_state = mlstm(
                q, k, v, i.transpose(1, 2), f.transpose(1, 2), state,
                backend=c.mlstm_backend, chunk_size=c.chunk_size, reset=reset, eps=c.eps,
            )
            if inplace and state is not None:
                for old, new in zip(state, new_state):
                    old.copy_(new)
            else:
                state = new_state
            h = h.transpose(1, 2)  # [B, S, NH, DV]
        h = self.multihead_norm(h)  # [B, S, Dv]
        return self.out_proj(torch.sigmoid(o) * h), state


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_mlstm = RMSNorm(config.embedding_dim, config.norm_eps, config.use_bias)
        self.mlstm_layer = mLSTMLayer(config)
        self.norm_ffn = RMSNorm(config.embedding_dim, config.norm_eps, config.use_bias)
        self.ffn = FeedForward(config)

    def forward(self, x, state=None, *, reset=None, mask=None, inplace=False):
        y, state = self.mlstm_layer(self.norm_mlstm(x), state, reset=reset, mask=mask, inplace=inplace)
        x = x + y
        return x + self.ffn(self.norm_ffn(x)), state


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.out_norm = RMSNorm(config.embedding_dim, config.norm_eps, config.use_bias) if config.add_out_norm else nn.Identity()


class XLSTM(nn.Module):
    """xLSTM language model. `model(input_ids, state) -> (logits, state)`; see `forward`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The initialisation used to train xLSTM 7B (spec §6). Also valid after building on the meta
        device and `to_empty(device=...)`."""
        c = self.config
        small = math.sqrt(2 / (5 * c.embedding_dim))
        wang = 2 / (c.num_blocks * math.sqrt(c.embedding_dim))
        for module in self.modules():
            if isinstance(module, (RMSNorm, MultiHeadLayerNorm)):
                module.weight.fill_(1.0)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
        nn.init.normal_(self.backbone.embeddings.weight, std=small)
        if not c.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=small)
        i_bias = torch.full((c.num_heads,), -10.0)
        f_bias = torch.linspace(3.0, 6.0, c.num_heads)
        for block in self.backbone.blocks:
            layer, ffn = block.mlstm_layer, block.ffn
            if c.weight_mode == "single":
                for lin in (layer.q, layer.k, layer.v):
                    nn.init.normal_(lin.weight, std=small)
                layer.ogate_preact.weight.zero_()
                layer.igate_preact.weight.zero_()
                layer.fgate_preact.weight.zero_()
                layer.igate_preact.bias.copy_(i_bias)
                layer.fgate_preact.bias.copy_(f_bias)
                nn.init.normal_(ffn.proj_up_gate.weight, std=small)
                nn.init.normal_(ffn.proj_up.weight, std=small)
            else:
                w = layer.qkv_opreact.weight  # rows [q | k | v | o]
                nn.init.normal_(w[: 2 * c.qk_dim + c.v_dim], std=small)
                w[2 * c.qk_dim + c.v_dim :].zero_()
                layer.ifgate_preact.weight.zero_()
                layer.ifgate_preact.bias.copy_(torch.cat([i_bias, f_bias]))
                nn.init.normal_(ffn.proj_up_gate_z.weight, std=small)
            nn.init.normal_(layer.out_proj.weight, std=wang)
            nn.init.normal_(ffn.proj_down.weight, std=wang)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """A clear error for ids of the wrong type, shape or range (one host sync)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.LongTensor [B, S], got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, S] with S >= 1, got {list(input_ids.shape)}")
        if input_ids.numel():
            lo, hi = input_ids.min().item(), input_ids.max().item()
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"input_ids contains token id {bad} outside [0, vocab_size={self.config.vocab_size})")

    def forward(
        self,
        input_ids: torch.Tensor,
        state: State | None = None,
        *,
        reset: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        inplace: bool = False,
        last_logits_only: bool = False,
        return_hidden: bool = False,
    ) -> tuple[torch.Tensor, State]:
        """input_ids [B, S] (any S >= 1) -> logits [B, S, V] (soft-capped) and the state after the
        last position.

        state: where to start from (None = empty). It is never modified unless `inplace=True`, in
            which case the new values are copied into its tensors (decoding with a preallocated
            state); gradients flow through a state passed in (truncated BPTT).
        reset: bool [B, S], True where a new document starts: the state is zeroed right before it.
        mask: bool [B, S], False at padding positions, which leave the state untouched.
        last_logits_only: compute logits for the last position only ([B, 1, V]), as in prefill.
        return_hidden: return the final hidden states [B, S, D] (after the output norm) in place of
            the logits; `logits(hidden)` maps them, so a loss can compute the logits piece by piece.
        """
        self.check_input_ids(input_ids)
        B, S = input_ids.shape
        for name, t in (("reset", reset), ("mask", mask)):
            if t is not None and (t.dtype != torch.bool or tuple(t.shape) != (B, S)):
                raise ValueError(f"{name} must be a bool tensor of shape [B, S] = [{B}, {S}], got {t.dtype} {list(t.shape)}")
        if state is not None:
            if not isinstance(state, State) or len(state) != self.config.num_blocks or state.batch_size != B:
                raise ValueError(f"state must be a State with {self.config.num_blocks} layers and batch size {B}")
        return self.run(input_ids, state, reset=reset, mask=mask, inplace=inplace, last_logits_only=last_logits_only,
                        return_hidden=return_hidden)

    def run(self, input_ids, state=None, *, reset=None, mask=None, inplace=False, last_logits_only=False, return_hidden=False):
        """`forward` without validating its arguments: no host synchronization, so a decoding step
        can be captured in a CUDA graph. The caller guarantees ids in range and matching shapes."""
        x = self.backbone.embeddings(input_ids)
        layers = []
        for n, block in enumerate(self.backbone.blocks):
            x, layer_state = block(x, None if state is None else state[n], reset=reset, mask=mask, inplace=inplace)
            layers.append(layer_state)
        x = self.backbone.out_norm(x[:, -1:] if last_logits_only else x)
        return x if return_hidden else self.logits(x), state if inplace and state is not None else State(layers)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., D] (after the output norm) -> soft-capped logits [..., V]."""
        return soft_cap(self.lm_head(hidden), self.config.output_logit_soft_cap)

    def save_pretrained(self, path, *, max_shard_size: int = 5 * 2**30, dtype: torch.dtype | None = None) -> None:
        """Writes the released Hugging Face layout (config.json + safetensors shards); see checkpoint.py."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)

    def with_weight_mode(self, weight_mode: WeightMode) -> "XLSTM":
        """This model in the other weight layout (single <-> fused), with identical outputs."""
        config = self.config.replace(weight_mode=weight_mode)
        with torch.device("meta"):
            model = XLSTM(config)
        sd = convert_weight_layout(self.state_dict(), self.config, weight_mode)
        model.load_state_dict(sd, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.backbone.embeddings.weight
        return model


# Fused layout: (fused module, [single modules in concatenation order]) per block.
FUSED_GROUPS = (
    ("mlstm_layer.qkv_opreact", ("mlstm_layer.q", "mlstm_layer.k", "mlstm_layer.v", "mlstm_layer.ogate_preact")),
    ("mlstm_layer.ifgate_preact", ("mlstm_layer.igate_preact", "mlstm_layer.fgate_preact")),
    ("ffn.proj_up_gate_z", ("ffn.proj_up_gate", "ffn.proj_up")),
)


def convert_weight_layout(state_dict: dict[str, torch.Tensor], config: ModelConfig, to: WeightMode) -> dict[str, torch.Tensor]:
    """Converts a state dict between the 'single' and 'fused' layouts. Entries are moved out of
    `state_dict` as they are converted, so peak memory grows by one projection at most."""
    if to not in ("single", "fused"):
        raise ValueError(f"weight layout must be 'single' or 'fused', got {to!r}")
    c = config
    sizes = {
        "mlstm_layer.qkv_opreact": [c.qk_dim, c.qk_dim, c.v_dim, c.v_dim],
        "mlstm_layer.ifgate_preact": [c.num_heads, c.num_heads],
        "ffn.proj_up_gate_z": [c.ffn_dim, c.ffn_dim],
    }
    out = dict(state_dict)
    for n in range(c.num_blocks):
        p = f"backbone.blocks.{n}."
        for fused, singles in FUSED_GROUPS:
            for kind in ("weight", "bias"):
                fused_key, single_keys = f"{p}{fused}.{kind}", [f"{p}{s}.{kind}" for s in singles]
                if to == "fused" and all(k in out for k in single_keys):
                    out[fused_key] = torch.cat([out.pop(k) for k in single_keys], dim=0)
                elif to == "single" and fused_key in out:
                    for k, part in zip(single_keys, out.pop(fused_key).split(sizes[fused], dim=0)):
                        out[k] = part.clone()
    return out
