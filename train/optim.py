"""AdamW with weight decay on weight matrices only, and the learning-rate schedules.

The schedule is a pure function of the step, so resuming restores it from the step alone.

AdamW's implementation (train.optimizer_impl): 'fused' updates every parameter of a group in one
kernel (CUDA), 'foreach' in a few multi-tensor ops per group, 'loop' tensor by tensor (about 20
passes over the float32 parameters and moments per step, and ~10 launches per tensor). 'auto' takes
fused where the parameters live on a GPU and foreach elsewhere (CPU, or the host copies of
cpu_offload); all three compute the same update up to float rounding.
"""

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices (linear layers, lm_head); not biases, norm weights or the embedding (spec §7)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_impl(requested: str, device_types: set[str]) -> str:
    """The AdamW implementation `requested`, 'auto' resolved by the device types of the parameters."""
    if requested != "auto":
        return requested
    return "fused" if device_types == {"cuda"} else "foreach"


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW in the implementation cfg.optimizer_impl (`describe` names the one it runs)."""
    impl = optimizer_impl(cfg.optimizer_impl, {p.device.type for p in model.parameters()})
    flags = {"fused": True, "foreach": False} if impl == "fused" else {"fused": False, "foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **flags)


def describe(optimizer: torch.optim.Optimizer) -> str:
    """'AdamW (fused)', 'AdamW (foreach)' or 'AdamW (loop)': the implementation an optimizer runs."""
    d = optimizer.defaults
    return f"{type(optimizer).__name__} ({'fused' if d.get('fused') else 'foreach' if d.get('foreach') else 'loop'})"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    cooldown = cfg.cooldown_steps
    if cfg.schedule == "wsd" and cooldown == 0:
        cooldown = max(1, cfg.steps // 5)
    decay_end = max(cfg.warmup_steps, cfg.steps - cooldown)
    if cfg.schedule in ("exponential", "wsd") and step >= decay_end:
        start = peak if cfg.schedule == "wsd" else floor
        return start * (cfg.steps - step) / max(1, cfg.steps - decay_end)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_end - cfg.warmup_steps))
    if cfg.schedule == "exponential":
        return peak * cfg.min_lr_ratio**progress
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return peak  # 'constant', and 'wsd' before its decay
