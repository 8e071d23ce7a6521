"""AdamW with decoupled weight decay on matrices only; warm-up then cosine decay.

Clipping lives with the strands (``parallel/clip.py``): the global norm sums over their groups."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..config import TrainConfig
from ..parallel.protocol import decay_groups


def plain_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Parameter groups of an unsplit model's parameters, by the same rule as a parallel model's
    ``param_groups``: weight decay on matrices, none on norms and biases."""
    return decay_groups([(p, p) for p in params], weight_decay)


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over parameter groups (a parallel model's ``param_groups``, or ``plain_groups``)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, cosine to ``min_lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
