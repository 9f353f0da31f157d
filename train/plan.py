"""Memory plan: parameters, gradients, optimizer state and activations per device under the chosen
parallelism, and whether it fits. `xlstm7b plan CONFIG --gpus N` (cli.py) prints it; training checks it first.

The estimate (bytes; P parameters, e the compute dtype's size, T = micro_batch * seq_len tokens):
    parameters   4P fp32 master weights (/N with FSDP); with FSDP also, unsharded in the compute dtype,
                 two blocks (the one running and the one prefetched) and the root group (embedding,
                 out norm, lm_head), which FSDP keeps unsharded for the whole step
    gradients    4P fp32 (/N with FSDP); with FSDP also the gradients of the largest group (a block or
                 the root) in flight: unsharded in the compute dtype, reduced to fp32 (/N); and with
                 FSDP and gradient accumulation 4P more: between reductions (the trainer reduces
                 once per step) FSDP accumulates every gradient unsharded in fp32 on the device
    optimizer    8P (AdamW's two fp32 moments; /N with FSDP)
    with cpu_offload the 16P/N of fp32 state lives in host memory (pinned) and only the unsharded
    groups and gradients in flight stay on the device; host memory adds 2 GiB for the process itself
    (CUDA context, libraries, data)
    activations  per block and token: e * (4D + 2Dqk + 4Dv + 3Dff) + fp32 gates and chunk states;
                 with activation checkpointing only each block's input (e * D) plus one block in full;
                 plus the logits: L * V * (e + 8) (fp32 upcast for the loss and its gradient), L = T or
                 train.loss_chunk_tokens when the loss is computed in pieces
    overhead     1 GiB of workspace and allocator slack

train.micro_batch = 0 asks for the largest micro-batch that fits: the largest divisor of the
sequences each process trains per step whose estimate fits (so gradient accumulation keeps the
global batch exactly).
"""

import dataclasses
import os
from dataclasses import dataclass

import torch

from xlstm7b import XLSTM, ModelConfig

from .config import JobConfig
from .parallel import resolve_parallel

GiB = 2**30
HOST_RUNTIME_GB = 2.0
"""Host memory of a training process besides offloaded state: CUDA context, libraries, data."""


@dataclass
class Plan:
    params: int
    parallel: str
    devices: int
    device_kind: str
    capacity_gb: float
    parts_gb: dict[str, float]
    host_gb: float
    micro_batch: int
    picked: str = ""
    """How an automatic micro-batch (train.micro_batch = 0) was chosen; '' when it was given."""

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
            f"activation_checkpointing={t.activation_checkpointing}, micro_batch={self.micro_batch} x seq_len={t.seq_len}",
            *([f"micro_batch  {self.picked}"] if self.picked else []),
            f"per {self.device_kind:<8}",
            *(f"  {k:<12} {v:9.2f} GiB" for k, v in self.parts_gb.items()),
            f"  {'total':<12} {self.total_gb:9.2f} GiB of {self.capacity_gb:.1f} GiB",
            f"host memory  {self.host_gb:.2f} GiB per process ({'offloaded parameters, gradients and optimizer state + ' if t.cpu_offload else ''}"
            f"{HOST_RUNTIME_GB:g} GiB for the process)",
        ]
        lines.append("fits         yes" if self.fits else "fits         NO: " + self.advice(job))
        return "\n".join(lines)

    def host_problem(self, processes: int, host_capacity_gb: float) -> str | None:
        """Why `processes` such processes with cpu_offload do not fit a machine of
        `host_capacity_gb` of memory (95 % of it), or None."""
        need = processes * self.host_gb
        if need <= 0.95 * host_capacity_gb:
            return None
        return (f"{processes} process(es) need {need:.1f} GiB ({self.host_gb:.1f} GiB each: 16 bytes per parameter of "
                f"its shard with cpu_offload, + {HOST_RUNTIME_GB:g} GiB), this machine has {host_capacity_gb:.1f} GiB; "
                "use more machines (FSDP shards the offloaded state over them) or leave train.cpu_offload off")

    def advice(self, job: JobConfig) -> str:
        t = job.train
        tips = []
        if self.parts_gb["logits"] > 1 and not 0 < t.loss_chunk_tokens <= 4096:
            tips.append("--train.loss_chunk_tokens=4096")
        if not t.activation_checkpointing:
            tips.append("--train.activation_checkpointing=true")
        if self.micro_batch > 1:
            tips.append(f"--train.micro_batch={max(1, self.micro_batch // 2)} (accumulation keeps the global batch)")
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
    """The memory plan of `job` on `devices` devices like `device` (capacity: `capacity_gb`, else
    run.gpu_memory_gb, else the device's). With train.micro_batch = 0, that of the largest
    micro-batch that fits (`Plan.picked` says which, or, if none does, why: the plan of 1)."""
    cap = capacity_gb if capacity_gb is not None else device_capacity_gb(device, job.run.gpu_memory_gb)
    counts = parameter_counts(job.model)
    if job.train.micro_batch:
        return _estimate(job, devices, device, cap, job.train.micro_batch, counts)
    per_rank = job.sequences_per_rank(devices)
    for m in sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True):
        plan = _estimate(job, devices, device, cap, m, counts)
        if plan.fits:
            plan.picked = (f"{m} picked (train.micro_batch = 0): the largest divisor of the {per_rank} sequences per "
                           f"process per step whose plan fits 95 % of {cap:.1f} GiB")
            return plan
    plan.picked = f"none fits (train.micro_batch = 0): even 1 sequence of {job.train.seq_len} tokens needs {plan.total_gb:.2f} GiB"
    return plan


def parameter_counts(c: ModelConfig) -> tuple[int, int]:
    """The model's parameters and those of one block, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = XLSTM(c)
    return model.num_params(), sum(p.numel() for p in model.backbone.blocks[0].parameters())


def _estimate(job: JobConfig, devices: int, device: torch.device, cap: float, micro_batch: int,
              counts: tuple[int, int]) -> Plan:
    c, t = job.model, job.train
    parallel = resolve_parallel(t, devices)
    D, Dqk, Dv, Dff, NH, V = c.embedding_dim, c.qk_dim, c.v_dim, c.ffn_dim, c.num_heads, c.vocab_size
    P, block = counts
    root = P - c.num_blocks * block  # embedding, out norm, lm_head: the outermost FSDP group
    e = 2 if (t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")) else 4
    fsdp = parallel == "fsdp"
    shard = devices if fsdp else 1
    state = {"parameters": 4 * P / shard, "gradients": 4 * P / shard, "optimizer": 8 * P / shard}
    host = sum(state.values()) if t.cpu_offload else 0
    if t.cpu_offload:
        state = dict.fromkeys(state, 0.0)
    if fsdp:
        state["parameters"] += e * (2 * block + root)
        state["gradients"] += (e + 4 / shard) * max(block, root)
        if t.global_batch_tokens // t.seq_len > micro_batch * devices:  # accumulation
            state["gradients"] += 4 * P
    T = micro_batch * t.seq_len
    cell = 4 * (4 * NH + NH * c.qk_head_dim * c.v_head_dim / c.chunk_size + 2 * NH * c.chunk_size)
    per_block = T * (e * (4 * D + 2 * Dqk + 4 * Dv + 3 * Dff) + cell)
    acts = c.num_blocks * T * e * D + per_block if t.activation_checkpointing else c.num_blocks * per_block
    parts = {**state, "activations": acts, "logits": min(T, t.loss_chunk_tokens or T) * V * (e + 8), "overhead": GiB}
    kind = "GPU" if device.type == "cuda" else "CPU"
    return Plan(P, parallel, devices, kind, cap, {k: v / GiB for k, v in parts.items()}, host / GiB + HOST_RUNTIME_GB, micro_batch)


def with_micro_batch(job: JobConfig, micro_batch: int) -> JobConfig:
    """`job` with train.micro_batch set (as a plan picked it)."""
    return dataclasses.replace(job, train=dataclasses.replace(job.train, micro_batch=micro_batch))
