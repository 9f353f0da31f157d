"""The xLSTM 7B architecture (spec §1) in one file, bottom-up: norms, feed-forward, mLSTM layer,
block, backbone, language model.

Module names mirror the released Hugging Face checkpoint (`backbone.blocks.0.mlstm_layer...`). The
weights are in one fused layout, for fewer, larger matmuls: each mLSTM layer's input projections
[q|k|v|o|i|f] in `in_proj` (one GEMM per call) with the gates' bias [i|f] in `gate_bias`, and the
feed-forward's [gate|z] in `proj_up_gate_z`. Checkpoints (pretrained.py) convert from the released
single layout (q, k, v, ogate_preact, ...) and the xlstm package's fused one (qkv_opreact,
ifgate_preact) on load, and to the released layout on save (layouts.py).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kernels import mlstm, mlstm_step_
from .state import State


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


def cell_inputs_width(config: ModelConfig) -> int:
    return config.qk_dim + config.v_dim + 2 * config.num_heads


def split_cell_inputs(cell_inputs: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """A `cell_inputs` buffer [..., Dqk + Dv + 2 NH] -> views k [..., Dqk], v [..., Dv], i, f [..., NH]."""
    return cell_inputs.split([config.qk_dim, config.v_dim, config.num_heads, config.num_heads], dim=-1)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A clear error if any id of `input_ids` lies outside [0, vocab_size). Reads the smallest and
    largest id back to the host: on CUDA a synchronization, so data pipelines call it once where
    the ids enter (a loader, `generate`), never inside a training step."""
    if input_ids.numel():
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one read back
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids contains token id {lo if lo < 0 else hi} outside the vocabulary [0, vocab_size={vocab_size})")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matrix products after a norm run in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then scaled. F.rms_norm
    computes half-precision inputs in float32 and rounds once, in one kernel on CUDA (a decoding step
    runs 65 of these norms: every launch counts).

    Under autocast the spec's input dtype is the compute dtype (`compute_dtype`): the result and the
    weight are rounded to it, as when FSDP runs the block with bf16 parameters, so the following
    matrix product gets a bf16 activation, not one promoted to float32 by a float32 weight (from a
    float32 residual stream, or CUDA autocast's float32 F.rms_norm). Outside autocast the casts
    are free."""

    def __init__(self, dim: int, eps: float, use_bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        y = F.rms_norm(x, x.shape[-1:], eps=self.eps).to(dtype) * self.weight.to(dtype)
        return y if self.bias is None else y + self.bias.to(dtype)


class MultiHeadLayerNorm(nn.Module):
    """Mean-centred LayerNorm over each head's dv features (float32; F.layer_norm computes half
    precision in float32 and rounds once), then one weight over all heads; dtypes as in RMSNorm."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, use_bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if use_bias else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, S, NH, DH = h.shape
        dtype = compute_dtype(h)
        y = F.layer_norm(h, (DH,), eps=self.eps).to(dtype).reshape(B, S, NH * DH) * self.weight.to(dtype)
        return y if self.bias is None else y + self.bias.to(dtype)


class FeedForward(nn.Module):
    """(silu(x W_gate) * (x W_z)) W_down, with [gate | z] computed in one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, F_, bias = config.embedding_dim, config.ffn_dim, config.use_bias
        self.ffn_dim = F_
        self.proj_up_gate_z = nn.Linear(D, 2 * F_, bias=bias)
        self.proj_down = nn.Linear(F_, D, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, z = self.proj_up_gate_z(x).split(self.ffn_dim, dim=-1)
        return self.proj_down(F.silu(gate) * z)


class mLSTMLayer(nn.Module):
    """Post-up-projection mLSTM layer: projections, soft-capped gates, the mLSTM cell, per-head
    LayerNorm, output gate applied after the norm, output projection. No conv, no skip."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, Dqk, Dv, NH, bias = config.embedding_dim, config.qk_dim, config.v_dim, config.num_heads, config.use_bias
        self.in_proj = nn.Linear(D, 2 * Dqk + 2 * Dv + 2 * NH, bias=bias)  # rows [q | k | v | o | i | f]
        # The gates are always biased (spec §1): by in_proj's bias where every projection has one,
        # else by their own, added in float32 after the product.
        self.gate_bias = None if bias else nn.Parameter(torch.zeros(2 * NH))  # [i | f]
        self.multihead_norm = MultiHeadLayerNorm(NH, config.v_head_dim, config.norm_eps, bias)
        self.out_proj = nn.Linear(Dv, D, bias=bias)

    def project(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """x [B, S, D] -> q, k [B, S, Dqk]; v, o [B, S, Dv]; i, f [B, S, NH] soft-capped, float32.
        Padding (mask [B, S] False) is made invisible to the cell: i = -inf writes nothing and
        f = +inf (lf = 0) forgets nothing (spec §2)."""
        c = self.config
        q, k, v, o, gates = self.in_proj(x).split([c.qk_dim, c.qk_dim, c.v_dim, c.v_dim, 2 * c.num_heads], dim=-1)
        gates = gates.float() if self.gate_bias is None else gates.float() + self.gate_bias
        i, f = soft_cap(gates, c.gate_soft_cap).split(c.num_heads, dim=-1)
        if mask is not None:
            i = i.masked_fill(~mask[..., None], float("-inf"))
            f = f.masked_fill(~mask[..., None], float("inf"))
        return q, k, v, o, i, f

    def gate_biases(self) -> torch.Tensor:
        """The i and f gates' bias [2 NH] ([i | f]): `gate_bias`, or the last rows of in_proj's bias."""
        return self.in_proj.bias[-2 * self.config.num_heads :] if self.gate_bias is None else self.gate_bias

    def record(self, cell_inputs, k, v, i, f) -> None:
        if cell_inputs is not None:
            for dst, src in zip(split_cell_inputs(cell_inputs, self.config), (k, v, i, f)):
                dst.copy_(src)

    def output(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Cell output h [B, S, NH, DV] and output gate pre-activation o [B, S, Dv] -> y [B, S, D]."""
        return self.out_proj(torch.sigmoid(o) * self.multihead_norm(h))

    def forward(self, x, state=None, *, reset=None, mask=None, cell_inputs=None):
        """x [B, S, D] -> y [B, S, D] and the layer's state after the last position (chunkwise
        kernel; `state` is not modified). cell_inputs [B, S, Dqk+Dv+2NH]: receives k, v, i, f."""
        c = self.config
        B, S, _ = x.shape
        q, k, v, o, i, f = self.project(x, mask)
        self.record(cell_inputs, k, v, i, f)
        # [B, S, NH*DH] -> [B, NH, S, DH]
        q, k, v = (t.view(B, S, c.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        h, state = mlstm(
            q, k, v, i.transpose(1, 2), f.transpose(1, 2), state,
            backend=c.mlstm_backend, chunk_size=c.chunk_size, reset=reset, eps=c.eps,
        )
        return self.output(h.transpose(1, 2), o), state  # h [B, NH, S, DV] -> [B, S, NH, DV]

    def step(self, x, state, active=None, cell_inputs=None, slots=None):
        """One token x [B, 1, D] -> y [B, 1, D] through the fused step kernel, which writes the new
        state into `state` (its rows `slots` [B] where given). Rows where active [B] is False
        leave it untouched."""
        c = self.config
        B = x.shape[0]
        q, k, v, o, i, f = self.project(x, None if active is None else active[:, None])
        self.record(cell_inputs, k, v, i, f)
        # [B, 1, NH*DH] -> [B, NH, DH]
        h = mlstm_step_(
            q.view(B, c.num_heads, -1), k.view(B, c.num_heads, -1), v.view(B, c.num_heads, -1),
            i.view(B, c.num_heads), f.view(B, c.num_heads), state, backend=c.mlstm_backend, eps=c.eps, slots=slots,
        )
        return self.output(h.view(B, 1, c.num_heads, -1), o)  # [B, NH, DV] -> [B, 1, NH, DV]


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_mlstm = RMSNorm(config.embedding_dim, config.norm_eps, config.use_bias)
        self.mlstm_layer = mLSTMLayer(config)
        self.norm_ffn = RMSNorm(config.embedding_dim, config.norm_eps, config.use_bias)
        self.ffn = FeedForward(config)

    def forward(self, x, state=None, *, reset=None, mask=None, cell_inputs=None):
        y, state = self.mlstm_layer(self.norm_mlstm(x), state, reset=reset, mask=mask, cell_inputs=cell_inputs)
        x = x + y
        return x + self.ffn(self.norm_ffn(x)), state

    def step(self, x, state, active=None, cell_inputs=None, slots=None):
        x = x + self.mlstm_layer.step(self.norm_mlstm(x), state, active, cell_inputs, slots)
        return x + self.ffn(self.norm_ffn(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.out_norm = RMSNorm(config.embedding_dim, config.norm_eps, config.use_bias) if config.add_out_norm else nn.Identity()


class XLSTM(nn.Module):
    """xLSTM language model. `model(input_ids, state) -> (logits, state)` over a sequence (see
    `forward`); `model.step(token, state) -> logits` decodes one token in place (see `step`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """With `tie_word_embeddings`, makes the lm_head's weight the embedding's Parameter object."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def _apply(self, fn, recurse=True):
        # `to_empty()` (materialising from the meta device) and moves between device types give
        # every module a new Parameter of its own, which would untie a tied lm_head.
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

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
        for block in self.backbone.blocks:
            layer, ffn = block.mlstm_layer, block.ffn
            w = layer.in_proj.weight  # rows [q | k | v | o | i | f]
            nn.init.normal_(w[: 2 * c.qk_dim + c.v_dim], std=small)
            w[2 * c.qk_dim + c.v_dim :].zero_()  # the output gate's and the i, f gates' rows
            bias = layer.gate_biases()
            # On the bias's device, stated: after transformers has loaded a model, a `torch.device(...)`
            # context no longer places torch.linspace (for the rest of the process).
            i_bias = torch.full((c.num_heads,), -10.0, device=bias.device)
            bias.copy_(torch.cat([i_bias, torch.linspace(3.0, 6.0, c.num_heads, device=bias.device)]))
            nn.init.normal_(ffn.proj_up_gate_z.weight, std=small)
            nn.init.normal_(layer.out_proj.weight, std=wang)
            nn.init.normal_(ffn.proj_down.weight, std=wang)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def validate_inputs(self, input_ids, state=None, reset=None, mask=None, cell_inputs=None) -> None:
        """A clear error for ids of the wrong type or shape, or a state, reset, mask or cell_inputs
        buffer that does not fit them. Reads metadata only (no host synchronization): the values
        of the ids are `check_token_ids`'s job."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.LongTensor [B, S], got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, S] with S >= 1, got {list(input_ids.shape)}")
        B, S = input_ids.shape
        for name, t in (("reset", reset), ("mask", mask)):
            if t is not None and (t.dtype != torch.bool or tuple(t.shape) != (B, S)):
                raise ValueError(f"{name} must be a bool tensor of shape [B, S] = [{B}, {S}], got {t.dtype} {list(t.shape)}")
        if state is not None:
            if not isinstance(state, State) or len(state) != self.config.num_blocks or state.batch_size != B:
                raise ValueError(f"state must be a State with {self.config.num_blocks} layers and batch size {B}")
        if cell_inputs is not None:
            want = (self.config.num_blocks, B, S, cell_inputs_width(self.config))
            if tuple(cell_inputs.shape) != want:
                raise ValueError(f"cell_inputs must be a cell_inputs_buffer({B}, {S}) of shape {list(want)}, got {list(cell_inputs.shape)}")

    def forward(
        self,
        input_ids: torch.Tensor,
        state: State | None = None,
        *,
        reset: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cell_inputs: torch.Tensor | None = None,
        last_logits_only: bool = False,
        return_hidden: bool = False,
        check_ids: bool = True,
    ) -> tuple[torch.Tensor, State]:
        """input_ids [B, S] (any S >= 1) -> logits [B, S, V] (soft-capped) and the state after the
        last position, through the chunkwise kernel.

        state: where to start from (None = empty); never modified, and gradients flow through it
            (truncated BPTT).
        reset: bool [B, S], True where a new document starts: the state is zeroed right before it.
        mask: bool [B, S], False at padding positions, which leave the state untouched.
        cell_inputs: a `cell_inputs_buffer(B, S)`; receives what every layer's cell saw.
        last_logits_only: compute logits for the last position only ([B, 1, V]), as in prefill.
        return_hidden: return the final hidden states [B, S, D] (after the output norm) in place of
            the logits; `logits(hidden)` maps them, so a loss can compute the logits piece by piece.
        check_ids: check that every id lies in the vocabulary (`check_token_ids`: a clear error in
            place of an embedding's index error, or a CUDA device-side assert that ends the process,
            at the cost of one host synchronization). A caller that checked its ids where they
            entered passes False, so its steps never wait on the host: the trainer (TokenData
            checks its tokens when it opens them), speculative decoding's verification, `xlstm7b
            eval` and the lm-eval harness (they check each batch on the host). Shapes and types are
            checked either way.
        """
        self.validate_inputs(input_ids, state, reset, mask, cell_inputs)
        if check_ids:
            check_token_ids(input_ids, self.config.vocab_size)
        x = self.backbone.embeddings(input_ids)
        layers = []
        for n, block in enumerate(self.backbone.blocks):
            x, layer_state = block(
                x, None if state is None else state[n], reset=reset, mask=mask,
                cell_inputs=None if cell_inputs is None else cell_inputs[n],
            )
            layers.append(layer_state)
        x = self.backbone.out_norm(x[:, -1:] if last_logits_only else x)
        return x if return_hidden else self.logits(x), State(layers)

    def step(
        self,
        token: torch.Tensor,
        state: State,
        active: torch.Tensor | None = None,
        cell_inputs: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decoding step: token [B] -> logits [B, V], writing the new state into `state`
        (contiguous float32 tensors, e.g. `State.zeros`; no gradient flows through it). Rows where
        active [B] is False leave the state untouched. cell_inputs: a `cell_inputs_buffer(B, 1)`,
        filled as in `forward`.
        slots: int64 [B], token b's row of `state`, which may then have any number of rows (a
        serving pool): only those rows are read and written, so the step costs B rows however large
        the state. Distinct slots, except rows that are inactive (they may share a scratch row).

        Nothing is validated (no host synchronization), so the step can be captured in a CUDA graph
        or compiled; the caller guarantees ids in range and matching shapes."""
        x = self.backbone.embeddings(token[:, None])  # [B, 1, D]
        for n, block in enumerate(self.backbone.blocks):
            x = block.step(x, state[n], active, None if cell_inputs is None else cell_inputs[n], slots)
        return self.logits(self.backbone.out_norm(x))[:, 0]

    def cell_inputs_buffer(self, batch_size: int, seq_len: int = 1) -> torch.Tensor:
        """A buffer for the `cell_inputs` argument of `forward` and `step`: float32
        [num_blocks, B, S, Dqk + Dv + 2 NH], which they fill with every layer's k, v, i, f as its
        cell saw them (gates soft-capped, padding masked); `split_cell_inputs` takes it apart.
        With them a saved state can be re-advanced over some of the positions with the cell alone
        (`kernels.mlstm_advance`), as speculative decoding's rollback does."""
        c = self.config
        return torch.zeros(c.num_blocks, batch_size, seq_len, cell_inputs_width(c), device=self.lm_head.weight.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., D] (after the output norm) -> soft-capped logits [..., V]."""
        return soft_cap(self.lm_head(hidden), self.config.output_logit_soft_cap)
