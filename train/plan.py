"""Memory plan: parameters, gradients, optimizer state and activations per device under the chosen
parallelism, and whether it fits. `xlstm7b plan CONFIG --gpus N` (cli.py) prints it; training checks it first.

The estimate (bytes; P parameters, e the compute dtype's size, T = micro_batch * seq_len tokens):
    parameters   4P fp32 master weights (/N with FSDP), + two blocks unsharded in the compute dtype (FSDP)
    gradients    4P fp32 (/N with FSDP)
    optimizer    8P (AdamW's two fp32 moments; /N with FSDP)
    with cpu_offload these three live in host memory and only the unsharded blocks stay on the device
    activations  per block and token: e * (4D + 2Dqk + 4Dv + 3Dff) + fp32 gates and chunk states;
                 with activation checkpointing only each block's input (e * D) plus one block in full;
                 plus the logits: L * V * (e + 8) (fp32 upcast for the loss and its gradient), L = T or
                 train.loss_chunk_tokens when the loss is computed in pieces
    overhead     1 GiB of workspace and allocator slack
"""

import os
from dataclasses import dataclass

import torch

from xlstm7b import XLSTM

from .config import JobConfig
from .parallel import resolve_parallel

GiB = 2**30


@dataclass
class Plan:
    params: int
    parallel: str
    devices: int
    device_kind: str
    capacity_gb: float
    parts_gb: dict[str, float]
    host_gb: float

    @property
    def total_gb(self) -> float:
        return sum(self.parts_gb.values())

    @property
    def fits(self) -> bool:
        return self.total_gb <= 0.95 * self.capacity_gb

    def report(self, job: JobConfig) -> str:
        t = job.train
        lines = [
            f"model        {self.params:,} parameters ({self.params / 1e9:.2f} B)",
            f"setup        {self.devices} {self.device_kind}(s), parallel={self.parallel}, cpu_offload={t.cpu_offload}, "
            f"activation_checkpointing={t.activation_checkpointing}, micro_batch={t.micro_batch} x seq_len={t.seq_len}",
            f"per {self.device_kind:<8}",
            *(f"  {k:<12} {v:9.2f} GiB" for k, v in self.parts_gb.items()),
            f"  {'total':<12} {self.total_gb:9.2f} GiB of {self.capacity_gb:.1f} GiB",
        ]
        if self.host_gb:
            lines.append(f"host memory  {self.host_gb:.2f} GiB per process for offloaded parameters, gradients and optimizer state")
        lines.append("fits         yes" if self.fits else "fits         NO: " + self.advice(job))
        return "\n".join(lines)

    def advice(self, job: JobConfig) -> str:
        t = job.train
        tips = []
        if self.parts_gb["logits"] > 1 and not 0 < t.loss_chunk_tokens <= 4096:
            tips.append("--train.loss_chunk_tokens=4096")
        if not t.activation_checkpointing:
            tips.append("--train.activation_checkpointing=true")
        if t.micro_batch > 1:
            tips.append(f"--train.micro_batch={max(1, t.micro_batch // 2)} (accumulation keeps the global batch)")
        if self.parallel != "fsdp" and self.device_kind == "GPU":
            tips.append("--train.parallel=fsdp with more GPUs")
        if not t.cpu_offload and self.device_kind == "GPU":
            tips.append("--train.cpu_offload=true")
        return "needs more memory than the device has; try " + ", ".join(tips) if tips else "use more or larger devices"


def device_capacity_gb(device: torch.device, override: float) -> float:
    if override:
        return override
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GiB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


def estimate(job: JobConfig, devices: int, device: torch.device, capacity_gb: float | None = None) -> Plan:
    c, t = job.model, job.train
    parallel = resolve_parallel(t, devices)
    D, Dqk, Dv, Dff, NH, V = c.embedding_dim, c.qk_dim, c.v_dim, c.ffn_dim, c.num_heads, c.vocab_size
    with torch.device("meta"):
        model = XLSTM(c)
    P = model.num_params()
    block = sum(p.numel() for p in model.backbone.blocks[0].parameters())
    e = 2 if (t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")) else 4
    shard = devices if parallel == "fsdp" else 1
    unsharded = 2 * block * e if parallel == "fsdp" else 0
    state = {"parameters": 4 * P / shard, "gradients": 4 * P / shard, "optimizer": 8 * P / shard}
    host = sum(state.values()) if t.cpu_offload else 0
    if t.cpu_offload:
        state = dict.fromkeys(state, 0.0)
    state["parameters"] += unsharded
    T = t.micro_batch * t.seq_len
    cell = 4 * (4 * NH + NH * c.qk_head_dim * c.v_head_dim / c.chunk_size + 2 * NH * c.chunk_size)
    per_block = T * (e * (4 * D + 2 * Dqk + 4 * Dv + 3 * Dff) + cell)
    acts = c.num_blocks * T * e * D + per_block if t.activation_checkpointing else c.num_blocks * per_block
    parts = {**state, "activations": acts, "logits": min(T, t.loss_chunk_tokens or T) * V * (e + 8), "overhead": GiB}
    kind = "GPU" if device.type == "cuda" else "CPU"
    cap = capacity_gb if capacity_gb is not None else device_capacity_gb(device, job.run.gpu_memory_gb)
    return Plan(P, parallel, devices, kind, cap, {k: v / GiB for k, v in parts.items()}, host / GiB)
