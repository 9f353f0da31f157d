"""Distribution, applied from outside to a plain XLSTM: process group, FSDP2 / DDP, per-block
torch.compile and activation checkpointing, and meta-device initialization.

The model is built on the meta device; no rank ever holds more than one block's full weights.
Initialization draws each part (embedding, block i, out norm, head) from its own seed, so the
weights are the same for any number of processes and any parallelism.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint as recompute_in_backward

from xlstm7b import XLSTM, ModelConfig

from .config import TrainConfig
from .finetune import load_weights


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t


def init_distributed() -> Dist:
    """Reads torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank, device)


def resolve_parallel(cfg: TrainConfig, world: int) -> str:
    if cfg.parallel != "auto":
        if cfg.parallel == "none" and world > 1:
            raise ValueError(f"train.parallel='none' with {world} processes; use 'fsdp' or 'ddp'")
        return cfg.parallel
    return "fsdp" if world > 1 or cfg.cpu_offload else "none"


def mixed_precision_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def model_parts(model: XLSTM) -> list[tuple[str, nn.Module]]:
    b = model.backbone
    return [("backbone.embeddings", b.embeddings), *((f"backbone.blocks.{i}", blk) for i, blk in enumerate(b.blocks)),
            ("backbone.out_norm", b.out_norm), ("lm_head", model.lm_head)]


@torch.no_grad()
def materialize(model: XLSTM, seed: int) -> None:
    """Materializes (`to_empty`) and initializes `model`, sharded or not, one part at a time: each
    part is built in full on the CPU of a meta-device twin, initialized by XLSTM.init_weights under
    its own seed, and copied into the model's (possibly sharded) parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.device("meta"):
        twin = XLSTM(model.config)
    params = dict(model.named_parameters())
    for n, (prefix, part) in enumerate(model_parts(twin)):
        part.to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1009 + n)
            twin.init_weights()  # meta parts are untouched, and draw nothing
        for name, full in part.named_parameters(prefix=prefix):
            p = params.get(name)
            if p is None:  # the tied lm_head
                continue
            if isinstance(p, DTensor):
                p.copy_(distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(full)
        part.to_empty(device="meta")


def recompute_blocks(model: XLSTM) -> None:
    """Activation checkpointing per block, through PyTorch's composable API (module hooks, so the
    parameter names stay unchanged and fully_shard applies on top): each block keeps only its input
    and runs its forward again in the backward pass."""
    for block in model.backbone.blocks:
        recompute_in_backward(block)


def compile_blocks(model: XLSTM, backend="inductor") -> None:
    """torch.compile on each block (train.compile): one graph per block, in which each Triton mLSTM
    kernel (the forward and the backward custom op, with their fake implementations) is a single
    opaque node; Inductor fuses the norms, gates and elementwise work around them."""
    for block in model.backbone.blocks:
        block.compile(backend=backend)


def initialize(model: XLSTM, seed: int, init_from: str) -> None:
    """The weights of a materialized (possibly sharded) model: from a saved folder, else drawn from `seed`."""
    if init_from:
        load_weights(model, init_from)
    else:
        materialize(model, seed)


def build_model(config: ModelConfig, cfg: TrainConfig, d: Dist, seed: int, init_from: str = "") -> tuple[nn.Module, XLSTM, str]:
    """(the module to train, the plain XLSTM inside it, the parallelism used). Its weights are
    initialized from `seed`, or read from the saved model folder `init_from`."""
    parallel = resolve_parallel(cfg, d.world)
    with torch.device("meta"):
        model = XLSTM(config)
    if cfg.activation_checkpointing:
        recompute_blocks(model)
    if cfg.compile:
        compile_blocks(model)
    wrapped: nn.Module = model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

        if not dist.is_initialized():  # one process without torchrun (cpu_offload on one GPU): a group of one
            dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh(d.device.type, (d.world,))
        dtype = mixed_precision_dtype(cfg, d.device)
        kwargs = dict(
            mesh=mesh,
            mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
            offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
        )
        for block in model.backbone.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        register_fsdp_forward_method(model, "logits")  # the loss calls the head outside forward()
        model.to_empty(device="cpu" if cfg.cpu_offload else d.device)
        initialize(model, seed, init_from)
    else:
        model.to_empty(device=d.device)
        initialize(model, seed, init_from)
        if parallel == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return wrapped, model, parallel
