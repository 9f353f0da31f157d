"""AdamW with weight decay on weight matrices only, and the learning-rate schedules.

The schedule is a pure function of the step, so resuming restores it from the step alone.
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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


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
